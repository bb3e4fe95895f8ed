"""Per-step completion-time statistics: count, mean and variance (Welford), in Redis.

One hash per (flow, step) ``{prefix}:stepstats:{flow|step}`` holds n, mean and M2 and,
per events partition, the offset of the last completion folded in from it (field
``o<partition>``). A completion is folded in only if the offset of the record that
completed the step is above its partition's mark, so folding it again (a redelivery, a
replay after a crash) changes nothing. This holds because one partition's records are
applied in offset order (one batch in flight per worker; a zombie and its successor apply
the same records, and the later writer skips what the earlier one folded; a linked id's
events, redirected to its user, fold in the same call as the rest of their batch), and because
the pipeline folds durations in *before* it writes the profiles: a completion the stored
profile holds was counted, so a duplicate a client resent (at another offset) needs
nothing from here. The dedup memory is one number per partition and step, not an entry per
completion (a set of messageId digests cost ~0.5 KB per active user). One Lua call per step
per batch; a step's keys share one hash tag (Redis Cluster).

The former dedup sets (``{prefix}:stepstats-applied:...``) are no longer written or read;
they expire a dedup window after their last write.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stream_app.profile import StepDuration
from stream_app.store.keys import Keys, parse_step_name, step_name
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
        """Fold durations in, skipping those at or below their partition's mark for their
        step; return how many were new. Every duration needs its ``source``."""

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


def _in_order(durations: Sequence[StepDuration]) -> list[tuple[StepDuration, int, int]]:
    """(duration, partition, offset) in offset order per partition (a batch's durations come
    per user); a duration without its record's position cannot be folded once: refused."""
    out = []
    for d in durations:
        if d.source is None:
            raise ValueError(f"step duration of {d.flow!r}/{d.step!r} without its record's position")
        out.append((d, d.source[0], d.source[1]))
    return sorted(out, key=lambda t: (t[1], t[2]))


class InMemoryStepStatsStore(StepStatsStore):
    def __init__(self) -> None:
        self.values: dict[tuple[str, str, str], tuple[int, float, float]] = {}
        self.marks: dict[tuple[str, str, str, int], int] = {}  # (flow, step, group, partition) -> offset

    async def add(self, durations: Sequence[StepDuration]) -> int:
        new = 0
        for d, partition, offset in _in_order(durations):
            key = (d.flow, d.step, d.group)
            if offset <= self.marks.get((*key, partition), -1):
                continue
            self.marks[(*key, partition)] = offset
            self.values[key] = _welford(*self.values.get(key, (0, 0.0, 0.0)), d.duration_s)
            new += 1
        return new

    async def get(self, flow: str, step: str, group: str = "") -> StepStats | None:
        value = self.values.get((flow, step, group))
        return _stats(flow, step, *value, group) if value else None

    async def all(self) -> list[StepStats]:
        return [_stats(f, s, *v, g) for (f, s, g), v in sorted(self.values.items())]


# KEYS: stats hash. ARGV: (partition, offset, duration) triples, in offset order per partition.
_ADD_LUA = """
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local mean = tonumber(redis.call('HGET', KEYS[1], 'mean') or '0')
local m2 = tonumber(redis.call('HGET', KEYS[1], 'm2') or '0')
local marks, changed = {}, {}  -- changed: field -> the new mark as sent (no float formatting)
local added = 0
for i = 1, #ARGV, 3 do
  local field = 'o' .. ARGV[i]
  if marks[field] == nil then
    marks[field] = tonumber(redis.call('HGET', KEYS[1], field) or '-1')
  end
  local offset = tonumber(ARGV[i + 1])
  if offset > marks[field] then
    marks[field] = offset
    changed[field] = ARGV[i + 1]
    local x = tonumber(ARGV[i + 2])
    n = n + 1
    local delta = x - mean
    mean = mean + delta / n
    m2 = m2 + delta * (x - mean)
    added = added + 1
  end
end
if added > 0 then
  local args = {'n', n, 'mean', tostring(mean), 'm2', tostring(m2)}
  for field, offset in pairs(changed) do
    args[#args + 1] = field
    args[#args + 1] = offset
  end
  redis.call('HSET', KEYS[1], unpack(args))
end
return added
"""


class RedisStepStatsStore(StepStatsStore):
    def __init__(self, client: AnyRedis, keys: Keys) -> None:
        self.client, self.keys = client, keys
        self.scripts = Scripts(client, {"add": _ADD_LUA})

    async def add(self, durations: Sequence[StepDuration]) -> int:
        by_step: dict[tuple[str, str, str], list[Any]] = {}
        for d, partition, offset in _in_order(durations):
            by_step.setdefault((d.flow, d.step, d.group), []).extend((partition, offset, repr(d.duration_s)))
        if not by_step:
            return 0
        calls: list[Call] = []
        for (flow, step, group), args in by_step.items():
            calls.append(Eval("add", [self.keys.step_stats(flow, step, group)], args))
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
