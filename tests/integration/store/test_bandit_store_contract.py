"""The bandit's counts: the same contract for Redis, Redis Cluster and memory."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from stream_app.store.bandit import PULL, REWARD, BanditStore, RedisBanditStore
from stream_app.store.keys import Keys
from stream_app.triggers.bandit import ArmEvent, ArmStats


@pytest.fixture(params=["redis", "redis-cluster"])
def store(request: pytest.FixtureRequest, fresh_redis: aioredis.Redis) -> BanditStore:
    client = fresh_redis if request.param == "redis" else request.getfixturevalue("fresh_redis_cluster")
    return RedisBanditStore(client, Keys("bd"), dedup_window_seconds=3600)


def pull(tid: str, variant: str = "a", context: str = "all", type_: str = "stalled_step") -> ArmEvent:
    return ArmEvent(type_, context, variant, tid)


async def test_pulls_and_rewards_count_once_per_trigger(store: BanditStore) -> None:
    new = await store.add([pull("1"), pull("2"), pull("1"), pull("3", "b")], [pull("1")])
    assert new == [(PULL, pull("1")), (PULL, pull("2")), (PULL, pull("3", "b")), (REWARD, pull("1"))]
    assert await store.add([pull("1")], [pull("1")]) == []  # re-sent outbox, redelivered outcome
    assert await store.arms(["stalled_step"]) == {
        ("stalled_step", "all", "a"): ArmStats(2, 1),
        ("stalled_step", "all", "b"): ArmStats(1, 0),
    }


async def test_types_and_contexts_are_kept_apart(store: BanditStore) -> None:
    await store.add(
        [
            pull("1", context="cluster:1"),
            pull("2", context="cluster:2"),
            pull("3", type_="onboarding_abandoned"),
        ],
        [pull("2", context="cluster:2")],
    )
    assert await store.arms(["stalled_step"]) == {
        ("stalled_step", "cluster:1", "a"): ArmStats(1, 0),
        ("stalled_step", "cluster:2", "a"): ArmStats(1, 1),
    }
    assert await store.arms(["onboarding_abandoned"]) == {
        ("onboarding_abandoned", "all", "a"): ArmStats(1, 0)
    }
    assert await store.arms([]) == {}
