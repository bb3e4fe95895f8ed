"""The bandit's choice (pure): deterministic, explores at its floor, learns the best arm per
context; pulls and rewards read from messages and profiles."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_app.triggers.bandit import (
    NO_CLUSTER,
    ArmEvent,
    ArmStats,
    choose,
    context_of,
    pulls_of,
    rewards_of,
)
from stream_app.triggers.config import Variant, parse_config

ARMS = (Variant("a"), Variant("b"), Variant("c"))


@given(st.text(min_size=1, max_size=40), st.integers(0, 50), st.integers(0, 50))
def test_the_same_trigger_with_the_same_counts_gets_the_same_variant(
    seed: str, pulls: int, rewards: int
) -> None:
    arms = {("t", "all", "b"): ArmStats(pulls, min(pulls, rewards))}
    assert choose(seed, "t", "all", ARMS, arms, 0.1) == choose(seed, "t", "all", ARMS, arms, 0.1)


def test_without_counts_every_arm_is_tried_about_equally() -> None:
    picks = Counter(choose(f"t{i}", "t", "all", ARMS, {}, 0.0).name for i in range(6000))
    assert all(1800 < picks[v.name] < 2200 for v in ARMS), picks


def test_with_clear_evidence_the_best_arm_wins_but_the_floor_keeps_exploring() -> None:
    arms = {
        ("t", "all", "a"): ArmStats(500, 50),
        ("t", "all", "b"): ArmStats(500, 250),
        ("t", "all", "c"): ArmStats(500, 100),
    }
    picks = Counter(choose(f"t{i}", "t", "all", ARMS, arms, 0.3).name for i in range(6000))
    # 70 % exploit (b, the best by far) + 30 % drawn by weight (a third each)
    assert picks["b"] / 6000 == pytest.approx(0.7 + 0.1, abs=0.03)
    assert picks["a"] / 6000 == pytest.approx(0.1, abs=0.02) and picks["c"] / 6000 == pytest.approx(
        0.1, abs=0.02
    )
    greedy = Counter(choose(f"t{i}", "t", "all", ARMS, arms, 0.0).name for i in range(2000))
    assert greedy["b"] == 2000


def test_each_context_learns_its_own_best_arm() -> None:
    """Simulated Bernoulli outcomes: cluster 1 responds to a, cluster 2 to c."""
    truth = {"cluster:1": {"a": 0.5, "b": 0.2, "c": 0.1}, "cluster:2": {"a": 0.1, "b": 0.2, "c": 0.5}}
    counts: dict[tuple[str, str, str], ArmStats] = {}
    rng = random.Random(7)
    late: Counter[tuple[str, str]] = Counter()
    for i in range(4000):
        ctx = "cluster:1" if i % 2 else "cluster:2"
        arm = choose(f"t{i}", "stalled_step", ctx, ARMS, counts, 0.05).name
        key = ("stalled_step", ctx, arm)
        was = counts.get(key, ArmStats())
        counts[key] = ArmStats(was.pulls + 1, was.rewards + (rng.random() < truth[ctx][arm]))
        if i >= 3000:
            late[(ctx, arm)] += 1
    assert late[("cluster:1", "a")] > 0.9 * 500 and late[("cluster:2", "c")] > 0.9 * 500, late


def test_context_names() -> None:
    assert context_of("3") == "cluster:3" and context_of(None) == NO_CLUSTER


def test_pulls_are_treated_bandit_triggers_only() -> None:
    bandit = {"kind": "bandit", "context": "cluster:1"}
    messages = [
        {"trigger_id": "1", "type": "stalled_step", "group": "treatment", "variant": "a", "policy": bandit},
        {"trigger_id": "2", "type": "stalled_step", "group": "control", "variant": "a", "policy": bandit},
        {"trigger_id": "3", "type": "stalled_step", "group": "treatment", "variant": "a"},  # a split
    ]
    assert pulls_of(messages) == [ArmEvent("stalled_step", "cluster:1", "a", "1")]


def test_rewards_are_the_types_reward_kind_for_triggers_the_bandit_chose() -> None:
    variants = [{"name": "a"}, {"name": "b"}]
    cfg = parse_config(
        {
            "stalled_step": {"policy": "bandit", "variants": variants, "reward": "opened"},
            "onboarding_abandoned": {"policy": "bandit", "variants": variants},
        }
    )
    fired = [
        {"trigger_id": "s1", "type": "stalled_step", "variant": "a", "arm": "all"},
        {"trigger_id": "o1", "type": "onboarding_abandoned", "variant": "b", "arm": "cluster:2"},
        {"trigger_id": "x1", "type": "stalled_step", "variant": "a"},  # not the bandit's
    ]
    noted = [
        ("s1", "opened"),
        ("s1", "clicked"),
        ("o1", "opened"),
        ("o1", "clicked"),
        ("x1", "opened"),
        ("zz", "clicked"),
    ]
    assert rewards_of(fired, noted, cfg) == [
        ArmEvent("stalled_step", "all", "a", "s1"),
        ArmEvent("onboarding_abandoned", "cluster:2", "b", "o1"),
    ]
