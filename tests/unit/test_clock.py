"""Time that holds in the field: client clocks only ever move decisions about their own user.

The runtime on the in-memory stores, fed records whose Kafka timestamps are the trusted
clock; its timer fires against the partition watermark built from them.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson

from stream_app.clock import note_offset, to_trusted, to_user, watermark_candidate
from stream_app.contract import Event, iso_ms
from stream_app.pipeline import Record
from stream_app.profile import new_profile
from stream_app.settings import Settings
from stream_app.worker.publisher import MemorySink, Sinks
from stream_app.worker.runtime import Runtime, Stores

T0 = 1_795_000_000_000
HOUR = 3_600_000
_offsets = itertools.count()

TRIGGERS_TOML = """
[limits]
allowed_lateness = 0
cap_per_day = 100
[stalled_step]
multiplier = 2.0
default_mean = 10
min_threshold = 1
min_samples = 1000
cooldown = 0
holdout = 0.0
[[stalled_step.actions]]
action = { kind = "in_app_tutorial" }
[onboarding_abandoned]
enabled = false
[segment_entered]
enabled = false
"""


def runtime(tmp_path: Path) -> tuple[Runtime, MemorySink]:
    path = tmp_path / "triggers.toml"
    path.write_text(TRIGGERS_TOML)
    settings = Settings(triggers_file=path, cluster_enabled=False)
    sinks = Sinks.in_memory()
    rt = Runtime(settings, sinks, Stores(settings, in_memory=True))
    rt.timer.owned = {0}
    assert isinstance(sinks.triggers, MemorySink)
    return rt, sinks.triggers


def record(uid: str, name: str, client_ms: int, received_ms: int, n: int, **props: str) -> Record:
    event = {
        "type": "track",
        "messageId": f"{uid}-{n}",
        "userId": uid,
        "timestamp": iso_ms(client_ms),
        "event": name,
        "properties": {"flow": "signup", **props},
    }
    return Record(orjson.dumps(event), uid.encode(), "onboarding.events", 0, next(_offsets), received_ms)


def stalled(sink: MemorySink) -> list[str]:
    return sorted(t["user_id"] for t in sink.values if t["type"] == "stalled_step")


async def test_fast_client_clocks_cannot_fire_other_users_stalls(tmp_path: Path) -> None:
    """The issue's field case: 30 finishers (8 s, threshold 20 s) and 64 clients an hour fast."""
    rt, sink = runtime(tmp_path)
    finishers = [f"fin{i}" for i in range(30)]
    await rt.batches.handle(
        [record(u, "Onboarding Step Started", T0, T0, 1, step="profile") for u in finishers]
        + [record("stuck", "Onboarding Step Started", T0, T0, 1, step="profile")]
    )
    # 64 other clients whose clocks run one hour ahead, received 1 s later
    await rt.batches.handle(
        [record(f"fast{i}", "Session Started", T0 + HOUR, T0 + 1000, 1) for i in range(64)]
    )
    await rt.timer.fire_due()
    assert stalled(sink) == []  # nothing is due: shared time is at T0 + 1 s, not T0 + 1 h
    await rt.batches.handle(
        [record(u, "Onboarding Step Completed", T0 + 8000, T0 + 8000, 2, step="profile") for u in finishers]
    )
    await rt.batches.handle([record("late", "Session Started", T0 + 25_000, T0 + 25_000, 1)])
    await rt.timer.fire_due()
    assert stalled(sink) == ["stuck"]  # the one user who did not finish, and only them
    assert rt.metrics.events_clock_ahead._value.get() == 64


async def test_a_slow_client_clock_still_gets_the_whole_step_time(tmp_path: Path) -> None:
    rt, sink = runtime(tmp_path)
    # this user's clock is an hour slow: its step started "an hour ago" by the trusted clock
    await rt.batches.handle([record("slow", "Onboarding Step Started", T0 - HOUR, T0, 1, step="profile")])
    await rt.batches.handle([record("other", "Session Started", T0 + 15_000, T0 + 15_000, 1)])
    await rt.timer.fire_due()
    assert stalled(sink) == []  # 15 s of its 20 s have passed
    doc = await rt.stores.profiles.get("slow")
    assert doc is not None and doc["engine"]["clock_offset_ms"] == HOUR
    await rt.batches.handle([record("other", "Session Started", T0 + 21_000, T0 + 21_000, 2)])
    await rt.timer.fire_due()
    assert stalled(sink) == ["slow"]
    (trigger,) = sink.values
    assert trigger["evidence"]["elapsed_s"] == 21.0  # measured on the user's own clock


async def test_a_fast_client_still_gets_its_own_stall_on_time(tmp_path: Path) -> None:
    rt, sink = runtime(tmp_path)
    await rt.batches.handle([record("fast", "Onboarding Step Started", T0 + HOUR, T0, 1, step="profile")])
    await rt.batches.handle([record("other", "Session Started", T0 + 19_000, T0 + 19_000, 1)])
    await rt.timer.fire_due()
    assert stalled(sink) == []
    await rt.batches.handle([record("other", "Session Started", T0 + 20_000, T0 + 20_000, 2)])
    await rt.timer.fire_due()
    assert stalled(sink) == ["fast"]


def event(ts_ms: int, received_ms: int | None) -> Event:
    return Event("m", "track", "u", None, ts_ms, received_ms=received_ms)


def test_the_offset_follows_the_latest_received_event() -> None:
    doc = new_profile("u")
    note_offset(doc, [event(T0 + 4990, T0 + 5001), event(T0, T0 + 5000)])
    assert doc["engine"]["clock_offset_ms"] == 11  # the later record wins, not the larger offset
    note_offset(doc, [event(T0, None)])  # nothing trusted to compare with: unchanged
    assert doc["engine"]["clock_offset_ms"] == 11
    assert to_trusted(doc, T0) == T0 + 11 and to_user(doc, T0 + 11) == T0 and to_trusted(doc, None) is None
    assert to_trusted(new_profile("v"), T0) == T0


def test_a_record_cannot_move_the_watermark_past_the_worker_clock() -> None:
    assert watermark_candidate(T0 + HOUR, wall_ms=T0) == T0
    assert watermark_candidate(T0 - 5, wall_ms=T0) == T0 - 5
    assert watermark_candidate(None, wall_ms=T0) is None
