"""The deadline index and watermarks: one contract for Redis and memory."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from stream_app.store.deadlines import DeadlineStore, RedisDeadlineStore, SweepState
from stream_app.store.keys import Keys


@pytest.fixture(params=["redis", "redis-cluster"])
def store(request: pytest.FixtureRequest, fresh_redis: aioredis.Redis) -> DeadlineStore:
    client = fresh_redis if request.param == "redis" else request.getfixturevalue("fresh_redis_cluster")
    return RedisDeadlineStore(client, Keys("dl"), "onboarding.events")


async def test_due_returns_the_earliest_first_per_partition(store: DeadlineStore) -> None:
    await store.schedule(0, {"a": 300, "b": 100, "c": 900})
    await store.schedule(1, {"z": 50})
    assert await store.due(0, 300, 10) == [("b", 100), ("a", 300)]
    assert await store.due(0, 300, 1) == [("b", 100)]
    assert await store.due(1, 10, 10) == []
    assert await store.pending(0) == 3


async def test_schedule_moves_and_removes(store: DeadlineStore) -> None:
    await store.schedule(0, {"a": 100})
    await store.schedule(0, {"a": 500, "b": None})
    assert await store.due(0, 1000, 10) == [("a", 500)]
    await store.schedule(0, {"a": None})
    assert await store.pending(0) == 0


async def test_settle_only_replaces_the_score_it_read(store: DeadlineStore) -> None:
    await store.schedule(0, {"a": 100, "b": 100, "c": 100})
    await store.schedule(0, {"b": 700})  # an event rescheduled b after the timer read it
    done = await store.settle(0, [("a", 100, None), ("b", 100, None), ("c", 100, 2000)])
    assert done == 2
    assert await store.due(0, 10_000, 10) == [("b", 700), ("c", 2000)]


async def test_remove_users_from_every_partition(store: DeadlineStore) -> None:
    await store.schedule(0, {"a": 1, "b": 2})
    await store.schedule(3, {"a": 1})
    await store.remove_users(["a"], range(4))
    assert await store.due(0, 10, 10) == [("b", 2)]
    assert await store.pending(3) == 0


async def test_watermark_only_moves_forward(store: DeadlineStore) -> None:
    assert await store.watermark(0) is None
    await store.advance_watermark(0, 1000, 5000)
    await store.advance_watermark(0, 900, 6000)  # an older event does not lower it
    assert await store.watermark(0) == (1000, 5000)
    await store.advance_watermark(0, 1500, 7000)
    assert await store.watermark(0) == (1500, 7000)
    assert await store.watermark(1) is None


async def test_record_batch_schedules_and_advances_in_one_go(store: DeadlineStore) -> None:
    await store.advance_watermark(1, 5000, 1)
    await store.record_batch({0: {"a": 10, "b": None}, 2: {"c": 30}}, {0: 700, 1: 4000}, wall_ms=99)
    assert await store.due(0, 100, 10) == [("a", 10)] and await store.due(2, 100, 10) == [("c", 30)]
    assert await store.watermark(0) == (700, 99)
    assert await store.watermark(1) == (5000, 1)  # never lowered


async def test_due_many_returns_only_partitions_with_due_users(store: DeadlineStore) -> None:
    await store.schedule(0, {"a": 10, "b": 50})
    await store.schedule(1, {"c": 500})
    assert await store.due_many({0: 20, 1: 20, 2: 20}, 10) == {0: [("a", 10)]}
    assert await store.due_many({}, 10) == {}


async def test_schedule_earlier_never_delays_a_deadline(store: DeadlineStore) -> None:
    await store.schedule(0, {"a": 500, "b": 500})
    await store.schedule_earlier(0, {"a": 900, "b": 200, "c": 700})
    assert await store.due(0, 10_000, 10) == [("b", 200), ("a", 500), ("c", 700)]


async def test_members_are_scanned_completely_while_others_leave(store: DeadlineStore) -> None:
    users = [f"u{i:03d}" for i in range(300)]
    await store.record_batch({}, {}, wall_ms=1, members={2: users[:200]})
    await store.add_members(2, users[200:])
    await store.add_members(3, ["other"])
    seen: list[str] = []
    cursor, rounds = 0, 0
    while True:
        cursor, chunk = await store.scan_members(2, cursor, 40)
        seen.extend(chunk)
        rounds += 1
        if rounds == 2:  # members leave in the middle of the scan (tombstones, erasure)
            await store.remove_members(2, [u for u in users[::3] if u not in seen])
        if cursor == 0:
            break
    stayed = {u for u in users if u in seen or u not in users[::3]}
    assert stayed <= set(seen) and "other" not in seen and rounds > 2
    await store.remove_users(["u001"], range(4))
    cursor, rest = await store.scan_members(2, 0, 1000)
    while cursor:
        cursor, more = await store.scan_members(2, cursor, 1000)
        rest.extend(more)
    assert "u001" not in rest


async def test_sweep_state_round_trips(store: DeadlineStore) -> None:
    assert await store.sweep_state(5) == SweepState()
    await store.save_sweep(5, SweepState(done=2, started_for=3, cursor=17))
    assert await store.sweep_state(5) == SweepState(2, 3, 17)
    assert await store.sweep_state(6) == SweepState()
