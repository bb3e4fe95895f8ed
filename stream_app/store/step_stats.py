"""Per-step completion-time statistics: count, mean and variance (Welford), in Redis.

One hash per (flow, step) ``{prefix}:stepstats:{flow|step}`` holds n, mean and M2;
the messageIds already folded in (their 64-bit digests) live in a sorted set with the same hash tag, so one
Lua call per step per batch deduplicates and updates atomically (also on Redis
Cluster). Folding the same completion twice (a redelivery, or a replay after a crash
between the profile write and this one) changes nothing.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stream_app.profile import StepDuration
from stream_app.store.keys import Keys, parse_step_name, step_name
from stream_app.store.profiles import digest
from stream_app.store.scripts import AnyRedis, Call, Eval, Scripts


@dataclass(frozen=True)
class StepStats:
    flow: str
    step: str
    count: int
    mean_s: float
    variance_s2: float
    group: str = ""

    @property
    def stddev_s(self) -> float:
        return math.sqrt(self.variance_s2)


GROUP_SEP = "\x1f"  # index entries written before step_name: "flow|step" US group


class StepStatsStore(abc.ABC):
    @abc.abstractmethod
    async def add(self, durations: Sequence[StepDuration]) -> int:
        """Fold durations in, skipping message ids already folded; return how many were new."""

    @abc.abstractmethod
    async def get(self, flow: str, step: str, group: str = "") -> StepStats | None: ...

    @abc.abstractmethod
    async def all(self) -> list[StepStats]: ...


def _welford(n: int, mean: float, m2: float, x: float) -> tuple[int, float, float]:
    n += 1
    delta = x - mean
    mean += delta / n
    return n, mean, m2 + delta * (x - mean)


def _stats(flow: str, step: str, n: int, mean: float, m2: float, group: str = "") -> StepStats:
    return StepStats(flow, step, n, mean, m2 / (n - 1) if n > 1 else 0.0, group)


class InMemoryStepStatsStore(StepStatsStore):
    def __init__(self) -> None:
        self.values: dict[tuple[str, str, str], tuple[int, float, float]] = {}
        self.applied: set[tuple[str, str]] = set()

    async def add(self, durations: Sequence[StepDuration]) -> int:
        new = 0
        for d in durations:
            if (d.group, d.message_id) in self.applied:
                continue
            self.applied.add((d.group, d.message_id))
            key = (d.flow, d.step, d.group)
            self.values[key] = _welford(*self.values.get(key, (0, 0.0, 0.0)), d.duration_s)
            new += 1
        return new

    async def get(self, flow: str, step: str, group: str = "") -> StepStats | None:
        value = self.values.get((flow, step, group))
        return _stats(flow, step, *value, group) if value else None

    async def all(self) -> list[StepStats]:
        return [_stats(f, s, *v, g) for (f, s, g), v in sorted(self.values.items())]


# KEYS: stats hash, applied zset. ARGV: now ms, window ms, then (digest of the message id,
# the id itself, duration) triples. The set holds digests; full ids written before them are
# still found (they leave with the dedup window).
_ADD_LUA = """
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local mean = tonumber(redis.call('HGET', KEYS[1], 'mean') or '0')
local m2 = tonumber(redis.call('HGET', KEYS[1], 'm2') or '0')
local now = tonumber(ARGV[1])
local added = 0
for i = 3, #ARGV, 3 do
  if not redis.call('ZSCORE', KEYS[2], ARGV[i + 1])
     and redis.call('ZADD', KEYS[2], 'NX', now, ARGV[i]) == 1 then
    local x = tonumber(ARGV[i + 2])
    n = n + 1
    local delta = x - mean
    mean = mean + delta / n
    m2 = m2 + delta * (x - mean)
    added = added + 1
  end
end
if added > 0 then
  redis.call('HSET', KEYS[1], 'n', n, 'mean', tostring(mean), 'm2', tostring(m2))
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[2], ARGV[2])  -- a step nobody completes for a window: no dedup memory
return added
"""


class RedisStepStatsStore(StepStatsStore):
    def __init__(self, client: AnyRedis, keys: Keys, dedup_window_seconds: int) -> None:
        self.client, self.keys = client, keys
        self.window_ms = dedup_window_seconds * 1000
        self.scripts = Scripts(client, {"add": _ADD_LUA})

    async def add(self, durations: Sequence[StepDuration]) -> int:
        by_step: dict[tuple[str, str, str], list[Any]] = {}
        for d in durations:
            args = (digest(d.message_id), d.message_id, repr(d.duration_s))
            by_step.setdefault((d.flow, d.step, d.group), []).extend(args)
        if not by_step:
            return 0
        now_ms = int(time.time() * 1000)
        calls: list[Call] = []
        for (flow, step, group), pairs in by_step.items():
            keys = [self.keys.step_stats(flow, step, group), self.keys.step_stats_applied(flow, step, group)]
            calls.append(Eval("add", keys, [now_ms, self.window_ms, *pairs]))
            calls.append(("SADD", self.keys.step_stats_index(), step_name(flow, step, group)))
        replies = await self.scripts.pipeline(calls)
        return sum(int(r) for r in replies[::2])

    async def get(self, flow: str, step: str, group: str = "") -> StepStats | None:
        n, mean, m2 = await self.client.hmget(self.keys.step_stats(flow, step, group), ["n", "mean", "m2"])
        if n is None or mean is None or m2 is None:
            return None
        return _stats(flow, step, int(n), float(mean), float(m2), group)

    async def all(self) -> list[StepStats]:
        members = await self.client.smembers(self.keys.step_stats_index())
        names = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        out = []
        for name in names:
            if GROUP_SEP in name:  # written before names were escaped: flow|step<US>group
                head, _, group = name.partition(GROUP_SEP)
                flow, _, step = head.partition("|")
            else:
                flow, step, group = parse_step_name(name)
            stats = await self.get(flow, step, group)
            if stats is not None:
                out.append(stats)
        return out
