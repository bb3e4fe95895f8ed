"""The clustering model: features, determinism, snapshots, id stability, hysteresis, names, quality."""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.metrics import adjusted_rand_index, purity
from evaluation.quality import Population, simulate
from stream_app.profile import new_profile
from stream_app.segments.assign import FEATURE_NAMES, Snapshot, choose_cluster, features
from stream_app.segments.cluster_model import Trainer, train_model

EXPECTED_NAMES = {
    "quick_adopter": "quick adopters",
    "steady": "steady",
    "passive": "passive",
    "struggling": "struggling",
}


@cache
def population(users: int, seed: int) -> Population:
    return simulate(users, seed)


def trained(seed: int = 7, users: int = 600, data_seed: int = 101) -> Trainer:
    t = Trainer(k=4, seed=seed)
    t.learn(population(users, data_seed).vectors())
    return t


def test_features_of_an_empty_profile_are_finite() -> None:
    x = features(new_profile("u"), {})
    assert len(x) == len(FEATURE_NAMES) and all(math.isfinite(v) for v in x)


docs = st.fixed_dictionaries(
    {
        "event_count": st.integers(0, 10**6),
        "first_seen_ms": st.one_of(st.none(), st.integers(0, 2 * 10**12)),
        "last_seen_ms": st.one_of(st.none(), st.integers(0, 2 * 10**12)),
        "sessions": st.fixed_dictionaries({"count": st.integers(0, 10**4)}),
        "help_views": st.dictionaries(st.text(max_size=5), st.integers(0, 10**4), max_size=4),
        "features": st.dictionaries(st.text(max_size=5), st.integers(0, 10**4), max_size=4),
        "device": st.one_of(
            st.none(), st.fixed_dictionaries({"type": st.sampled_from(["mobile", "desktop"])})
        ),
        "onboarding": st.dictionaries(
            st.sampled_from(["signup", "import"]),
            st.fixed_dictionaries(
                {
                    "status": st.sampled_from(["in_progress", "completed"]),
                    "completed_steps": st.dictionaries(
                        st.sampled_from(["a", "b", "c"]),
                        st.fixed_dictionaries(
                            {"duration_s": st.one_of(st.none(), st.floats(0, 1e7, allow_nan=False))}
                        ),
                        max_size=3,
                    ),
                }
            ),
            max_size=2,
        ),
    }
)


@settings(max_examples=200, deadline=None)
@given(docs, st.dictionaries(st.sampled_from(["signup|a", "signup|b", "import|c"]), st.floats(0, 1e6)))
def test_features_are_finite_for_any_profile(doc: dict[str, Any], means: dict[str, float]) -> None:
    assert all(math.isfinite(v) for v in features(doc, means))


def test_training_is_deterministic_with_a_seed() -> None:
    a = trained(seed=3).snapshot(None, 1, 0)
    b = trained(seed=3).snapshot(None, 1, 0)
    assert a == b


def test_snapshot_json_round_trip_assigns_identically() -> None:
    snap = trained().snapshot(None, 1, 5)
    again = Snapshot.from_json(snap.to_json())
    for x in population(200, 202).vectors():
        assert again.distances(x) == snap.distances(x)


def test_names_follow_the_archetypes_on_held_out_users() -> None:
    snap = trained().snapshot(None, 1, 0)
    held_out = population(400, 303)
    named = [snap.names[snap.nearest(x)] for x in held_out.vectors()]
    agree = sum(EXPECTED_NAMES[a] == n for a, n in zip(held_out.archetypes, named, strict=True))
    assert agree / len(named) > 0.85
    assert sorted(snap.names.values()) == sorted(EXPECTED_NAMES.values())


def test_quality_on_held_out_users_meets_the_target() -> None:
    snap = trained().snapshot(None, 1, 0)
    held_out = population(400, 303)
    found = [snap.nearest(x) for x in held_out.vectors()]
    assert adjusted_rand_index(held_out.archetypes, found) >= 0.8
    assert purity(held_out.archetypes, found) >= 0.9


def test_ids_survive_retraining_a_restart_and_a_reseed() -> None:
    v1 = trained(seed=7).snapshot(None, 1, 0)
    # the next training pass, on another worker after a restart (the model lives in the store)
    v2 = train_model(population(600, 404).vectors(), v1, version=2, now_ms=1)
    reseeded = trained(seed=99, data_seed=505).snapshot(v2, 3, 2)  # trained from scratch, other data
    held_out = population(400, 303).vectors()
    for newer in (v2, reseeded):
        same = sum(choose_cluster(v1.nearest(x), newer.distances(x)) == v1.nearest(x) for x in held_out)
        assert same / len(held_out) >= 0.95
        assert {newer.names[c] for c in newer.centroids} == set(EXPECTED_NAMES.values())
        assert all(newer.names[c] == v1.names[c] for c in v1.centroids)


def test_a_training_pass_is_reproducible_and_keeps_the_ids_of_the_previous_model() -> None:
    first = population(600, 101).vectors()
    v1 = train_model(first, None, version=1, now_ms=0)
    assert v1 == train_model(first, None, version=1, now_ms=0)
    assert v1.samples == len(first)
    # the next pass: a fresh model from a sample set that moved on (other users, other order)
    moved = population(600, 404).vectors()[::-1]
    v2 = train_model(moved, v1, version=2, now_ms=1)
    assert v2.version == 2 and set(v2.centroids) == set(v1.centroids) and v2.next_id == v1.next_id
    assert all(v2.names[c] == v1.names[c] for c in v1.centroids)
    held_out = population(400, 303).vectors()
    same = sum(v2.nearest(x) == v1.nearest(x) for x in held_out)
    assert same / len(held_out) >= 0.95
    # the order in which the stream touched the users does not decide the model
    reordered = train_model(moved[::-1], v1, version=2, now_ms=1)
    assert sum(reordered.nearest(x) == v2.nearest(x) for x in held_out) / len(held_out) >= 0.95


def test_a_training_pass_needs_k_samples() -> None:
    with pytest.raises(ValueError, match="at least 4 samples"):
        train_model([[0.0] * len(FEATURE_NAMES)] * 3, None, version=1, now_ms=0)


def test_hysteresis() -> None:
    assert choose_cluster(None, {"a": 1.0, "b": 2.0}) == "a"
    assert choose_cluster("b", {"a": 1.7, "b": 2.0}) == "b"  # a is closer, but not by 20%
    assert choose_cluster("b", {"a": 1.5, "b": 2.0}) == "a"
    assert choose_cluster("gone", {"a": 1.0, "b": 2.0}) == "a"


@pytest.mark.parametrize(
    ("truth", "found", "ari"), [([0, 0, 1, 1], [5, 5, 7, 7], 1.0), ([0, 0, 1, 1], [1, 2, 1, 2], -0.5)]
)
def test_adjusted_rand_index_known_values(truth: list[int], found: list[int], ari: float) -> None:
    assert adjusted_rand_index(truth, found) == pytest.approx(ari)
