"""Whose clock a decision runs on. Pure: no I/O, no clock reads.

Three clocks meet in the engine:

* the **client's** (an event's ``timestamp``): phones and laptops are often minutes or
  hours off. Within one profile, event times are compared with each other (step
  durations, sessions, recency), so they stay on the client's clock, corrected by
  ``sentAt`` where the event allows (:mod:`stream_app.contract`);
* the **trusted** clock of the Kafka record timestamp (the producer's or the broker's;
  the collector's for events that came over HTTP), which is never earlier than the event;
* the worker's **wall** clock.

Shared time, a partition's watermark that fires everyone's deadlines, advances only on
trusted clocks (record timestamps, and the wall clock while the partition is caught up),
so nothing one client sends can move time for another user. A user's deadlines are
computed on the user's own clock and translated into trusted time with the user's
*clock offset*: record time minus event time of the user's latest event (>= 0, because
the contract caps event times at the record time). Translating back, the timer decides
for a user at ``watermark - offset``. A client whose clock is an hour slow thus still
gets the full step time before a stall, and one whose clock is an hour fast cannot
fire anything early: its event times were capped at the record time.
"""

from __future__ import annotations

from collections.abc import Iterable

from stream_app.contract import Event
from stream_app.profile import Profile

OFFSET_KEY = "clock_offset_ms"


def offset_ms(doc: Profile) -> int:
    """The user's clock offset: how far trusted time is ahead of the user's event times."""
    return int((doc.get("engine") or {}).get(OFFSET_KEY) or 0)


def note_offset(doc: Profile, events: Iterable[Event]) -> None:
    """Remember the offset of the most recently received of ``events`` (those with a record time).

    The latest event wins, so a user who changes device or fixes their clock is followed;
    an event delivered late (an offline queue) raises the offset for a while, which only
    postpones that user's own deadlines.
    """
    latest: Event | None = None
    for ev in events:
        if ev.received_ms is not None and (latest is None or ev.received_ms >= (latest.received_ms or 0)):
            latest = ev
    if latest is not None and latest.received_ms is not None:
        doc.setdefault("engine", {})[OFFSET_KEY] = max(0, latest.received_ms - latest.ts_ms)


def to_trusted(doc: Profile, user_ms: int | None) -> int | None:
    """A deadline on the user's clock, as trusted time (for the partition's deadline index)."""
    return None if user_ms is None else user_ms + offset_ms(doc)


def to_user(doc: Profile, trusted_ms: int) -> int:
    """A trusted instant (a watermark) on the user's clock (what their decisions compare with)."""
    return trusted_ms - offset_ms(doc)


def watermark_candidate(record_ms: int | None, wall_ms: int) -> int | None:
    """What one record can tell its partition's watermark: its timestamp, never past the
    worker's own clock (a producer with a wild clock cannot push time ahead either)."""
    return None if record_ms is None else min(record_ms, wall_ms)
