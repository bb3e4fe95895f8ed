"""The lift report's statistics and outcome rules."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from stream_app.profile import new_profile
from stream_app.report import (
    GroupResult,
    Lift,
    arm_outcomes,
    bandit_arms,
    engagement,
    engagement_rows,
    experiments,
    funnel,
    funnel_rows,
    lift,
    outcomes,
    planned_n,
)
from stream_app.triggers.bandit import ArmStats
from stream_app.triggers.config import parse_config

TREATED = "treatment"


def test_wilson_matches_published_values() -> None:
    # Newcombe (1998), table I: 81/263 -> 0.2553 to 0.3662
    low, high = GroupResult(263, 81).wilson()
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    assert GroupResult(10, 0).wilson()[0] == 0.0 and GroupResult(10, 10).wilson()[1] == pytest.approx(1.0)


def test_newcombe_difference_matches_the_published_example() -> None:
    # Newcombe (1998), table II example (56/70 vs 48/80): difference 0.2 with interval 0.0524 to 0.3339
    low, high = Lift("t", GroupResult(70, 56), GroupResult(80, 48)).interval()
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


def test_empty_groups_give_nan_not_an_error() -> None:
    assert all(math.isnan(x) for x in Lift("t", GroupResult(5, 2), GroupResult(0, 0)).interval())


def test_outcomes_of_a_stalled_step_count_a_later_completion() -> None:
    doc = new_profile("u")
    doc["onboarding"]["signup"] = {
        "status": "in_progress",
        "completed_steps": {"profile": {"completed_ms": 2000, "duration_s": 1, "message_id": "m"}},
    }
    doc["engine"] = {
        "fired": [
            {"type": "stalled_step", "subject": "signup/profile", "at": 1000, "group": "treatment"},
            {"type": "stalled_step", "subject": "signup/connect", "at": 1500, "group": "control"},
            {"type": "onboarding_abandoned", "subject": "signup", "at": 1700, "group": "treatment"},
        ]
    }
    assert outcomes(doc) == [
        ("stalled_step", "treatment", True),
        ("stalled_step", "control", False),
        ("onboarding_abandoned", "treatment", False),
    ]
    assert outcomes({"merged_into": "x"}) == []


@pytest.mark.parametrize("effect", [0.0, 0.15])
def test_the_interval_covers_the_true_lift_of_a_simulated_experiment(effect: float) -> None:
    rng = random.Random(3)
    rows = []
    for _ in range(4000):
        group = "control" if rng.random() < 0.2 else "treatment"
        rate = 0.4 + (effect if group == "treatment" else 0.0)
        rows.append(("stalled_step", group, rng.random() < rate))
    (result,) = lift(rows)
    low, high = result.interval()
    assert low < effect < high
    assert (low > 0) == (effect > 0)  # a real effect of 15 points is detected, none is not invented


def test_engagement_counts_reported_outcomes_per_type_and_variant_of_treated_triggers() -> None:
    doc = new_profile("u")
    doc["engine"] = {
        "fired": [
            {"trigger_id": "t1", "type": "stalled_step", "subject": "s/a", "at": 1, "group": "treatment"},
            {"trigger_id": "t2", "type": "stalled_step", "subject": "s/b", "at": 2, "group": "treatment"},
            {"trigger_id": "t3", "type": "stalled_step", "subject": "s/c", "at": 3, "group": "control"},
            {
                "trigger_id": "t4",
                "type": "onboarding_completed",
                "subject": "s",
                "at": 4,
                "group": "treatment",
            },
        ]
    }
    doc["interventions"] = {
        "t1": {"first_ms": 5, "delivered": 5, "opened": 6, "variant": "b"},
        "t2": {"first_ms": 5, "delivered": 5, "dismissed": 9, "variant": "b"},
        "t3": {"first_ms": 5, "delivered": 5},  # a control trigger is never shown: not counted
        "zz": {"first_ms": 5, "opened": 5},  # an id this profile never got: ignored
    }
    rows = engagement_rows(doc)
    assert len(rows) == 3 and set(rows) == {
        ("onboarding_completed", "-", frozenset()),
        ("stalled_step", "b", frozenset({"delivered", "dismissed"})),
        ("stalled_step", "b", frozenset({"delivered", "opened"})),
    }
    (done, stalled) = engagement(rows + rows)  # two such users
    assert stalled.as_dict()["triggers"] == 4 and stalled.counts == {
        "delivered": 4, "opened": 2, "clicked": 0, "dismissed": 2,
    }  # fmt: skip
    assert stalled.rate("opened").rate == 0.5 and done.rate("opened").n == 2  # no delivery reported
    assert engagement_rows({"merged_into": "x"}) == []


def test_the_planned_sample_matches_the_textbook_value() -> None:
    # 50 % vs 55 %, two-sided 5 %, power 80 %: 1,565 per group (e.g. Fleiss, Statistical
    # Methods for Rates and Proportions, the normal approximation without continuity correction)
    assert planned_n(0.5, 0.05) == 1565
    assert planned_n(0.5, 0.025) > 4 * planned_n(0.5, 0.05) * 0.95  # a half effect: ~4x the users
    assert planned_n(0.98, 0.05) > 0  # near the top the effect is measured downwards


def test_an_experiment_waits_for_its_planned_sample_then_names_the_better_arm() -> None:
    def rows(arm: str, n: int, rate: float) -> list[tuple[str, str, bool]]:
        return [("stalled_step", arm, i < rate * n) for i in range(n)]

    early = experiments(rows("a", 100, 0.6) + rows("control", 100, 0.3), min_effect=0.1)
    (only,) = early
    assert only.verdict().startswith("not yet") and only.needed > 100
    late = experiments(
        rows("a", 2000, 0.6) + rows("b", 2000, 0.58) + rows("control", 2000, 0.3), min_effect=0.1
    )
    verdicts = {(c.a, c.b): c.verdict() for c in late}
    assert verdicts == {
        ("a", "control"): "a better",
        ("b", "control"): "b better",
        ("a", "b"): "no difference of the minimum effect or more",
    }
    assert late[0].as_dict()["planned_n_per_arm"] == late[0].needed


def test_arm_outcomes_name_the_variant_shown_or_the_control() -> None:
    doc = new_profile("u")
    doc["onboarding"]["signup"] = {"status": "completed", "completed_ms": 5000, "completed_steps": {}}
    doc["engine"] = {
        "fired": [
            {"trigger_id": "t1", "type": "onboarding_abandoned", "subject": "signup", "at": 1000,
             "group": "treatment", "variant": "email_b"},
            {"trigger_id": "t2", "type": "onboarding_abandoned", "subject": "signup", "at": 9000,
             "group": "control"},
            {"trigger_id": "t3", "type": "onboarding_completed", "subject": "signup", "at": 1,
             "group": "treatment"},  # no experiment on this type: not an arm
        ]
    }  # fmt: skip
    assert arm_outcomes(doc) == [
        ("onboarding_abandoned", "email_b", True),
        ("onboarding_abandoned", "control", False),
    ]


def test_the_funnel_counts_started_completed_dropped_and_median_time_per_group() -> None:
    def user(segments: list[str], done: dict[str, float], current: str | None, stalled: bool) -> Any:
        doc = new_profile("u")
        doc["onboarding"]["signup"] = {
            "status": "in_progress",
            "current_step": current,
            "completed_steps": {s: {"completed_ms": 1, "duration_s": d} for s, d in done.items()},
        }
        fired = [{"type": "stalled_step", "subject": f"signup/{current}", "at": 1, "group": "control"}]
        doc["engine"] = {"segments": segments, "cluster": None, "fired": fired if stalled else []}
        return doc

    docs = [
        user(["struggling"], {"account": 10}, "profile", stalled=True),
        user(["struggling"], {"account": 30, "profile": 50}, "connect", stalled=False),
        user(["power_user", "struggling"], {"account": 20}, None, stalled=False),
    ]
    by_segment = {(f.group, f.step): f for f in funnel(r for d in docs for r in funnel_rows(d, "segment"))}
    account = by_segment[("struggling", "account")]
    assert (account.started, account.completed, account.dropped, account.median_s) == (3, 3, 0, 20)
    profile = by_segment[("struggling", "profile")]
    assert (profile.started, profile.completed, profile.dropped, profile.median_s) == (2, 1, 1, 50)
    assert by_segment[("struggling", "connect")].dropped == 0  # still open, not stalled
    assert by_segment[("power_user", "account")].started == 1
    everyone = funnel(r for d in docs for r in funnel_rows(d, "all"))
    assert [f.step for f in everyone] == ["account", "profile", "connect"]  # the funnel's order
    assert funnel_rows({"merged_into": "x"}, "all") == []


def test_the_bandit_report_lists_each_arm_per_context_with_its_share_now() -> None:
    cfg = parse_config(
        {"stalled_step": {"policy": "bandit", "exploration": 0.3, "variants": [{"name": "a"}, {"name": "b"}]}}
    )
    arms = {
        ("stalled_step", "cluster:1", "a"): ArmStats(200, 20),
        ("stalled_step", "cluster:1", "b"): ArmStats(200, 120),
        ("stalled_step", "all", "a"): ArmStats(3, 1),
        ("other_type", "all", "a"): ArmStats(9, 9),  # not a bandit type here: not listed
    }
    rows = {(r.context, r.variant): r for r in bandit_arms(arms, cfg)}
    assert sorted(rows) == [("all", "a"), ("all", "b"), ("cluster:1", "a"), ("cluster:1", "b")]
    best = rows[("cluster:1", "b")]
    assert (best.result.n, best.result.successes) == (200, 120) and best.as_dict()["rate"] == 0.6
    assert best.share_now == pytest.approx(0.7 + 0.15, abs=0.03)  # exploit + half the exploration
    assert rows[("all", "b")].result.n == 0  # an arm never pulled in a context is listed too
