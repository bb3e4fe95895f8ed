"""Lift of triggers: the outcome of treated users against the holdout control group. Pure.

For every trigger occurrence the engine decided (delivered = treatment, held out =
control; both are kept in the profile's ``engine.fired`` log), the outcome is whether
the user went on to do what the trigger is about:

* ``stalled_step``: completed that step after the trigger;
* ``onboarding_abandoned`` and the rest: completed the onboarding flow (any flow) after it.

The rates come with 95% Wilson score intervals and the difference (treatment - control)
with Newcombe's hybrid score interval, which behave for small groups and rates near 0
or 1. Users are assigned to the groups by a hash, so the comparison is a randomized one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from stream_app.profile import Profile, is_tombstone
from stream_app.triggers.bandit import Arms, ArmStats, choose
from stream_app.triggers.config import TriggerConfig
from stream_app.triggers.decide import CONTROL, TREATMENT

Z95 = 1.959963984540054


@dataclass(frozen=True)
class GroupResult:
    n: int
    successes: int

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else math.nan

    def wilson(self, z: float = Z95) -> tuple[float, float]:
        if self.n == 0:
            return (math.nan, math.nan)
        p, n = self.rate, self.n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Lift:
    trigger_type: str
    treatment: GroupResult
    control: GroupResult

    @property
    def difference(self) -> float:
        return self.treatment.rate - self.control.rate

    def interval(self) -> tuple[float, float]:
        """Newcombe (1998) method 10: the difference's 95% interval from the two Wilson intervals."""
        if self.treatment.n == 0 or self.control.n == 0:
            return (math.nan, math.nan)
        p1, p2 = self.treatment.rate, self.control.rate
        l1, u1 = self.treatment.wilson()
        l2, u2 = self.control.wilson()
        d = p1 - p2
        return (
            d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
        )

    def as_dict(self) -> dict[str, Any]:
        low, high = self.interval()
        return {
            "type": self.trigger_type,
            "treatment": {
                "n": self.treatment.n,
                "completed": self.treatment.successes,
                "rate": self.treatment.rate,
            },
            "control": {"n": self.control.n, "completed": self.control.successes, "rate": self.control.rate},
            "difference": self.difference,
            "difference_ci95": [low, high],
        }


def outcomes(doc: Profile) -> list[tuple[str, str, bool]]:
    """(trigger type, group, succeeded) for every trigger occurrence decided for this user."""
    if is_tombstone(doc):
        return []
    flows: dict[str, Any] = doc.get("onboarding", {})
    return [(f["type"], f["group"], _succeeded(f, flows)) for f in (doc.get("engine") or {}).get("fired", [])]


def _succeeded(fired: dict[str, Any], flows: dict[str, Any]) -> bool:
    """Did the user do, after the trigger, what it was about?"""
    at = fired["at"]
    if fired["type"] == "stalled_step":
        flow, _, step = fired["subject"].partition("/")
        done = flows.get(flow, {}).get("completed_steps", {}).get(step)
        return done is not None and done["completed_ms"] >= at
    return any(f.get("status") == "completed" and (f.get("completed_ms") or 0) >= at for f in flows.values())


def lift(rows: Iterable[tuple[str, str, bool]]) -> list[Lift]:
    counts: dict[tuple[str, str], list[int]] = {}
    for type_, group, success in rows:
        c = counts.setdefault((type_, group), [0, 0])
        c[0] += 1
        c[1] += int(success)
    types = sorted({t for t, _g in counts})
    return [
        Lift(
            t,
            GroupResult(*counts.get((t, TREATMENT), [0, 0])),
            GroupResult(*counts.get((t, CONTROL), [0, 0])),
        )
        for t in types
    ]


OUTCOMES = ("delivered", "opened", "clicked", "dismissed")


@dataclass(frozen=True)
class Engagement:
    """What notification services and apps reported back about one trigger type (and variant)
    shown to treated users: how many were delivered, opened, clicked, dismissed."""

    trigger_type: str
    variant: str
    triggers: int
    counts: dict[str, int]

    def rate(self, outcome: str) -> GroupResult:
        """``outcome`` among the delivered ones (all triggers when no delivery was reported)."""
        base = self.counts["delivered"] or self.triggers
        return GroupResult(base, min(base, self.counts[outcome]))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.trigger_type, "variant": self.variant, "triggers": self.triggers}
        for outcome in OUTCOMES:
            out[outcome] = self.counts[outcome]
            if outcome != "delivered":
                r = self.rate(outcome)
                out[f"{outcome}_rate"] = r.rate
                out[f"{outcome}_ci95"] = list(r.wilson())
        return out


