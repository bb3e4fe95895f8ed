"""Per-partition indexes of the events topic: deadlines, watermark, members, sweep cursor.

One interface, Redis and memory. Each partition of the events topic has

* a sorted set of user ids scored by the user's next deadline (trusted time, ms);
* a watermark hash (the greatest record timestamp read from it, and the wall clock then);
* a set of the user ids whose profiles it has written (*members*), which the cluster
  sweep walks so that users who send nothing more still get (re)assigned;
* the sweep's cursor over that set (:class:`SweepState`).

The worker that owns the partition fires what is due and sweeps its members. Keys of one
partition share a Cluster hash tag, so each script touches one slot; partitions spread
over the nodes of a Redis Cluster.

Firing is decided by the profile's compare-and-set write, not by this index: the
index says whom to look at, the profile says whether that occurrence was already
decided. :meth:`DeadlineStore.settle` only replaces the score it read, so a deadline
rescheduled meanwhile by an event is never lost.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stream_app.store.keys import Keys
from stream_app.store.scripts import AnyRedis, Call, Eval, Scripts


@dataclass(frozen=True, slots=True)
class SweepState:
    """Where a partition's cluster sweep stands.

    ``done``: every member has been checked against a model whose sweep version is at
    least this; ``started_for``: the sweep version the pass now running began with;
    ``cursor``: the scan position of that pass (0: at the start).
    """

    done: int = 0
    started_for: int = 0
    cursor: int = 0


class DeadlineStore(abc.ABC):
    @abc.abstractmethod
    async def schedule(self, partition: int, entries: Mapping[str, int | None]) -> None:
        """Set each user's next deadline in ``partition`` (None: remove)."""

    @abc.abstractmethod
    async def schedule_earlier(self, partition: int, entries: Mapping[str, int]) -> None:
        """Set each user's deadline unless one at or before it is already set (``ZADD LT``)."""

    @abc.abstractmethod
    async def due(self, partition: int, upto_ms: int, limit: int) -> list[tuple[str, int]]:
        """Users whose deadline is <= ``upto_ms``, earliest first, with the score read."""

    @abc.abstractmethod
    async def settle(self, partition: int, settled: Sequence[tuple[str, int, int | None]]) -> int:
        """For (user, score read, next deadline): replace the score only if it is still the one read.

        Returns how many were replaced or removed.
        """

    @abc.abstractmethod
    async def pending(self, partition: int) -> int: ...

    @abc.abstractmethod
    async def remove_users(self, users: Sequence[str], partitions: Iterable[int]) -> None:
        """Drop users from every given partition (erasure)."""

    @abc.abstractmethod
    async def advance_watermark(self, partition: int, event_ms: int, wall_ms: int) -> None:
        """Raise the partition's watermark to ``event_ms`` (never lowers it), noting the wall clock."""

    @abc.abstractmethod
    async def watermark(self, partition: int) -> tuple[int, int] | None:
        """(max event time, wall clock when it was seen), or None before any event."""

    async def due_many(self, upto: Mapping[int, int], limit: int) -> dict[int, list[tuple[str, int]]]:
        """:meth:`due` for several partitions (partition -> watermark); only partitions with due users."""
        out = {}
        for partition, upto_ms in upto.items():
            due = await self.due(partition, upto_ms, limit)
            if due:
                out[partition] = due
        return out

    @abc.abstractmethod
    async def add_members(self, partition: int, users: Iterable[str]) -> None:
        """Note users whose profiles this partition writes."""

    @abc.abstractmethod
    async def remove_members(self, partition: int, users: Sequence[str]) -> None: ...

    @abc.abstractmethod
    async def scan_members(self, partition: int, cursor: int, count: int) -> tuple[int, list[str]]:
        """About ``count`` members from ``cursor``; the next cursor, 0 when the scan is complete.

        A full scan returns every user who was a member throughout it at least once
        (possibly more than once), as Redis ``SSCAN`` guarantees.
        """

    @abc.abstractmethod
    async def sweep_state(self, partition: int) -> SweepState: ...

    @abc.abstractmethod
    async def save_sweep(self, partition: int, state: SweepState) -> None: ...

    async def record_batch(
        self,
        schedules: Mapping[int, Mapping[str, int | None]],
        marks: Mapping[int, int],
        wall_ms: int,
        members: Mapping[int, Iterable[str]] | None = None,
    ) -> None:
        """A batch's deadline changes, watermark advances and members (one round trip where the
        store can)."""
        for partition, entries in schedules.items():
            await self.schedule(partition, entries)
        for partition, event_ms in marks.items():
            await self.advance_watermark(partition, event_ms, wall_ms)
        for partition, users in (members or {}).items():
            await self.add_members(partition, users)


