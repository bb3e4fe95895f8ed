"""Cluster quality on synthetic users with known archetypes (benchmarks and tests).

Profiles are built the way the engine builds them (the pure pipeline on the in-memory
store, identity links included) from :mod:`stream_app.synthetic` streams.

* :func:`simulate` / :func:`build`: the users' *final* profiles (end of stream), for
  training and scoring a model offline.
* :func:`replay` / :func:`build_delivered`: the clusters the running engine actually
  stores: the worker's own roles (batch runner, cluster service, timer, sweep) on
  in-memory stores, driven batch by batch, a model trained every few batches.

Both run on an event-time clock (the simulated "now" is the latest event read), so the
results do not depend on the date they are computed on.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from stream_app.contract import ContractRules, parse_timestamp
from stream_app.metrics import Metrics
from stream_app.pipeline import EventProcessor, Record
from stream_app.profile import Profile, ProfileRules, StepDuration, is_tombstone
from stream_app.segments.assign import Snapshot, features
from stream_app.settings import Settings
from stream_app.store.models import InMemoryModelStore
from stream_app.store.profiles import InMemoryProfileStore
from stream_app.synthetic import SimUser, generate_users, interleaved_stream, record_key
from stream_app.worker.publisher import Sinks
from stream_app.worker.runtime import Runtime, Stores

T0 = 1_795_000_000_000

#: The cluster name each archetype should get (names: :data:`cluster_model.NAME_PROFILES`).
ARCHETYPE_CLUSTER_NAME: dict[str, str] = {
    "quick_adopter": "quick adopters",
    "steady": "steady",
    "passive": "passive",
    "struggling": "struggling",
}


@dataclass
class Population:
    user_ids: list[str]
    archetypes: list[str]
    docs: list[Profile]
    step_means: dict[tuple[str, str], float]

    def vectors(self) -> list[list[float]]:
        return [features(d, self.step_means) for d in self.docs]

    def by_user(self) -> dict[str, list[float]]:
        """The population as a training sample set: user id -> feature vector."""
        return dict(zip(self.user_ids, self.vectors(), strict=True))


def simulate(users: int, seed: int) -> Population:
    """``users`` synthetic users run through the pipeline; their final profiles and step means."""
    return asyncio.run(build(users, seed))


async def build(users: int, seed: int) -> Population:
    """:func:`simulate` for callers already inside an event loop."""
    sim = generate_users(users, seed)
    store = InMemoryProfileStore()
    durations: dict[tuple[str, str], list[float]] = {}

    async def stats(batch: list[StepDuration]) -> None:
        for d in batch:
            durations.setdefault((d.flow, d.step), []).append(d.duration_s)

    records, times = _records(sim, seed)
    end_s = (times[-1] if times else T0) / 1000
    processor = EventProcessor(
        store,
        ContractRules(pii_salt=b"q"),
        ProfileRules(),
        Metrics(),
        step_stats=stats,
        clock=lambda: end_s,  # every event is in the past: no future-skew rejects, whatever the date
    )
    for i in range(0, len(records), 2000):
        await processor.process(records[i : i + 2000])
    docs, ids, kinds = [], [], []
    for user in sim:
        raw = store.profiles.get(user.user_id)
        if raw is None:
            continue
        ids.append(user.user_id)
        kinds.append(user.archetype)
        docs.append(orjson.loads(raw[1]))
    means = {k: sum(v) / len(v) for k, v in durations.items()}
    return Population(ids, kinds, docs, means)


def _records(sim: list[SimUser], seed: int) -> tuple[list[Record], list[int]]:
    """The interleaved stream as records (one partition), each with its event's time as Kafka
    timestamp (as a live producer writes them), and those times (ms)."""
    stream = list(interleaved_stream(sim, T0, seed))
    times = [parse_timestamp(e["timestamp"]) for e in stream]  # non-decreasing
    records = [
        Record(orjson.dumps(e), record_key(e), "onboarding.events", 0, i, ts)
        for i, (e, ts) in enumerate(zip(stream, times, strict=True))
    ]
    return records, times


@dataclass(frozen=True)
class DeliveredUser:
    """One user as the running engine left them."""

    user_id: str
    archetype: str
    consent_refused: bool
    stored_id: str | None  # engine.cluster of the final document (None: never assigned / refused)
    stored_name: str | None
    stored_version: int | None  # model version that set the stored cluster
    final_id: str  # nearest centroid of the final snapshot for the final profile, no hysteresis
    final_name: str
    assignments: int  # how many times the stored cluster changed (first assignment included)
    first_name: str | None  # the first cluster the user was given
    first_features: list[float] | None  # the profile's features when it got its first cluster


@dataclass(frozen=True)
class Moment:
    """What the engine's users looked like right after one batch (consent refused left out)."""

    batch: int  # 1-based
    event_ms: int  # event time of the batch's last record
    model_version: int  # 0: no model yet
    fired: int  # deadlines the timer reacted to after this batch
    #: (archetype, stored cluster name or None) -> users with a profile so far
    names: dict[tuple[str, str | None], int]


