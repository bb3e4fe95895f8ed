"""The batch runner: one batch of `onboarding.events` records until it has taken effect.

Process (:class:`~stream_app.pipeline.EventProcessor`), publish what it caused, count the
segment sizes, refresh training samples, schedule deadlines, advance watermarks, note the
partitions' members, then return so the agent acks. Every step is idempotent, so a batch
can be run again at any point:

* a **transient** failure (Redis down, hung or out of memory, the broker not acknowledging,
  profiles in contention: :func:`is_transient`) retries the whole batch with back-off for as
  long as it lasts; nothing is acked meanwhile and nothing is applied twice;
* a **permanent** one (a Lua error on one profile, a record the broker refuses as too large,
  an ACL denial, a bug tripped by one record) is tried BATCH_PERMANENT_ATTEMPTS times, then
  the batch is split in halves to find the records that fail alone; each of those is
  *parked* on the dead-letter topic (reason ``processing_failed``, the error class in its
  message; never lost: fix the cause and re-publish it) and the rest goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import fields

import redis.exceptions as redis_errors
from redis.exceptions import OutOfMemoryError

from stream_app.contract import Invalid, Reason
from stream_app.errors import ContentionError, RedisDataLost
from stream_app.metrics import Metrics
from stream_app.pipeline import BatchOutcome, EventProcessor, Record
from stream_app.settings import Settings
from stream_app.store.deadlines import DeadlineStore
from stream_app.store.sizes import SegmentSizeStore
from stream_app.worker.clusters import Baselines, ClusterService
from stream_app.worker.epochs import EpochGuard
from stream_app.worker.publisher import Publisher
from stream_app.worker.recommender import RecommenderService
from stream_app.worker.timer import Watermarks

log = logging.getLogger("stream_app")

#: failures that pass: the same batch, run again, will succeed once the cause is gone
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    ContentionError,
    OSError,
    TimeoutError,  # also asyncio.TimeoutError: an attempt cut off by BATCH_ATTEMPT_TIMEOUT_SECONDS
    redis_errors.ConnectionError,  # also BusyLoadingError, AuthenticationError
    redis_errors.TimeoutError,
    redis_errors.OutOfMemoryError,  # maxmemory under noeviction: frees up
    redis_errors.ReadOnlyError,  # a replica being promoted
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.ClusterError,
)


#: error codes of a Redis reply that name a passing server state, whatever class the client
#: maps them to (a reply error inside a pipeline or a script can arrive as a plain
#: ResponseError): out of memory, loading, a busy script, failover, persistence failing
_TRANSIENT_REPLIES = ("OOM", "LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN",
                      "NOREPLICAS", "MISCONF", "UNBLOCKED")  # fmt: skip


def is_out_of_memory(exc: BaseException) -> bool:
    """Redis at maxmemory under noeviction (Redis 7 names it OOM; 6.2 wraps it, inside a
    script, in a plain script error)."""
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, redis_errors.ResponseError) and "maxmemory" in str(exc)
    )


def is_transient(exc: BaseException) -> bool:
    """Will the same work succeed later without anyone changing it? (outage vs. poison)"""
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    if isinstance(exc, redis_errors.ResponseError):
        text = str(exc)
        if is_out_of_memory(exc) or any(
            text.startswith(code) or f" {code} " in text or f"-{code} " in text for code in _TRANSIENT_REPLIES
        ):
            return True
    if type(exc).__module__.startswith("aiokafka"):
        # timeouts and connection loss are outages; aiokafka marks the other retriable errors
        # (leader moved, topic being created); too large, unauthorized, invalid are not
        name = type(exc).__name__
        return name in {"KafkaTimeoutError", "RequestTimedOutError"} or bool(getattr(exc, "retriable", False))
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


class BatchRunner:
    def __init__(
        self,
        settings: Settings,
        processor: EventProcessor,
        publisher: Publisher,
        deadlines: DeadlineStore,
        watermarks: Watermarks,
        baselines: Baselines,
        clusters: ClusterService,
        sizes: SegmentSizeStore,
        metrics: Metrics,
        lock: asyncio.Lock,
        guard: EpochGuard | None = None,
        recommender: RecommenderService | None = None,
    ) -> None:
        self.settings, self.processor, self.publisher = settings, processor, publisher
        self.deadlines, self.watermarks, self.baselines = deadlines, watermarks, baselines
        self.clusters, self.sizes, self.metrics, self.lock = clusters, sizes, metrics, lock
        self.guard, self.recommender = guard, recommender
        self.next_offsets: dict[int, int] = {}  # events partition -> next offset to process
        self.busy_since: float | None = None  # monotonic start of the batch being handled
        self.retrying_since: float | None = None  # monotonic time its first attempt failed
        self.in_hand: dict[int, int] = {}  # events partition -> first offset of the batch in hand

    def position(self, partition: int, committed: int | None) -> int | None:
        """The next offset of ``partition`` not yet processed: past the last batch handled, else
        where the batch in hand (maybe stuck retrying) starts, else the group's committed offset.
        Never the consumer's fetch position: it runs ahead of processing by what is prefetched,
        and a backlog buffered but unread is not caught up."""
        return self.next_offsets.get(partition, self.in_hand.get(partition, committed))

    async def handle(self, records: list[Record]) -> BatchOutcome:
        """Process one batch until it took effect (records that fail for good are parked on the
        dead-letter topic). Outages pause here; nothing is acked meanwhile."""
        started = time.perf_counter()
        self.busy_since = time.monotonic()
        for rec in records:
            self.in_hand[rec.partition] = min(self.in_hand.get(rec.partition, rec.offset), rec.offset)
        outcome = await self._run(records)
        self.in_hand.clear()
        self.busy_since = self.retrying_since = None
        self.metrics.batch_retrying_seconds.set(0)
        self.metrics.redis_out_of_memory.set(0)
        self._count(records, outcome, time.perf_counter() - started)
        return outcome

    async def _run(self, records: list[Record]) -> BatchOutcome:
        delay = 0.1
        failures = 0
        while True:
            try:
                # A hung call (a frozen Redis can leave one waiting past its socket timeout)
                # must not stall the partition forever: cancel the attempt and run it again.
                async with self.lock:
                    return await asyncio.wait_for(
                        self._process_and_publish(records), self.settings.batch_attempt_timeout_seconds
                    )
            except RedisDataLost:
                raise  # not a record's fault, not an outage: the worker stops
            except Exception as exc:
                if not is_transient(exc):
                    failures += 1
                    if failures >= self.settings.batch_permanent_attempts:
                        return await self._isolate(records, exc)
                    log.warning(
                        "batch failed with an error that does not look like an outage; trying again "
                        "before isolating the records that cause it",
                        extra={"error": repr(exc)[:300], "attempt": failures, "records": len(records)},
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.settings.redis_retry_max_seconds)
                    continue
                self.retrying_since = self.retrying_since or time.monotonic()
                self.metrics.batch_retrying_seconds.set(time.monotonic() - self.retrying_since)
                self.metrics.store_error(exc)
                out_of_memory = is_out_of_memory(exc)
                self.metrics.redis_out_of_memory.set(int(out_of_memory))
                log.warning(
                    "Redis is out of memory (maxmemory reached, noeviction): the batch waits; free "
                    "memory or raise maxmemory"
                    if out_of_memory
                    else "batch failed, retrying the whole batch (idempotent)",
                    extra={"error": repr(exc)[:300], "retry_in_s": delay, "records": len(records)},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.redis_retry_max_seconds)

    async def _isolate(self, records: list[Record], exc: Exception) -> BatchOutcome:
        """Halve the batch until the failing records stand alone; park those, run the rest."""
        if len(records) > 1:
            mid = len(records) // 2
            return _merge(await self._run(records[:mid]), await self._run(records[mid:]))
        record = records[0]
        parked = BatchOutcome()
        reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        parked.dead_letters.append((record, Invalid(Reason.PROCESSING_FAILED, reason)))
        log.error(
            "record parked on the dead-letter topic: it fails for good (fix the cause, then re-publish it)",
            extra={
                "error": type(exc).__name__,
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
            },
        )
        delay = 0.1
        while True:  # the dead-letter topic is where nothing gets lost: wait for it
            try:
                await self.publisher.dead_letters(parked)
                break
            except Exception as dlq_exc:
                log.error(
                    "cannot park a failing record on the dead-letter topic; retrying",
                    extra={"error": repr(dlq_exc)[:300], "retry_in_s": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.redis_retry_max_seconds)
        self.metrics.records_parked.labels(type(exc).__name__).inc()
        self.next_offsets[record.partition] = max(
            self.next_offsets.get(record.partition, 0), record.offset + 1
        )
        return parked

    async def _process_and_publish(self, records: list[Record]) -> BatchOutcome:
        phase = self.metrics.batch_phase_seconds
        t0 = time.perf_counter()
        if self.guard is not None:
            await self.guard.check({rec.partition for rec in records})
        await self.baselines.refresh()
        await self.clusters.refresh()
        outcome = await self.processor.process(records)
        t1 = time.perf_counter()
        phase.labels("process").observe(t1 - t0)
        await self.publisher.dead_letters(outcome)
        await self.publisher.reactions(outcome)
        t2 = time.perf_counter()
        phase.labels("publish").observe(t2 - t1)
        await self.sizes.add(outcome.size_deltas)
        await self.clusters.sample(outcome.profiles, outcome.linked, self.settings.cluster_samples_per_batch)
        if self.recommender is not None:
            await self.recommender.sample(outcome.profiles, outcome.linked)
        t3 = time.perf_counter()
        phase.labels("segments_and_samples").observe(t3 - t2)
        wall_ms = int(time.time() * 1000)
        advanced = self.watermarks.advanced(records, wall_ms)
        await self.deadlines.record_batch(outcome.deadlines, advanced, wall_ms, outcome.members)
        self.watermarks.written(advanced, wall_ms)
        phase.labels("deadlines").observe(time.perf_counter() - t3)
        for rec in records:
            self.next_offsets[rec.partition] = max(self.next_offsets.get(rec.partition, 0), rec.offset + 1)
        return outcome

    def _count(self, records: list[Record], outcome: BatchOutcome, seconds: float) -> None:
        m = self.metrics
        m.batch_seconds.observe(seconds)
        m.batch_size.observe(len(records))
        for kind, count in Counter(ev.type for _rec, ev in outcome.events).items():
            m.events_consumed.labels(kind).inc(count)
        if outcome.dead_letters:
            m.events_consumed.labels("invalid").inc(len(outcome.dead_letters))
            for reason, count in Counter(inv.reason.value for _rec, inv in outcome.dead_letters).items():
                m.events_invalid.labels(reason).inc(count)
        m.events_duplicate.inc(outcome.duplicates)
        m.events_clock_ahead.inc(sum(1 for _rec, ev in outcome.events if ev.ahead_ms > 0))
        m.traits_dropped.inc(sum(ev.dropped_traits for _rec, ev in outcome.events))
        m.events_applied.inc(outcome.applied)
        m.last_batch_unixtime.set(time.time())
        m.profile_cache_bytes.set(self.processor.cache.bytes)


def _merge(first: BatchOutcome, second: BatchOutcome) -> BatchOutcome:
    """The outcome of two consecutive parts of a batch, as if run as one."""
    merged = BatchOutcome()
    for f in fields(BatchOutcome):
        a, b = getattr(first, f.name), getattr(second, f.name)
        if isinstance(a, list):
            value: object = a + b
        elif isinstance(a, int):
            value = a + b
        elif isinstance(a, dict):
            value = dict(a)
            for key, later in b.items():
                earlier = value.get(key)
                if isinstance(earlier, dict):
                    value[key] = {**earlier, **later}
                elif isinstance(earlier, set):
                    value[key] = earlier | later
                else:
                    value[key] = later
        else:
            value = b
        setattr(merged, f.name, value)
    return merged