class InMemoryDeadlineStore(DeadlineStore):
    def __init__(self) -> None:
        self.sets: dict[int, dict[str, int]] = {}
        self.marks: dict[int, tuple[int, int]] = {}
        self.members: dict[int, set[str]] = {}
        self.sweeps: dict[int, SweepState] = {}
        self._scan_positions: dict[int, str] = {}

    async def add_members(self, partition: int, users: Iterable[str]) -> None:
        self.members.setdefault(partition, set()).update(users)

    async def remove_members(self, partition: int, users: Sequence[str]) -> None:
        self.members.get(partition, set()).difference_update(users)

    async def scan_members(self, partition: int, cursor: int, count: int) -> tuple[int, list[str]]:
        # a cursor stands for the last member returned, so members removed meanwhile shift nothing
        after = self._scan_positions.get(cursor, "") if cursor else ""
        ordered = sorted(m for m in self.members.get(partition, ()) if not cursor or m > after)
        chunk = ordered[:count]
        if len(chunk) == len(ordered):
            return 0, chunk
        token = len(self._scan_positions) + 1
        self._scan_positions[token] = chunk[-1]
        return token, chunk

    async def sweep_state(self, partition: int) -> SweepState:
        return self.sweeps.get(partition, SweepState())

    async def save_sweep(self, partition: int, state: SweepState) -> None:
        self.sweeps[partition] = state

    async def schedule(self, partition: int, entries: Mapping[str, int | None]) -> None:
        zset = self.sets.setdefault(partition, {})
        for user, at in entries.items():
            if at is None:
                zset.pop(user, None)
            else:
                zset[user] = at

    async def schedule_earlier(self, partition: int, entries: Mapping[str, int]) -> None:
        zset = self.sets.setdefault(partition, {})
        for user, at in entries.items():
            if user not in zset or at < zset[user]:
                zset[user] = at

    async def due(self, partition: int, upto_ms: int, limit: int) -> list[tuple[str, int]]:
        items = sorted((at, user) for user, at in self.sets.get(partition, {}).items() if at <= upto_ms)
        return [(user, at) for at, user in items[:limit]]

    async def settle(self, partition: int, settled: Sequence[tuple[str, int, int | None]]) -> int:
        zset = self.sets.setdefault(partition, {})
        done = 0
        for user, read, nxt in settled:
            if zset.get(user) == read:
                done += 1
                if nxt is None:
                    del zset[user]
                else:
                    zset[user] = nxt
        return done

    async def pending(self, partition: int) -> int:
        return len(self.sets.get(partition, {}))

    async def remove_users(self, users: Sequence[str], partitions: Iterable[int]) -> None:
        for p in partitions:
            for user in users:
                self.sets.get(p, {}).pop(user, None)
            self.members.get(p, set()).difference_update(users)

    async def advance_watermark(self, partition: int, event_ms: int, wall_ms: int) -> None:
        current = self.marks.get(partition)
        if current is None or event_ms > current[0]:
            self.marks[partition] = (event_ms, wall_ms)

    async def watermark(self, partition: int) -> tuple[int, int] | None:
        return self.marks.get(partition)


# KEYS[1] the partition's zset. ARGV: triples (user, score read, next or "").
_SETTLE_LUA = """
local done = 0
for i = 1, #ARGV, 3 do
  local current = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if current and tonumber(current) == tonumber(ARGV[i + 1]) then
    if ARGV[i + 2] == '' then
      redis.call('ZREM', KEYS[1], ARGV[i])
    else
      redis.call('ZADD', KEYS[1], ARGV[i + 2], ARGV[i])
    end
    done = done + 1
  end
end
return done
"""

# KEYS[1] watermark hash. ARGV: event ms, wall ms.
_ADVANCE_LUA = """
local ts = tonumber(redis.call('HGET', KEYS[1], 'ts') or '-1')
if tonumber(ARGV[1]) > ts then
  redis.call('HSET', KEYS[1], 'ts', ARGV[1], 'at', ARGV[2])
end
return 1
"""


