"""One contract, two implementations: the in-memory twin must behave like Redis."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from stream_app.outbox import segment_change, store_outbox, stored_outbox
from stream_app.profile import new_profile
from stream_app.store.docpack import decode_doc
from stream_app.store.keys import USER_KEY_KINDS, Keys
from stream_app.store.profiles import (
    DEDUP_HEADER,
    DIGEST_BYTES,
    DIGEST_ENTRY,
    InMemoryProfileStore,
    ProfileStore,
    RedisProfileStore,
    Write,
    digest,
)


@pytest.fixture(params=["redis", "redis-cluster", "memory"])
def store(request: pytest.FixtureRequest, fresh_redis: aioredis.Redis) -> ProfileStore:
    if request.param == "memory":
        return InMemoryProfileStore()
    client = fresh_redis if request.param == "redis" else request.getfixturevalue("fresh_redis_cluster")
    return RedisProfileStore(client, Keys("t"), ttl_seconds=3600, dedup_window_seconds=3600)


async def test_unknown_profile_loads_as_version_zero(store: ProfileStore) -> None:
    loaded = await store.load({"nobody": ["m1"]})
    assert loaded["nobody"].doc is None
    assert loaded["nobody"].version == 0
    assert loaded["nobody"].seen == set()
    assert await store.get("nobody") is None
    assert await store.version("nobody") == 0


async def test_a_copy_at_the_stored_version_is_confirmed_without_the_document(store: ProfileStore) -> None:
    doc = new_profile("u1")
    assert await store.save([Write("u1", 0, doc, ["m1"])]) == set()
    mine = await store.load({"u1": ["m1", "m2"], "nobody": []}, known={"u1": 1, "nobody": 1})
    assert mine["u1"].current and mine["u1"].doc is None and mine["u1"].version == 1
    assert mine["u1"].seen == {"m1"}  # the dedup answer comes all the same
    assert not mine["nobody"].current and mine["nobody"].doc is None and mine["nobody"].version == 0
    assert await store.save([Write("u1", 1, doc, ["m2"])]) == set()  # written elsewhere meanwhile
    stale = await store.load({"u1": []}, known={"u1": 1})
    assert not stale["u1"].current and stale["u1"].doc == doc and stale["u1"].version == 2
    assert (await store.load({"u1": []}))["u1"].doc == doc  # without known, as before


async def test_write_then_read_back_with_seen_ids(store: ProfileStore) -> None:
    doc = new_profile("u1")
    doc["event_count"] = 2
    assert await store.save([Write("u1", 0, doc, ["m1", "m2"])]) == set()
    loaded = await store.load({"u1": ["m1", "m3"]})
    assert loaded["u1"].version == 1
    assert loaded["u1"].doc == doc
    assert loaded["u1"].seen == {"m1"}
    # what seen_ids hands out (opaque entries) makes those ids seen in another profile (a merge)
    copied = await store.seen_ids("u1")
    assert len(copied) == 2
    assert await store.save([Write("u9", 0, new_profile("u9"), copied, require_unseen=False)]) == set()
    assert (await store.load({"u9": ["m1", "m2", "m3"]}))["u9"].seen == {"m1", "m2"}
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


async def test_recording_a_publication_never_creates_a_profile(store: ProfileStore) -> None:
    await store.save([Write("pub", 0, with_outbox("pub", "t-1", "t-2"))])
    await store.mark_published({"pub": "t-1,t-2", "never-written": "t-3"})
    assert stored_outbox((await store.load({"pub": []}))["pub"].doc) in (
        [],
        stored_outbox(with_outbox("pub", "t-1", "t-2")),
    )
    assert await store.get("never-written") is None
    assert (await store.load({"never-written": []}))["never-written"].doc is None
    await store.erase(["pub"])
    assert await store.get("pub") is None
    await store.mark_published({"pub": "t-1,t-2"})
    assert await store.get("pub") is None


@pytest.fixture(params=["redis", "redis-cluster"])
def client(request: pytest.FixtureRequest, fresh_redis: aioredis.Redis) -> aioredis.Redis:
    return fresh_redis if request.param == "redis" else request.getfixturevalue("fresh_redis_cluster")


async def test_redis_keeps_digests_reads_sets_of_full_ids_and_compresses_documents(
    client: aioredis.Redis,
) -> None:
    """Redis only: what the store writes is compact, and what it wrote before still counts."""
    keys = Keys("t")
    store = RedisProfileStore(client, keys, ttl_seconds=3600, dedup_window_seconds=3600)
    doc = new_profile("big")
    doc["features"] = {f"feature-{i}": i for i in range(60)}  # a few KB of JSON
    await store.save([Write("big", 0, doc, ["m1"])])
    stored = await client.hget(keys.profile("big"), "d")
    assert stored is not None and stored[:1] != b"{" and len(stored) < len(orjson.dumps(doc)) / 3
    assert await store.get("big") == doc and (await store.load({"big": []}))["big"].doc == doc
    assert (await client.get(keys.dedup("big")) or b"")[DEDUP_HEADER:] == digest("m1")
    # an id applied before the upgrade: in the set of full ids, still a duplicate
    await client.zadd(keys.seen("big"), {"old-1": 1_000})
    assert (await store.load({"big": ["old-1", "m1", "new"]}))["big"].seen == {"old-1", "m1"}
    assert await store.save([Write("big", 1, doc, ["old-1"])]) == {"big"}  # refused: applied before
    assert sorted(await store.seen_ids("big")) == sorted(
        [DIGEST_ENTRY + digest("m1").hex(), DIGEST_ENTRY + digest("old-1").hex()]
    )
    # a plain JSON document (written before compression) reads as before
    await client.hset(keys.profile("old"), mapping={"v": 1, "d": orjson.dumps(new_profile("old"))})
    assert await store.get("old") == new_profile("old")


async def test_an_idle_user_keeps_the_document_and_drops_the_dedup_memory(client: aioredis.Redis) -> None:
    """Redis only: the digests live a dedup window after the user's last write, the
    document the profile TTL: an idle user costs its document alone."""
    keys = Keys("idle")
    store = RedisProfileStore(client, keys, ttl_seconds=86_400, dedup_window_seconds=600)
    await store.save([Write("u1", 0, new_profile("u1"), ["m1"])])
    assert 0 < await client.ttl(keys.dedup("u1")) <= 600
    assert 600 < await client.ttl(keys.profile("u1")) <= 86_400


async def test_ids_are_remembered_a_window_at_least_and_two_at_most(client: aioredis.Redis) -> None:
    """Redis only: the dedup memory keeps two generations; a write a window after the current
    one began drops the older one, so an active user's memory does not grow without end."""
    keys = Keys("gen")
    now = [1_800_000_000.0]
    store = RedisProfileStore(
        client, keys, ttl_seconds=86_400, dedup_window_seconds=600, clock=lambda: now[0]
    )
    version = 0

    async def write(message_id: str, at: float) -> set[str]:
        nonlocal version
        now[0] = 1_800_000_000.0 + at
        assert await store.save([Write("u", version, new_profile("u"), [message_id])]) == set()
        version += 1
        return (await store.load({"u": ["m0", "m1", "m2", "m3", "m4"]}))["u"].seen

    assert await write("m0", 0) == {"m0"}
    assert await write("m1", 599) == {"m0", "m1"}  # the same generation
    assert await write("m2", 601) == {"m0", "m1", "m2"}  # m0, m1 now the older generation
    assert await write("m3", 1201) == {"m2", "m3"}  # m0 and m1 were written over a window ago
    assert await write("m4", 1201 + 1200) == {"m4"}  # two windows since: all of it went
    assert len(await client.get(keys.dedup("u")) or b"") == DEDUP_HEADER + DIGEST_BYTES
    assert 0 < await client.ttl(keys.dedup("u")) <= 600


