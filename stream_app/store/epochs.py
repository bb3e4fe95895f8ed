"""Epoch markers: proof that Redis still holds what the committed offsets say was applied.

When a worker applies the first batch of an events partition for a consumer group that has
never committed on it, it writes that partition's marker (``SET NX``, no expiry, the same
Cluster slot as the partition's deadlines). From then on the marker must be there: if the
group has committed offsets for a partition and Redis has no marker, Redis lost its data
(restarted without persistence, failed over to an empty replica, flushed) while Kafka says
the events were applied. Carrying on would rebuild profiles from the middle of the stream
and forget which messageIds were applied, so the worker stops with a clear error instead
(README "Redis lost its data" for the recovery). One interface, Redis and memory.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence

from stream_app.store.keys import Keys
from stream_app.store.scripts import AnyRedis


class EpochStore(abc.ABC):
    @abc.abstractmethod
    async def missing(self, partitions: Sequence[int]) -> list[int]:
        """The partitions (of the events topic) whose marker is not in Redis."""

    @abc.abstractmethod
    async def mark(self, partitions: Sequence[int]) -> None:
        """Write the partitions' markers (an existing marker is kept as it is)."""


class InMemoryEpochStore(EpochStore):
    def __init__(self) -> None:
        self.marked: dict[int, int] = {}

    async def missing(self, partitions: Sequence[int]) -> list[int]:
        return [p for p in partitions if p not in self.marked]

    async def mark(self, partitions: Sequence[int]) -> None:
        for p in partitions:
            self.marked.setdefault(p, int(time.time() * 1000))


class RedisEpochStore(EpochStore):
    def __init__(self, client: AnyRedis, keys: Keys, topic: str) -> None:
        self.client, self.keys, self.topic = client, keys, topic

    async def missing(self, partitions: Sequence[int]) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        for p in partitions:
            pipe.exists(self.keys.epoch(self.topic, p))
        found = await pipe.execute()
        return [p for p, n in zip(partitions, found, strict=True) if not n]

    async def mark(self, partitions: Sequence[int]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for p in partitions:
            pipe.set(self.keys.epoch(self.topic, p), int(time.time() * 1000), nx=True)
        await pipe.execute()
