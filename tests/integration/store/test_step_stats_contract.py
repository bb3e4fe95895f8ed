"""Step statistics: the same contract for Redis and memory; Welford equals the textbook formulas."""

from __future__ import annotations

import statistics

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.profile import StepDuration
from stream_app.store.keys import Keys
from stream_app.store.step_stats import InMemoryStepStatsStore, RedisStepStatsStore, StepStatsStore


@pytest.fixture(params=["redis", "redis-cluster"])
def store(request: pytest.FixtureRequest, fresh_redis: aioredis.Redis) -> StepStatsStore:
    client = fresh_redis if request.param == "redis" else request.getfixturevalue("fresh_redis_cluster")
    return RedisStepStatsStore(client, Keys("st"), dedup_window_seconds=3600)


async def test_mean_and_variance(store: StepStatsStore) -> None:
    values = [10.0, 20.0, 30.0, 44.5]
    added = await store.add([StepDuration("signup", "profile", v, f"m{i}") for i, v in enumerate(values)])
    assert added == 4
    stats = await store.get("signup", "profile")
    assert stats is not None and stats.count == 4
    assert stats.mean_s == pytest.approx(statistics.mean(values))
    assert stats.variance_s2 == pytest.approx(statistics.variance(values))
    assert await store.get("signup", "other") is None


async def test_the_same_completion_counts_once(store: StepStatsStore) -> None:
    d = StepDuration("signup", "email", 12.0, "m1")
    assert await store.add([d, d]) == 1
    assert await store.add([d]) == 0  # redelivered, or replayed after a crash
    stats = await store.get("signup", "email")
    assert stats is not None and stats.count == 1 and stats.mean_s == 12.0


async def test_all_lists_every_step(store: StepStatsStore) -> None:
    await store.add([StepDuration("a", "x", 1.0, "1"), StepDuration("b", "y", 2.0, "2")])
    assert [(s.flow, s.step) for s in await store.all()] == [("a", "x"), ("b", "y")]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 10_000, allow_nan=False), min_size=2, max_size=40))
async def test_welford_matches_statistics_module(values: list[float]) -> None:
    mem = InMemoryStepStatsStore()
    await mem.add([StepDuration("f", "s", v, str(i)) for i, v in enumerate(values)])
    stats = await mem.get("f", "s")
    assert stats is not None
    assert stats.mean_s == pytest.approx(statistics.mean(values), rel=1e-9, abs=1e-9)
    assert stats.variance_s2 == pytest.approx(statistics.variance(values), rel=1e-6, abs=1e-6)


async def test_names_with_separators_are_different_steps(store: StepStatsStore) -> None:
    """("a|b", "c") and ("a", "b|c") were one key and one index row: statistics were mixed."""
    await store.add([StepDuration("a|b", "c", 10.0, "m1"), StepDuration("a", "b|c", 30.0, "m2")])
    await store.add([StepDuration("a", "b|c", 50.0, "m3", "cluster:c|1")])
    first, second = await store.get("a|b", "c"), await store.get("a", "b|c")
    assert first is not None and first.count == 1 and first.mean_s == 10.0
    assert second is not None and second.count == 1 and second.mean_s == 30.0
    rows = {(s.flow, s.step, s.group): s.mean_s for s in await store.all()}
    assert rows == {("a|b", "c", ""): 10.0, ("a", "b|c", ""): 30.0, ("a", "b|c", "cluster:c|1"): 50.0}


async def test_the_dedup_memory_of_a_step_expires_a_window_after_its_last_completion(
    fresh_redis: aioredis.Redis,
) -> None:
    """Redis only: the digests guard against folding a redelivered completion twice; a step
    nobody completes for a dedup window keeps its statistics and drops them."""
    keys = Keys("ttl")
    store = RedisStepStatsStore(fresh_redis, keys, dedup_window_seconds=600)
    await store.add([StepDuration("signup", "email", 12.0, "m1")])
    assert 0 < await fresh_redis.pttl(keys.step_stats_applied("signup", "email", "")) <= 600_000
    assert await fresh_redis.ttl(keys.step_stats("signup", "email", "")) == -1  # the statistics stay
