"""The batch runner tells outages from poison: outages wait, poison records are parked."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import redis.exceptions as redis_errors
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
)

from stream_app.contract import iso_ms
from stream_app.errors import ContentionError
from stream_app.pipeline import BatchOutcome, Record
from stream_app.settings import Settings
from stream_app.worker.batches import is_out_of_memory, is_transient
from stream_app.worker.publisher import MemorySink, Sinks
from stream_app.worker.runtime import Runtime, Stores

T0 = 1_795_000_000_000


def wrapped(cause: BaseException) -> RuntimeError:
    try:
        raise RuntimeError("while publishing") from cause
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (redis_errors.ConnectionError("refused"), True),
        (redis_errors.TimeoutError("timed out"), True),
        (redis_errors.BusyLoadingError("loading"), True),
        (redis_errors.OutOfMemoryError("OOM command not allowed"), True),
        (redis_errors.ReadOnlyError("replica"), True),
        (TimeoutError(), True),
        (ConnectionResetError(), True),
        (ContentionError("busy"), True),
        (KafkaTimeoutError(), True),
        (KafkaConnectionError(), True),
        (wrapped(redis_errors.ConnectionError("refused")), True),
        (redis_errors.ResponseError("ERR Error running script (call to f_1): user_script:3: bad"), False),
        (redis_errors.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), False),
        # passing server states that arrive as a plain reply error (a pipeline, a script)
        (redis_errors.ResponseError("command not allowed when used memory > 'maxmemory'."), True),
        (redis_errors.ResponseError("ERR Error running script: @user_script:1: -OOM not allowed"), True),
        (redis_errors.ResponseError("MISCONF Errors writing to the AOF file: No space left on device"), True),
        (redis_errors.ResponseError("LOADING Redis is loading the dataset in memory"), True),
        (redis_errors.ResponseError("ERR unknown command 'BUSYBOX'"), False),
        (MessageSizeTooLargeError(), False),
        (TopicAuthorizationFailedError(), False),
        (ValueError("a bug tripped by one record"), False),
        (wrapped(KeyError("x")), False),
    ],
)
def test_outages_are_transient_and_poison_is_not(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def track(uid: str, mid: str, at: int) -> bytes:
    doc = {
        "type": "track",
        "messageId": mid,
        "userId": uid,
        "timestamp": iso_ms(T0 + at * 1000),
        "event": "Feature Used",
        "properties": {"feature": "export"},
    }
    return orjson.dumps(doc)


def batch() -> list[Record]:
    values = [track(f"u{i}", f"m{i}", i) for i in range(7)]
    return [Record(v, None, "onboarding.events", 0, i, T0 + i * 1000) for i, v in enumerate(values)]


def runtime_failing_on(poisoned: set[str], error: Exception, times: int | None = None) -> Runtime:
    """A runtime whose processor raises ``error`` whenever a batch holds a poisoned user
    (``times``: only that many times, then it works)."""
    settings = Settings(batch_permanent_attempts=2, redis_retry_max_seconds=0.01)
    runtime = Runtime(settings, Sinks.in_memory(), Stores(settings, in_memory=True))
    process = runtime.processor.process
    left = [times]

    async def failing(records: list[Record]) -> BatchOutcome:
        if any(orjson.loads(r.value)["userId"] in poisoned for r in records) and left[0] != 0:
            if left[0] is not None:
                left[0] -= 1
            raise error
        return await process(records)

    runtime.processor.process = failing  # type: ignore[method-assign]
    return runtime


def parked(runtime: Runtime) -> list[tuple[Any, dict[str, bytes]]]:
    sink = runtime.publisher.sinks.dead_letters
    assert isinstance(sink, MemorySink)
    return [(orjson.loads(value), dict(headers or [])) for _key, value, headers in sink.records]


async def test_a_poison_record_is_parked_and_the_rest_of_the_batch_applies() -> None:
    error = redis_errors.ResponseError("ERR Error running script: user_script:1: boom")
    runtime = runtime_failing_on({"u3"}, error)
    outcome = await asyncio.wait_for(runtime.batches.handle(batch()), 30)
    assert outcome.applied == 6
    dead = parked(runtime)
    assert [doc["userId"] for doc, _headers in dead] == ["u3"]
    headers = dead[0][1]
    assert headers["dlq.reason"] == b"processing_failed" and b"ResponseError" in headers["dlq.message"]
    assert headers["dlq.source.offset"] == b"3"
    for uid in ("u0", "u1", "u2", "u4", "u5", "u6"):
        assert await runtime.stores.profiles.get(uid) is not None
    assert await runtime.stores.profiles.get("u3") is None
    assert runtime.batches.next_offsets == {0: 7}
    counted = runtime.metrics.records_parked.collect()[0].samples
    assert [(s.name, s.labels, s.value) for s in counted if s.name.endswith("_total")] == [
        ("onboarding_records_parked_total", {"error": "ResponseError"}, 1.0)
    ]


async def test_an_outage_is_waited_out_and_nothing_is_parked() -> None:
    runtime = runtime_failing_on({"u3"}, redis_errors.ConnectionError("refused"), times=5)
    outcome = await asyncio.wait_for(runtime.batches.handle(batch()), 30)
    assert outcome.applied == 7 and parked(runtime) == []


async def test_a_permanent_error_that_goes_away_on_a_retry_parks_nothing() -> None:
    runtime = runtime_failing_on({"u3"}, ValueError("flaky"), times=1)
    outcome = await asyncio.wait_for(runtime.batches.handle(batch()), 30)
    assert outcome.applied == 7 and parked(runtime) == []


def test_out_of_memory_is_told_from_the_reply_of_redis_7_and_of_6_2() -> None:
    assert is_out_of_memory(
        redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    )
    six = (
        "Error running script (call to f_0a1b): @user_script:12: "
        "-OOM command not allowed when used memory > 'maxmemory'"
    )
    assert is_out_of_memory(redis_errors.ResponseError(six))
    assert not is_out_of_memory(redis_errors.ResponseError("WRONGTYPE Operation against a key"))
