"""The worker's batch path on a real 3-node Redis Cluster (REDIS_CLUSTER=true).

Profiles, seen ids, step statistics, deadlines, watermarks, segment sizes and model
samples all go through the Cluster client; no Kafka is needed (outputs go to in-memory sinks).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import Any

import orjson
import redis.asyncio as aioredis

from stream_app.contract import iso_ms, parse_timestamp
from stream_app.pipeline import Record
from stream_app.settings import Settings
from stream_app.worker.publisher import Sinks
from stream_app.worker.runtime import Runtime

_offsets = itertools.count()


def track(name: str, mid: str, at_ms: int, uid: str | None, anon: str | None = None, **props: str) -> bytes:
    doc: dict[str, Any] = {"type": "track", "event": name, "messageId": mid, "timestamp": iso_ms(at_ms)}
    doc.update({"properties": props} if props else {})
    doc.update({"userId": uid} if uid else {})
    doc.update({"anonymousId": anon} if anon else {})
    return orjson.dumps(doc)


def records(*raws: bytes) -> list[Record]:
    """As a live producer writes them: each record's timestamp is its event's time."""
    return [
        Record(
            raw, b"k", "onboarding.events", 0, next(_offsets), parse_timestamp(orjson.loads(raw)["timestamp"])
        )
        for raw in raws
    ]


async def test_a_batch_runs_on_redis_cluster(
    redis_cluster_url: str, fresh_redis_cluster: aioredis.RedisCluster
) -> None:
    prefix = f"rc{uuid.uuid4().hex[:6]}"
    settings = Settings.load(
        redis_url=redis_cluster_url,
        redis_cluster=True,
        redis_key_prefix=prefix,
    )
    runtime = Runtime(settings, Sinks.in_memory())
    t0 = int(time.time() * 1000) - 600_000
    users = [f"user-{i}" for i in range(6)]
    step = {"flow": "signup", "step": "profile"}
    batch = [track("Onboarding Step Started", f"{u}-1", t0, u, **step) for u in users]
    batch += [track("Onboarding Step Completed", f"{u}-2", t0 + 42_000, u, **step) for u in users]
    batch.append(track("Feature Used", "anon-1", t0 + 1000, None, anon="visitor", feature="search"))
    identify = {"type": "identify", "messageId": "id-1", "timestamp": iso_ms(t0 + 50_000)}
    batch.append(orjson.dumps(identify | {"userId": users[0], "anonymousId": "visitor"}))
    try:
        first = await asyncio.wait_for(runtime.batches.handle(records(*batch)), 20)
        assert first.applied == len(batch) and not first.dead_letters
        again = await asyncio.wait_for(runtime.batches.handle(records(*batch)), 20)  # redelivered
        assert again.applied == 0

        view = await runtime.reader.read(users[0])
        assert view is not None and view["event_count"] == 4  # 2 own + anonymous + identify
        assert view["features"] == {"search": 1}
        assert await runtime.reader.read("visitor") == view  # follows the identity link
        stats = await runtime.stores.step_stats.get("signup", "profile")
        assert stats is not None and stats.count == len(users) and stats.mean_s == 42.0
        assert await runtime.stores.deadlines.watermark(0) is not None

        # the users really are spread over the nodes
        nodes = {fresh_redis_cluster.get_node_from_key(runtime.stores.keys.profile(u)).name for u in users}
        assert len(nodes) > 1

        erase = track("Data Deletion Requested", "del-1", t0 + 60_000, users[1])
        out = await asyncio.wait_for(runtime.batches.handle(records(erase)), 20)
        assert out.erased == [users[1]] and await runtime.reader.read(users[1]) is None
        # handle_batch retries failed attempts: none may have failed
        samples = [s for m in runtime.metrics.store_errors.collect() for s in m.samples]
        assert [s for s in samples if s.name.endswith("_total")] == []
    finally:
        await runtime.close()
