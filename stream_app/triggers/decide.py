"""Which triggers a profile owes at an instant, and when to look again. Pure: no I/O, no clock.

A *candidate* is one occurrence of a trigger condition (this step start stalled, this
flow completed, ...), named by an occurrence key that is the same however often it is
recomputed. Each occurrence is decided once and the decision is stored in the profile
(``engine.handled``), in the same compare-and-set write as the events: recomputing
after a crash, a redelivery or a second timer finds it handled. The trigger id is a
digest of user, type and occurrence, so a replay that re-sends a message re-sends the
same id.

Gates, in order: consent (latest consent says no), re-eligibility (the same subject
triggered recently), cooldown (this type triggered recently), frequency cap (all
types, rolling 24 h), then the holdout split (deterministic by user and type).
Held-out occurrences count for cooldown and cap like delivered ones, so both groups
go through the same eligibility.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stream_app.contract import iso_ms
from stream_app.profile import Profile
from stream_app.triggers.bandit import Arms, choose, context_of
from stream_app.triggers.config import (
    StallSettings,
    TriggerConfig,
    TriggerType,
    Variant,
    pick_by_weight,
)

DAY_MS = 86_400_000
MAX_HANDLED = 200
MAX_FIRED = 50

CONTROL = "control"
TREATMENT = "treatment"


@dataclass(frozen=True, slots=True)
class StepBaseline:
    mean_s: float
    count: int


#: (flow, step, group) -> baseline; group "" is all users, "cluster:<id>" one cluster
Baselines = Mapping[tuple[str, str, str], StepBaseline]


@dataclass(frozen=True, slots=True)
class Threshold:
    seconds: float
    mean_s: float
    samples: int
    basis: str  # "all", "cluster:<id>" or "default"


@dataclass(frozen=True, slots=True)
class Candidate:
    type: str
    subject: str  # what re-eligibility is about: "flow/step", flow, step or segment
    occurrence: str  # unique per occurrence; part of the trigger id
    due_ms: int  # when the condition became true (event time)
    evidence: Callable[[], Mapping[str, Any]]  # built only for occurrences being decided


@dataclass(slots=True)
class Decisions:
    triggers: list[dict[str, Any]] = field(default_factory=list)  # messages, group in each
    suppressed: list[tuple[str, str]] = field(default_factory=list)  # (type, reason)
    #: (flow, step) the user dropped at: a stall decided for the step, or the flow abandoned
    #: on a step not stalled before (whatever the gates decided about the trigger)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    deadline_ms: int | None = None
    changed: bool = False


def stall_threshold(
    flow: str, step: str, groups: list[str], baselines: Baselines, stall: StallSettings
) -> Threshold:
    """k x mean of the step, from the most specific group with enough samples, else the default."""
    samples = 0
    for group in [*groups, ""]:
        b = baselines.get((flow, step, group))
        if b is not None and group == "":
            samples = b.count
        if b is not None and b.count >= stall.min_samples:
            mean, samples, basis = b.mean_s, b.count, group or "all"
            break
    else:
        mean = stall.default_mean_by_step.get(f"{flow}/{step}", stall.default_mean_s)
        basis = "default"
    seconds = min(stall.max_threshold_s, max(stall.min_threshold_s, stall.multiplier * mean))
    return Threshold(seconds, mean, samples, basis)


def trigger_id(user_id: str, type_: str, occurrence: str) -> str:
    return hashlib.sha256(f"{user_id}\x1f{type_}\x1f{occurrence}".encode()).hexdigest()[:32]


def in_holdout(user_id: str, type_: str, share: float) -> bool:
    """Deterministic control-group membership: the same user and type always land the same way."""
    if share <= 0:
        return False
    digest = hashlib.sha256(f"holdout\x1f{type_}\x1f{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def assign_variant(user_id: str, type_: str, variants: Sequence[Variant]) -> Variant | None:
    """The user's arm of a trigger type's experiment: deterministic (a hash of user and type,
    independent of the holdout's), weighted; the same user always sees the same variant."""
    if not variants:
        return None
    digest = hashlib.sha256(f"variant\x1f{type_}\x1f{user_id}".encode()).digest()
    return pick_by_weight(int.from_bytes(digest[:8], "big") / 2**64, variants)


def _dropped(cand: Candidate, handled: Mapping[str, int]) -> list[tuple[str, str]]:
    """Where an occurrence just decided says the user dropped (the live funnel's count)."""
    if cand.type == "stalled_step":
        flow, _, step = cand.subject.partition("/")
        return [(flow, step)]
    if cand.type == "onboarding_abandoned":
        step = cand.evidence().get("current_step") or "-"
        stalled = f"stalled_step|{cand.subject}/{step}@"  # a stall on this step was counted
        return [] if any(key.startswith(stalled) for key in handled) else [(cand.subject, step)]
    return []


def engine_state(doc: Profile) -> dict[str, Any]:
    state: dict[str, Any] = doc.setdefault("engine", {})
    state.setdefault("handled", {})
    state.setdefault("fired", [])
    return state


def candidates(
    doc: Profile,
    now_ms: int,
    config: TriggerConfig,
    baselines: Baselines,
    groups: list[str],
    entered: list[str],
) -> tuple[list[Candidate], list[int]]:
    """Conditions true at ``now_ms`` (with their occurrence keys) and future instants to look again."""
    found: list[Candidate] = []
    later: list[int] = []
    flows: dict[str, dict[str, Any]] = doc.get("onboarding", {})
    last_seen = doc.get("last_seen_ms")

    def due(at: int, cand: Candidate) -> None:
        if at <= now_ms:
            found.append(cand)
        else:
            later.append(at)

    if config.enabled("stalled_step"):
        for flow, state in sorted(flows.items()):
            step, started = state.get("current_step"), state.get("current_step_started_ms")
            if state.get("status") == "completed" or step is None or started is None:
                continue
            th = stall_threshold(flow, step, groups, baselines, config.stall)
            deadline = started + int(th.seconds * 1000)

            def evidence(
                flow: str = flow, step: str = step, started: int = started, th: Threshold = th
            ) -> Any:
                return {
                    "flow": flow,
                    "step": step,
                    "step_started_at": iso_ms(started),
                    "elapsed_s": round(max(0, now_ms - started) / 1000, 3),
                    "threshold_s": round(th.seconds, 3),
                    "multiplier": config.stall.multiplier,
                    "mean_s": round(th.mean_s, 3),
                    "samples": th.samples,
                    "baseline": th.basis,
                }

            due(
                deadline,
                Candidate("stalled_step", f"{flow}/{step}", f"{flow}/{step}@{started}", deadline, evidence),
            )
    if config.enabled("onboarding_abandoned") and last_seen is not None:
        for flow, state in sorted(flows.items()):
            if state.get("status") == "completed":
                continue
            at = last_seen + config.abandon_after_ms

            def abandoned(flow: str = flow, state: dict[str, Any] = state, last: int = last_seen) -> Any:
                return {
                    "flow": flow,
                    "last_seen_at": iso_ms(last),
                    "idle_s": round(max(0, now_ms - last) / 1000, 3),
                    "steps_completed": sorted(state.get("completed_steps", {})),
                    "current_step": state.get("current_step"),
                }

            due(at, Candidate("onboarding_abandoned", flow, f"{flow}@{last_seen}", at, abandoned))
    if config.enabled("onboarding_completed"):
        for flow, state in sorted(flows.items()):
            if state.get("status") == "completed" and state.get("completed_ms") is not None:
                at = state["completed_ms"]

                def completed(flow: str = flow, at: int = at, started: int = state["started_ms"]) -> Any:
                    return {
                        "flow": flow,
                        "completed_at": iso_ms(at),
                        "duration_s": round((at - started) / 1000, 3),
                    }

                due(at, Candidate("onboarding_completed", flow, flow, at, completed))
    if config.enabled("repeated_help_views"):
        for step, views in sorted(doc.get("help_views", {}).items()):
            if views >= config.help_min_views:
                rounds = views // config.help_min_views
                help_ev = {"step": step, "help_views": views, "min_views": config.help_min_views}
                found.append(
                    Candidate(
                        "repeated_help_views",
                        step,
                        f"{step}#{rounds}",
                        now_ms,
                        functools.partial(dict, help_ev),
                    )
                )
    if config.enabled("segment_entered"):
        for segment in entered:
            seg_ev = {"segment": segment, "entered_at": iso_ms(now_ms)}
            found.append(
                Candidate(
                    "segment_entered", segment, f"{segment}@{now_ms}", now_ms, functools.partial(dict, seg_ev)
                )
            )
    return found, later


def decide(
    doc: Profile,
    user_id: str,
    now_ms: int,
    config: TriggerConfig,
    baselines: Baselines,
    segments: frozenset[str],
    cluster: Mapping[str, Any] | None,
    entered: list[str],
    arms: Arms | None = None,
) -> Decisions:
    """Decide every undecided occurrence due at ``now_ms``; record the decisions in ``doc``.
    ``arms``: the bandit's counts, for trigger types with ``policy = "bandit"``."""
    out = Decisions()
    state = engine_state(doc)
    handled: dict[str, int] = state["handled"]
    fired: list[dict[str, Any]] = state["fired"]
    consent = doc.get("consent", {}).get("personalization")
    groups = [f"cluster:{cluster['id']}"] if cluster else []
    cluster_name = cluster.get("name") if cluster else None
    found, later = candidates(doc, now_ms, config, baselines, groups, entered)
    for cand in found:
        key = f"{cand.type}|{cand.occurrence}"
        if key in handled:
            continue
        ttype: TriggerType = config.types[cand.type]
        if cand.type == "segment_entered":
            rule = next((a for a in ttype.actions if cand.subject in (a.segment, a.cluster)), None)
            if rule is None:
                continue  # entering a segment no action names is not an occurrence
        else:
            rule = ttype.action_for(segments, cluster_name)
        if now_ms - cand.due_ms > config.max_delay_ms:
            reason: str | None = "too_late"
        elif consent is False:
            reason = "consent"
        elif rule is None:
            reason = "no_action"
        else:
            reason = _gate(fired, ttype, cand, now_ms, config.cap_per_day)
        handled[key] = now_ms
        out.changed = True
        out.dropped.extend(_dropped(cand, handled))
        if reason:
            out.suppressed.append((cand.type, reason))
            continue
        group = CONTROL if in_holdout(user_id, cand.type, ttype.holdout) else TREATMENT
        if group == CONTROL:
            out.suppressed.append((cand.type, "holdout"))
        tid = trigger_id(user_id, cand.type, cand.occurrence)
        variant = assign_variant(user_id, cand.type, ttype.variants)
        arm: str | None = None  # the bandit's context, for treated triggers it chose for
        if ttype.policy == "bandit" and ttype.variants and group == TREATMENT:
            arm = context_of(cluster["id"] if cluster else None)
            variant = choose(tid, cand.type, arm, ttype.variants, arms or {}, ttype.exploration)
        record = {"trigger_id": tid, "type": cand.type, "subject": cand.subject, "at": now_ms, "group": group}
        if variant is not None:
            record["variant"] = variant.name
        if arm is not None:
            record["arm"] = arm
        fired.append(record)
        assert rule is not None
        message = {
            "trigger_id": tid,
            "type": cand.type,
            "user_id": user_id,
            "created_at": iso_ms(now_ms),
            "due_at": iso_ms(cand.due_ms),
            "group": group,
            "evidence": dict(cand.evidence()),
            "action": {**rule.action, **(variant.action if variant else {})},
            "segments": sorted(segments),
            "cluster": dict(cluster) if cluster else None,
        }
        if variant is not None:
            message["variant"] = variant.name
        if arm is not None:
            message["policy"] = {"kind": "bandit", "context": arm}
        out.triggers.append(message)
    if len(handled) > MAX_HANDLED:
        for old in sorted(handled, key=handled.__getitem__)[: len(handled) - MAX_HANDLED]:
            del handled[old]
    del fired[:-MAX_FIRED]
    if consent is not False:
        pending = [at for at in later if now_ms - at <= config.max_delay_ms]
        out.deadline_ms = min(pending) if pending else None
    return out


def _gate(
    fired: list[dict[str, Any]], ttype: TriggerType, cand: Candidate, now_ms: int, cap: int
) -> str | None:
    same_subject = [f["at"] for f in fired if f["type"] == cand.type and f["subject"] == cand.subject]
    if same_subject and (
        ttype.reeligible_after_ms is None or now_ms - max(same_subject) < ttype.reeligible_after_ms
    ):
        return "not_reeligible"
    same_type = [f["at"] for f in fired if f["type"] == cand.type]
    if same_type and now_ms - max(same_type) < ttype.cooldown_ms:
        return "cooldown"
    if sum(1 for f in fired if now_ms - f["at"] < DAY_MS) >= cap:
        return "cap"
    return None
