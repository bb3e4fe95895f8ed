"""One contract, two implementations: the in-memory twin must behave like Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from stream_app.profile import new_profile
from stream_app.store.keys import USER_KEY_KINDS, Keys
from stream_app.store.profiles import ProfileStore, RedisProfileStore, Write


@pytest.fixture(params=["redis", "redis-cluster"])
def store(request: pytest.FixtureRequest, fresh_redis: aioredis.Redis) -> ProfileStore:
    client = fresh_redis if request.param == "redis" else request.getfixturevalue("fresh_redis_cluster")
    return RedisProfileStore(client, Keys("t"), ttl_seconds=3600, dedup_window_seconds=3600)


async def test_unknown_profile_loads_as_version_zero(store: ProfileStore) -> None:
    loaded = await store.load({"nobody": ["m1"]})
    assert loaded["nobody"].doc is None
    assert loaded["nobody"].version == 0
    assert loaded["nobody"].seen == set()
    assert await store.get("nobody") is None
    assert await store.version("nobody") == 0


async def test_write_then_read_back_with_seen_ids(store: ProfileStore) -> None:
    doc = new_profile("u1")
    doc["event_count"] = 2
    assert await store.save([Write("u1", 0, doc, ["m1", "m2"])]) == set()
    loaded = await store.load({"u1": ["m1", "m3"]})
    assert loaded["u1"].version == 1
    assert loaded["u1"].doc == doc
    assert loaded["u1"].seen == {"m1"}
    assert sorted(await store.seen_ids("u1")) == ["m1", "m2"]
    assert await store.version("u1") == 1
    assert await store.save([Write("u1", 1, doc, ["m3"])]) == set()
    assert await store.version("u1") == 2


async def test_stale_write_is_refused_and_changes_nothing(store: ProfileStore) -> None:
    first = new_profile("u2")
    assert await store.save([Write("u2", 0, first, ["a"])]) == set()
    stale = new_profile("u2")
    stale["event_count"] = 99
    assert await store.save([Write("u2", 0, stale, ["b"])]) == {"u2"}
    loaded = await store.load({"u2": ["a", "b"]})
    assert loaded["u2"].doc == first
    assert loaded["u2"].seen == {"a"}


async def test_batch_of_writes_reports_only_the_conflicting_ids(store: ProfileStore) -> None:
    await store.save([Write("x", 0, new_profile("x"))])
    conflicts = await store.save([Write("x", 0, new_profile("x")), Write("y", 0, new_profile("y"))])
    assert conflicts == {"x"}
    assert (await store.load({"y": []}))["y"].version == 1


async def test_erase_removes_every_key_of_the_user(store: ProfileStore) -> None:
    await store.save([Write("gone", 0, new_profile("gone"), ["m"]), Write("kept", 0, new_profile("kept"))])
    assert await store.erase(["gone"]) >= 2
    assert await store.get("gone") is None
    assert (await store.load({"gone": ["m"]}))["gone"].seen == set()
    assert await store.get("kept") is not None
    if isinstance(store, RedisProfileStore):
        keys = Keys("t")
        for kind in USER_KEY_KINDS:
            assert not await store.client.exists(keys.user_key(kind, "gone"))


async def test_documents_lists_every_stored_profile(store: ProfileStore) -> None:
    for i in range(7):
        await store.save([Write(f"d{i}", 0, {"user_id": f"d{i}"}, [f"m{i}"])])
    seen = sorted([doc["user_id"] async for doc in store.documents(batch=3)])
    assert seen == [f"d{i}" for i in range(7)]


async def test_a_node_that_lost_its_scripts_refuses_nothing(store: ProfileStore) -> None:
    """A restarted or newly added node has no scripts: only the calls it refused (NOSCRIPT)
    run again, so on a Cluster the writes other nodes applied are not reported as refused."""
    if not isinstance(store, RedisProfileStore):
        pytest.skip("no script cache in memory")
    users = [f"n{i}" for i in range(12)]
    assert await store.save([Write(u, 0, new_profile(u), [f"{u}-a"]) for u in users]) == set()
    client = store.client
    if isinstance(client, aioredis.RedisCluster):
        node = client.get_node_from_key(Keys("t").profile(users[0]))
        others = {client.get_node_from_key(Keys("t").profile(u)).name for u in users}
        assert len(others) > 1, "the users should span several nodes"
        await client.execute_command("SCRIPT FLUSH", target_nodes=node)
    else:
        await client.script_flush()
    assert await store.save([Write(u, 1, new_profile(u), [f"{u}-b"]) for u in users]) == set()
    loaded = await store.load({u: [f"{u}-a", f"{u}-b"] for u in users})
    assert all(e.version == 2 and e.seen == {f"{u}-a", f"{u}-b"} for u, e in loaded.items())


async def test_published_marks_are_loaded_survive_writes_and_never_create_a_profile(
    store: ProfileStore,
) -> None:
    await store.save([Write("pub", 0, new_profile("pub"))])
    assert (await store.load({"pub": []}))["pub"].published is None
    await store.mark_published({"pub": "t-1,t-2", "never-written": "t-3"})
    assert (await store.load({"pub": []}))["pub"].published == "t-1,t-2"
    assert await store.save([Write("pub", 1, new_profile("pub"))]) == set()  # a later write keeps it
    assert (await store.load({"pub": []}))["pub"].published == "t-1,t-2"
    assert await store.get("never-written") is None
    assert (await store.load({"never-written": []}))["never-written"].published is None
    await store.erase(["pub"])
    assert (await store.load({"pub": []}))["pub"].published is None
