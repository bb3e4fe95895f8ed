"""The shared cluster model store: one contract for Redis and memory."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from stream_app.segments.assign import Snapshot
from stream_app.store.keys import Keys
from stream_app.store.models import ClusterModelStore, RedisClusterModelStore


@pytest.fixture(params=["redis", "redis-cluster"])
def store(request: pytest.FixtureRequest, fresh_redis: aioredis.Redis) -> ClusterModelStore:
    client = fresh_redis if request.param == "redis" else request.getfixturevalue("fresh_redis_cluster")
    return RedisClusterModelStore(client, Keys("cm"))


def snap(version: int) -> Snapshot:
    return Snapshot(version, 1000 + version, [0.0] * 8, [1.0] * 8, {"c1": [0.0] * 8}, {"c1": "steady"}, 10)


async def test_publish_only_accepts_the_next_version(store: ClusterModelStore) -> None:
    assert await store.latest() is None and await store.version() == 0
    assert not await store.publish(snap(2))
    assert await store.publish(snap(1))
    assert not await store.publish(snap(1))  # a second trainer with the same base loses
    assert await store.publish(snap(2))
    assert await store.version() == 2 and await store.latest() == snap(2)
    assert [s.version for s in await store.history()] == [2, 1]


async def test_the_sample_set_keeps_one_latest_vector_per_user(store: ClusterModelStore) -> None:
    await store.put_samples({f"u{i}": [float(i)] * 8 for i in range(5)}, cap=100)
    await store.put_samples({"u1": [10.0] * 8, "u5": [5.0] * 8}, cap=100)  # u1 moved on; u5 is new
    assert await store.sample_count() == 6
    drawn = await store.sample(100)
    assert sorted(v[0] for v in drawn) == [0.0, 2.0, 3.0, 4.0, 5.0, 10.0]
    assert all(len(v) == 8 for v in drawn)
    # a draw is random and without repeats
    smaller = await store.sample(4)
    assert len(smaller) == 4 and len({v[0] for v in smaller}) == 4
    assert {v[0] for v in smaller} <= {v[0] for v in drawn}


async def test_the_sample_set_is_capped_and_forgets_erased_users(store: ClusterModelStore) -> None:
    await store.put_samples({f"u{i}": [float(i)] * 8 for i in range(10)}, cap=6)
    assert await store.sample_count() == 6
    kept = {int(v[0]) for v in await store.sample(100)}
    assert len(kept) == 6 and kept <= set(range(10))
    await store.remove_samples([f"u{i}" for i in kept] + ["never-seen"])
    assert await store.sample_count() == 0 and await store.sample(10) == []
    await store.remove_samples([])


async def test_the_lease_is_exclusive_reentrant_and_expires(store: ClusterModelStore) -> None:
    assert await store.acquire_lease("w1", ttl_ms=300)
    assert await store.acquire_lease("w1", ttl_ms=300)  # the holder renews
    assert not await store.acquire_lease("w2", ttl_ms=300)
    await asyncio.sleep(0.4)
    assert await store.acquire_lease("w2", ttl_ms=300)  # the holder died: another takes over
