"""What the demo's live view and summary show: written by the sender and the observer thread,
read by the renderer."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

LATENCY_WINDOW_S = 10.0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


class Activity(NamedTuple):
    time: str
    user: str
    event: str
    detail: str
    user_id: str | None  # set when the event names a userId (whose profile the view can show)


@dataclass
class LiveStats:
    """Everything the live view and the summary show; written by the producer loop and the
    observer thread, read by the renderer."""

    started: float = field(default_factory=time.monotonic)
    phase: str = "streaming"
    cohorts: int = 0
    front_door: str = ""  # where the stream goes in (the collector's URL)
    sent: int = 0  # synthetic events accepted by the collector
    broken: int = 0  # extra events that break the contract (the collector dead-letters them)
    resent: int = 0  # extra copies of earlier events (a client retry)
    delivery_errors: int = 0  # requests the collector refused for good (400/401/500)
    retried_requests: int = 0  # 503 answers: the request is sent again, like an SDK does
    consumed: int = 0  # records the worker read (events, broken records and copies)
    applied: int = 0
    invalid: int = 0  # dead-lettered by the worker (records produced to Kafka directly)
    collector_dead_lettered: int = 0  # dead-lettered by the collector
    duplicates: int = 0
    profile_keys: int = 0  # {prefix}:p:* keys: profiles and the anonymous ids linked to them
    linked_ids: int = 0
    sent_rate: float = 0.0
    applied_rate: float = 0.0
    p50: float | None = None  # over the last LATENCY_WINDOW_S
    p99: float | None = None
    p50_all: float | None = None  # over the whole run
    p99_all: float | None = None
    triggers: dict[str, int] = field(default_factory=dict)  # delivered, by type
    held_out: int = 0
    suppressed: int = 0  # cooldown, cap, consent, ... (not holdout)
    segment_changes: int = 0
    cluster_model: int = 0
    timer_lag_p50: float | None = None
    observer_error: str = ""
    recent: deque[Activity] = field(default_factory=lambda: deque(maxlen=8))
    summaries: OrderedDict[str, str] = field(default_factory=OrderedDict)

    @property
    def records(self) -> int:
        """Records the worker will read (what the collector produced to onboarding.events)."""
        return self.sent + self.resent

    @property
    def dead_lettered(self) -> int:
        return self.invalid + self.collector_dead_lettered

    @property
    def profiles(self) -> int:
        return max(0, self.profile_keys - self.linked_ids)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def summary_text(self) -> str:
        return (
            f"sent {self.sent} events (+{self.broken} deliberately broken records, {self.resent} re-sent "
            f"copies) through the collector; applied {self.applied}; dead-lettered {self.dead_lettered}; "
            f"duplicates dropped "
            f"{self.duplicates}; {self.profiles} profiles; latency p50 {_ms(self.p50_all)}, "
            f"p99 {_ms(self.p99_all)}; {sum(self.triggers.values())} triggers "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.triggers.items())) or 'none'}), "
            f"{self.held_out} held out; {self.segment_changes} segment changes; "
            f"cluster model v{self.cluster_model}"
        )

    def summary_line(self) -> str:
        def ms(value: float | None) -> str:
            return "na" if value is None else f"{value * 1000:.0f}"

        return (
            f"summary: sent={self.sent} broken={self.broken} resent={self.resent} applied={self.applied} "
            f"dead_lettered={self.dead_lettered} duplicates={self.duplicates} profiles={self.profiles} "
            f"p50_ms={ms(self.p50_all)} p99_ms={ms(self.p99_all)} "
            f"triggers={sum(self.triggers.values())} held_out={self.held_out} "
            f"segment_changes={self.segment_changes} cluster_model={self.cluster_model}"
        )


def activity(event: dict[str, Any]) -> Activity:
    props = event.get("properties") or {}
    detail = " / ".join(str(props[k]) for k in ("flow", "step", "feature", "path") if k in props)
    user_id = event.get("userId")
    name = event.get("event") or (f"page {event['name']}" if event.get("name") else event["type"])
    return Activity(
        time.strftime("%H:%M:%S"), str(user_id or event.get("anonymousId")), str(name), detail, user_id
    )
