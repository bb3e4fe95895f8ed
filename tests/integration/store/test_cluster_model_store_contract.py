"""The shared cluster model store: one contract for Redis and memory."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from stream_app.segments.cluster_model import Snapshot
from stream_app.store.keys import Keys
from stream_app.store.models import ClusterModelStore, InMemoryClusterModelStore, RedisClusterModelStore


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def store(request: pytest.FixtureRequest, fresh_redis: aioredis.Redis) -> ClusterModelStore:
    if request.param == "memory":
        return InMemoryClusterModelStore()
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


async def test_samples_are_capped_and_taken_once(store: ClusterModelStore) -> None:
    await store.add_samples([[float(i)] * 8 for i in range(10)], cap=6)
    assert await store.queued() == 6
    first, second = await asyncio.gather(store.take_samples(4), store.take_samples(4))
    assert sorted(v[0] for v in first + second) == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]  # newest kept, none twice
    assert await store.take_samples(4) == []


async def test_the_lease_is_exclusive_reentrant_and_expires(store: ClusterModelStore) -> None:
    assert await store.acquire_lease("w1", ttl_ms=300)
    assert await store.acquire_lease("w1", ttl_ms=300)  # the holder renews
    assert not await store.acquire_lease("w2", ttl_ms=300)
    await asyncio.sleep(0.4)
    assert await store.acquire_lease("w2", ttl_ms=300)  # the holder died: another takes over