async def test_digests_kept_in_a_sorted_set_count_and_move_to_the_string(client: aioredis.Redis) -> None:
    """Redis only: the layout before 2026-12-02 (a sorted set of digests) is still read, and
    the user's next write moves it into the packed string."""
    keys = Keys("mv")
    store = RedisProfileStore(client, keys, ttl_seconds=3600, dedup_window_seconds=3600)
    await store.save([Write("u", 0, new_profile("u"))])
    await client.zadd(keys.seen_digests("u"), {digest8("old-1"): 1_000, digest8("old-2"): 1_000})
    assert (await store.load({"u": ["old-1", "new"]}))["u"].seen == {"old-1"}
    assert await store.save([Write("u", 1, new_profile("u"), ["old-2"])]) == {"u"}  # applied before
    assert await store.save([Write("u", 1, new_profile("u"), ["new"])]) == set()
    assert await client.exists(keys.seen_digests("u")) == 0
    assert (await store.load({"u": ["old-1", "old-2", "new", "other"]}))["u"].seen == {
        "old-1",
        "old-2",
        "new",
    }
    assert len(await store.seen_ids("u")) == 3


def digest8(message_id: str) -> bytes:
    """A messageId's digest as written before 2026-12-02 (later): 8 bytes."""
    return hashlib.blake2b(message_id.encode(), digest_size=8).digest()


