"""The bandit's counts: pulls and rewards per (trigger type, context, variant), in Redis.

Each trigger type has one hash of counts and one sorted set of the trigger ids already
counted (``p:<id>`` for a pull, ``r:<id>`` for a reward), under one hash tag, so one Lua
call per type deduplicates and counts atomically (also on Redis Cluster). Counting the
same trigger twice (a re-sent outbox, a redelivered outcome, a replay after a crash)
changes nothing; ids older than the dedup window are forgotten.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence

from stream_app.store.keys import Keys
from stream_app.store.scripts import AnyRedis, Call, Eval, Scripts
from stream_app.triggers.bandit import ArmEvent, ArmStats

PULL, REWARD = "p", "r"
SEP = "|"  # contexts ("all", "cluster:<id>") and variant names (a-z0-9_-) never contain it


class BanditStore(abc.ABC):
    @abc.abstractmethod
    async def add(self, pulls: Sequence[ArmEvent], rewards: Sequence[ArmEvent]) -> list[tuple[str, ArmEvent]]:
        """Count pulls and rewards not counted before (by trigger id); return those that were
        new, as ``(PULL | REWARD, event)``."""

    @abc.abstractmethod
    async def arms(self, trigger_types: Sequence[str]) -> dict[tuple[str, str, str], ArmStats]:
        """(type, context, variant) -> counts, for these trigger types."""


class InMemoryBanditStore(BanditStore):
    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], ArmStats] = {}
        self.counted: set[tuple[str, str]] = set()

    async def add(self, pulls: Sequence[ArmEvent], rewards: Sequence[ArmEvent]) -> list[tuple[str, ArmEvent]]:
        new = []
        for kind, e in _tagged(pulls, rewards):
            if (kind, e.trigger_id) in self.counted:
                continue
            self.counted.add((kind, e.trigger_id))
            key = (e.type, e.context, e.variant)
            was = self.counts.get(key, ArmStats())
            pull = kind == PULL
            self.counts[key] = ArmStats(was.pulls + pull, was.rewards + (not pull))
            new.append((kind, e))
        return new

    async def arms(self, trigger_types: Sequence[str]) -> dict[tuple[str, str, str], ArmStats]:
        return {k: v for k, v in self.counts.items() if k[0] in trigger_types}


def _tagged(pulls: Sequence[ArmEvent], rewards: Sequence[ArmEvent]) -> list[tuple[str, ArmEvent]]:
    return [(PULL, e) for e in pulls] + [(REWARD, e) for e in rewards]


# KEYS: arms hash, counted zset. ARGV: now ms, window ms, then (counted member, hash field)
# pairs. Returns a 1 (new) or 0 (counted before) per pair.
_ADD_LUA = """
local now = tonumber(ARGV[1])
local new = {}
for i = 3, #ARGV, 2 do
  if redis.call('ZADD', KEYS[2], 'NX', now, ARGV[i]) == 1 then
    redis.call('HINCRBY', KEYS[1], ARGV[i + 1], 1)
    new[#new + 1] = 1
  else
    new[#new + 1] = 0
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
return new
"""


class RedisBanditStore(BanditStore):
    def __init__(self, client: AnyRedis, keys: Keys, dedup_window_seconds: int) -> None:
        self.client, self.keys = client, keys
        self.window_ms = dedup_window_seconds * 1000
        self.scripts = Scripts(client, {"add": _ADD_LUA})

    async def add(self, pulls: Sequence[ArmEvent], rewards: Sequence[ArmEvent]) -> list[tuple[str, ArmEvent]]:
        by_type: dict[str, list[tuple[str, ArmEvent]]] = {}
        for kind, e in _tagged(pulls, rewards):
            by_type.setdefault(e.type, []).append((kind, e))
        if not by_type:
            return []
        now_ms = int(time.time() * 1000)
        calls: list[Call] = []
        for t, items in by_type.items():
            args: list[str] = []
            for kind, e in items:
                args.extend((f"{kind}:{e.trigger_id}", SEP.join((e.context, e.variant, kind))))
            keys = [self.keys.bandit(t, "arms"), self.keys.bandit(t, "counted")]
            calls.append(Eval("add", keys, [now_ms, self.window_ms, *args]))
        replies = await self.scripts.pipeline(calls)
        return [
            item
            for items, flags in zip(by_type.values(), replies, strict=True)
            for item, flag in zip(items, flags, strict=True)
            if int(flag)
        ]

    async def arms(self, trigger_types: Sequence[str]) -> dict[tuple[str, str, str], ArmStats]:
        out: dict[tuple[str, str, str], ArmStats] = {}
        for t in trigger_types:
            raw = await self.client.hgetall(self.keys.bandit(t, "arms"))
            counts: dict[tuple[str, str], dict[str, int]] = {}
            for f, v in raw.items():
                context, variant, kind = (f.decode() if isinstance(f, bytes) else str(f)).split(SEP)
                counts.setdefault((context, variant), {})[kind] = int(v)
            for (context, variant), c in counts.items():
                out[(t, context, variant)] = ArmStats(c.get("p", 0), c.get("r", 0))
        return out
