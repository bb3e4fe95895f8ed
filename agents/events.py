"""The profile agent: `onboarding.events` in batches -> the batch runner (:mod:`stream_app.worker.batches`).

Concurrency stays 1 (faust-streaming #606: with more, a commit can skip an in-flight
message; per-user order needs one consumer per partition anyway).

Batches come from ``noack_take`` and are acked by hand, after ``handle_batch`` has
written their effects. That lets batch N be processed while Faust buffers the next records
(``take``/``take_events`` stop intake during processing, which cost a third of the
throughput): at most one batch is in flight, batches are processed strictly in order,
and acks go in offset order, so a commit never passes an unprocessed record.

Batches adapt to the load. What Faust hands over while a batch is in flight waits in
``pending`` and goes into the next batch, up to BATCH_MAX_EVENTS. While the owned
partitions hold at least a full batch more than is processed (``backlog``: a restart, a
deploy on a backlog, a burst), the next batch waits up to BACKLOG_FILL_SECONDS to fill:
a full batch costs ~40 % less per event on Redis (a user's events folded into one write;
bench/pipeline_cost.py). Live traffic is never behind by a batch, so it keeps batches of
BATCH_WINDOW_SECONDS (latency). Intake pauses only while ``pending`` holds a full batch,
and only until the batch in flight has taken it.

Only records this agent handled are marked committable (:class:`AckGuard`). In a rebalance
Faust drops what its queues hold and *acks* a record it then skips (flow stopped, or fetched
in the previous generation) without handing it over; while the partition's committed offset
is unknown (popped at the revocation) the commit then takes that ack's offset, past records
nobody processed. Such a record is now settled without being committable: it is fetched
again from the committed offset and processed then. (Found reading Faust; it never fired
in 26 instrumented rolling restarts on Apache Kafka. The loss those did show, twice, was
the seek after a rebalance: :func:`stream_app.worker.app._install_group_consumer`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import faust

from stream_app.pipeline import Record
from stream_app.settings import Settings

BatchHandler = Callable[[list[Record]], Awaitable[object]]

log = logging.getLogger(__name__)

#: the longest a batch waits to fill while the worker is behind (once per backlog's tail)
BACKLOG_FILL_SECONDS = 1.0


def _no_backlog() -> int:
    return 0


def to_records(events: Sequence[Any]) -> list[Record]:
    records = []
    for event in events:
        msg = event.message
        value = msg.value if isinstance(msg.value, bytes) else bytes(msg.value or b"")
        ts = int(msg.timestamp * 1000) if msg.timestamp else None
        records.append(Record(value, msg.key, msg.topic, msg.partition, msg.offset, ts))
    return records


class AckGuard:
    """Lets the consumer commit only records of ``topic`` the agent handled (see the module doc)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.handled: weakref.WeakSet[Any] = weakref.WeakSet()  # messages the agent processed
        self.refused = 0  # acks Faust gave records it skipped

    def install(self, consumer: Any) -> None:
        """Wrap ``consumer.ack`` (Faust's ``Message.ack`` ends there, the skip path included)."""
        if getattr(consumer, "_ack_guard", None) is self:
            return
        original = consumer.ack

        def ack(message: Any) -> bool:
            if message.topic != self.topic or message in self.handled:
                return bool(original(message))
            # skipped, never processed: settled (nobody waits for it) but not committable
            message.acked = True
            consumer._unacked_messages.discard(message)
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.info(
                    "a record skipped in a rebalance is not committed (fetched again)",
                    extra={"partition": message.partition, "offset": message.offset, "refused": self.refused},
                )
            return False

        consumer.ack = ack
        consumer._ack_guard = self

    def handled_all(self, events: Sequence[Any]) -> None:
        for event in events:
            self.handled.add(event.message)


def register(
    app: faust.App,
    events_topic: Any,
    handle: BatchHandler,
    settings: Settings,
    backlog: Callable[[], int] = _no_backlog,
) -> None:
    """``backlog``: records of the owned partitions not processed yet (0 when not known)."""

    guard = AckGuard(events_topic.get_topic_name())

    @app.agent(events_topic, concurrency=1, name="profiles")
    async def update_profiles(stream: Any) -> None:
        guard.install(app.consumer)

        async def process_then_ack(events: Sequence[Any]) -> None:
            await handle(to_records(events))
            guard.handled_all(events)
            for event in events:
                await stream.ack(event)

        size = settings.batch_max_events
        pending: list[Any] = []  # handed over by Faust, not in a batch yet (in offset order)
        full = asyncio.Event()  # pending holds a full batch
        room = asyncio.Event()  # pending has room again (the batch in flight took its share)

        async def drain() -> None:
            """Batches of what is pending, in order, until nothing is. Between the last
            check of ``pending`` and the return there is no await: a record handed over
            meanwhile finds this drain done and starts the next one."""
            while pending:
                if len(pending) < size and backlog() >= size:
                    full.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(full.wait(), BACKLOG_FILL_SECONDS)
                batch = pending[:size]
                del pending[:size]
                if len(pending) < size:
                    room.set()
                await process_then_ack(batch)

        in_flight: asyncio.Task[None] | None = None
        try:
            async for events in stream.noack_take(size, within=settings.batch_window_seconds):
                pending.extend(events)
                if len(pending) >= size:
                    full.set()
                while in_flight is not None and not in_flight.done() and len(pending) >= size:
                    room.clear()  # a full batch waits: pause intake until the drain takes it
                    waiter = asyncio.ensure_future(room.wait())
                    await asyncio.wait([in_flight, waiter], return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                if in_flight is None or in_flight.done():
                    if in_flight is not None:
                        in_flight.result()  # a failed batch stops the agent here, as it always did
                    in_flight = asyncio.ensure_future(drain())
            if in_flight is not None:
                await in_flight
        finally:
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()  # unacked: redelivered after restart, applied once by messageId
