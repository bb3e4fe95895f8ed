"""Segment sizes: how many users are in each rule segment and cluster. One interface, Redis and memory.

Every worker adds the changes it decides (``entered`` +1, ``exited`` -1) to one shared hash;
the ``onboarding_segment_members`` gauges are read from it. A crash between a profile write
and the increment leaves a count off by one, so the sizes are approximate (README "Metrics").
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

from stream_app.store.keys import Keys
from stream_app.store.scripts import AnyRedis


class SegmentSizeStore(abc.ABC):
    @abc.abstractmethod
    async def add(self, deltas: Mapping[str, int]) -> None:
        """Move the sizes (``rule:<segment>`` / ``cluster:<name>`` -> +-n)."""

    @abc.abstractmethod
    async def read(self) -> dict[str, int]:
        """Every size, never below zero."""


class InMemorySegmentSizeStore(SegmentSizeStore):
    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    async def add(self, deltas: Mapping[str, int]) -> None:
        for key, delta in deltas.items():
            self.sizes[key] = self.sizes.get(key, 0) + delta

    async def read(self) -> dict[str, int]:
        return {k: max(0, v) for k, v in self.sizes.items()}


class RedisSegmentSizeStore(SegmentSizeStore):
    def __init__(self, client: AnyRedis, keys: Keys) -> None:
        self.client, self.key = client, keys.segment_sizes()

    async def add(self, deltas: Mapping[str, int]) -> None:
        moves = {k: d for k, d in deltas.items() if d}
        if not moves:
            return
        pipe = self.client.pipeline(transaction=False)
        for key, delta in moves.items():
            pipe.hincrby(self.key, key, delta)
        await pipe.execute()

    async def read(self) -> dict[str, int]:
        raw = await self.client.hgetall(self.key)
        return {(k.decode() if isinstance(k, bytes) else str(k)): max(0, int(v)) for k, v in raw.items()}
