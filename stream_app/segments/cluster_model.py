"""Online clustering of users with stable, named cluster ids. No I/O, no clock reads.

* :func:`features` turns a profile into a small vector (onboarding progress, time on
  steps relative to each step's average, help, sessions, features, velocity, device).
* :class:`Trainer` keeps a river ``StandardScaler`` and a river ``KMeans``; it is seeded
  with k-means++ on the first samples (river's random initial centres otherwise make
  the result depend on luck), then learns online with a small ``halflife``.
* :func:`train_model` is one training pass of the engine: a fresh Trainer on the current
  sample set (one latest vector per user, shuffled), ids matched to the previous model.
* A :class:`Snapshot` is what every worker uses to assign: scaler statistics and
  centroids as JSON (never pickle), versioned. Each new snapshot's centroids are
  matched to the previous snapshot's ids (Hungarian assignment on centroid distance),
  so the same behaviour keeps its id across retraining, restarts and workers.
* :func:`choose_cluster` adds hysteresis: a user's stored cluster changes only when
  another centroid is clearly closer.
* Names come from the centroids (quick adopters, steady, passive, struggling).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from river import cluster, preprocessing
from scipy.optimize import linear_sum_assignment

from stream_app.segments.assign import (
    FEATURE_NAMES,
    FEATURE_WEIGHTS,
    Snapshot,
)

#: How each name scores a centroid (z-scores per feature); names are assigned one-to-one.
NAME_PROFILES: dict[str, dict[str, float]] = {
    "quick adopters": {"features_used": 1, "sessions": 1, "relative_step_time": -1, "onboarding_done": 0.5},
    "struggling": {"help_views": 1.5, "relative_step_time": 1, "onboarding_done": -0.3},
    "passive": {"sessions": -1, "features_used": -1, "steps_completed": -1, "onboarding_done": -1},
    "steady": {},  # scored by closeness to the average user
}


def _unscale(z: Sequence[float], means: Sequence[float], stds: Sequence[float]) -> list[float]:
    return [v / w * s + m for v, w, s, m in zip(z, FEATURE_WEIGHTS, stds, means, strict=True)]


def name_clusters(centroids: Mapping[str, Sequence[float]]) -> dict[str, str]:
    """Unique human-readable names: the best one-to-one match of centroids and name profiles."""
    ids = sorted(centroids)
    names = list(NAME_PROFILES)
    score = np.zeros((len(ids), len(names)))
    for i, cid in enumerate(ids):
        z = dict(zip(FEATURE_NAMES, centroids[cid], strict=True))
        for j, name in enumerate(names):
            weights = NAME_PROFILES[name]
            if weights:
                score[i, j] = sum(w * z[f] for f, w in weights.items())
            else:
                score[i, j] = -math.sqrt(sum(v * v for v in centroids[cid])) + 1.0
    rows, cols = linear_sum_assignment(-score)
    out = {cid: f"cluster {cid}" for cid in ids}
    for r, c in zip(rows, cols, strict=True):
        out[ids[r]] = names[c]
    return out


@dataclass
class Trainer:
    """A river StandardScaler + KMeans, seeded by k-means++; exported as a :class:`Snapshot`."""

    k: int = 4
    seed: int = 7
    halflife: float = 0.02
    scaler: preprocessing.StandardScaler = field(default_factory=preprocessing.StandardScaler)
    kmeans: cluster.KMeans | None = None
    seen: int = 0
    seeding: list[list[float]] = field(default_factory=list)  # raw vectors until k-means++ init
    min_seed: int = 200

    def _dict(self, x: Sequence[float]) -> dict[str, float]:
        return dict(zip(FEATURE_NAMES, x, strict=True))

    def _scaled(self, x: Sequence[float]) -> dict[str, float]:
        z = self.scaler.transform_one(self._dict(x))
        return {f: w * z[f] for f, w in zip(FEATURE_NAMES, FEATURE_WEIGHTS, strict=True)}

    def learn(self, vectors: Iterable[Sequence[float]]) -> None:
        for x in vectors:
            self.seen += 1
            self.scaler.learn_one(self._dict(x))
            if self.kmeans is None:
                self.seeding.append(list(x))
                if len(self.seeding) >= self.min_seed:
                    self._init_centres()
                continue
            self.kmeans.learn_one(self._scaled(x))

    @property
    def ready(self) -> bool:
        return self.kmeans is not None

    def _init_centres(self, restarts: int = 8) -> None:
        """k-means++ with several restarts on the buffered samples; the lowest inertia wins."""
        rng = random.Random(self.seed)
        pts = np.array([[self._scaled(x)[f] for f in FEATURE_NAMES] for x in self.seeding])
        best: tuple[float, np.ndarray] | None = None
        for _ in range(restarts):
            centres = [pts[rng.randrange(len(pts))]]
            for _ in range(1, self.k):
                d2 = np.min([np.sum((pts - c) ** 2, axis=1) for c in centres], axis=0)
                total = float(d2.sum())
                pick = rng.random() * total
                centres.append(pts[min(len(pts) - 1, int(np.searchsorted(np.cumsum(d2), pick)))])
            c = np.array(centres)
            for _ in range(30):  # Lloyd refinement
                labels = np.argmin(((pts[:, None, :] - c[None, :, :]) ** 2).sum(axis=2), axis=1)
                c = np.array(
                    [pts[labels == i].mean(axis=0) if np.any(labels == i) else c[i] for i in range(self.k)]
                )
            inertia = float(np.min(((pts[:, None, :] - c[None, :, :]) ** 2).sum(axis=2), axis=1).sum())
            if best is None or inertia < best[0]:
                best = (inertia, c)
        assert best is not None
        self.kmeans = cluster.KMeans(n_clusters=self.k, halflife=self.halflife, seed=self.seed)
        for i in range(self.k):
            for j, f in enumerate(FEATURE_NAMES):
                self.kmeans.centers[i][f] = float(best[1][i, j])
        self.seeding = []

    def snapshot(self, previous: Snapshot | None, version: int, now_ms: int) -> Snapshot:
        """Export, keeping the ids of ``previous`` for the centroids that match its ones."""
        if self.kmeans is None:
            raise ValueError("not enough samples to cluster yet")
        means = [float(self.scaler.means.get(f, 0.0)) for f in FEATURE_NAMES]
        stds = [math.sqrt(float(self.scaler.vars.get(f, 0.0))) for f in FEATURE_NAMES]
        raw = [[float(self.kmeans.centers[i].get(f, 0.0)) for f in FEATURE_NAMES] for i in range(self.k)]
        ids: list[str | None] = [None] * self.k
        next_id = previous.next_id if previous else 1
        if previous is not None and previous.centroids:
            old_ids = sorted(previous.centroids)
            # compare in the original feature space: the scaler may have moved between snapshots
            new_orig = [_unscale(c, means, stds) for c in raw]
            old_orig = [_unscale(previous.centroids[o], previous.means, previous.stds) for o in old_ids]
            cost = np.array([[math.dist(n, o) for o in old_orig] for n in new_orig])
            for r, c in zip(*linear_sum_assignment(cost), strict=True):
                ids[r] = old_ids[c]
        for i in range(self.k):
            if ids[i] is None:
                ids[i] = f"c{next_id}"
                next_id += 1
        centroids = {str(cid): raw[i] for i, cid in enumerate(ids)}
        return Snapshot(
            version, now_ms, means, stds, centroids, name_clusters(centroids), self.seen, next_id=next_id
        )


def train_model(
    samples: Sequence[Sequence[float]],
    previous: Snapshot | None,
    *,
    version: int,
    now_ms: int,
    k: int = 4,
    halflife: float = 0.02,
    seed: int = 7,
    seed_size: int = 1000,
) -> Snapshot:
    """One training pass: a fresh model from the sample set, its ids matched to ``previous``.

    ``samples`` hold one (latest) vector per user. They are shuffled (seeded by ``seed``
    and ``version``, so a pass is reproducible) so that the k-means++ seeding on the first
    ``seed_size`` of them and river's online updates on the rest see every stage of the
    journey and every kind of user, not the order in which the stream touched them. The
    model is not continued from ``previous``: its centroids live in the standardized
    space of an older scaler and would drift from their meaning (see bench/RESULTS.md);
    only its ids carry over (:meth:`Trainer.snapshot`).
    """
    if len(samples) < k:
        raise ValueError(f"need at least {k} samples to train {k} clusters, got {len(samples)}")
    order = [list(x) for x in samples]
    random.Random(seed * 1_000_003 + version).shuffle(order)
    trainer = Trainer(k=k, seed=seed, halflife=halflife, min_seed=min(len(order), seed_size))
    trainer.learn(order)
    return trainer.snapshot(previous, version, now_ms)