class RedisDeadlineStore(DeadlineStore):
    def __init__(self, client: AnyRedis, keys: Keys, topic: str) -> None:
        self.client, self.keys, self.topic = client, keys, topic
        self.scripts = Scripts(client, {"settle": _SETTLE_LUA, "advance": _ADVANCE_LUA})

    def _zset(self, partition: int) -> str:
        return self.keys.deadlines(self.topic, partition)

    async def schedule(self, partition: int, entries: Mapping[str, int | None]) -> None:
        adds = {user: at for user, at in entries.items() if at is not None}
        removes = [user for user, at in entries.items() if at is None]
        pipe = self.client.pipeline(transaction=False)
        if adds:
            pipe.zadd(self._zset(partition), dict(adds))
        if removes:
            pipe.zrem(self._zset(partition), *removes)
        if adds or removes:
            await pipe.execute()

    async def schedule_earlier(self, partition: int, entries: Mapping[str, int]) -> None:
        if entries:
            args = [arg for user, at in entries.items() for arg in (at, user)]
            await self.client.execute_command("ZADD", self._zset(partition), "LT", *args)

    async def due(self, partition: int, upto_ms: int, limit: int) -> list[tuple[str, int]]:
        rows: list[Any] = await self.client.zrangebyscore(
            self._zset(partition), "-inf", upto_ms, start=0, num=limit, withscores=True
        )
        out: list[tuple[str, int]] = []
        for user, score in rows:
            out.append((user.decode() if isinstance(user, bytes) else str(user), int(score)))
        return out

    async def settle(self, partition: int, settled: Sequence[tuple[str, int, int | None]]) -> int:
        if not settled:
            return 0
        args: list[object] = []
        for user, read, nxt in settled:
            args.extend((user, read, "" if nxt is None else nxt))
        return int(await self.scripts.call("settle", [self._zset(partition)], *args))

    async def due_many(self, upto: Mapping[int, int], limit: int) -> dict[int, list[tuple[str, int]]]:
        if not upto:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for partition, upto_ms in upto.items():
            pipe.zrangebyscore(self._zset(partition), "-inf", upto_ms, start=0, num=limit, withscores=True)
        out: dict[int, list[tuple[str, int]]] = {}
        for partition, rows in zip(upto, await pipe.execute(), strict=True):
            if rows:
                out[partition] = [(u.decode() if isinstance(u, bytes) else str(u), int(sc)) for u, sc in rows]
        return out

    async def pending(self, partition: int) -> int:
        return int(await self.client.zcard(self._zset(partition)))

    async def remove_users(self, users: Sequence[str], partitions: Iterable[int]) -> None:
        if not users:
            return
        pipe = self.client.pipeline(transaction=False)
        for p in partitions:
            pipe.zrem(self._zset(p), *users)
            pipe.srem(self._members(p), *users)
        await pipe.execute()

    def _members(self, partition: int) -> str:
        return self.keys.partition_members(self.topic, partition)

    async def add_members(self, partition: int, users: Iterable[str]) -> None:
        listed = list(users)
        if listed:
            await self.client.sadd(self._members(partition), *listed)

    async def remove_members(self, partition: int, users: Sequence[str]) -> None:
        if users:
            await self.client.srem(self._members(partition), *users)

    async def scan_members(self, partition: int, cursor: int, count: int) -> tuple[int, list[str]]:
        nxt, found = await self.client.sscan(self._members(partition), cursor, count=count)
        return int(nxt), [u.decode() if isinstance(u, bytes) else str(u) for u in found]

    async def sweep_state(self, partition: int) -> SweepState:
        raw = await self.client.hmget(self.keys.sweep(self.topic, partition), ["done", "started", "cursor"])
        done, started, cursor = (int(v) if v is not None else 0 for v in raw)
        return SweepState(done, started, cursor)

    async def save_sweep(self, partition: int, state: SweepState) -> None:
        await self.client.hset(
            self.keys.sweep(self.topic, partition),
            mapping={"done": state.done, "started": state.started_for, "cursor": state.cursor},
        )

    async def advance_watermark(self, partition: int, event_ms: int, wall_ms: int) -> None:
        await self.scripts.call("advance", [self.keys.watermark(self.topic, partition)], event_ms, wall_ms)

    async def record_batch(
        self,
        schedules: Mapping[int, Mapping[str, int | None]],
        marks: Mapping[int, int],
        wall_ms: int,
        members: Mapping[int, Iterable[str]] | None = None,
    ) -> None:
        calls: list[Call] = []
        for partition, users in (members or {}).items():
            listed = list(users)
            if listed:
                calls.append(("SADD", self._members(partition), *listed))
        for partition, entries in schedules.items():
            adds = [arg for user, at in entries.items() if at is not None for arg in (at, user)]
            removes = [user for user, at in entries.items() if at is None]
            if adds:
                calls.append(("ZADD", self._zset(partition), *adds))
            if removes:
                calls.append(("ZREM", self._zset(partition), *removes))
        for partition, event_ms in marks.items():
            calls.append(Eval("advance", [self.keys.watermark(self.topic, partition)], [event_ms, wall_ms]))
        if calls:
            await self.scripts.pipeline(calls)

    async def watermark(self, partition: int) -> tuple[int, int] | None:
        raw = await self.client.hmget(self.keys.watermark(self.topic, partition), ["ts", "at"])
        if raw[0] is None:
            return None
        return int(raw[0]), int(raw[1] or 0)
