"""Getting a batch's outputs onto Kafka before the batch is acked: dead letters, segment
changes, triggers. The sinks are given at construction; a message with no sink is an error,
never a silent drop counted as sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from stream_app.metrics import Metrics
from stream_app.outbox import HOLDOUT, SEGMENTS, TRIGGERS, Kind, Outbox, OutboxMessage
from stream_app.pipeline import BatchOutcome, Reactions
from stream_app.triggers.bandit import ArmEvent, pulls_of

Headers = list[tuple[str, bytes]]


class Sink(Protocol):
    """An output topic: what Faust's ``topic.send`` offers (a future per record)."""

    async def send(
        self, *, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> Awaitable[Any]: ...


@dataclass
class MemorySink:
    """A sink that keeps what it gets (tests, replays)."""

    records: list[tuple[bytes | None, bytes, Headers | None]] = field(default_factory=list)

    async def send(
        self, *, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> Awaitable[Any]:
        self.records.append((key, value, headers))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    @property
    def values(self) -> list[Any]:
        return [orjson.loads(value) for _key, value, _headers in self.records]


@dataclass(frozen=True)
class Sinks:
    dead_letters: Sink
    segments: Sink
    triggers: Sink
    holdout: Sink

    def for_kind(self, kind: Kind) -> Sink:
        return {SEGMENTS: self.segments, TRIGGERS: self.triggers, HOLDOUT: self.holdout}[kind]

    @classmethod
    def in_memory(cls) -> Sinks:
        return cls(MemorySink(), MemorySink(), MemorySink(), MemorySink())


DEADLINE_TYPES = ("stalled_step", "onboarding_abandoned")


class Publisher:
    """Sends what batches and timer passes decided, and records what went out.

    ``record``: where the published outboxes are recorded durably (the profile store's
    ``mark_published``), so that whoever loads a profile next does not send its outbox again.
    """

    def __init__(
        self,
        sinks: Sinks,
        outbox: Outbox,
        metrics: Metrics,
        record: Callable[[Mapping[str, str]], Awaitable[None]] | None = None,
        pulls: Callable[[list[ArmEvent]], Awaitable[object]] | None = None,
    ) -> None:
        self.sinks, self.outbox, self.metrics, self.record = sinks, outbox, metrics, record
        self.pulls = pulls  # the bandit's pulls: counted once sent (by trigger id: resending is safe)

    async def dead_letters(self, outcome: BatchOutcome) -> None:
        """Every invalid record of the batch to the dead-letter topic, delivered before the ack."""
        if not outcome.dead_letters:
            return
        failed_at = datetime.now(UTC).isoformat().encode()
        futures = []
        for rec, invalid in outcome.dead_letters:
            headers = [
                ("dlq.reason", invalid.reason.value.encode()),
                ("dlq.message", invalid.message.encode()),
                ("dlq.source.topic", rec.topic.encode()),
                ("dlq.source.partition", str(rec.partition).encode()),
                ("dlq.source.offset", str(rec.offset).encode()),
                ("dlq.failed_at", failed_at),
            ]
            if rec.timestamp_ms is not None:
                headers.append(("dlq.source.timestamp", str(rec.timestamp_ms).encode()))
            futures.append(await self.sinks.dead_letters.send(key=rec.key, value=rec.value, headers=headers))
        await asyncio.gather(*futures)
        self.metrics.dead_letters_published.inc(len(futures))

    async def reactions(self, outcome: Reactions) -> None:
        """Segment changes and triggers, delivered before the batch (or timer pass) is acked.

        Sending and recording the send go together: a pass cancelled meanwhile (an attempt
        timeout, a shutdown) still records what it sent, so nobody sends it again."""
        await asyncio.shield(self._deliver(outcome))
        self._count(outcome)

    async def _deliver(self, outcome: Reactions) -> None:
        await self.send(outcome.outbox)
        if self.pulls is not None:
            pulls = pulls_of([m.value for m in outcome.outbox if m.kind == TRIGGERS])
            if pulls:
                await self.pulls(pulls)
        self.outbox.mark_published([key for _pid, key in outcome.outbox_keys])  # this process
        if self.record is not None and outcome.outbox_keys:
            await self.record(dict(outcome.outbox_keys))

    def _count(self, outcome: Reactions) -> None:
        m = self.metrics
        now = time.time()
        for message in outcome.outbox:
            value = message.value
            if message.kind == SEGMENTS:
                m.segment_changes.labels(value["source"], value["change"]).inc()
            elif message.kind == TRIGGERS:
                m.triggers_emitted.labels(value["type"]).inc()
            if message.kind in (TRIGGERS, HOLDOUT) and value["type"] in DEADLINE_TYPES:
                due = datetime.fromisoformat(value["due_at"]).timestamp()
                m.timer_lag.observe(max(0.0, now - due))
        for type_, reason in outcome.suppressed:
            m.triggers_suppressed.labels(type_, reason).inc()
        for flow, step, stage, groups, took in outcome.funnel:
            m.count_funnel(flow, step, stage, groups, took)
        m.cluster_reassignments.inc(outcome.cluster_moves)

    async def send(self, messages: Sequence[OutboxMessage]) -> None:
        futures = [
            await self.sinks.for_kind(m.kind).send(key=m.key.encode(), value=orjson.dumps(m.value))
            for m in messages
        ]
        await asyncio.gather(*futures)
