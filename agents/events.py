"""The profile agent: `onboarding.events` in batches -> the batch runner (:mod:`stream_app.worker.batches`).

Concurrency stays 1 (faust-streaming #606: with more, a commit can skip an in-flight
message; per-user order needs one consumer per partition anyway).

Batches come from ``noack_take`` and are acked by hand, after ``handle_batch`` has
written their effects. That lets batch N be processed while Faust buffers batch N+1
(``take``/``take_events`` stop intake during processing, which cost a third of the
throughput): at most one batch is in flight, batches are processed strictly in order,
and acks go in offset order, so a commit never passes an unprocessed record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import faust

from stream_app.pipeline import Record
from stream_app.settings import Settings

BatchHandler = Callable[[list[Record]], Awaitable[object]]


def to_records(events: Sequence[Any]) -> list[Record]:
    records = []
    for event in events:
        msg = event.message
        value = msg.value if isinstance(msg.value, bytes) else bytes(msg.value or b"")
        ts = int(msg.timestamp * 1000) if msg.timestamp else None
        records.append(Record(value, msg.key, msg.topic, msg.partition, msg.offset, ts))
    return records


def register(app: faust.App, events_topic: Any, handle: BatchHandler, settings: Settings) -> None:
    @app.agent(events_topic, concurrency=1, name="profiles")
    async def update_profiles(stream: Any) -> None:
        async def process_then_ack(events: Sequence[Any]) -> None:
            await handle(to_records(events))
            for event in events:
                await stream.ack(event)

        in_flight: asyncio.Task[None] | None = None
        try:
            async for events in stream.noack_take(
                settings.batch_max_events, within=settings.batch_window_seconds
            ):
                if in_flight is not None:
                    await in_flight  # one batch at a time, in order
                in_flight = asyncio.ensure_future(process_then_ack(list(events)))
            if in_flight is not None:
                await in_flight
        finally:
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()  # unacked: redelivered after restart, applied once by messageId
