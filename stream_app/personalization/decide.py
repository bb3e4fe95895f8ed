"""The answer to "what should this user see now?", from a stored profile. Pure; no I/O.

Only decisions leave: segment names, the cluster, the checklist chosen, recommendations,
flags and the versions behind them; never a trait, an id of another user or the event
history. A user who refused personalization, an unknown id and an id with no profile
get the same default answer (``personalized: false``), never an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stream_app.personalization.config import Checklist, Default, PersonalizationConfig
from stream_app.personalization.recommend import RecoModel, adoption, recommend
from stream_app.profile import Profile, is_tombstone


def _matches(
    segments: Sequence[str],
    cluster: dict[str, Any] | None,
    want_segments: Sequence[str],
    want_clusters: Sequence[str],
) -> bool:
    if set(segments) & set(want_segments):
        return True
    return cluster is not None and bool({cluster.get("name"), cluster.get("id")} & set(want_clusters))


def _checklist(chosen: Checklist | Default) -> dict[str, Any]:
    return {
        "name": chosen.name,
        "items": [item.model_dump(exclude_none=True) for item in chosen.items],
    }


def default_answer(
    config: PersonalizationConfig, model: RecoModel | None, config_version: str
) -> dict[str, Any]:
    """The non-personalized answer: the default checklist, no flag, what all users adopt most."""
    k = config.recommendations.count
    return {
        "personalized": False,
        "segments": [],
        "cluster": None,
        "checklist": _checklist(config.default),
        "recommendations": [r.as_dict() for r in recommend(model, None, [], k)],
        "flags": dict.fromkeys(config.flags, False),
        "versions": _versions(None, model, config_version),
    }


def answer(
    doc: Profile | None, config: PersonalizationConfig, model: RecoModel | None, config_version: str
) -> dict[str, Any]:
    """The decision for one stored profile (already followed past a tombstone)."""
    if doc is None or is_tombstone(doc) or (doc.get("consent") or {}).get("personalization") is False:
        return default_answer(config, model, config_version)
    state = doc.get("engine") or {}
    segments = sorted(state.get("segments") or [])
    cluster = state.get("cluster") or None
    chosen: Checklist | Default = next(
        (c for c in config.checklists if _matches(segments, cluster, c.segments, c.clusters)), config.default
    )
    group = cluster.get("name") if cluster else None
    recs = recommend(model, group, adoption(doc), config.recommendations.count)
    return {
        "personalized": True,
        "segments": segments,
        "cluster": {"id": cluster["id"], "name": cluster["name"]} if cluster else None,
        "checklist": _checklist(chosen),
        "recommendations": [r.as_dict() for r in recs],
        "flags": {
            name: _matches(segments, cluster, f.segments, f.clusters) for name, f in config.flags.items()
        },
        "versions": _versions(cluster, model, config_version),
    }


def _versions(cluster: dict[str, Any] | None, model: RecoModel | None, config_version: str) -> dict[str, Any]:
    return {
        "cluster_model": cluster.get("model_version") if cluster else None,
        "recommender": model.version if model else None,
        "config": config_version,
    }
