"""Time in the worker: partition watermarks, the deadline timer and the cluster sweep.

* :class:`Watermarks` follows each owned partition's shared time (README "Time semantics",
  :mod:`stream_app.clock`): the greatest record timestamp read, minus the allowed lateness,
  plus the wall-clock time since, only while the partition is caught up.
* :class:`DeadlineTimer` fires the due deadlines of the partitions this worker owns
  (``TIMER_INTERVAL_SECONDS``) and sweeps their members when the cluster model moves users.

Both write profiles through the processor's compare-and-set, under the lock they share
with the batch runner, and publish what that decides before the next pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

from stream_app.clock import watermark_candidate
from stream_app.metrics import Metrics
from stream_app.pipeline import EventProcessor, Record, TimerOutcome
from stream_app.settings import Settings
from stream_app.store.deadlines import DeadlineStore, SweepState
from stream_app.store.sizes import SegmentSizeStore
from stream_app.worker.clusters import Baselines, ClusterService
from stream_app.worker.publisher import Publisher

#: Profiles the cluster sweep re-checks per hold of the lock it shares with the batches: a
#: batch waits for at most one such chunk (its reads, writes and the acks of what it
#: publishes), not for a whole pass (bench/RESULTS.md, "Latency at half load": on Apache
#: Kafka a whole pass held it 0.3-0.5 s; the p99 did not measurably move with chunks)
SWEEP_HOLD = 32

#: partition -> True when this worker has read everything in it (the consumer's positions)
CaughtUp = Callable[[int], Awaitable[bool]]

#: partition -> True while this worker is a full batch or more behind in it (a backlog)
Lagging = Callable[[int], bool]


async def _never(_partition: int) -> bool:
    return False


def _not_lagging(_partition: int) -> bool:
    return False


class Watermarks:
    def __init__(
        self,
        store: DeadlineStore,
        lateness_ms: int,
        caught_up: CaughtUp = _never,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.store, self.lateness_ms, self.caught_up, self.wall_ms = store, lateness_ms, caught_up, wall_ms
        #: owned partitions' marks as last written: (greatest record time, wall clock then)
        self.marks: dict[int, tuple[int, int]] = {}

    def advanced(self, records: Iterable[Record], wall_ms: int) -> dict[int, int]:
        """The partitions these records move forward (record timestamps only: no client
        clock moves shared time), and to where; remembered as written by the caller."""
        latest: dict[int, int] = {}
        for rec in records:
            ts = watermark_candidate(rec.timestamp_ms, wall_ms)
            if ts is not None:
                latest[rec.partition] = max(latest.get(rec.partition, ts), ts)
        return {p: ts for p, ts in latest.items() if ts > self.marks.get(p, (-1, 0))[0]}

    def written(self, advanced: dict[int, int], wall_ms: int) -> None:
        for partition, ts_ms in advanced.items():
            self.marks[partition] = (ts_ms, wall_ms)

    def forget(self) -> None:
        """After a rebalance: re-read, another worker may have advanced them meanwhile."""
        self.marks.clear()

    async def at(self, partition: int) -> int | None:
        """The partition's watermark now (trusted time), or None before any record was read."""
        mark = self.marks.get(partition)
        if mark is None:  # not read since this worker got the partition
            mark = await self.store.watermark(partition)
            if mark is None:
                return None
            self.marks[partition] = mark
        event_ms, seen_wall_ms = mark
        wm = event_ms - self.lateness_ms
        if await self.caught_up(partition):
            wm += max(0, self.wall_ms() - seen_wall_ms)
        return wm