def engagement_rows(doc: Profile) -> list[tuple[str, str, frozenset[str]]]:
    """(trigger type, variant, outcomes reported) for every treated trigger of this user."""
    if is_tombstone(doc):
        return []
    log: dict[str, Any] = doc.get("interventions") or {}
    rows = []
    for fired in (doc.get("engine") or {}).get("fired", []):
        if fired.get("group") != TREATMENT:
            continue
        seen = log.get(fired.get("trigger_id", "")) or {}
        variant = str(seen.get("variant") or fired.get("variant") or "-")
        rows.append((fired["type"], variant, frozenset(o for o in OUTCOMES if o in seen)))
    return rows


def engagement(rows: Iterable[tuple[str, str, frozenset[str]]]) -> list[Engagement]:
    totals: dict[tuple[str, str], list[int]] = {}
    for type_, variant, seen in rows:
        t = totals.setdefault((type_, variant), [0] * (1 + len(OUTCOMES)))
        t[0] += 1
        for i, outcome in enumerate(OUTCOMES, start=1):
            t[i] += int(outcome in seen)
    return [
        Engagement(type_, variant, t[0], dict(zip(OUTCOMES, t[1:], strict=True)))
        for (type_, variant), t in sorted(totals.items())
    ]


# --- experiments (variants of a trigger type) ---------------------------------------------------
Z_POWER80 = 0.8416212335729143


def arm_outcomes(doc: Profile) -> list[tuple[str, str, bool]]:
    """(trigger type, arm, succeeded) for the trigger types that run an experiment on this
    user: arm = the variant shown, or ``control`` for the held-out group."""
    if is_tombstone(doc):
        return []
    flows: dict[str, Any] = doc.get("onboarding", {})
    out = []
    for fired in (doc.get("engine") or {}).get("fired", []):
        arm = CONTROL if fired["group"] == CONTROL else fired.get("variant")
        if arm:
            out.append((fired["type"], str(arm), _succeeded(fired, flows)))
    return out


def planned_n(p_base: float, min_effect: float, z_alpha: float = Z95, z_power: float = Z_POWER80) -> int:
    """Users per arm to detect an absolute difference of ``min_effect`` from a rate of ``p_base``
    (two-sided 5 %, power 80 %; the normal approximation for two proportions)."""
    p1 = min(max(p_base, 0.0), 1.0)
    p2 = min(1.0, p1 + min_effect) if p1 + min_effect <= 1 else max(0.0, p1 - min_effect)
    pbar = (p1 + p2) / 2
    root = z_alpha * math.sqrt(2 * pbar * (1 - pbar)) + z_power * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return math.ceil(root * root / (min_effect * min_effect)) if min_effect > 0 else 0


@dataclass(frozen=True)
class Comparison:
    """Arm ``a`` against arm ``b`` (b is the control or another variant) of one trigger type."""

    trigger_type: str
    a: str
    b: str
    lift: Lift
    needed: int  # planned users per arm (fixed horizon)

    def verdict(self) -> str:
        have = min(self.lift.treatment.n, self.lift.control.n)
        if have < self.needed:
            return f"not yet: {self.needed - have} more users per arm (planned {self.needed})"
        low, high = self.lift.interval()
        if low > 0:
            return f"{self.a} better"
        if high < 0:
            return f"{self.b} better"
        return "no difference of the minimum effect or more"

    def as_dict(self) -> dict[str, Any]:
        low, high = self.lift.interval()
        return {
            "type": self.trigger_type,
            "a": self.a,
            "b": self.b,
            "a_n": self.lift.treatment.n,
            "a_rate": self.lift.treatment.rate,
            "b_n": self.lift.control.n,
            "b_rate": self.lift.control.rate,
            "difference": self.lift.difference,
            "difference_ci95": [low, high],
            "planned_n_per_arm": self.needed,
            "verdict": self.verdict(),
        }


def experiments(rows: Iterable[tuple[str, str, bool]], min_effect: float) -> list[Comparison]:
    """Every variant against the control and against each other, per trigger type.

    Fixed horizon: a comparison names a winner only once both arms reached the sample size
    planned for ``min_effect`` (from the control's observed rate, 50 % while it has none), so
    looking at the report every day does not inflate false winners the way stopping at the
    first significant look would; before that it says how many users are still needed."""
    counts: dict[tuple[str, str], list[int]] = {}
    for type_, arm, success in rows:
        c = counts.setdefault((type_, arm), [0, 0])
        c[0] += 1
        c[1] += int(success)
    out: list[Comparison] = []
    for type_ in sorted({t for t, _a in counts}):
        arms = sorted(a for t, a in counts if t == type_ and a != CONTROL)
        control = GroupResult(*counts.get((type_, CONTROL), [0, 0]))
        base = control.rate if control.n else 0.5
        needed = planned_n(base, min_effect)
        pairs = [(a, CONTROL) for a in arms] + [(a, b) for i, a in enumerate(arms) for b in arms[i + 1 :]]
        for a, b in pairs:
            lift_ab = Lift(
                type_, GroupResult(*counts[(type_, a)]), GroupResult(*counts.get((type_, b), [0, 0]))
            )
            out.append(Comparison(type_, a, b, lift_ab, needed))
    return out


