"""Lua scripts by EVALSHA, pipelined, the same way on standalone Redis and Redis Cluster.

Every Redis store runs its scripts through :class:`Scripts`:

* Scripts are loaded once with ``SCRIPT LOAD``, which a Cluster client sends to every
  primary, and again after ``NOSCRIPT`` (a restarted node, a node added to the Cluster,
  a flushed script cache).
* ``EVALSHA`` is queued as a raw command: redis-py's Cluster pipeline blocks its
  ``evalsha`` method but routes a raw ``EVALSHA`` by its declared keys, like any keyed
  command. Each script's keys share one hash tag (:mod:`stream_app.store.keys`), hence
  one slot, so the pipeline sends each call to the node owning it.
* After ``NOSCRIPT`` only the refused calls are run again. On a Cluster a pipeline
  spans nodes and one node may lack a script while the others ran theirs; re-running
  those would make, say, a compare-and-set that was applied look refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

AnyRedis = Redis | RedisCluster


@dataclass(frozen=True, slots=True)
class Eval:
    """One call of a named script: ``keys`` must share one hash tag (one Cluster slot)."""

    script: str
    keys: Sequence[str]
    args: Sequence[Any] = ()


#: A script call, or a raw command for ``execute_command`` such as ``("SADD", key, member)``.
Call = Eval | tuple[Any, ...]


class Scripts:
    """The named Lua scripts of one store, on one client."""

    def __init__(self, client: AnyRedis, sources: Mapping[str, str]) -> None:
        self.client = client
        self.sources = dict(sources)
        self._sha: dict[str, str] = {}

    async def _load(self) -> None:
        for name, body in self.sources.items():
            self._sha[name] = await self.client.script_load(body)

    async def call(self, script: str, keys: Sequence[str], *args: Any) -> Any:
        """Run one script call; its reply."""
        return (await self.pipeline([Eval(script, keys, args)]))[0]

    async def pipeline(self, calls: Sequence[Call]) -> list[Any]:
        """Run ``calls`` in one pipeline (no transaction); their replies, in order.

        Loads the scripts on first use, not before every pipeline as redis-py's Script
        objects do (a round trip each). The first other error is raised after the whole
        pipeline ran, as a pipeline does.
        """
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            if not self._sha:
                await self._load()
            pipe = self.client.pipeline(transaction=False)
            for i in todo:
                call = calls[i]
                if isinstance(call, Eval):
                    pipe.execute_command(
                        "EVALSHA", self._sha[call.script], len(call.keys), *call.keys, *call.args
                    )
                else:
                    pipe.execute_command(*call)
            missing: list[int] = []
            for i, reply in zip(todo, await pipe.execute(raise_on_error=False), strict=True):
                if isinstance(reply, NoScriptError) and not attempt:
                    missing.append(i)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    replies[i] = reply
            if not missing:
                break
            self._sha.clear()
            todo = missing
        return replies
