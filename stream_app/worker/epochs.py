"""The epoch guard: before a batch is applied, Redis must still hold its partitions' markers.

See :mod:`stream_app.store.epochs` for why. A partition this process has not seen yet is
checked on its first batch: no marker and no committed offset means a fresh start (the
marker is written); no marker but a committed offset means Redis lost its data. Partitions
already known are re-checked at most every ``recheck_seconds``, so a Redis that restarts
empty under a running worker is caught within about a second (one EXISTS per partition).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from stream_app.errors import RedisDataLost
from stream_app.store.epochs import EpochStore

log = logging.getLogger(__name__)

#: the consumer group's committed offset of an events partition (None: never committed)
Committed = Callable[[int], "int | None"]


def _never_committed(partition: int) -> int | None:
    return None


class EpochGuard:
    def __init__(
        self,
        store: EpochStore,
        topic: str,
        committed: Committed = _never_committed,
        accept: bool = False,
        recheck_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.topic, self.committed, self.accept = store, topic, committed, accept
        self.recheck_seconds, self.clock = recheck_seconds, clock
        self.known: set[int] = set()  # partitions whose marker this process has seen or written
        self._checked_at = float("-inf")

    async def check(self, partitions: Iterable[int]) -> None:
        """Raise :class:`RedisDataLost` if Redis lost the data of any of these partitions."""
        wanted = sorted(set(partitions))
        now = self.clock()
        if set(wanted) <= self.known and now - self._checked_at < self.recheck_seconds:
            return
        missing = await self.store.missing(wanted)
        lost = [p for p in missing if p in self.known or self.committed(p) is not None]
        if lost and not self.accept:
            raise RedisDataLost(lost, self.topic)
        if lost:
            log.warning(
                "Redis has no epoch marker for partitions with committed offsets; accepted "
                "(ACCEPT_REDIS_STATE=true): markers written",
                extra={"partitions": lost},
            )
        if missing:
            await self.store.mark(missing)
        self.known.update(wanted)
        self._checked_at = now
