"""Shared models in Redis: versioned snapshots, training samples, a training lease.

Two models use it: the cluster model (``name="cluster"``, snapshots of
:class:`~stream_app.segments.assign.Snapshot`, samples are feature vectors) and the
recommender (``name="reco"``, :class:`~stream_app.personalization.recommend.RecoModel`,
samples are ``[cluster name, features in adoption order]``). Each has its own keys,
hash tag and lease. Below, the cluster model's words; the recommender's are the same.

One model serves every worker: workers keep one feature vector per user (the latest
state of a sample of the profiles each batch wrote) in a shared sample set, the worker
holding the lease trains from a random draw of it and publishes snapshot N+1 (refused
unless the stored version is N, so two trainers can never interleave), and every worker
assigns with the latest snapshot. Erasure removes a user's vector.
Snapshots are JSON (:class:`~stream_app.segments.cluster_model.Snapshot`), never
pickle. All keys share one Cluster hash tag, so each script touches one slot.
"""

from __future__ import annotations

import abc
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

import orjson

from stream_app.segments.assign import Snapshot
from stream_app.store.keys import Keys
from stream_app.store.scripts import AnyRedis, Scripts

HISTORY = 10


class Versioned(Protocol):
    @property
    def version(self) -> int: ...

    def to_json(self) -> bytes: ...


S = TypeVar("S", bound=Versioned)


class ModelStore(abc.ABC, Generic[S]):
    @abc.abstractmethod
    async def put_samples(self, vectors: Mapping[str, Any], cap: int) -> None:
        """Store each user's latest feature vector (replacing an older one); beyond ``cap``
        users, random others are dropped."""

    @abc.abstractmethod
    async def sample(self, limit: int) -> list[Any]:
        """Up to ``limit`` stored vectors drawn at random (all of them when fewer), one per user."""

    @abc.abstractmethod
    async def remove_samples(self, users: Sequence[str]) -> None:
        """Forget these users' vectors (erasure, consent withdrawn)."""

    @abc.abstractmethod
    async def sample_count(self) -> int: ...

    @abc.abstractmethod
    async def version(self) -> int:
        """Version of the latest snapshot (0: none yet)."""

    @abc.abstractmethod
    async def latest(self) -> S | None: ...

    @abc.abstractmethod
    async def publish(self, snapshot: S) -> bool:
        """Store ``snapshot`` if it is exactly the next version; False if another got there first."""

    @abc.abstractmethod
    async def history(self) -> list[S]:
        """The last few snapshots, newest first."""

    @abc.abstractmethod
    async def acquire_lease(self, owner: str, ttl_ms: int) -> bool:
        """Become (or stay) the trainer for ``ttl_ms``; False while another owner holds it."""


class InMemoryModelStore(ModelStore[S]):
    def __init__(self) -> None:
        self.samples: dict[str, Any] = {}
        self.snapshots: list[S] = []
        self.lease: tuple[str, float] | None = None
        self.clock = time.monotonic
        self.rng = random.Random(0)

    async def put_samples(self, vectors: Mapping[str, Any], cap: int) -> None:
        self.samples.update({user: orjson.loads(orjson.dumps(v)) for user, v in vectors.items()})
        if len(self.samples) > cap:
            for user in self.rng.sample(sorted(self.samples), len(self.samples) - cap):
                del self.samples[user]

    async def sample(self, limit: int) -> list[Any]:
        users = list(self.samples)
        if len(users) > limit:
            users = self.rng.sample(users, limit)
        return [orjson.loads(orjson.dumps(self.samples[u])) for u in users]

    async def remove_samples(self, users: Sequence[str]) -> None:
        for user in users:
            self.samples.pop(user, None)

    async def sample_count(self) -> int:
        return len(self.samples)

    async def version(self) -> int:
        return self.snapshots[-1].version if self.snapshots else 0

    async def latest(self) -> S | None:
        return self.snapshots[-1] if self.snapshots else None

    async def publish(self, snapshot: S) -> bool:
        if snapshot.version != await self.version() + 1:
            return False
        self.snapshots.append(snapshot)
        del self.snapshots[:-HISTORY]
        return True

    async def history(self) -> list[S]:
        return list(reversed(self.snapshots))

    async def acquire_lease(self, owner: str, ttl_ms: int) -> bool:
        now = self.clock()
        if self.lease is None or self.lease[0] == owner or self.lease[1] <= now:
            self.lease = (owner, now + ttl_ms / 1000)
            return True
        return False


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


class RedisModelStore(ModelStore[S]):
    def __init__(self, client: AnyRedis, keys: Keys, name: str, decode: Callable[[bytes | str], S]) -> None:
        self.client, self.keys, self.name, self.decode = client, keys, name, decode
        self.scripts = Scripts(client, {"publish": _PUBLISH_LUA, "lease": _LEASE_LUA})

    def _key(self, kind: str) -> str:
        return self.keys.model(self.name, kind)

    async def put_samples(self, vectors: Mapping[str, Any], cap: int) -> None:
        if not vectors:
            return
        key = self._key("vectors")
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping={user: orjson.dumps(v) for user, v in vectors.items()})
        pipe.hlen(key)
        size = int((await pipe.execute())[-1])
        if size > cap:  # random eviction: a user's chance to stay does not depend on when they came
            evict = await self.client.hrandfield(key, size - cap)
            if evict:
                await self.client.hdel(key, *evict)

    async def sample(self, limit: int) -> list[Any]:
        key = self._key("vectors")
        raw: list[bytes] = await self.client.hrandfield(key, limit, withvalues=True)  # type: ignore[assignment]
        return [orjson.loads(v) for v in (raw or [])[1::2]]  # field, value, ...; distinct fields

    async def remove_samples(self, users: Sequence[str]) -> None:
        if users:
            await self.client.hdel(self._key("vectors"), *users)

    async def sample_count(self) -> int:
        return int(await self.client.hlen(self._key("vectors")))

    async def version(self) -> int:
        raw = await self.client.hget(self._key("model"), "version")
        return int(raw) if raw is not None else 0

    async def latest(self) -> S | None:
        raw = await self.client.hget(self._key("model"), "snapshot")
        return self.decode(raw) if raw is not None else None

    async def publish(self, snapshot: S) -> bool:
        keys = [self._key("model"), self._key("history")]
        done = await self.scripts.call("publish", keys, snapshot.version, snapshot.to_json(), HISTORY)
        return bool(done)

    async def history(self) -> list[S]:
        raw = await self.client.lrange(self._key("history"), 0, -1)
        return [self.decode(r) for r in raw]

    async def acquire_lease(self, owner: str, ttl_ms: int) -> bool:
        return bool(await self.scripts.call("lease", [self._key("lease")], owner, ttl_ms))


ClusterModelStore = ModelStore[Snapshot]
InMemoryClusterModelStore = InMemoryModelStore[Snapshot]


def RedisClusterModelStore(client: AnyRedis, keys: Keys) -> RedisModelStore[Snapshot]:
    """The cluster model's store (its keys as they always were: ``{prefix}:cluster-*``)."""
    return RedisModelStore(client, keys, "cluster", Snapshot.from_json)