@dataclass
class Delivered:
    """Result of :func:`replay`."""

    users: list[DeliveredUser]
    docs: list[Profile]  # final documents, same order as ``users``
    snapshots: list[Snapshot]  # every published snapshot, oldest first
    step_means: dict[tuple[str, str], float]  # at the end of the stream
    batches: int
    records: int
    #: every vector put into the sample set: (archetype of the sampled profile, batch index, features)
    samples: list[tuple[str, int, list[float]]] = field(default_factory=list)
    timer_fires: int = 0  # deadlines that came due and were reacted to during the stream
    timeline: list[Moment] = field(default_factory=list)  # after every batch

    def final_snapshot(self) -> Snapshot:
        return self.snapshots[-1]


def replay(users: int, seed: int, **options: Any) -> Delivered:
    """The clusters the running engine gives ``users`` synthetic users (seeded, in memory).

    ``options``: the keyword arguments of :func:`build_delivered`.
    """
    return asyncio.run(build_delivered(users, seed, **options))


async def build_delivered(
    users: int,
    seed: int,
    *,
    batch_size: int = 2000,
    samples_per_batch: int = 100,
    train_every: int = 3,
    k: int = 4,
    halflife: float = 0.02,
    min_samples: int = 200,
    margin: float = 0.2,
    train_samples: int = 5000,
    sample_cap: int = 50_000,
    sweep: bool = True,
) -> Delivered:
    """:func:`replay` for callers already inside an event loop.

    The worker's own roles (:class:`stream_app.worker.runtime.Runtime` on in-memory stores,
    one partition, this process holding the training lease), driven batch by batch:

    * each batch goes through the batch runner (baselines re-read, reactions wired, each
      write assigning with the current snapshot and hysteresis, a sample of the written
      profiles refreshing the training set);
    * every ``train_every`` batches, the training pass (the stand-in for the
      ``CLUSTER_TRAIN_INTERVAL_SECONDS`` timer);
    * then the deadline timer and (``sweep``) the cluster sweep, on the partition's
      watermark: the records carry their events' times as Kafka timestamps, as a live
      producer writes them.

    Deterministic for a seed: the only randomness (samples, shuffles) is seeded.
    """
    sim = generate_users(users, seed)
    archetype_of = {u.user_id: u.archetype for u in sim} | {u.anonymous_id: u.archetype for u in sim}
    settings = Settings.load(
        cluster_k=k,
        cluster_halflife=halflife,
        cluster_min_samples=min_samples,
        cluster_margin=margin,
        cluster_train_samples=train_samples,
        cluster_sample_cap=sample_cap,
        cluster_samples_per_batch=samples_per_batch,
        cluster_sweep_rate=10_000_000,  # a whole partition per timer pass
        baseline_refresh_seconds=1e-6,  # re-read before every batch
        batch_max_events=batch_size,
    )
    stores = Stores(settings, in_memory=True)
    rt = Runtime(settings, Sinks.in_memory(), stores, rng=random.Random(seed), wall_ms=lambda: T0)
    rt.timer.owned = {0}
    profiles = stores.profiles
    assert isinstance(profiles, InMemoryProfileStore)
    samples: list[tuple[str, int, list[float]]] = []
    history: dict[str, list[tuple[str | None, list[float]]]] = {}  # user -> (name, features) per change
    batches = 0
    assign, sample = rt.clusters.assign, rt.clusters.sample

    def recording_assign(
        doc: Profile, now_ms: int, current: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any] | None, str]:
        cluster, reason = assign(doc, now_ms, current)
        if cluster is not None and (current is None or current.get("id") != cluster["id"]):
            x = features(doc, rt.baselines.means)
            history.setdefault(str(doc.get("user_id")), []).append((cluster["name"], x))
        return cluster, reason

    async def recording_sample(
        docs: Mapping[str, Profile], linked: Any = (), limit: int | None = None
    ) -> None:
        before = dict(stores.models.samples) if isinstance(stores.models, InMemoryModelStore) else {}
        await sample(docs, linked, limit)
        if limit is not None and isinstance(stores.models, InMemoryModelStore):
            for pid, x in stores.models.samples.items():
                if pid in docs and before.get(pid) != x:
                    samples.append((archetype_of.get(pid, "?"), batches, x))

    rt.clusters.assign = recording_assign  # type: ignore[method-assign]  # instrumented, same decisions
    rt.clusters.sample = recording_sample  # type: ignore[method-assign]

    def moment(batch: int, fired: int) -> Moment:
        names: dict[tuple[str, str | None], int] = {}
        for user in sim:
            raw = profiles.profiles.get(user.user_id)
            if raw is None:
                continue
            doc = orjson.loads(raw[1])
            if is_tombstone(doc) or doc.get("consent", {}).get("personalization") is False:
                continue
            stored = (doc.get("engine") or {}).get("cluster")
            key = (user.archetype, stored["name"] if stored else None)
            names[key] = names.get(key, 0) + 1
        snap = rt.clusters.snapshot
        return Moment(batch, last_ms, snap.version if snap else 0, fired, names)

    records, times = _records(sim, seed)
    timeline: list[Moment] = []
    snapshots: list[Snapshot] = []  # every published snapshot, oldest first
    timer_fires = 0
    last_ms = T0
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        last_ms = times[i + len(batch) - 1]
        await rt.batches.handle(batch)
        batches += 1
        if batches % train_every == 0 and (published := await rt.clusters.train_once()) is not None:
            snapshots.append(published)
        fired = 0
        while looked := await rt.timer.fire_due():
            fired += looked
            if looked < 500:
                break
        while sweep and await rt.timer.sweep():
            pass
        timer_fires += fired
        timeline.append(moment(batches, fired))
    step_means = rt.baselines.means
    if not snapshots:
        raise ValueError("the stream was too short to train a model")

    final = snapshots[-1]
    out: list[DeliveredUser] = []
    docs: list[Profile] = []
    for user in sim:
        raw = profiles.profiles.get(user.user_id)
        if raw is None:
            continue
        doc = orjson.loads(raw[1])
        if is_tombstone(doc):
            continue
        stored = (doc.get("engine") or {}).get("cluster")
        nearest = final.nearest(features(doc, step_means))
        changes = history.get(user.user_id, [])
        out.append(
            DeliveredUser(
                user.user_id,
                user.archetype,
                doc.get("consent", {}).get("personalization") is False,
                stored["id"] if stored else None,
                stored["name"] if stored else None,
                stored.get("model_version") if stored else None,
                nearest,
                final.names[nearest],
                len(changes),
                changes[0][0] if changes else None,
                changes[0][1] if changes else None,
            )
        )
        docs.append(doc)
    return Delivered(
        out, docs, snapshots, dict(step_means), batches, len(records), samples, timer_fires, timeline
    )
