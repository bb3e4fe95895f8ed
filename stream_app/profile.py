"""Pure profile logic: how one event changes a user's profile document. No I/O.

A profile is a JSON-able dict (the *document*) stored whole in Redis. Times are
epoch milliseconds in keys ending in ``_ms``; :func:`render_profile` adds the
ISO-8601 forms for readers. Functions here mutate the working copy they are given
and return the side effects the caller must perform (step statistics, erasure);
they never touch Kafka or Redis and never look at the wall clock unless handed
``now_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

from stream_app.contract import (
    DELETION_REQUESTED,
    FEATURE_USED,
    HELP_VIEWED,
    ONBOARDING_COMPLETED,
    OUTCOME_EVENTS,
    SESSION_STARTED,
    STEP_COMPLETED,
    STEP_STARTED,
    Event,
    iso_ms,
)

Profile = dict[str, Any]

#: Bounds that keep one profile's size finite whatever a client sends.
MAX_EVENT_NAMES = 100
MAX_FEATURES = 200
MAX_RECENT_SESSIONS = 20  # enough for sessions-per-week; each costs ~14 bytes per write
MAX_GROUPS = 10
MAX_INTERVENTIONS = 50  # outcomes kept per profile (trigger ids), the earliest first out
MAX_FLOWS = 20  # onboarding flows tracked per profile; events of further flows are counted only
MAX_STEPS_PER_FLOW = 50  # distinct steps tracked per flow; further step names are counted only
OTHER = "(other)"
SESSION_START_MERGE_MS = 60_000

LIFECYCLE_STAGES = ("new", "activated", "active", "dormant", "churned")


@dataclass(frozen=True, slots=True)
class ProfileRules:
    """Thresholds of the profile logic, taken from the settings."""

    session_gap_ms: int = 30 * 60 * 1000
    active_min_sessions: int = 3
    dormant_after_ms: int = 30 * 86_400_000
    churned_after_ms: int = 90 * 86_400_000


@dataclass(frozen=True, slots=True)
class StepDuration:
    """A completed step's duration, to fold into that step's statistics once, by the position
    of the record that completed it (``source``: partition, offset; see store/step_stats)."""

    flow: str
    step: str
    duration_s: float
    message_id: str
    group: str = ""  # "" for all users; "cluster:<id>" for the user's cluster at completion
    source: tuple[int, int] | None = None  # the completing record's (partition, offset)


@dataclass(frozen=True, slots=True)
class EraseRequested:
    profile_id: str


@dataclass(frozen=True, slots=True)
class Bounded:
    """Input that would grow the profile past a bound (a new flow or step name) was not kept."""

    what: str  # "flows" | "steps"


@dataclass(frozen=True, slots=True)
class StepProgress:
    """A step started (it became the user's current step) or completed for the first time:
    the live funnel's counts (metrics only; stalls and abandonment come from decisions)."""

    flow: str
    step: str
    stage: str  # "started" | "completed"


@dataclass(frozen=True, slots=True)
class OutcomeNoted:
    """An intervention's outcome (``opened``, ``clicked``, ...) folded in for the first time:
    a bandit's reward when that trigger was the bandit's choice (counted once per trigger id)."""

    trigger_id: str
    outcome: str


Effect = StepDuration | EraseRequested | Bounded | OutcomeNoted | StepProgress


def new_profile(profile_id: str) -> Profile:
    return {
        "user_id": profile_id,
        "event_count": 0,
        "counts": {},
        "events": {},
        "first_seen_ms": None,
        "last_seen_ms": None,
        "sessions": {"count": 0, "recent_ms": []},
        "onboarding": {},
        "features": {},
        "help_views": {},
        "device": None,
        "country": None,
        "city": None,
        "locale": None,
        "traits": {},
        "consent": {"personalization": None, "updated_ms": None},
        "lifecycle": "new",
        "merged_from": [],
        "identified": False,
        "groups": {},
    }


def is_tombstone(doc: Profile | None) -> TypeGuard[Profile]:
    """A tombstone marks an id merged into another profile (``merged_into``)."""
    return doc is not None and "merged_into" in doc


def _bump(counter: dict[str, int], key: str, limit: int, by: int = 1) -> None:
    if key not in counter and len(counter) >= limit:
        key = OTHER
    counter[key] = counter.get(key, 0) + by


def apply_event(doc: Profile, event: Event, rules: ProfileRules) -> list[Effect]:
    """Fold one *new* (not yet applied) event into ``doc``; return the effects to perform."""
    effects: list[Effect] = []
    ts = event.ts_ms
    doc["event_count"] += 1
    _bump(doc["counts"], event.type, 10)

    last_seen = doc["last_seen_ms"]
    recent: list[int] = doc["sessions"]["recent_ms"]
    gap_start = last_seen is None or ts - last_seen > rules.session_gap_ms
    # An explicit "Session Started" next to a start inferred from the gap is the same session.
    explicit_start = (
        event.type == "track"
        and event.name == SESSION_STARTED
        and (not recent or abs(ts - recent[-1]) > SESSION_START_MERGE_MS)
    )
    if gap_start or explicit_start:
        doc["sessions"]["count"] += 1
        recent.append(ts)
        recent.sort()
        del recent[:-MAX_RECENT_SESSIONS]
    doc["first_seen_ms"] = ts if doc["first_seen_ms"] is None else min(doc["first_seen_ms"], ts)
    doc["last_seen_ms"] = ts if last_seen is None else max(last_seen, ts)

    if event.device is not None and (last_seen is None or ts >= last_seen):
        doc["device"] = {
            k: v
            for k, v in (
                ("type", event.device.type),
                ("os", event.device.os),
                ("os_version", event.device.os_version),
                ("browser", event.device.browser),
                ("model", event.device.model),
            )
            if v is not None
        }
    for key in ("country", "city", "locale"):
        value = getattr(event, key)
        if value is not None and (last_seen is None or ts >= last_seen or doc[key] is None):
            doc[key] = value

    if event.consent_personalization is not None:
        consent = doc["consent"]
        if consent["updated_ms"] is None or ts >= consent["updated_ms"]:
            consent["personalization"] = event.consent_personalization
            consent["updated_ms"] = ts

    if event.user_id is not None:
        doc["identified"] = True  # a user id, not only an anonymous visitor (identity.py)
    if event.type == "identify" and event.traits:
        doc["traits"].update(event.traits)
    elif event.type == "group" and event.group_id is not None:
        _apply_group(doc, event)
    elif event.type == "track":
        effects.extend(_apply_track(doc, event))

    doc["lifecycle"] = lifecycle_stage(doc, max(ts, doc["last_seen_ms"]), rules)
    return effects


def _apply_group(doc: Profile, event: Event) -> None:
    """The account/company the user belongs to: its latest traits, at most MAX_GROUPS groups."""
    groups: dict[str, dict[str, Any]] = doc.setdefault("groups", {})
    gid = event.group_id
    assert gid is not None
    entry = groups.get(gid)
    if entry is None:
        if len(groups) >= MAX_GROUPS:
            return
        entry = groups[gid] = {"traits": {}, "updated_ms": event.ts_ms}
    if event.ts_ms >= entry["updated_ms"]:
        entry["traits"].update(event.traits or {})
        entry["updated_ms"] = event.ts_ms


def _flow(doc: Profile, flow: str, ts: int) -> dict[str, Any] | None:
    """The flow's state, created on first sight; None once the profile tracks MAX_FLOWS flows."""
    flows: dict[str, dict[str, Any]] = doc["onboarding"]
    state = flows.get(flow)
    if state is None:
        if len(flows) >= MAX_FLOWS:
            return None
        state = flows[flow] = {
            "status": "in_progress",
            "started_ms": ts,
            "completed_ms": None,
            "current_step": None,
            "current_step_started_ms": None,
            "completed_steps": {},
        }
    state["started_ms"] = min(state["started_ms"], ts)
    return state


def _apply_track(doc: Profile, event: Event) -> list[Effect]:
    name = event.name or ""
    props = event.properties
    ts = event.ts_ms
    _bump(doc["events"], name, MAX_EVENT_NAMES)
    if name == STEP_STARTED:
        state = _flow(doc, props["flow"], ts)
        if state is None:
            return [Bounded("flows")]
        step = props["step"]
        if step not in state["completed_steps"] and len(state["completed_steps"]) >= MAX_STEPS_PER_FLOW:
            return [Bounded("steps")]
        current_started = state["current_step_started_ms"]
        if step not in state["completed_steps"] and (current_started is None or ts >= current_started):
            moved = state["current_step"] != step
            state["current_step"] = step
            state["current_step_started_ms"] = ts
            if moved:
                return [StepProgress(props["flow"], step, "started")]
    elif name == STEP_COMPLETED:
        return _complete_step(doc, event)
    elif name == ONBOARDING_COMPLETED:
        state = _flow(doc, props["flow"], ts)
        if state is None:
            return [Bounded("flows")]
        state["status"] = "completed"
        state["completed_ms"] = ts if state["completed_ms"] is None else min(state["completed_ms"], ts)
        state["current_step"] = None
        state["current_step_started_ms"] = None
    elif name == FEATURE_USED:
        _bump(doc["features"], props["feature"], MAX_FEATURES)
    elif name == HELP_VIEWED:
        _bump(doc["help_views"], props["step"], MAX_FEATURES)
    elif name == DELETION_REQUESTED:
        return [EraseRequested(doc["user_id"])]
    elif name in OUTCOME_EVENTS:
        return _note_outcome(doc, OUTCOME_EVENTS[name], props, ts)
    return []


def _note_outcome(doc: Profile, outcome: str, props: dict[str, Any], ts: int) -> list[Effect]:
    """``interventions[trigger_id]``: when each outcome first happened (and the variant shown).
    The earliest time wins, so the fold is the same in any order and under redelivery."""
    log: dict[str, dict[str, Any]] = doc.setdefault("interventions", {})
    tid = props["trigger_id"]
    entry = log.get(tid)
    if entry is None:
        if len(log) >= MAX_INTERVENTIONS:
            del log[min(log, key=lambda k: (log[k]["first_ms"], k))]
        entry = log[tid] = {"first_ms": ts}
    entry["first_ms"] = min(entry["first_ms"], ts)
    first = outcome not in entry
    entry[outcome] = min(entry.get(outcome, ts), ts)
    variant = props.get("variant")
    if isinstance(variant, str) and variant:
        _note_variant(entry, variant, ts)
    return [OutcomeNoted(tid, outcome)] if first else []


def _note_variant(entry: dict[str, Any], variant: str, ts: int) -> None:
    """The variant of the earliest report that names one (ties: the smaller name)."""
    if "variant" not in entry or (ts, variant) < (entry["variant_ms"], entry["variant"]):
        entry["variant"], entry["variant_ms"] = variant, ts


def _complete_step(doc: Profile, event: Event) -> list[Effect]:
    flow, step, ts = event.properties["flow"], event.properties["step"], event.ts_ms
    state = _flow(doc, flow, ts)
    if state is None:
        return [Bounded("flows")]
    if step in state["completed_steps"]:
        return []  # completing a step twice (another messageId) keeps the first completion
    if len(state["completed_steps"]) >= MAX_STEPS_PER_FLOW:
        return [Bounded("steps")]
    duration_s: float | None = None
    if state["current_step"] == step and state["current_step_started_ms"] is not None:
        duration_s = max(0.0, (ts - state["current_step_started_ms"]) / 1000)
        state["current_step"] = None
        state["current_step_started_ms"] = None
    # (no messageId: nothing reads it since durations are counted by record position, and
    # an id is ~30 incompressible bytes per step in every document; older documents keep theirs)
    state["completed_steps"][step] = {"completed_ms": ts, "duration_s": duration_s}
    done = StepProgress(flow, step, "completed")
    if duration_s is None:
        return [done]
    return [done, StepDuration(flow, step, duration_s, event.message_id, source=event.source)]


def replayed_effects(doc: Profile, event: Event) -> list[Effect]:
    """Effects of an event already applied to ``doc`` that must be re-sent on redelivery.

    A step's duration is not among them: the pipeline folds durations into the statistics
    before it writes the profile, so a completion the profile holds was counted (a replay of
    its record before the profile write is counted once by the record's position).
    """
    if event.type == "track" and event.name == DELETION_REQUESTED:
        return [EraseRequested(doc["user_id"])]
    if event.type == "track" and event.name in OUTCOME_EVENTS:  # a reward never counted (a crash)
        outcome, tid = OUTCOME_EVENTS[event.name], event.properties.get("trigger_id")
        if outcome in doc.get("interventions", {}).get(tid, {}):
            return [OutcomeNoted(str(tid), outcome)]
    return []


def lifecycle_stage(doc: Profile, now_ms: int, rules: ProfileRules) -> str:
    """new / activated / active / dormant / churned, from recency, onboarding and sessions."""
    last_seen = doc.get("last_seen_ms")
    if last_seen is not None:
        idle = now_ms - last_seen
        if idle > rules.churned_after_ms:
            return "churned"
        if idle > rules.dormant_after_ms:
            return "dormant"
    completed = any(f.get("status") == "completed" for f in doc.get("onboarding", {}).values())
    if not completed:
        return "new"
    if doc.get("sessions", {}).get("count", 0) >= rules.active_min_sessions:
        return "active"
    return "activated"


def merge_profiles(target: Profile, source: Profile, source_id: str) -> None:
    """Fold the profile of ``source_id`` (an anonymous or previous id) into ``target``.

    Counts add up; first/last seen take min/max; per-flow onboarding keeps the most
    advanced state; target's traits win. Applying it twice is prevented by the caller
    through ``merged_from``.
    """
    target["event_count"] += source.get("event_count", 0)
    for key in ("counts", "events", "features", "help_views"):
        limit = 10 if key == "counts" else MAX_FEATURES
        for name, count in source.get(key, {}).items():
            _bump(target[key], name, limit, by=count)
    for key, pick in (("first_seen_ms", min), ("last_seen_ms", max)):
        values = [v for v in (target.get(key), source.get(key)) if v is not None]
        target[key] = pick(values) if values else None
    sessions = target["sessions"]
    sessions["count"] += source.get("sessions", {}).get("count", 0)
    recent = sorted(set(sessions["recent_ms"]) | set(source.get("sessions", {}).get("recent_ms", [])))
    sessions["recent_ms"] = recent[-MAX_RECENT_SESSIONS:]
    for flow, src in source.get("onboarding", {}).items():
        dst = target["onboarding"].get(flow)
        if dst is None:
            target["onboarding"][flow] = src
            continue
        for step, done in src.get("completed_steps", {}).items():
            dst["completed_steps"].setdefault(step, done)
        dst["started_ms"] = min(dst["started_ms"], src["started_ms"])
        if src.get("status") == "completed" and dst.get("status") != "completed":
            dst.update(
                status="completed",
                completed_ms=src["completed_ms"],
                current_step=None,
                current_step_started_ms=None,
            )
        elif dst.get("current_step") is None and src.get("current_step") not in dst["completed_steps"]:
            dst["current_step"] = src.get("current_step")
            dst["current_step_started_ms"] = src.get("current_step_started_ms")
    for key in ("device", "country", "city", "locale"):
        if target.get(key) is None:
            target[key] = source.get(key)
    target["traits"] = {**source.get("traits", {}), **target["traits"]}
    src_consent = source.get("consent", {})
    if src_consent.get("updated_ms") is not None and (
        target["consent"]["updated_ms"] is None or src_consent["updated_ms"] > target["consent"]["updated_ms"]
    ):
        target["consent"] = dict(src_consent)
    for gid, group in source.get("groups", {}).items():
        groups = target.setdefault("groups", {})
        if gid not in groups and len(groups) < MAX_GROUPS:
            groups[gid] = group
    for tid, entry in source.get("interventions", {}).items():
        log: dict[str, dict[str, Any]] = target.setdefault("interventions", {})
        mine = log.get(tid)
        if mine is None:
            if len(log) >= MAX_INTERVENTIONS:
                del log[min(log, key=lambda k: (log[k]["first_ms"], k))]
            log[tid] = dict(entry)
            continue
        for key, value in entry.items():
            if key == "variant":
                _note_variant(mine, value, entry["variant_ms"])
            elif key != "variant_ms":
                mine[key] = min(mine.get(key, value), value)
    target["identified"] = bool(target.get("identified") or source.get("identified"))
    # never truncated: erasure follows this list (the link is refused beyond the limit instead)
    merged = [*target["merged_from"], source_id, *source.get("merged_from", [])]
    target["merged_from"] = list(dict.fromkeys(merged))


def render_profile(doc: Profile, now_ms: int, rules: ProfileRules) -> Profile:
    """The reader's view: ``*_ms`` times also as ISO-8601, lifecycle recomputed for ``now``.

    Never fails on stored data: traits are the client's and are passed through unconverted,
    and a time that cannot be rendered is shown as null.
    """

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                if key == "traits":
                    out[key] = item  # the client's names: a trait called "x_ms" is not our time
                    continue
                out[key] = convert(item)
                if isinstance(key, str) and key.endswith("_ms"):
                    iso_key = key[:-3] if key != "recent_ms" else "recent"
                    if isinstance(item, int):
                        out[iso_key if iso_key not in value else f"{iso_key}_at"] = _iso_or_none(item)
                    elif isinstance(item, list):
                        out[iso_key] = [_iso_or_none(v) for v in item]
                    elif item is None:
                        out[iso_key] = None
            return out
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    view = convert(doc)
    view["lifecycle"] = lifecycle_stage(doc, now_ms, rules)
    return view


def _iso_or_none(value: Any) -> str | None:
    try:
        return iso_ms(int(value))
    except (OverflowError, ValueError, TypeError):
        return None
