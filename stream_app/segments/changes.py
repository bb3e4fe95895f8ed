"""Segment membership changes of one profile: what to publish to ``onboarding.segments``. Pure.

The profile remembers the memberships it last published (``engine.segments`` and
``engine.cluster``); a change is the difference between that and the memberships now.
Change messages are stored in the profile's outbox by the same write, so a crash
between the write and the publish is repaired by re-publishing (same ``change_id``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from stream_app.contract import iso_ms
from stream_app.segments.rules import SegmentSet, unparse


def change_id(user_id: str, source: str, segment: str, change: str, at_ms: int) -> str:
    return hashlib.sha256(f"{user_id}\x1f{source}\x1f{segment}\x1f{change}\x1f{at_ms}".encode()).hexdigest()[
        :32
    ]


def _message(
    user_id: str, segment: str, source: str, change: str, at_ms: int, reason: str, **extra: Any
) -> dict[str, Any]:
    return {
        "change_id": change_id(user_id, source, segment, change, at_ms),
        "user_id": user_id,
        "segment": segment,
        "source": source,
        "change": change,
        "at": iso_ms(at_ms),
        "reason": reason,
        **extra,
    }


def rule_changes(
    user_id: str,
    before: frozenset[str],
    now: frozenset[str],
    at_ms: int,
    segments: SegmentSet,
    why_exit: str | None = None,
) -> list[dict[str, Any]]:
    """Entered/exited messages for rule segments; ``why_exit`` overrides the reason (e.g. consent)."""
    rules = {d.name: d for d in segments.order}
    out = []
    for name in sorted(now - before):
        out.append(_message(user_id, name, "rule", "entered", at_ms, f"matches: {unparse(rules[name].rule)}"))
    for name in sorted(before - now):
        if why_exit:
            reason = why_exit
        elif name in rules:
            reason = f"no longer matches: {unparse(rules[name].rule)}"
        else:
            reason = "segment removed from the configuration"
        out.append(_message(user_id, name, "rule", "exited", at_ms, reason))
    return out


def cluster_changes(
    user_id: str,
    before: Mapping[str, Any] | None,
    now: Mapping[str, Any] | None,
    at_ms: int,
    why: str,
) -> list[dict[str, Any]]:
    """Exited the old cluster and entered the new one. The segment is the cluster's name, so a
    new model that renames the user's cluster (ids persist across models, names are matched
    to the centroids again; two clusters can swap names) is an exit and an entry too, with the
    same ``cluster_id``: a consumer that follows memberships by name never sees an exit of a
    name it was not told about, and the segment sizes, counted by name, stay right."""
    old, new = before or {}, now or {}
    if old.get("id") == new.get("id") and old.get("name") == new.get("name"):
        return []
    if old and new and old["id"] == new["id"]:
        why = f"cluster {new['id']} renamed from {old['name']!r} ({why})"
    out = []
    if before:
        out.append(
            _message(user_id, before["name"], "cluster", "exited", at_ms, why, cluster_id=before["id"])
        )
    if now:
        out.append(_message(user_id, now["name"], "cluster", "entered", at_ms, why, cluster_id=now["id"]))
    return out


def linked_exits(source_id: str, engine: Mapping[str, Any] | None, at_ms: int) -> list[dict[str, Any]]:
    """Exits of every membership ``source_id`` had when it is linked into another profile.

    An anonymous visitor's profile can join segments (and a cluster) before the visitor
    identifies; once linked, its history counts in the user's profile and the id itself
    has no profile any more, so its memberships end here.
    """
    state = engine or {}
    why = "linked into another profile (identify/alias)"
    out = [
        _message(source_id, name, "rule", "exited", at_ms, why) for name in sorted(state.get("segments", []))
    ]
    cluster = state.get("cluster")
    if cluster:
        out.append(
            _message(source_id, cluster["name"], "cluster", "exited", at_ms, why, cluster_id=cluster["id"])
        )
    return out