async def test_a_string_of_8_byte_digests_counts_and_is_stored_shorter_at_the_next_write(
    client: aioredis.Redis,
) -> None:
    """Redis only: the dedup string as written before 2026-12-02 (later; no width byte, 8-byte
    entries, two generations) is still read, and the next write stores it in 6-byte entries."""
    keys = Keys("w8")
    now = 1_800_000_000
    store = RedisProfileStore(client, keys, ttl_seconds=3600, dedup_window_seconds=600, clock=lambda: now)
    await store.save([Write("u", 0, new_profile("u"))])
    older, current = [digest8("o1"), digest8("o2")], [digest8(f"c{i}") for i in range(12)]
    header = struct.pack(">II", now - 700, 16)  # the current generation began 700 s ago
    await client.set(keys.dedup("u"), header + b"".join(older + current), ex=600)
    every = ["o1", "o2", *(f"c{i}" for i in range(12))]
    assert (await store.load({"u": [*every, "new"]}))["u"].seen == set(every)  # a table (>8 ids)
    assert (await store.load({"u": ["c11", "new"]}))["u"].seen == {"c11"}  # a scan
    assert await store.save([Write("u", 1, new_profile("u"), ["c3"])]) == {"u"}  # applied before
    assert len(set(await store.seen_ids("u"))) == 14
    assert await store.save([Write("u", 1, new_profile("u"), ["new"])]) == set()
    # a window after the current generation began: the older one (o1, o2) went
    packed = await client.get(keys.dedup("u")) or b""
    assert packed[:1] == bytes([DIGEST_BYTES]) and len(packed) == DEDUP_HEADER + 13 * DIGEST_BYTES
    remembered = (await store.load({"u": [*every, "new"]}))["u"].seen
    assert remembered == {*every[2:], "new"}
    assert sorted(await store.seen_ids("u")) == sorted(
        DIGEST_ENTRY + digest(m).hex() for m in [*every[2:], "new"]
    )


async def test_many_ids_at_once_are_checked_like_one(store: ProfileStore) -> None:
    """A batch with many of one user's ids (the lookup builds a table past 8) finds the same."""
    ids = [f"m{i}" for i in range(40)]
    assert await store.save([Write("u", 0, new_profile("u"), ids[:20])]) == set()
    assert (await store.load({"u": ids}))["u"].seen == set(ids[:20])
    assert (await store.load({"u": ids[15:18]}))["u"].seen == set(ids[15:18])
    assert await store.save([Write("u", 1, new_profile("u"), ids[19:30])]) == {"u"}  # m19 applied
    assert await store.save([Write("u", 1, new_profile("u"), ids[20:30])]) == set()


async def test_a_write_can_drop_the_dedup_memory(store: ProfileStore) -> None:
    """A linked id's final tombstone: its events go to the user, whose memory has copies."""
    await store.save([Write("anon", 0, new_profile("anon"), ["m1", "m2"])])
    assert await store.save([Write("anon", 1, {"merged_into": "u1"}, forget_seen=True)]) == set()
    loaded = (await store.load({"anon": ["m1", "m2"]}))["anon"]
    assert loaded.seen == set() and loaded.doc == {"merged_into": "u1"} and await store.seen_ids("anon") == []


async def test_compression_can_be_switched_off_and_either_form_reads(fresh_redis: aioredis.Redis) -> None:
    doc = new_profile("u1")
    doc["features"] = {f"feature-{i}": i for i in range(40)}
    plain = RedisProfileStore(fresh_redis, Keys("c"), 3600, 3600, compress=False)
    packed = RedisProfileStore(fresh_redis, Keys("c"), 3600, 3600)
    await plain.save([Write("u1", 0, doc)])
    assert (await fresh_redis.hget(Keys("c").profile("u1"), "d"))[:1] == b"{"
    assert await packed.get("u1") == doc
    await packed.save([Write("u1", 1, doc)])
    assert (await fresh_redis.hget(Keys("c").profile("u1"), "d"))[:1] != b"{"
    assert await plain.get("u1") == doc


