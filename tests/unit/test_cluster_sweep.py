"""Users who arrived before the first model, or stop sending events, still get their cluster.

The runtime on the in-memory stores: a backlog of synthetic users is applied before any
model exists; the model is trained afterwards; the sweep alone must bring every profile
its cluster, publish each ``entered`` once, and leave the model's later versions alone
unless they would move users.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from evaluation.metrics import adjusted_rand_index
from stream_app.contract import parse_timestamp
from stream_app.pipeline import Record, TimerOutcome
from stream_app.segments.assign import choose_cluster, features
from stream_app.settings import Settings
from stream_app.synthetic import generate_users, interleaved_stream, record_key
from stream_app.worker.publisher import MemorySink, Sinks
from stream_app.worker.runtime import Runtime, Stores
from stream_app.worker.timer import SWEEP_HOLD
from tests.unit.test_clock import T0

USERS = 120


def backlog(seed: int = 5) -> tuple[list[Record], dict[str, str]]:
    users = generate_users(USERS, seed)
    records = []
    for i, event in enumerate(interleaved_stream(users, T0, seed, time_scale=0.05, arrival_spread_s=300)):
        stamp = parse_timestamp(event["timestamp"])
        records.append(Record(orjson.dumps(event), record_key(event), "onboarding.events", 0, i, stamp))
    return records, {u.user_id: u.archetype for u in users}


def runtime(tmp_path: Path) -> tuple[Runtime, MemorySink]:
    settings = Settings(cluster_min_samples=50, cluster_sweep_rate=400, timer_interval_seconds=0.25)
    sinks = Sinks.in_memory()
    rt = Runtime(settings, sinks, Stores(settings, in_memory=True))
    rt.timer.owned = {0}
    assert isinstance(sinks.segments, MemorySink)
    return rt, sinks.segments


async def clusters(rt: Runtime, ids: list[str]) -> dict[str, str | None]:
    """Stored cluster ids of the users who did not refuse personalization (those get none)."""
    out: dict[str, str | None] = {}
    for uid in ids:
        doc = await rt.stores.profiles.get(uid)
        assert doc is not None, uid
        if doc["consent"]["personalization"] is not False:
            out[uid] = ((doc.get("engine") or {}).get("cluster") or {}).get("id")
    return out


async def test_the_sweep_clusters_a_backlog_that_was_applied_before_the_first_model(tmp_path: Path) -> None:
    rt, segments = runtime(tmp_path)
    records, archetype = backlog()
    for i in range(0, len(records), 500):
        await rt.batches.handle(records[i : i + 500])
    ids = sorted(archetype)
    assert set((await clusters(rt, ids)).values()) == {None}  # no model while they were applied
    first = await rt.clusters.train_once()
    assert first is not None and first.sweep_version == first.version == 1
    passes = 0
    while await rt.timer.sweep():
        passes += 1
    assert passes >= 2  # bounded work per pass: 100 profiles here, not the whole partition
    found = await clusters(rt, ids)
    assert len(found) >= 100 and None not in found.values()
    assert adjusted_rand_index([archetype[u] for u in found], list(found.values())) >= 0.8
    entered = Counter(
        (m["user_id"], m["segment"])
        for m in segments.values
        if m["source"] == "cluster" and m["change"] == "entered"
    )
    assert set(entered.values()) == {1} and {u for u, _s in entered} >= set(found)
    assert await rt.timer.sweep() == 0  # swept: idle until a model moves users

    # a retrained model that moves (almost) no one: published, but no new sweep
    second = await rt.clusters.train_once()
    assert second is not None and second.version == 2 and second.sweep_version == 1
    await rt.clusters.refresh(force=True)
    assert await rt.timer.sweep() == 0


async def test_a_model_that_moves_users_reaches_the_silent_ones(tmp_path: Path) -> None:
    rt, segments = runtime(tmp_path)
    records, archetype = backlog(seed=9)
    for i in range(0, len(records), 500):
        await rt.batches.handle(records[i : i + 500])
    await rt.clusters.train_once()
    while await rt.timer.sweep():
        pass
    ids = sorted(archetype)
    before = await clusters(rt, ids)
    latest = await rt.stores.models.latest()
    assert latest is not None
    # the next model swaps the centroids of two clusters: their users must move, without an event
    a, b = sorted(latest.centroids)[:2]
    swapped = {**latest.centroids, a: latest.centroids[b], b: latest.centroids[a]}
    moved = replace(latest, version=latest.version + 1, centroids=swapped, sweep_version=latest.version + 1)
    assert await rt.stores.models.publish(moved)
    await rt.clusters.refresh(force=True)
    while await rt.timer.sweep():
        pass
    after = await clusters(rt, ids)
    # what the sweep owes each user: the new model's choice, with the hysteresis margin
    expected = {}
    for uid, cid in before.items():
        doc = await rt.stores.profiles.get(uid)
        assert doc is not None
        distances = moved.distances(features(doc, rt.baselines.means))
        expected[uid] = choose_cluster(cid, distances, rt.settings.cluster_margin)
    assert after == expected
    movers = {u for u in ids if u in before and expected[u] != before[u]}
    assert len(movers) >= 20 and all(before[u] in (a, b) for u in movers)  # the swapped clusters' users
    exits = [m for m in segments.values if m["source"] == "cluster" and m["change"] == "exited"]
    assert sorted(m["user_id"] for m in exits) == sorted(movers)  # each mover exits once, no one else


async def test_a_batch_waits_for_one_chunk_of_the_sweep_not_a_whole_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep re-checks its pass in chunks of SWEEP_HOLD profiles, each under the lock;
    a batch that comes during a chunk takes the lock next (on Apache Kafka a pass of 250
    profiles held it 0.3-0.5 s: the batches' latency tail)."""
    rt, _segments = runtime(tmp_path)
    records, _archetype = backlog()
    for i in range(0, len(records), 500):
        await rt.batches.handle(records[i : i + 500])
    await rt.clusters.train_once()
    chunks: list[int] = []
    recheck = rt.processor.recheck

    async def slow_recheck(partition: int, users: Sequence[str], now_ms: int) -> TimerOutcome:
        chunks.append(len(users))
        await asyncio.sleep(0.02)  # a chunk's round trips to Redis and the broker
        return await recheck(partition, users, now_ms)

    monkeypatch.setattr(rt.processor, "recheck", slow_recheck)
    sweep = asyncio.create_task(rt.timer.sweep())
    await asyncio.sleep(0.01)  # the sweep's first chunk holds the lock now
    async with rt.lock:  # a batch
        chunks_before_the_batch = len(chunks)
    assert await sweep == 100  # CLUSTER_SWEEP_RATE 400 x 0.25 s
    assert chunks == [SWEEP_HOLD, SWEEP_HOLD, SWEEP_HOLD, 100 - 3 * SWEEP_HOLD]
    assert chunks_before_the_batch == 1


async def test_the_sweep_waits_while_the_worker_is_behind_and_goes_on_once_caught_up(tmp_path: Path) -> None:
    """Behind by a batch or more, the batches cluster whom they write: the sweep leaves the
    partition's CPU and lock to them, and sweeps all of it once the worker caught up."""
    rt, _segments = runtime(tmp_path)
    records, archetype = backlog()
    for i in range(0, len(records), 500):
        await rt.batches.handle(records[i : i + 500])
    await rt.clusters.train_once()
    behind = True
    rt.timer.lagging = lambda partition: behind
    assert await rt.timer.sweep() == 0
    assert rt.metrics.registry.get_sample_value("onboarding_cluster_sweep_partitions_behind") == 1
    assert set((await clusters(rt, sorted(archetype))).values()) == {None}
    behind = False
    while await rt.timer.sweep():
        pass
    assert None not in (await clusters(rt, sorted(archetype))).values()
