"""The epoch guard tells a fresh start from a Redis that lost its data."""

from __future__ import annotations

import pytest

from stream_app.errors import RedisDataLost
from stream_app.store.epochs import InMemoryEpochStore
from stream_app.worker.epochs import EpochGuard


async def test_a_fresh_group_marks_its_partitions() -> None:
    store = InMemoryEpochStore()
    guard = EpochGuard(store, "events", committed=lambda p: None)
    await guard.check([0, 1])
    assert set(store.marked) == {0, 1}


async def test_committed_offsets_without_markers_mean_redis_lost_its_data() -> None:
    store = InMemoryEpochStore()
    store.marked[0] = 1
    guard = EpochGuard(store, "events", committed=lambda p: 500)
    with pytest.raises(RedisDataLost) as err:
        await guard.check([0, 1])
    assert err.value.partitions == [1] and "ACCEPT_REDIS_STATE" in str(err.value)
    assert 1 not in store.marked  # nothing written: the next start finds the same


async def test_markers_vanishing_under_a_running_worker_are_caught_on_the_next_check() -> None:
    store = InMemoryEpochStore()
    now = [0.0]
    guard = EpochGuard(store, "events", committed=lambda p: None, clock=lambda: now[0])
    await guard.check([3])
    store.marked.clear()  # Redis restarted empty
    await guard.check([3])  # within recheck_seconds: not asked again
    now[0] += 1.5
    with pytest.raises(RedisDataLost):
        await guard.check([3])  # known here, so gone means lost, committed or not


async def test_accepting_the_redis_state_writes_the_missing_markers() -> None:
    store = InMemoryEpochStore()
    guard = EpochGuard(store, "events", committed=lambda p: 10, accept=True)
    await guard.check([2])
    assert 2 in store.marked
