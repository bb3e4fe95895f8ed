"""The shared cluster model as one worker uses it: step baselines, assignment, training, samples.

:class:`Baselines` keeps the per-step statistics the stall thresholds and the cluster
features need, and the bandit's arm counts (both re-read every BASELINE_REFRESH_SECONDS).
:class:`ClusterService` keeps the latest published snapshot, assigns users with hysteresis,
trains and publishes the next snapshot when this worker holds the training lease, and keeps
the training sample set current. The replay in ``evaluation/quality.py`` runs the same
class on in-memory stores.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from stream_app.metrics import Metrics
from stream_app.profile import Profile, StepDuration
from stream_app.segments.assign import Snapshot, assignment_change, choose_cluster, features
from stream_app.settings import Settings
from stream_app.store.bandit import BanditStore
from stream_app.store.models import ClusterModelStore
from stream_app.store.step_stats import StepStatsStore
from stream_app.triggers.bandit import Arms
from stream_app.triggers.decide import StepBaseline

log = logging.getLogger("stream_app.clusters")

#: Decimals a training vector keeps in the sample set. Features are logs of counts and ratios,
#: standardized before any distance: rounding moves one by at most 5e-5, far below their
#: spread, and a vector stores in ~55 bytes of JSON instead of ~130 (bench/RESULTS.md).
SAMPLE_DECIMALS = 4


class Baselines:
    """What decisions learn from everyone: per-step completion statistics (stall thresholds by
    step and group, step means) and, for trigger types run by a bandit, its arm counts."""

    def __init__(
        self,
        store: StepStatsStore,
        refresh_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        bandit: BanditStore | None = None,
        bandit_types: Sequence[str] = (),
    ) -> None:
        self.store, self.refresh_seconds, self.clock = store, refresh_seconds, clock
        self.bandit, self.bandit_types = bandit, tuple(bandit_types)
        self.by_step: dict[tuple[str, str, str], StepBaseline] = {}  # (flow, step, group)
        self.means: dict[tuple[str, str], float] = {}  # (flow, step) -> mean s, all users
        self.arms: Arms = {}
        self._read_at = float("-inf")
        self._admitted: set[tuple[str, str, str]] = set()  # new rows since the last refresh

    async def refresh(self, force: bool = False) -> None:
        if not force and self.clock() - self._read_at < self.refresh_seconds:
            return
        stats = await self.store.all()
        self.by_step = {(s.flow, s.step, s.group): StepBaseline(s.mean_s, s.count) for s in stats}
        self.means = {(s.flow, s.step): s.mean_s for s in stats if not s.group}
        if self.bandit is not None and self.bandit_types:
            self.arms = await self.bandit.arms(self.bandit_types)
        self._read_at = self.clock()
        self._admitted.clear()

    def admit(self, durations: Sequence[StepDuration], max_rows: int) -> tuple[list[StepDuration], int]:
        """The durations whose statistics row exists or fits under ``max_rows``, and how many
        were refused. A soft bound: rows other workers created since the last refresh are
        not known here, so the total may pass ``max_rows`` by what they add in one interval."""
        allowed: list[StepDuration] = []
        refused = 0
        for d in durations:
            row = (d.flow, d.step, d.group)
            if row in self.by_step or row in self._admitted:
                allowed.append(d)
            elif len(self.by_step) + len(self._admitted) < max_rows:
                self._admitted.add(row)
                allowed.append(d)
            else:
                refused += 1
        return allowed, refused


class ClusterService:
    def __init__(
        self,
        settings: Settings,
        models: ClusterModelStore,
        baselines: Baselines,
        metrics: Metrics,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] | None = None,
        in_thread: bool = True,
    ) -> None:
        self.settings, self.models, self.baselines, self.metrics = settings, models, baselines, metrics
        self.rng = rng or random.Random()
        self.clock, self.in_thread = clock, in_thread
        self.wall_ms = wall_ms or (lambda: int(time.time() * 1000))
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.snapshot: Snapshot | None = None
        self._checked_at = float("-inf")

    @property
    def enabled(self) -> bool:
        return self.settings.cluster_enabled

    def assign(
        self, doc: Profile, now_ms: int, current: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any] | None, str]:
        """The user's cluster under the shared model, with hysteresis against the stored one."""
        snap = self.snapshot
        if snap is None:
            return (dict(current) if current else None), ""
        distances = snap.distances(features(doc, self.baselines.means))
        cid = choose_cluster(current.get("id") if current else None, distances, self.settings.cluster_margin)
        reason = f"nearest centroid of model v{snap.version} (distance {distances[cid]:.2f})"
        return {"id": cid, "name": snap.names[cid], "model_version": snap.version}, reason

    async def refresh(self, force: bool = False) -> None:
        """Pick up a newer shared model (checked at most every BASELINE_REFRESH_SECONDS)."""
        if not self.enabled:
            return
        if not force and self.clock() - self._checked_at < self.settings.baseline_refresh_seconds:
            return
        self._checked_at = self.clock()
        version = await self.models.version()
        if version and (self.snapshot is None or self.snapshot.version != version):
            self.snapshot = await self.models.latest()
            self.metrics.cluster_model_version.set(version)
            if self.snapshot is not None:
                self.metrics.cluster_model_created.set(self.snapshot.created_ms / 1000)

    async def train_once(self) -> Snapshot | None:
        """If this worker holds the training lease: train on the sample set, publish the next snapshot.

        Each pass trains a fresh model on a random draw of the users' latest vectors
        (:func:`~stream_app.segments.cluster_model.train_model`); ids carry over from the
        previous snapshot by matching centroids. The snapshot starts a sweep (its
        ``sweep_version`` is itself) only if it would move at least CLUSTER_SWEEP_MIN_CHANGE
        of the sample's users away from the model the stored clusters were swept to.
        """
        s = self.settings
        ttl_ms = int(3 * s.cluster_train_interval_seconds * 1000)
        if not self.enabled or not await self.models.acquire_lease(self.worker_id, ttl_ms):
            return None
        if await self.models.sample_count() < s.cluster_min_samples:
            return None
        samples = await self.models.sample(s.cluster_train_samples)
        latest = await self.models.latest()
        version = (latest.version if latest else 0) + 1
        base = latest  # the model whose assignments the stored clusters were last swept to
        if latest is not None and latest.sweep_version != latest.version:
            base = next((h for h in await self.models.history() if h.version == latest.sweep_version), None)
        now_ms = self.wall_ms()

        def train() -> tuple[Snapshot, float]:
            from stream_app.segments.cluster_model import train_model  # river, numpy: the trainer only

            snap = train_model(
                samples, latest, version=version, now_ms=now_ms, k=s.cluster_k, halflife=s.cluster_halflife
            )
            moved = assignment_change(base, snap, samples, s.cluster_margin)
            keep = latest is not None and base is not None and moved < s.cluster_sweep_min_change
            return replace(snap, sweep_version=latest.sweep_version if keep and latest else version), moved

        # ~0.2 s for 5000 samples: in a thread, so batches and timers keep their turns
        snap, moved = await asyncio.to_thread(train) if self.in_thread else train()
        if not await self.models.publish(snap):
            return None
        log.info(
            "cluster model published",
            extra={
                "version": snap.version,
                "samples": snap.samples,
                "clusters": snap.names,
                "moved_share": round(moved, 4),
                "sweep_version": snap.sweep_version,
            },
        )
        await self.refresh(force=True)
        return snap

    async def sample(
        self, docs: Mapping[str, Profile], linked: Sequence[str] = (), limit: int | None = None
    ) -> None:
        """Keep the latest vector of (a sample of, up to ``limit``) these profiles; drop those of
        users who refused personalization and of ids linked into another profile."""
        if not self.enabled or (limit is not None and limit <= 0) or not docs:
            return
        consenting: list[str] = []
        gone = list(linked)  # a linked id's history now counts in its user's vector
        for pid, doc in docs.items():
            (gone if doc.get("consent", {}).get("personalization") is False else consenting).append(pid)
        if gone:
            await self.models.remove_samples(gone)
        picked = consenting if limit is None else self.rng.sample(consenting, min(limit, len(consenting)))
        vectors = {
            pid: [round(x, SAMPLE_DECIMALS) for x in features(docs[pid], self.baselines.means)]
            for pid in picked
        }
        await self.models.put_samples(vectors, cap=self.settings.cluster_sample_cap)

    async def forget(self, profile_ids: Sequence[str]) -> None:
        """Erasure: the users' training vectors go with their profiles."""
        await self.models.remove_samples(profile_ids)
