"""The profile agent: `onboarding.events` in batches -> Runtime.handle_batch.

Concurrency stays 1 (faust-streaming #606: with more, a commit can skip an in-flight
message; per-user order needs one consumer per partition anyway). Batches come from
``take_events`` so each record's partition/offset reaches the dead-letter headers;
the batch is acked only after ``handle_batch`` returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stream_app.pipeline import Record

if TYPE_CHECKING:
    import faust

    from stream_app.app import Runtime


def register(app: faust.App, runtime: Runtime) -> None:
    settings = runtime.settings
    events_topic = app.topic(runtime.topics["events"].name, key_serializer="raw", value_serializer="raw")
    runtime.dlq_topic = app.topic(runtime.topics["dlq"].name, key_serializer="raw", value_serializer="raw")

    @app.agent(events_topic, concurrency=1, name="profiles")
    async def update_profiles(stream: Any) -> None:
        async for events in stream.take_events(
            settings.batch_max_events, within=settings.batch_window_seconds
        ):
            records = []
            for event in events:
                msg = event.message
                value = msg.value if isinstance(msg.value, bytes) else bytes(msg.value or b"")
                ts = int(msg.timestamp * 1000) if msg.timestamp else None
                records.append(Record(value, msg.key, msg.topic, msg.partition, msg.offset, ts))
            await runtime.handle_batch(records)
