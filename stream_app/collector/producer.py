"""A confluent-kafka producer for asyncio: each record's delivery is an awaitable.

The collector answers 200 only after the broker acknowledged every record of the request
(idempotent producer, ``acks=all``). librdkafka runs its own threads; delivery reports
are served by one polling thread, which hands each result to the event loop. The queue is
bounded (``queue.buffering.max.messages``/``kbytes``): when it is full, or the broker does
not acknowledge in time, the request fails with :class:`ProduceUnavailable` and the client
retries (the engine drops duplicates by ``messageId``). Nothing is buffered without bound.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from stream_app.errors import StreamAppError

Headers = Sequence[tuple[str, bytes]]


class ProduceUnavailable(StreamAppError):
    """The broker cannot take the records now (unreachable, slow, or the local queue is full)."""


class ProduceRejected(StreamAppError):
    """The broker refused the records for good (authorization, a missing topic, too large)."""


#: errors that say the records will never be accepted as they are
PERMANENT = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD,
}


class AsyncProducer:
    def __init__(self, config: dict[str, Any]) -> None:
        self._producer = Producer(
            {
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "queue.buffering.max.messages": 100_000,
                "queue.buffering.max.kbytes": 65_536,
                **config,
            }
        )
        self._closing = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="collector-producer-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closing.is_set():
            self._producer.poll(0.05)

    async def send_all(
        self, records: Sequence[tuple[str, bytes | None, bytes, Headers | None]], timeout: float
    ) -> None:
        """Produce ``(topic, key, value, headers)`` records; return once all are acknowledged.

        Raises :class:`ProduceUnavailable` (retry later) or :class:`ProduceRejected`. One
        future per call, settled by the delivery report that completes the set (or the first
        failure): waking the event loop once per record would cost more than producing it.
        """
        if not records:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        remaining = len(records)

        def report(err: KafkaError | None, _msg: Any) -> None:  # on the polling thread only
            nonlocal remaining
            remaining -= 1
            if err is not None or remaining == 0:
                loop.call_soon_threadsafe(_settle, done, err)

        # records produced before a failure still report later: nobody awaits those reports
        done.add_done_callback(_retrieve)
        for topic, key, value, headers in records:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=list(headers or ()), on_delivery=report
                )
            except BufferError as exc:
                raise ProduceUnavailable("the producer queue is full") from exc
            except KafkaException as exc:
                raise ProduceRejected(str(exc)) from exc
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError as exc:
            raise ProduceUnavailable(f"the broker did not acknowledge within {timeout:g} s") from exc

    def flush(self, timeout: float) -> int:
        """Deliver what is queued (graceful shutdown); the number of records still undelivered."""
        return int(self._producer.flush(timeout))

    def close(self, timeout: float = 10.0) -> int:
        left = self.flush(timeout)
        self._closing.set()
        self._poller.join(2)
        return left


def _settle(fut: asyncio.Future[None], err: KafkaError | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    elif err.code() in PERMANENT:
        fut.set_exception(ProduceRejected(err.str()))
    else:
        fut.set_exception(ProduceUnavailable(err.str()))


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
