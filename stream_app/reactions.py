"""What a profile change, or the passage of time, causes. Pure: no I/O, no clock reads.

:func:`react` runs after a profile has taken new events (pipeline) and when one of its
deadlines comes due (timer). It

1. evaluates the rule segments and the cluster at ``now_ms`` and diffs them with the
   memberships last published (segment change messages);
2. decides the triggers that are due (:mod:`stream_app.triggers.decide`);
3. returns the next instant at which something can change with no new event (a step
   deadline, an abandonment, a time-relative segment rule), for the deadline index.

Messages go into ``engine.outbox`` of the document, written by the caller's
compare-and-set together with the decisions; the caller publishes the outbox before
it acks (and re-publishes an outbox it is not sure was published), so nothing decided
is lost and nothing is decided twice. Users whose latest consent says no get no
segments, no cluster and no triggers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stream_app.outbox import HOLDOUT, SEGMENTS, TRIGGERS, OutboxMessage, store_outbox
from stream_app.profile import Profile, ProfileRules
from stream_app.segments.changes import cluster_changes, rule_changes
from stream_app.segments.facts import profile_facts
from stream_app.segments.rules import SegmentSet
from stream_app.triggers.bandit import Arms
from stream_app.triggers.config import TriggerConfig
from stream_app.triggers.decide import CONTROL, Baselines, decide, engine_state

#: (doc, now_ms, stored cluster) -> (cluster {"id", "name", ...} or None, reason for a change)
ClusterAssigner = Callable[[Profile, int, Mapping[str, Any] | None], tuple[dict[str, Any] | None, str]]


@dataclass(frozen=True)
class ReactionContext:
    segments: SegmentSet
    triggers: TriggerConfig
    rules: ProfileRules
    baselines: Baselines = field(default_factory=dict)
    assign_cluster: ClusterAssigner | None = None
    arms: Arms = field(default_factory=dict)  # the bandit's counts (trigger types with policy "bandit")


@dataclass(slots=True)
class Reaction:
    outbox: list[OutboxMessage]
    suppressed: list[tuple[str, str]]
    deadline_ms: int | None
    changed: bool  # the document's engine state changed: it must be written
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (flow, step): the live funnel


def funnel_groups(doc: Profile) -> tuple[str, ...]:
    """The groups a user counts in for the live funnel: ``all``, ``segment:<name>`` for each
    rule segment they are in, ``cluster:<name>`` (as of the last reaction)."""
    engine = doc.get("engine") or {}
    groups = ["all", *(f"segment:{s}" for s in engine.get("segments") or [])]
    cluster = engine.get("cluster")
    if cluster:
        groups.append(f"cluster:{cluster['name']}")
    return tuple(groups)


def react(doc: Profile, user_id: str, now_ms: int, ctx: ReactionContext) -> Reaction:
    state = engine_state(doc)
    refused = doc.get("consent", {}).get("personalization") is False
    before = frozenset(state.get("segments", []))
    now_segments = frozenset() if refused else ctx.segments.evaluate(profile_facts(doc, now_ms, ctx.rules))
    messages = rule_changes(
        user_id, before, now_segments, now_ms, ctx.segments, "consent withdrawn" if refused else None
    )
    cluster_before = state.get("cluster")
    if refused:
        cluster_now, why = None, "consent withdrawn"
    elif ctx.assign_cluster is not None:
        cluster_now, why = ctx.assign_cluster(doc, now_ms, cluster_before)
    else:
        cluster_now, why = cluster_before, ""
    cluster_msgs = cluster_changes(user_id, cluster_before, cluster_now, now_ms, why)
    messages.extend(cluster_msgs)
    entered = sorted(now_segments - before)
    if cluster_msgs and cluster_now is not None:
        entered.append(cluster_now["name"])
    state["segments"] = sorted(now_segments)
    state["cluster"] = cluster_now
    decisions = decide(
        doc, user_id, now_ms, ctx.triggers, ctx.baselines, now_segments, cluster_now, entered, ctx.arms
    )
    outbox = [OutboxMessage(SEGMENTS, user_id, m) for m in messages]
    outbox.extend(
        OutboxMessage(HOLDOUT if t["group"] == CONTROL else TRIGGERS, user_id, t) for t in decisions.triggers
    )
    deadlines = [d for d in (decisions.deadline_ms,) if d is not None]
    if not refused:
        flip = ctx.segments.next_change_ms(doc, now_ms, ctx.rules)
        if flip is not None:
            deadlines.append(flip)
    changed = bool(messages) or decisions.changed
    store_outbox(doc, outbox)
    deadline = min(deadlines) if deadlines else None
    return Reaction(outbox, decisions.suppressed, deadline, changed, decisions.dropped)
