"""Pure trigger decisions: thresholds, each trigger type, the gates, determinism."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.paths import CONFIG_DIR
from stream_app.profile import Profile, new_profile
from stream_app.triggers.bandit import ArmStats
from stream_app.triggers.config import StallSettings, TriggerConfigError, load_triggers, parse_config
from stream_app.triggers.decide import (
    CONTROL,
    TREATMENT,
    StepBaseline,
    assign_variant,
    decide,
    in_holdout,
    stall_threshold,
    trigger_id,
)

T0 = 1_795_000_000_000
S = 1000
NO_HOLDOUT = {
    "stalled_step": {
        "multiplier": 2,
        "min_samples": 5,
        "default_mean": 60,
        "min_threshold": 1,
        "cooldown": 0,
        "actions": [
            {"segment": "struggling", "action": {"kind": "live_chat"}},
            {"action": {"kind": "tutorial"}},
        ],
    },
    "onboarding_abandoned": {"after": 3600, "actions": [{"action": {"kind": "email"}}]},
    "onboarding_completed": {"actions": [{"action": {"kind": "welcome"}}]},
    "repeated_help_views": {"min_views": 3, "actions": [{"action": {"kind": "chat"}}]},
    "segment_entered": {"actions": [{"segment": "power_user", "action": {"kind": "advanced"}}]},
    "limits": {"cap_per_day": 10, "allowed_lateness": 0},
}


def config(**changes: Any) -> Any:
    raw = copy.deepcopy(NO_HOLDOUT)
    for key, value in changes.items():
        raw.setdefault(key, {}).update(value)
    return parse_config(raw)


def stuck_at(step: str = "profile", started: int = T0, consent: bool | None = None) -> Profile:
    doc = new_profile("u1")
    doc["first_seen_ms"] = doc["last_seen_ms"] = started
    doc["consent"]["personalization"] = consent
    doc["onboarding"]["signup"] = {
        "status": "in_progress",
        "started_ms": started,
        "completed_ms": None,
        "current_step": step,
        "current_step_started_ms": started,
        "completed_steps": {},
    }
    return doc


def run(doc: Profile, at_s: float, cfg: Any = None, **kw: Any) -> Any:
    kw.setdefault("baselines", {})
    kw.setdefault("segments", frozenset())
    kw.setdefault("cluster", None)
    kw.setdefault("entered", [])
    return decide(doc, "u1", T0 + int(at_s * S), cfg or config(), **kw)


def types(d: Any) -> list[str]:
    return [t["type"] for t in d.triggers]


# --- thresholds ----------------------------------------------------------------------------


def test_threshold_uses_the_most_specific_group_with_enough_samples() -> None:
    stall = StallSettings(
        multiplier=2, min_samples=5, default_mean_s=60, min_threshold_s=1, max_threshold_s=1e6
    )
    base = {("f", "s", ""): StepBaseline(100, 50), ("f", "s", "cluster:c2"): StepBaseline(300, 9)}
    assert stall_threshold("f", "s", ["cluster:c2"], base, stall).seconds == 600
    assert stall_threshold("f", "s", ["cluster:c2"], base, stall).basis == "cluster:c2"
    assert stall_threshold("f", "s", ["cluster:c9"], base, stall).seconds == 200  # falls back to all users
    few = {("f", "s", ""): StepBaseline(100, 4)}
    th = stall_threshold("f", "s", [], few, stall)
    assert (th.seconds, th.basis, th.samples) == (120, "default", 4)


def test_threshold_is_clamped_and_per_step_defaults_apply() -> None:
    stall = StallSettings(2, 5, 60, {"f/slow": 500}, min_threshold_s=30, max_threshold_s=900)
    assert stall_threshold("f", "slow", [], {}, stall).seconds == 900
    assert stall_threshold("f", "fast", [], {("f", "fast", ""): StepBaseline(1, 99)}, stall).seconds == 30


# --- stalled step --------------------------------------------------------------------------


def test_a_stalled_user_gets_one_trigger_at_twice_the_mean_and_never_again() -> None:
    doc = stuck_at()
    early = run(doc, 119)
    assert early.triggers == [] and early.deadline_ms == T0 + 120 * S
    fired = run(doc, 121)
    assert types(fired) == ["stalled_step"]
    t = fired.triggers[0]
    assert t["evidence"]["threshold_s"] == 120 and t["evidence"]["mean_s"] == 60
    assert t["evidence"]["baseline"] == "default" and t["evidence"]["elapsed_s"] == 121
    assert t["action"] == {"kind": "tutorial"} and t["group"] == TREATMENT
    assert t["trigger_id"] == trigger_id("u1", "stalled_step", f"signup/profile@{T0}")
    assert run(doc, 500).triggers == []  # recomputed later, or after a crash: decided already


def test_a_finisher_gets_no_stall() -> None:
    doc = stuck_at()
    state = doc["onboarding"]["signup"]
    state["completed_steps"]["profile"] = {"completed_ms": T0 + 50 * S, "duration_s": 50, "message_id": "m"}
    state["current_step"] = state["current_step_started_ms"] = None
    d = run(doc, 1000)
    assert "stalled_step" not in types(d)


def test_the_action_follows_the_segment() -> None:
    d = run(stuck_at(), 200, segments=frozenset({"struggling"}))
    assert d.triggers[0]["action"] == {"kind": "live_chat"}


def test_a_user_who_said_no_gets_nothing_and_no_deadline() -> None:
    doc = stuck_at(consent=False)
    assert run(doc, 10).deadline_ms is None
    d = run(doc, 200)
    assert d.triggers == [] and d.suppressed == [("stalled_step", "consent")]


def test_an_occurrence_past_the_maximum_delay_is_dropped() -> None:
    d = run(stuck_at(), 2 * 86_400)
    assert d.triggers == [] and ("stalled_step", "too_late") in d.suppressed


# --- the gates ------------------------------------------------------------------------------


def test_cooldown_suppresses_a_second_trigger_of_the_type() -> None:
    cfg = config(stalled_step={"cooldown": 600})
    doc = stuck_at("profile")
    assert types(run(doc, 121, cfg)) == ["stalled_step"]
    state = doc["onboarding"]["signup"]
    state["current_step"], state["current_step_started_ms"] = "connect", T0 + 130 * S
    d = run(doc, 300, cfg)
    assert d.triggers == [] and d.suppressed == [("stalled_step", "cooldown")]


def test_reeligibility_is_per_subject() -> None:
    cfg = config(stalled_step={"reeligible_after": 3600})
    doc = stuck_at("profile")
    run(doc, 121, cfg)
    state = doc["onboarding"]["signup"]
    state["current_step_started_ms"] = T0 + 200 * S  # the same step started again
    assert run(doc, 400, cfg).suppressed == [("stalled_step", "not_reeligible")]
    state["current_step_started_ms"] = T0 + 4000 * S
    assert "stalled_step" in types(run(doc, 4200, cfg))


def test_the_frequency_cap_counts_every_type() -> None:
    cfg = config(limits={"cap_per_day": 1})
    doc = stuck_at()
    doc["help_views"] = {"profile": 3}
    d = run(doc, 121, cfg)
    assert len(d.triggers) == 1 and d.suppressed[0][1] == "cap"


def test_holdout_is_deterministic_and_close_to_the_share() -> None:
    share = 0.2
    members = [in_holdout(f"user-{i}", "stalled_step", share) for i in range(20_000)]
    assert members == [in_holdout(f"user-{i}", "stalled_step", share) for i in range(20_000)]
    assert 0.18 < sum(members) / len(members) < 0.22
    assert not any(in_holdout(f"user-{i}", "x", 0.0) for i in range(1000))


def test_a_control_user_gets_a_holdout_record_not_a_trigger() -> None:
    cfg = config(stalled_step={"holdout": 1.0})
    doc = stuck_at()
    d = run(doc, 121, cfg)
    assert [t["group"] for t in d.triggers] == [CONTROL]
    assert d.suppressed == [("stalled_step", "holdout")]
    assert doc["engine"]["fired"][0]["group"] == CONTROL


# --- the other types --------------------------------------------------------------------------


def test_abandonment_completion_help_and_segment_entered() -> None:
    doc = stuck_at()
    doc["onboarding"]["signup"]["current_step"] = None
    d = run(doc, 10)
    assert d.deadline_ms == T0 + 3600 * S
    assert types(run(doc, 3601)) == ["onboarding_abandoned"]
    doc["help_views"] = {"profile": 3}
    assert types(run(doc, 3602)) == ["repeated_help_views"]
    doc["onboarding"]["signup"].update(status="completed", completed_ms=T0 + 3700 * S)
    assert types(run(doc, 3700)) == ["onboarding_completed"]
    d = run(doc, 3800, entered=["power_user", "dormant"])
    assert types(d) == ["segment_entered"] and d.triggers[0]["action"] == {"kind": "advanced"}


def test_the_shipped_configuration_decides() -> None:
    cfg = load_triggers(CONFIG_DIR / "triggers.toml")
    d = decide(stuck_at("connect_data"), "u1", T0 + 1201 * S, cfg, {}, frozenset(), None, [])
    assert d.triggers and d.triggers[0]["evidence"]["threshold_s"] == 1200


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=12))
def test_any_sequence_of_evaluations_fires_an_occurrence_at_most_once(times: list[int]) -> None:
    doc = stuck_at()
    ids: list[str] = []
    for at in sorted(times):
        ids.extend(t["trigger_id"] for t in run(doc, at).triggers if t["type"] == "stalled_step")
    assert len(ids) == len(set(ids))
    assert len(ids) == (1 if max(times) >= 120 else 0)


@pytest.mark.parametrize("user", ["a", "b"])
def test_trigger_ids_are_stable(user: str) -> None:
    assert trigger_id(user, "t", "o") == trigger_id(user, "t", "o") != trigger_id(user, "t", "o2")


# --- experiments ------------------------------------------------------------------------------

VARIANTS = [
    {"name": "tutorial", "weight": 3, "action": {"template": "video"}},
    {"name": "checklist", "weight": 1, "action": {"kind": "checklist_nudge"}},
]


def test_variants_are_assigned_by_user_deterministically_and_by_weight() -> None:
    arms = config(stalled_step={"variants": VARIANTS}).types["stalled_step"].variants
    picks = [assign_variant(f"user-{i}", "stalled_step", arms) for i in range(20_000)]
    assert picks == [assign_variant(f"user-{i}", "stalled_step", arms) for i in range(20_000)]
    share = sum(1 for p in picks if p is not None and p.name == "tutorial") / len(picks)
    assert 0.73 < share < 0.77
    assert assign_variant("u", "stalled_step", ()) is None


def test_the_trigger_carries_its_variant_and_the_variants_action_fields() -> None:
    cfg = config(stalled_step={"variants": VARIANTS})
    doc = stuck_at()
    d = run(doc, 121, cfg)
    (message,) = d.triggers
    arm = assign_variant("u1", "stalled_step", cfg.types["stalled_step"].variants)
    assert arm is not None and message["variant"] == arm.name
    assert message["action"] == {"kind": "tutorial", **arm.action}
    assert doc["engine"]["fired"][0]["variant"] == arm.name
    assert "variant" not in run(stuck_at(), 121).triggers[0]  # no experiment: no variant


@pytest.mark.parametrize(
    ("variants", "words"),
    [([VARIANTS[0]], "at least two"), ([VARIANTS[0], VARIANTS[0]], "must differ"),
     ([{**VARIANTS[0], "weight": 0}, VARIANTS[1]], "weight")],
)  # fmt: skip
def test_a_bad_experiment_names_its_table(variants: list[Any], words: str) -> None:
    with pytest.raises(TriggerConfigError) as err:
        config(stalled_step={"variants": variants})
    assert "stalled_step" in str(err.value) and words in str(err.value)


def test_under_a_bandit_treated_triggers_get_its_choice_and_control_ones_stay_out() -> None:
    cfg = config(stalled_step={"variants": VARIANTS, "policy": "bandit", "exploration": 0.0})
    arms = {
        ("stalled_step", "cluster:7", "tutorial"): ArmStats(100, 2),
        ("stalled_step", "cluster:7", "checklist"): ArmStats(100, 60),
    }
    doc = stuck_at()
    (message,) = run(doc, 121, cfg, cluster={"id": "7", "name": "seven"}, arms=arms).triggers
    assert message["variant"] == "checklist" and message["action"]["kind"] == "checklist_nudge"
    assert message["policy"] == {"kind": "bandit", "context": "cluster:7"}
    assert doc["engine"]["fired"][0]["arm"] == "cluster:7"
    held = config(stalled_step={"variants": VARIANTS, "policy": "bandit", "holdout": 1.0})
    (control,) = run(stuck_at(), 121, held, arms=arms).triggers
    assert control["group"] == CONTROL and "policy" not in control


def test_a_bandit_without_variants_names_its_table() -> None:
    with pytest.raises(TriggerConfigError) as err:
        config(stalled_step={"policy": "bandit"})
    assert "stalled_step" in str(err.value) and "variants" in str(err.value)


def test_the_live_funnel_counts_a_drop_once_per_step_whatever_the_gates() -> None:
    doc = stuck_at()  # threshold 120 s; abandonment after 3600 s of silence
    assert run(doc, 121).dropped == [("signup", "profile")]
    assert run(doc, 3601).dropped == []  # abandoned on the step that already counted as a stall
    quiet = stuck_at(consent=False)  # no trigger for them, but they did drop
    assert run(quiet, 121).dropped == [("signup", "profile")]
    between = stuck_at()
    between["onboarding"]["signup"]["current_step"] = None
    assert run(between, 3601).dropped == [("signup", "-")]  # abandoned between two steps