# --- funnels --------------------------------------------------------------------------------------


@dataclass
class FunnelStep:
    """One flow step for one group of users: how many started it, completed it, dropped at it
    (a stalled_step decision for the step, or the flow abandoned while on it), and the
    median time to complete it."""

    group: str
    flow: str
    step: str
    started: int = 0
    completed: int = 0
    dropped: int = 0
    durations: list[float] | None = None

    @property
    def median_s(self) -> float:
        values = sorted(self.durations or [])
        if not values:
            return math.nan
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group, "flow": self.flow, "step": self.step, "started": self.started,
            "completed": self.completed, "dropped": self.dropped, "median_s": self.median_s,
        }  # fmt: skip


def funnel_rows(doc: Profile, by: str) -> list[tuple[str, str, str, str, float | None]]:
    """(group, flow, step, state, duration) for every step this user started; state is
    completed, dropped or open. ``by``: ``all``, ``segment`` (one row per segment the user
    is in) or ``cluster``."""
    if is_tombstone(doc):
        return []
    engine = doc.get("engine") or {}
    if by == "segment":
        groups = list(engine.get("segments") or []) or ["(no segment)"]
    elif by == "cluster":
        groups = [str((engine.get("cluster") or {}).get("name") or "(no cluster)")]
    else:
        groups = ["all"]
    stalled = {f["subject"] for f in engine.get("fired", []) if f["type"] == "stalled_step"}
    abandoned = {f["subject"] for f in engine.get("fired", []) if f["type"] == "onboarding_abandoned"}
    rows: list[tuple[str, str, str, str, float | None]] = []
    for flow, state in (doc.get("onboarding") or {}).items():
        steps: list[tuple[str, str, float | None]] = [
            (step, "completed", done.get("duration_s"))
            for step, done in state.get("completed_steps", {}).items()
        ]
        current = state.get("current_step")
        if current and current not in state.get("completed_steps", {}):
            dropped = f"{flow}/{current}" in stalled or flow in abandoned
            steps.append((current, "dropped" if dropped else "open", None))
        rows.extend((g, flow, step, what, took) for g in groups for step, what, took in steps)
    return rows


def funnel(rows: Iterable[tuple[str, str, str, str, float | None]]) -> list[FunnelStep]:
    out: dict[tuple[str, str, str], FunnelStep] = {}
    for group, flow, step, what, took in rows:
        entry = out.setdefault((group, flow, step), FunnelStep(group, flow, step, durations=[]))
        entry.started += 1
        if what == "completed":
            entry.completed += 1
            if took is not None and entry.durations is not None:
                entry.durations.append(took)
        elif what == "dropped":
            entry.dropped += 1
    # within a group and flow, the funnel's order: most started first
    return sorted(out.values(), key=lambda f: (f.group, f.flow, -f.started, f.step))


# --- bandit ----------------------------------------------------------------------------------------


@dataclass
class ArmRow:
    """One bandit arm: a variant of a trigger type in one context (cluster), its counts, and
    the share of the next triggers in that context it would get now (Thompson sampling with
    the type's exploration floor, estimated by ``draws`` deterministic draws)."""

    trigger_type: str
    context: str
    variant: str
    result: GroupResult  # n = pulls, successes = rewards
    share_now: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.trigger_type, "context": self.context, "variant": self.variant,
            "pulls": self.result.n, "rewards": self.result.successes, "rate": self.result.rate,
            "ci95": list(self.result.wilson()), "share_now": self.share_now,
        }  # fmt: skip


def bandit_arms(arms: Arms, config: TriggerConfig, draws: int = 2000) -> list[ArmRow]:
    """Every arm of every trigger type under ``policy = "bandit"``, per context seen."""
    out: list[ArmRow] = []
    for ttype in config.types.values():
        if ttype.policy != "bandit" or not ttype.variants:
            continue
        contexts = sorted({c for (t, c, _v) in arms if t == ttype.name})
        for context in contexts:
            picks = Counter(
                choose(f"report{i}", ttype.name, context, ttype.variants, arms, ttype.exploration).name
                for i in range(draws)
            )
            for v in ttype.variants:
                stats = arms.get((ttype.name, context, v.name), ArmStats())
                result = GroupResult(stats.pulls, min(stats.rewards, stats.pulls))
                out.append(ArmRow(ttype.name, context, v.name, result, picks[v.name] / draws))
    return out
