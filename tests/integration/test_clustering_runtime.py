"""One shared model across workers and restarts, through a real Redis.

Two runtimes stand for two workers owning different partitions; a third is a restart.
They must agree on every user's cluster id, and a model retrained by another worker
must keep the ids of the same behaviour.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest

from evaluation.quality import build
from stream_app.contract import iso_ms
from stream_app.pipeline import Record
from stream_app.segments.assign import features
from stream_app.settings import Settings
from stream_app.worker.publisher import Sinks
from stream_app.worker.runtime import Runtime


@pytest.fixture
async def runtimes(redis_url: str) -> AsyncIterator[list[Runtime]]:
    settings = Settings.load(
        redis_url=redis_url,
        redis_key_prefix=f"cl{uuid.uuid4().hex[:6]}",
        cluster_train_interval_seconds=0.1,  # lease of 0.3 s
        cluster_min_samples=200,
    )
    made = [Runtime(settings, Sinks.in_memory()) for _ in range(3)]
    yield made
    for r in made:
        await r.close()


def stored_cluster(runtime: Runtime, doc: dict[str, object]) -> str | None:
    cluster, _reason = runtime.clusters.assign(doc, 0, None)
    return cluster["id"] if cluster else None


async def test_workers_and_a_restart_share_one_model_and_its_ids(runtimes: list[Runtime]) -> None:
    first, second, restarted = runtimes
    train, held_out = await build(600, 11), await build(300, 12)
    await first.stores.models.put_samples(train.by_user(), cap=50_000)
    assert await second.clusters.train_once() is not None or await first.clusters.train_once() is not None
    for r in runtimes:
        await r.clusters.refresh(force=True)
    assert (
        first.clusters.snapshot == second.clusters.snapshot == restarted.clusters.snapshot
        and first.clusters.snapshot is not None
    )
    ids = {r.clusters.worker_id: [stored_cluster(r, d) for d in held_out.docs] for r in runtimes}
    assert len({tuple(v) for v in ids.values()}) == 1  # every worker says the same for every user


async def test_a_model_retrained_by_another_worker_keeps_the_ids(runtimes: list[Runtime]) -> None:
    first, second, _ = runtimes
    await first.stores.models.put_samples((await build(600, 21)).by_user(), cap=50_000)
    v1 = await first.clusters.train_once()
    assert v1 is not None
    held_out = await build(300, 22)
    before = {}
    for doc in held_out.docs:
        cluster, _ = first.clusters.assign(doc, 0, None)
        assert cluster is not None
        before[doc["user_id"]] = cluster
    # the sample set moves on: other users, and new states of some of the same ones
    await second.stores.models.put_samples((await build(600, 23)).by_user(), cap=50_000)
    assert await first.stores.models.acquire_lease(first.clusters.worker_id, 300)  # the first worker is alive
    assert await second.clusters.train_once() is None  # ... and holds the lease
    await asyncio.sleep(0.4)  # ... until it lapses (the first worker died)
    v2 = await second.clusters.train_once()
    assert v2 is not None and v2.version == v1.version + 1
    kept = 0
    for doc in held_out.docs:
        cluster, _ = second.clusters.assign(doc, 0, before[doc["user_id"]])  # stored cluster + hysteresis
        kept += cluster is not None and cluster["id"] == before[doc["user_id"]]["id"]
    assert kept / len(held_out.docs) >= 0.95


async def test_erasure_refused_consent_and_identity_links_remove_training_vectors(
    runtimes: list[Runtime],
) -> None:
    first = runtimes[0]
    pop = await build(50, 31)
    await first.stores.models.put_samples(pop.by_user(), cap=50_000)
    gone = pop.user_ids[:3]
    await first._forget(gone)
    assert await first.stores.models.sample_count() == 47
    vectors = await first.stores.models.sample(100)
    assert sorted(map(tuple, vectors)) == sorted(map(tuple, pop.vectors()[3:]))

    # a user who says no to personalization: the next batch that writes them drops the vector
    refuser = pop.user_ids[3]
    event = {
        "type": "track",
        "event": "Feature Used",
        "messageId": f"no-{uuid.uuid4().hex[:6]}",
        "userId": refuser,
        "timestamp": iso_ms(int(time.time() * 1000)),
        "properties": {"feature": "search"},
        "context": {"consent": {"categoryPreferences": {"personalization": False}}},
    }
    out = await first.batches.handle(
        [Record(orjson.dumps(event), refuser.encode(), "onboarding.events", 0, 0, None)]
    )
    assert out.applied == 1
    assert await first.stores.models.sample_count() == 46
    assert features(pop.docs[3], pop.step_means) not in await first.stores.models.sample(100)

    # an anonymous visitor is sampled, then identifies: only the user's vector remains
    now = int(time.time() * 1000)
    visit = {
        "type": "page",
        "name": "Pricing",
        "messageId": "v-1",
        "anonymousId": "anon-9",
        "timestamp": iso_ms(now),
    }
    identify = {"type": "identify", "messageId": "v-2", "anonymousId": "anon-9", "userId": "u-9"}
    await first.batches.handle([Record(orjson.dumps(visit), b"anon-9", "onboarding.events", 0, 1, None)])
    assert await first.stores.models.sample_count() == 47  # every profile of a small batch is sampled
    identify["timestamp"] = iso_ms(now + 1000)
    out = await first.batches.handle(
        [Record(orjson.dumps(identify), b"u-9", "onboarding.events", 0, 2, None)]
    )
    assert out.applied == 1 and out.linked == ["anon-9"]
    assert first.stores.redis is not None
    sampled = {k.decode() for k in await first.stores.redis.hkeys(first.stores.keys.cluster_model("vectors"))}
    assert "u-9" in sampled and "anon-9" not in sampled and len(sampled) == 47