async def test_on_the_redis_we_run_a_profile_and_its_dedup_set_stay_compact(private_redis_url: str) -> None:
    """The embedded Redis (and docker-compose) is configured for the engine's data: a profile
    hash keeps its deflated document in a listpack; 300 ids' dedup memory is 8 bytes each."""
    client = aioredis.Redis.from_url(private_redis_url)
    await client.flushdb()
    keys = Keys("compact")
    store = RedisProfileStore(client, keys, ttl_seconds=3600, dedup_window_seconds=3600)
    doc = new_profile("u1")
    doc["features"] = {f"feature-{i}": i for i in range(60)}
    await store.save([Write("u1", 0, doc, [f"m{i}" for i in range(300)])])
    assert len(await client.hget(keys.profile("u1"), "d") or b"") > 64  # past Redis' default
    assert await client.object("encoding", keys.profile("u1")) in (b"listpack", b"ziplist")
    assert len(await client.get(keys.dedup("u1")) or b"") == DEDUP_HEADER + 300 * DIGEST_BYTES
    await client.aclose()


def with_outbox(user: str, *ids: str) -> dict[str, Any]:
    doc = new_profile(user)
    doc["engine"] = {"segments": [], "outbox": []}
    store_outbox(doc, [segment_change({"change_id": i, "user_id": user, "segment": "s"}) for i in ids])
    return doc


async def test_an_outbox_is_stored_until_it_is_published(store: ProfileStore) -> None:
    """A write's outbox loads with the profile until its publication is recorded; then the
    profile loads with an empty one (Redis drops it), also after later writes of it."""
    doc = with_outbox("ob", "c-1")
    assert await store.save([Write("ob", 0, doc)]) == set()
    assert (await store.load({"ob": []}))["ob"].doc == doc and await store.get("ob") == doc
    await store.mark_published({"ob": "c-1"})
    assert stored_outbox((await store.load({"ob": []}))["ob"].doc) in ([], stored_outbox(doc))
    store.known_published = {"c-1"}.__contains__  # what the processor remembers publishing
    assert await store.save([Write("ob", 1, doc)]) == set()  # a write that kept the published outbox
    assert stored_outbox((await store.load({"ob": []}))["ob"].doc) in ([], stored_outbox(doc))
    newer = with_outbox("ob", "c-1", "c-2")  # carried and extended: another key, not published
    assert await store.save([Write("ob", 2, newer)]) == set()
    await store.mark_published({"ob": "c-1"})  # a late record of the older one changes nothing
    assert (await store.load({"ob": []}))["ob"].doc == newer


async def test_redis_keeps_a_published_outbox_nowhere(client: aioredis.Redis) -> None:
    """Redis only: the outbox is a field of its own while unpublished, then gone; a document
    written before that (its outbox inside, a published mark beside it) reads as before."""
    keys = Keys("ob")
    store = RedisProfileStore(client, keys, ttl_seconds=3600, dedup_window_seconds=3600)
    doc = with_outbox("u", "c-1")
    await store.save([Write("u", 0, doc)])
    assert await client.hexists(keys.profile("u"), "o")
    assert b"c-1" not in zlib_free(await client.hget(keys.profile("u"), "d"))
    await store.mark_published({"u": "c-1"})
    assert not await client.hexists(keys.profile("u"), "o")
    assert stored_outbox(await store.get("u")) == []
    store.known_published = {"c-1", "c-9"}.__contains__  # what the processor remembers publishing
    await store.save([Write("u", 1, doc)])  # the published outbox written again: not stored again
    assert not await client.hexists(keys.profile("u"), "o")
    # the layout before: the outbox inside the document, its publication in `p`
    old = with_outbox("old", "c-9")
    await client.hset(keys.profile("old"), mapping={"v": 1, "d": orjson.dumps(old), "p": "c-9"})
    loaded = (await store.load({"old": []}))["old"]
    assert loaded.doc == old and loaded.published == "c-9"  # the processor learns it from `p`
    await store.save([Write("old", 1, old)])  # its next write: published, so kept nowhere
    assert await client.hmget(keys.profile("old"), ["o", "p"]) == [None, None]
    assert stored_outbox(await store.get("old")) == []


def zlib_free(raw: bytes | None) -> bytes:
    """The stored document's JSON, inflated if it was deflated."""
    return orjson.dumps(decode_doc(raw or b"{}"))
