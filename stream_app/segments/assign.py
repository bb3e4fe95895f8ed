"""Assigning users to clusters of the shared model: features, snapshots, hysteresis. Pure.

What every worker needs on every profile write: the feature vector of a profile, the
published :class:`Snapshot` (scaler statistics and centroids as JSON, versioned), the
distances to its centroids and the hysteresis of :func:`choose_cluster`. No numpy, river or
scipy here: training lives in :mod:`stream_app.segments.cluster_model`, which only the
lease holder runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from stream_app.profile import Profile

DAY_MS = 86_400_000

FEATURE_NAMES: tuple[str, ...] = (
    "onboarding_done",  # 1 if a flow is completed
    "steps_completed",  # log1p
    "relative_step_time",  # mean log2(duration / step mean) over completed steps
    "help_views",  # log1p
    "sessions",  # log1p
    "features_used",  # log1p of distinct features
    "velocity",  # log1p(events per active day)
    "mobile",  # 1 on a phone or tablet
)

#: Weight of each feature in the distance (after standardization). The device class says
#: little about behaviour and would split clusters by phone vs desktop at full weight.
FEATURE_WEIGHTS: tuple[float, ...] = (0.3, 0.3, 1.0, 1.0, 1.0, 1.0, 0.5, 0.25)


def features(doc: Profile, step_means: Mapping[tuple[str, str], float] | None = None) -> list[float]:
    """The feature vector of a profile; finite for any document, including an empty one."""
    means = step_means or {}
    flows: dict[str, Any] = doc.get("onboarding") or {}
    done = any(f.get("status") == "completed" for f in flows.values())
    ratios: list[float] = []
    completed = 0
    for flow, state in flows.items():
        for step, info in (state.get("completed_steps") or {}).items():
            completed += 1
            duration = info.get("duration_s")
            mean = means.get((flow, step))
            if duration is not None and mean:
                ratios.append(math.log2(max(duration, 0.1) / max(mean, 0.1)))
    first, last = doc.get("first_seen_ms"), doc.get("last_seen_ms")
    active_days = max(1.0, ((last or 0) - (first or 0)) / DAY_MS) if first is not None else 1.0
    device = (doc.get("device") or {}).get("type")
    vector = [
        1.0 if done else 0.0,
        math.log1p(completed),
        sum(ratios) / len(ratios) if ratios else 0.0,
        math.log1p(sum((doc.get("help_views") or {}).values())),
        math.log1p((doc.get("sessions") or {}).get("count", 0)),
        math.log1p(len(doc.get("features") or {})),
        math.log1p(doc.get("event_count", 0) / active_days),
        1.0 if device in ("mobile", "tablet") else 0.0,
    ]
    return [v if math.isfinite(v) else 0.0 for v in vector]


@dataclass(frozen=True)
class Snapshot:
    version: int
    created_ms: int
    means: list[float]
    stds: list[float]
    centroids: dict[str, list[float]]  # scaled space, by stable id
    names: dict[str, str]
    samples: int
    feature_names: tuple[str, ...] = FEATURE_NAMES
    next_id: int = 1
    #: the version whose assignments every stored cluster must be brought to by the sweep:
    #: this version when it moves users (:func:`assignment_change`), else an earlier one's
    sweep_version: int = 0

    def __post_init__(self) -> None:
        if not self.sweep_version:  # a model that comes with no sweep version moves users
            object.__setattr__(self, "sweep_version", self.version)

    def scale(self, x: Sequence[float]) -> list[float]:
        return [
            w * (v - m) / s if s > 0 else 0.0
            for v, m, s, w in zip(x, self.means, self.stds, FEATURE_WEIGHTS, strict=True)
        ]

    def distances(self, x: Sequence[float]) -> dict[str, float]:
        z = self.scale(x)
        return {cid: math.dist(z, c) for cid, c in self.centroids.items()}

    def nearest(self, x: Sequence[float]) -> str:
        d = self.distances(x)
        return min(d, key=d.__getitem__)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "version": self.version,
                "created_ms": self.created_ms,
                "means": self.means,
                "stds": self.stds,
                "centroids": self.centroids,
                "names": self.names,
                "samples": self.samples,
                "feature_names": list(self.feature_names),
                "next_id": self.next_id,
                "sweep_version": self.sweep_version,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Snapshot:
        d = orjson.loads(raw)
        return cls(
            d["version"],
            d["created_ms"],
            d["means"],
            d["stds"],
            d["centroids"],
            d["names"],
            d["samples"],
            tuple(d["feature_names"]),
            d["next_id"],
            d.get("sweep_version") or d["version"],
        )


def assignment_change(
    base: Snapshot | None, new: Snapshot, vectors: Sequence[Sequence[float]], margin: float
) -> float:
    """Share of ``vectors`` whose cluster would change going from ``base`` to ``new`` (with
    hysteresis, ids matched across versions); 1.0 without a base."""
    if base is None or not vectors:
        return 1.0
    moved = 0
    for x in vectors:
        before = base.nearest(x)
        if choose_cluster(before, new.distances(x), margin) != before:
            moved += 1
    return moved / len(vectors)


def choose_cluster(current: str | None, distances: Mapping[str, float], margin: float = 0.2) -> str:
    """Keep ``current`` unless it vanished or another centroid is closer by more than ``margin``."""
    best = min(distances, key=distances.__getitem__)
    if current is None or current not in distances or best == current:
        return best
    return best if distances[best] < (1 - margin) * distances[current] else current