class DeadlineTimer:
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
        partitions: int,
        lagging: Lagging = _not_lagging,
    ) -> None:
        self.settings, self.processor, self.publisher = settings, processor, publisher
        self.deadlines, self.watermarks, self.baselines = deadlines, watermarks, baselines
        self.clusters, self.sizes, self.metrics, self.lock = clusters, sizes, metrics, lock
        self.partitions = partitions  # of the events topic (erasure clears every one)
        self.lagging = lagging
        self.owned: set[int] = set()  # events partitions this worker owns now
        self._pending_read_at = self._sizes_read_at = float("-inf")

    async def fire_due(self, limit: int = 500) -> int:
        """One timer pass over this worker's partitions; returns how many deadlines it looked at."""
        owned = sorted(self.owned)
        looked = 0
        worst_lag = 0.0
        marks: dict[int, int] = {}
        for partition in owned:
            wm = await self.watermarks.at(partition)
            if wm is not None:
                marks[partition] = wm
                worst_lag = max(worst_lag, time.time() - wm / 1000)
        async with self.lock:
            # one round trip for every owned partition; the work only where something is due
            due_by_partition = await self.deadlines.due_many(marks, limit)
            for partition, due in due_by_partition.items():
                await self.baselines.refresh()
                outcome = await self.processor.fire(partition, due, marks[partition])
                await self._settle(outcome)
                await self.deadlines.settle(partition, outcome.settled)
                await self.deadlines.remove_members(partition, outcome.departed)
                looked += len(due)
        if time.monotonic() - self._pending_read_at > self.settings.baseline_refresh_seconds:
            self._pending_read_at = time.monotonic()
            pending = 0
            for partition in owned:
                pending += await self.deadlines.pending(partition)
            self.metrics.deadlines_pending.set(pending)
        await self.refresh_sizes()
        self.metrics.deadlines_fired.inc(looked)
        self.metrics.watermark_lag.set(worst_lag)
        return looked

    async def sweep(self) -> int:
        """One pass of the cluster sweep over this worker's partitions; returns profiles checked.

        Once a model exists, every profile with behaviour must get its cluster, and a new
        model that would move users (its ``sweep_version``) must reach those who send
        nothing more. Each partition's members are walked with a cursor kept in Redis (a
        new owner continues where the last one stopped), about CLUSTER_SWEEP_RATE profiles
        a second for the whole worker; every profile goes through the same reaction and
        compare-and-set write as the timer, so a change is published once, with its id.
        A pass that began for an older model still finishes; the partition counts as swept
        to the version the pass began with, and a newer one starts another pass.

        A partition this worker is a full batch or more behind in waits: its batches give
        every user they write the current model's cluster, so the sweep's re-checks would
        mostly repeat them, taking CPU and the lock from the catching up. Once it is caught
        up, the sweep goes on from where it was.
        """
        if not self.clusters.enabled:
            return 0
        await self.clusters.refresh()  # an idle worker must still see a new model
        snap = self.clusters.snapshot
        owned = sorted(self.owned)
        if snap is None or not owned:
            return 0
        per_pass = self.settings.cluster_sweep_rate * self.settings.timer_interval_seconds
        count = max(1, int(per_pass / len(owned)))
        checked = behind = 0
        for partition in owned:
            state = await self.deadlines.sweep_state(partition)
            if state.done >= snap.sweep_version:
                continue
            if self.lagging(partition):
                behind += 1
                continue
            wm = await self.watermarks.at(partition)
            if wm is None:  # nothing read from it yet: no time to decide at
                behind += 1
                continue
            started = state.started_for if state.cursor else snap.sweep_version
            cursor, users = await self.deadlines.scan_members(partition, state.cursor, count)
            for at in range(0, len(users), SWEEP_HOLD):
                # the lock is fair: a batch waiting for it goes between two chunks
                async with self.lock:
                    await self.baselines.refresh()
                    outcome = await self.processor.recheck(partition, users[at : at + SWEEP_HOLD], wm)
                    await self._settle(outcome)
                    for part, entries in outcome.earlier.items():
                        await self.deadlines.schedule_earlier(part, entries)
                    await self.deadlines.remove_members(partition, outcome.departed)
                    # the sweep sees every member's current state: the next model learns from it
                    await self.clusters.sample(outcome.profiles)
            checked += len(users)
            done = started if cursor == 0 else state.done
            await self.deadlines.save_sweep(partition, SweepState(done, started, cursor))
            behind += int(done < snap.sweep_version)
        self.metrics.cluster_sweep_checked.inc(checked)
        self.metrics.cluster_sweep_behind.set(behind)
        return checked

    async def _settle(self, outcome: TimerOutcome) -> None:
        await self.publisher.reactions(outcome)
        await self.sizes.add(outcome.size_deltas)

    async def refresh_sizes(self, force: bool = False) -> None:
        """The segment size gauges from the shared counts (every BASELINE_REFRESH_SECONDS)."""
        if not force and time.monotonic() - self._sizes_read_at < self.settings.baseline_refresh_seconds:
            return
        self._sizes_read_at = time.monotonic()
        for name, value in (await self.sizes.read()).items():
            source, _, segment = name.partition(":")
            self.metrics.segment_members.labels(source, segment).set(value)
