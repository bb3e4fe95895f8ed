"""Step statistics: the same contract for Redis and memory; Welford equals the textbook formulas."""

from __future__ import annotations

import statistics
from typing import Any

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
    return RedisStepStatsStore(client, Keys("st"))


def done(
    step: str, seconds: float, offset: int, partition: int = 0, flow: str = "signup", **kw: Any
) -> StepDuration:
    """A duration as the pipeline makes it: from the record at (partition, offset)."""
    return StepDuration(flow, step, seconds, f"m{partition}-{offset}", source=(partition, offset), **kw)


async def test_mean_and_variance(store: StepStatsStore) -> None:
    values = [10.0, 20.0, 30.0, 44.5]
    added = await store.add([done("profile", v, i) for i, v in enumerate(values)])
    assert added == 4
    stats = await store.get("signup", "profile")
    assert stats is not None and stats.count == 4
    assert stats.mean_s == pytest.approx(statistics.mean(values))
    assert stats.variance_s2 == pytest.approx(statistics.variance(values))
    assert await store.get("signup", "other") is None


async def test_the_same_completion_counts_once(store: StepStatsStore) -> None:
    d = done("email", 12.0, 7)
    assert await store.add([d, d]) == 1
    assert await store.add([d]) == 0  # redelivered, or replayed after a crash
    stats = await store.get("signup", "email")
    assert stats is not None and stats.count == 1 and stats.mean_s == 12.0


async def test_each_partition_is_ordered_on_its_own_and_a_batch_comes_in_any_order(
    store: StepStatsStore,
) -> None:
    """Partition 1's marks do not hide partition 0's lower offsets; a batch's durations come
    per user, not in offset order, and still count once each."""
    assert await store.add([done("email", 1.0, 50, partition=1), done("email", 2.0, 3, partition=0)]) == 2
    assert await store.add([done("email", 3.0, 9, partition=0), done("email", 4.0, 4, partition=0)]) == 2
    # a zombie and its successor apply overlapping ranges: only what is above the mark counts
    overlap = [done("email", 5.0, o, partition=0) for o in (4, 9, 12)] + [done("email", 6.0, 51, partition=1)]
    assert await store.add(overlap) == 2
    assert await store.add(overlap) == 0
    stats = await store.get("signup", "email")
    assert stats is not None and stats.count == 6
    assert stats.mean_s == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 6)


async def test_a_group_keeps_its_own_marks(store: StepStatsStore) -> None:
    await store.add([done("email", 10.0, 5)])
    assert await store.add([done("email", 10.0, 5, group="cluster:c1")]) == 1  # the cluster's row


async def test_a_duration_without_its_records_position_is_refused(store: StepStatsStore) -> None:
    with pytest.raises(ValueError, match="position"):
        await store.add([StepDuration("signup", "email", 1.0, "m1")])


async def test_all_lists_every_step(store: StepStatsStore) -> None:
    await store.add([done("x", 1.0, 1, flow="a"), done("y", 2.0, 2, flow="b")])
    assert [(s.flow, s.step) for s in await store.all()] == [("a", "x"), ("b", "y")]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 10_000, allow_nan=False), min_size=2, max_size=40))
async def test_welford_matches_statistics_module(values: list[float]) -> None:
    mem = InMemoryStepStatsStore()
    await mem.add([done("s", v, i, flow="f") for i, v in enumerate(values)])
    stats = await mem.get("f", "s")
    assert stats is not None
    assert stats.mean_s == pytest.approx(statistics.mean(values), rel=1e-9, abs=1e-9)
    assert stats.variance_s2 == pytest.approx(statistics.variance(values), rel=1e-6, abs=1e-6)


async def test_names_with_separators_are_different_steps(store: StepStatsStore) -> None:
    """("a|b", "c") and ("a", "b|c") were one key and one index row: statistics were mixed."""
    await store.add([done("c", 10.0, 1, flow="a|b"), done("b|c", 30.0, 2, flow="a")])
    await store.add([done("b|c", 50.0, 3, flow="a", group="cluster:c|1")])
    first, second = await store.get("a|b", "c"), await store.get("a", "b|c")
    assert first is not None and first.count == 1 and first.mean_s == 10.0
    assert second is not None and second.count == 1 and second.mean_s == 30.0
    rows = {(s.flow, s.step, s.group): s.mean_s for s in await store.all()}
    assert rows == {("a|b", "c", ""): 10.0, ("a", "b|c", ""): 30.0, ("a", "b|c", "cluster:c|1"): 50.0}


async def test_the_dedup_memory_is_a_mark_per_partition(fresh_redis: aioredis.Redis) -> None:
    """Redis only: no entry per completion (a set of messageId digests cost ~0.5 KB per active
    user), one offset per partition in the step's hash."""
    keys = Keys("mark")
    store = RedisStepStatsStore(fresh_redis, keys)
    assert await store.add([done("email", 12.0, o, partition=o % 3) for o in range(30)]) == 30
    assert await fresh_redis.exists(keys.step_stats_applied("signup", "email", "")) == 0
    fields = await fresh_redis.hgetall(keys.step_stats("signup", "email", ""))
    assert {k.decode() for k in fields} == {"n", "mean", "m2", "o0", "o1", "o2"}
    assert fields[b"o2"] == b"29"
    big = 2**50 + 3  # an offset Lua's number formatting would mangle
    assert await store.add([done("email", 1.0, big)]) == 1
    assert await fresh_redis.hget(keys.step_stats("signup", "email", ""), "o0") == str(big).encode()
