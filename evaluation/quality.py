"""Cluster quality on synthetic users with known archetypes (benchmarks and tests).

Profiles are built the way the engine builds them (the pure pipeline on the in-memory
store, identity links included) from :mod:`stream_app.synthetic` streams.

* :func:`simulate` / :func:`build`: the users' *final* profiles (end of stream), for
  training and scoring a model offline.
* :func:`replay` / :func:`build_delivered`: the clusters the running engine actually
  stores. The stream runs through the pipeline with reactions wired; after every batch
  the latest features of a sample of the profiles it touched (mid-journey) replace those
  users' vectors in the sample set, a model is trained and published every few batches
  the way ``Runtime.train_once`` does it, and each profile write (and each due
  deadline) assigns the user with the latest snapshot and hysteresis, like
  ``Runtime.assign_cluster``.

Both run on an event-time clock (the simulated "now" is the latest event read), so the
results do not depend on the date they are computed on.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from stream_app.contract import ContractRules
from stream_app.metrics import Metrics
from stream_app.paths import CONFIG_DIR
from stream_app.pipeline import BatchOutcome, EventProcessor, Record
from stream_app.profile import Profile, ProfileRules, StepDuration, is_tombstone
from stream_app.reactions import ReactionContext
from stream_app.segments.assign import Snapshot, choose_cluster, features
from stream_app.segments.cluster_model import train_model
from stream_app.segments.rules import load_segments
from stream_app.store.profiles import InMemoryProfileStore
from stream_app.synthetic import SimUser, generate_users, interleaved_stream, record_key
from stream_app.triggers.config import load_triggers
from stream_app.triggers.decide import StepBaseline

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
    """The interleaved stream as records (one partition), and each record's event time (ms)."""
    stream = list(interleaved_stream(sim, T0, seed))
    records = [Record(orjson.dumps(e), record_key(e), "sim", 0, i, None) for i, e in enumerate(stream)]
    times = [  # ISO-8601 UTC with milliseconds, non-decreasing
        int(datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp() * 1000) for e in stream
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
) -> Delivered:
    """:func:`replay` for callers already inside an event loop.

    Mirrors ``stream_app.app.Runtime`` with one worker holding the training lease:

    * before each batch, step means and stall baselines are re-read from the durations
      folded so far (``Runtime.refresh_baselines``);
    * the batch runs through :class:`EventProcessor` with reactions wired; each write
      assigns the user with the current snapshot and hysteresis ``margin`` against
      the stored cluster (``Runtime.assign_cluster``);
    * after it, the latest features of up to ``samples_per_batch`` random profiles the
      batch wrote (consent refused skipped and dropped) replace those users' vectors in
      the sample set, capped at ``sample_cap`` users (``Runtime._sample_profiles``);
    * every ``train_every`` batches, the training pass of ``Runtime.train_once`` (the
      stand-in for the ``CLUSTER_TRAIN_INTERVAL_SECONDS`` timer): once the set holds
      ``min_samples`` users, :func:`train_model` on a random draw of at most
      ``train_samples`` of them, published as the next version;
    * the deadline timer (``Runtime.fire_due``): deadlines at or before the watermark
      (latest event time minus the allowed lateness) are reacted to, which also
      re-assigns the cluster.

    The simulated clock is event time (the latest event read), so it is deterministic.
    """
    sim = generate_users(users, seed)
    archetype_of = {u.user_id: u.archetype for u in sim} | {u.anonymous_id: u.archetype for u in sim}
    store = InMemoryProfileStore()
    rules = ProfileRules()
    triggers = load_triggers(CONFIG_DIR / "triggers.toml")
    segments = load_segments(CONFIG_DIR / "segments.toml")
    rng = random.Random(seed)
    durations: dict[tuple[str, str, str], list[float]] = {}
    baselines: dict[tuple[str, str, str], StepBaseline] = {}
    step_means: dict[tuple[str, str], float] = {}
    snapshots: list[Snapshot] = []
    sample_set: dict[str, list[float]] = {}  # user -> latest vector (Runtime: ClusterModelStore)
    samples: list[tuple[str, int, list[float]]] = []
    history: dict[str, list[tuple[str | None, list[float]]]] = {}  # user -> (name, features) per change
    now = {"ms": T0}

    async def stats(batch: list[StepDuration]) -> None:
        for d in batch:
            durations.setdefault((d.flow, d.step, d.group), []).append(d.duration_s)

    def refresh_baselines() -> None:
        baselines.clear()
        baselines.update({key: StepBaseline(sum(v) / len(v), len(v)) for key, v in durations.items()})
        step_means.clear()
        step_means.update({(f, s): b.mean_s for (f, s, g), b in baselines.items() if not g})

    def assign_cluster(
        doc: Profile, now_ms: int, current: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any] | None, str]:
        snap = snapshots[-1] if snapshots else None
        if snap is None:
            return (dict(current) if current else None), ""
        x = features(doc, step_means)
        distances = snap.distances(x)
        cid = choose_cluster(current.get("id") if current else None, distances, margin)
        if current is None or current.get("id") != cid:
            history.setdefault(str(doc.get("user_id")), []).append((snap.names[cid], x))
        reason = f"nearest centroid of model v{snap.version} (distance {distances[cid]:.2f})"
        return {"id": cid, "name": snap.names[cid], "model_version": snap.version}, reason

    def context() -> ReactionContext:
        return ReactionContext(segments, triggers, rules, baselines, assign_cluster)

    processor = EventProcessor(
        store,
        ContractRules(pii_salt=b"q"),
        rules,
        Metrics(),
        step_stats=stats,
        clock=lambda: now["ms"] / 1000,
        reactions=context,
    )

    def sample_profiles(outcome: BatchOutcome, batch_index: int) -> None:
        consenting = []
        for pid in outcome.linked:
            sample_set.pop(pid, None)
        for pid, d in outcome.profiles.items():
            if d.get("consent", {}).get("personalization") is False:
                sample_set.pop(pid, None)
            else:
                consenting.append(pid)
        for pid in rng.sample(consenting, min(samples_per_batch, len(consenting))):
            x = features(outcome.profiles[pid], step_means)
            sample_set[pid] = x
            samples.append((archetype_of.get(pid, "?"), batch_index, x))
        if len(sample_set) > sample_cap:
            for pid in rng.sample(sorted(sample_set), len(sample_set) - sample_cap):
                del sample_set[pid]

    def train_once() -> None:
        if len(sample_set) < min_samples:
            return
        users = sorted(sample_set)
        drawn = users if len(users) <= train_samples else rng.sample(users, train_samples)
        latest = snapshots[-1] if snapshots else None
        version = (latest.version if latest else 0) + 1
        snap = train_model(
            [sample_set[u] for u in drawn], latest, version=version, now_ms=now["ms"], k=k, halflife=halflife
        )
        snapshots.append(snap)

    deadlines: dict[str, int] = {}  # user -> due (ms), one partition

    def note_deadlines(outcome: BatchOutcome) -> None:
        for entries in outcome.deadlines.values():
            for user, due in entries.items():
                if due is None:
                    deadlines.pop(user, None)
                else:
                    deadlines[user] = due
        for user in outcome.erased:
            deadlines.pop(user, None)

    async def fire_due(watermark: int) -> int:
        fired = 0
        while True:
            due = sorted(((u, ms) for u, ms in deadlines.items() if ms <= watermark), key=lambda d: d[1])
            if not due:
                return fired
            outcome = await processor.fire(0, due, watermark)
            for user, read, nxt in outcome.settled:
                if deadlines.get(user) == read:
                    if nxt is None or nxt <= read:
                        deadlines.pop(user)
                    else:
                        deadlines[user] = nxt
            fired += len(due)
            if any(deadlines.get(u) == ms for u, ms in due):  # a conflict left it: not in memory
                return fired

    timeline: list[Moment] = []

    def moment(batch: int, fired: int) -> Moment:
        names: dict[tuple[str, str | None], int] = {}
        for user in sim:
            raw = store.profiles.get(user.user_id)
            if raw is None:
                continue
            doc = orjson.loads(raw[1])
            if is_tombstone(doc) or doc.get("consent", {}).get("personalization") is False:
                continue
            stored = (doc.get("engine") or {}).get("cluster")
            key = (user.archetype, stored["name"] if stored else None)
            names[key] = names.get(key, 0) + 1
        return Moment(batch, now["ms"], snapshots[-1].version if snapshots else 0, fired, names)

    records, times = _records(sim, seed)
    batches = 0
    timer_fires = 0
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        now["ms"] = times[i + len(batch) - 1]
        refresh_baselines()
        outcome = await processor.process(batch)
        note_deadlines(outcome)
        sample_profiles(outcome, batches)
        batches += 1
        if batches % train_every == 0:
            train_once()
        refresh_baselines()
        fired = await fire_due(now["ms"] - triggers.allowed_lateness_ms)
        timer_fires += fired
        timeline.append(moment(batches, fired))
    if not snapshots:
        raise ValueError("the stream was too short to train a model")

    final = snapshots[-1]
    out: list[DeliveredUser] = []
    docs: list[Profile] = []
    for user in sim:
        raw = store.profiles.get(user.user_id)
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
