"""Users who arrived before the first model, or stop sending events, still get their cluster.

The runtime on the in-memory stores: a backlog of synthetic users is applied before any
model exists; the model is trained afterwards; the sweep alone must bring every profile
its cluster, publish each ``entered`` once, and leave the model's later versions alone
unless they would move users.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import orjson

from evaluation.metrics import adjusted_rand_index
from stream_app.app import Runtime
from stream_app.contract import parse_timestamp
from stream_app.pipeline import Record
from stream_app.segments.assign import choose_cluster, features
from stream_app.settings import Settings
from stream_app.store.profiles import InMemoryProfileStore
from stream_app.synthetic import generate_users, interleaved_stream, record_key
from tests.unit.test_clock import T0, Sink

USERS = 120


def backlog(seed: int = 5) -> tuple[list[Record], dict[str, str]]:
    users = generate_users(USERS, seed)
    records = []
    for i, event in enumerate(interleaved_stream(users, T0, seed, time_scale=0.05, arrival_spread_s=300)):
        stamp = parse_timestamp(event["timestamp"])
        records.append(Record(orjson.dumps(event), record_key(event), "onboarding.events", 0, i, stamp))
    return records, {u.user_id: u.archetype for u in users}


def runtime(tmp_path: Path) -> tuple[Runtime, Sink]:
    settings = Settings(cluster_min_samples=50, cluster_sweep_rate=400, timer_interval_seconds=0.25)
    rt = Runtime(settings, store=InMemoryProfileStore())
    segments = Sink()
    rt.out_topics = {"segments": segments, "triggers": Sink(), "holdout": Sink()}
    rt.assigned = {(rt.topics["events"].name, 0)}
    return rt, segments


async def clusters(rt: Runtime, ids: list[str]) -> dict[str, str | None]:
    """Stored cluster ids of the users who did not refuse personalization (those get none)."""
    out: dict[str, str | None] = {}
    for uid in ids:
        doc = await rt.store.get(uid)
        assert doc is not None, uid
        if doc["consent"]["personalization"] is not False:
            out[uid] = ((doc.get("engine") or {}).get("cluster") or {}).get("id")
    return out


async def test_the_sweep_clusters_a_backlog_that_was_applied_before_the_first_model(tmp_path: Path) -> None:
    rt, segments = runtime(tmp_path)
    records, archetype = backlog()
    for i in range(0, len(records), 500):
        await rt.handle_batch(records[i : i + 500])
    ids = sorted(archetype)
    assert set((await clusters(rt, ids)).values()) == {None}  # no model while they were applied
    first = await rt.train_once()
    assert first is not None and first.sweep_version == first.version == 1
    passes = 0
    while await rt.sweep_clusters():
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
    assert await rt.sweep_clusters() == 0  # swept: idle until a model moves users

    # a retrained model that moves (almost) no one: published, but no new sweep
    second = await rt.train_once()
    assert second is not None and second.version == 2 and second.sweep_version == 1
    await rt.refresh_model(force=True)
    assert await rt.sweep_clusters() == 0


async def test_a_model_that_moves_users_reaches_the_silent_ones(tmp_path: Path) -> None:
    rt, segments = runtime(tmp_path)
    records, archetype = backlog(seed=9)
    for i in range(0, len(records), 500):
        await rt.handle_batch(records[i : i + 500])
    await rt.train_once()
    while await rt.sweep_clusters():
        pass
    ids = sorted(archetype)
    before = await clusters(rt, ids)
    latest = await rt.models.latest()
    assert latest is not None
    # the next model swaps the centroids of two clusters: their users must move, without an event
    a, b = sorted(latest.centroids)[:2]
    swapped = {**latest.centroids, a: latest.centroids[b], b: latest.centroids[a]}
    moved = replace(latest, version=latest.version + 1, centroids=swapped, sweep_version=latest.version + 1)
    assert await rt.models.publish(moved)
    await rt.refresh_model(force=True)
    while await rt.sweep_clusters():
        pass
    after = await clusters(rt, ids)
    # what the sweep owes each user: the new model's choice, with the hysteresis margin
    expected = {}
    for uid, cid in before.items():
        doc = await rt.store.get(uid)
        assert doc is not None
        distances = moved.distances(features(doc, rt.step_means))
        expected[uid] = choose_cluster(cid, distances, rt.settings.cluster_margin)
    assert after == expected
    movers = {u for u in ids if u in before and expected[u] != before[u]}
    assert len(movers) >= 20 and all(before[u] in (a, b) for u in movers)  # the swapped clusters' users
    exits = [m for m in segments.values if m["source"] == "cluster" and m["change"] == "exited"]
    assert sorted(m["user_id"] for m in exits) == sorted(movers)  # each mover exits once, no one else
