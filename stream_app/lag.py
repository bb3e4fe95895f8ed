"""Consumer lag per partition, in records and in seconds. Pure: time is passed in.

In records: the partition's log-end offset (high-water mark) minus the position processed
(or committed). In seconds, the way kafka-lag-exporter estimates it: the log-end offset is
sampled over time, and the age of the oldest unprocessed record is ``now`` minus the
moment the log end first passed the processed position (interpolated between samples).
An idle, caught-up partition has lag 0 / 0 s; one that is always a few records behind
under steady load shows the few seconds those records have waited, not the time since it
was last exactly caught up.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field

MAX_SAMPLES = 600  # per partition: ten minutes at one sample a second


@dataclass
class LagTracker:
    """Log-end offsets of each partition over time (only when they change)."""

    samples: dict[int, deque[tuple[int, float]]] = field(default_factory=dict)  # (offset, at)

    def observe(self, partition: int, log_end: int, now: float) -> None:
        history = self.samples.setdefault(partition, deque(maxlen=MAX_SAMPLES))
        if not history or history[-1][0] != log_end:
            history.append((log_end, now))

    def forget(self, partitions: set[int]) -> None:
        for partition in list(self.samples):
            if partition not in partitions:
                del self.samples[partition]

    def lag(self, partition: int, position: int, now: float) -> tuple[int, float]:
        """(records behind, seconds the oldest of them has waited) at ``position`` (next to process)."""
        history = self.samples.get(partition)
        if not history:
            return 0, 0.0
        log_end = history[-1][0]
        behind = max(0, log_end - position)
        if behind == 0:
            return 0, 0.0
        offsets = [offset for offset, _at in history]
        # the first sample whose log end is past ``position``: record ``position`` was appended
        # after the sample before it and by this one
        i = bisect_right(offsets, position)
        if i == 0:
            return behind, max(0.0, now - history[0][1])  # older than what was sampled
        before_offset, before_at = history[i - 1]
        after_offset, after_at = history[i]
        share = (position - before_offset + 1) / max(1, after_offset - before_offset)
        appended = before_at + (after_at - before_at) * min(1.0, share)
        return behind, max(0.0, now - appended)
