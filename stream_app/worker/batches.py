"""The batch runner: one batch of `onboarding.events` records until it has taken effect.

Process (:class:`~stream_app.pipeline.EventProcessor`), publish what it caused, count the
segment sizes, refresh training samples, schedule deadlines, advance watermarks, note the
partitions' members, then return so the agent acks. An outage (Redis down or hung, the
broker not acknowledging, profiles in contention) retries the whole batch with back-off:
every step is idempotent, so nothing is acked meanwhile and nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from redis.exceptions import OutOfMemoryError, RedisError

from stream_app.errors import ContentionError
from stream_app.metrics import Metrics
from stream_app.pipeline import BatchOutcome, EventProcessor, Record
from stream_app.settings import Settings
from stream_app.store.deadlines import DeadlineStore
from stream_app.store.sizes import SegmentSizeStore
from stream_app.worker.clusters import Baselines, ClusterService
from stream_app.worker.publisher import Publisher
from stream_app.worker.timer import Watermarks

log = logging.getLogger("stream_app")

#: failures that pass: the same batch, run again, will succeed once the cause is gone
TRANSIENT = (RedisError, OSError, ContentionError, TimeoutError)


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
    ) -> None:
        self.settings, self.processor, self.publisher = settings, processor, publisher
        self.deadlines, self.watermarks, self.baselines = deadlines, watermarks, baselines
        self.clusters, self.sizes, self.metrics, self.lock = clusters, sizes, metrics, lock
        self.next_offsets: dict[int, int] = {}  # events partition -> next offset to process
        self.busy_since: float | None = None  # monotonic start of the batch being handled
        self.retrying_since: float | None = None  # monotonic time its first attempt failed

    async def handle(self, records: list[Record]) -> BatchOutcome:
        """Process one batch until it succeeds. Outages pause here; nothing is acked meanwhile."""
        started = time.perf_counter()
        self.busy_since = time.monotonic()
        delay = 0.1
        while True:
            try:
                # A hung call (a frozen Redis can leave one waiting past its socket timeout)
                # must not stall the partition forever: cancel the attempt and run it again.
                async with self.lock:
                    outcome = await asyncio.wait_for(
                        self._process_and_publish(records), self.settings.batch_attempt_timeout_seconds
                    )
                break
            except TRANSIENT as exc:
                self.retrying_since = self.retrying_since or time.monotonic()
                self.metrics.batch_retrying_seconds.set(time.monotonic() - self.retrying_since)
                self.metrics.store_error(exc)
                out_of_memory = isinstance(exc, OutOfMemoryError)
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
        self.busy_since = self.retrying_since = None
        self.metrics.batch_retrying_seconds.set(0)
        self.metrics.redis_out_of_memory.set(0)
        self._count(records, outcome, time.perf_counter() - started)
        return outcome

    async def _process_and_publish(self, records: list[Record]) -> BatchOutcome:
        phase = self.metrics.batch_phase_seconds
        t0 = time.perf_counter()
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
