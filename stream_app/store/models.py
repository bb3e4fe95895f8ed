"""The shared cluster model in Redis: versioned snapshots, training samples, a training lease.

One model serves every worker: workers push feature samples, the worker holding the
lease trains and publishes snapshot N+1 (refused unless the stored version is N, so
two trainers can never interleave), and every worker assigns with the latest snapshot.
Snapshots are JSON (:class:`~stream_app.segments.cluster_model.Snapshot`), never
pickle. All keys share one Cluster hash tag, so each script touches one slot.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence

import orjson

from stream_app.segments.cluster_model import Snapshot
from stream_app.store.keys import Keys
from stream_app.store.scripts import AnyRedis, Scripts

HISTORY = 10


class ClusterModelStore(abc.ABC):
    @abc.abstractmethod
    async def add_samples(self, vectors: Sequence[Sequence[float]], cap: int) -> None:
        """Queue feature vectors for training, keeping at most the newest ``cap``."""

    @abc.abstractmethod
    async def take_samples(self, limit: int) -> list[list[float]]:
        """Remove and return up to ``limit`` queued vectors, oldest first."""

    @abc.abstractmethod
    async def queued(self) -> int: ...

    @abc.abstractmethod
    async def version(self) -> int:
        """Version of the latest snapshot (0: none yet)."""

    @abc.abstractmethod
    async def latest(self) -> Snapshot | None: ...

    @abc.abstractmethod
    async def publish(self, snapshot: Snapshot) -> bool:
        """Store ``snapshot`` if it is exactly the next version; False if another got there first."""

    @abc.abstractmethod
    async def history(self) -> list[Snapshot]:
        """The last few snapshots, newest first."""

    @abc.abstractmethod
    async def acquire_lease(self, owner: str, ttl_ms: int) -> bool:
        """Become (or stay) the trainer for ``ttl_ms``; False while another owner holds it."""


class InMemoryClusterModelStore(ClusterModelStore):
    def __init__(self) -> None:
        self.samples: list[list[float]] = []
        self.snapshots: list[Snapshot] = []
        self.lease: tuple[str, float] | None = None
        self.clock = time.monotonic

    async def add_samples(self, vectors: Sequence[Sequence[float]], cap: int) -> None:
        self.samples.extend(list(v) for v in vectors)
        del self.samples[:-cap]

    async def take_samples(self, limit: int) -> list[list[float]]:
        taken, self.samples = self.samples[:limit], self.samples[limit:]
        return taken

    async def queued(self) -> int:
        return len(self.samples)

    async def version(self) -> int:
        return self.snapshots[-1].version if self.snapshots else 0

    async def latest(self) -> Snapshot | None:
        return self.snapshots[-1] if self.snapshots else None

    async def publish(self, snapshot: Snapshot) -> bool:
        if snapshot.version != await self.version() + 1:
            return False
        self.snapshots.append(snapshot)
        del self.snapshots[:-HISTORY]
        return True

    async def history(self) -> list[Snapshot]:
        return list(reversed(self.snapshots))

    async def acquire_lease(self, owner: str, ttl_ms: int) -> bool:
        now = self.clock()
        if self.lease is None or self.lease[0] == owner or self.lease[1] <= now:
            self.lease = (owner, now + ttl_ms / 1000)
            return True
        return False


# KEYS: samples list. ARGV: limit. Oldest first (RPUSH appends, so the head is the oldest).
_TAKE_LUA = """
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
redis.call('LTRIM', KEYS[1], #items, -1)
return items
"""

# KEYS: model hash, history list. ARGV: version, snapshot json, history length.
_PUBLISH_LUA = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if tonumber(ARGV[1]) ~= current + 1 then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'snapshot', ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
return 1
"""

# KEYS: lease. ARGV: owner, ttl ms.
_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


class RedisClusterModelStore(ClusterModelStore):
    def __init__(self, client: AnyRedis, keys: Keys) -> None:
        self.client, self.keys = client, keys
        self.scripts = Scripts(client, {"take": _TAKE_LUA, "publish": _PUBLISH_LUA, "lease": _LEASE_LUA})

    async def add_samples(self, vectors: Sequence[Sequence[float]], cap: int) -> None:
        if not vectors:
            return
        key = self.keys.cluster_model("samples")
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(key, *(orjson.dumps(list(v)) for v in vectors))
        pipe.ltrim(key, -cap, -1)
        await pipe.execute()

    async def take_samples(self, limit: int) -> list[list[float]]:
        raw = await self.scripts.call("take", [self.keys.cluster_model("samples")], limit)
        return [orjson.loads(r) for r in raw or []]

    async def queued(self) -> int:
        return int(await self.client.llen(self.keys.cluster_model("samples")))

    async def version(self) -> int:
        raw = await self.client.hget(self.keys.cluster_model("model"), "version")
        return int(raw) if raw is not None else 0

    async def latest(self) -> Snapshot | None:
        raw = await self.client.hget(self.keys.cluster_model("model"), "snapshot")
        return Snapshot.from_json(raw) if raw is not None else None

    async def publish(self, snapshot: Snapshot) -> bool:
        keys = [self.keys.cluster_model("model"), self.keys.cluster_model("history")]
        done = await self.scripts.call("publish", keys, snapshot.version, snapshot.to_json(), HISTORY)
        return bool(done)

    async def history(self) -> list[Snapshot]:
        raw = await self.client.lrange(self.keys.cluster_model("history"), 0, -1)
        return [Snapshot.from_json(r) for r in raw]

    async def acquire_lease(self, owner: str, ttl_ms: int) -> bool:
        return bool(await self.scripts.call("lease", [self.keys.cluster_model("lease")], owner, ttl_ms))
