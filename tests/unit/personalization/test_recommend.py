"""The recommender's invariants: never what the user already uses, deterministic, aggregates only."""

from __future__ import annotations

import random

import orjson

from stream_app.personalization.recommend import (
    ALL,
    RecoModel,
    adoption,
    popular_baseline,
    recommend,
    train,
)
from stream_app.profile import OTHER, new_profile
from stream_app.synthetic import FEATURE_PATHS, adopted_features, generate_users, user_events

NAMES = {
    "quick_adopter": "quick adopters",
    "steady": "steady",
    "passive": "passive",
    "struggling": "struggling",
}


def population(n: int, seed: int) -> list[tuple[str, list[str]]]:
    return [(NAMES[u.archetype], adopted_features(user_events(u, 0))) for u in generate_users(n, seed)]


def model(n: int = 800, seed: int = 5, min_support: int = 5) -> RecoModel:
    return train(population(n, seed), version=1, now_ms=0, min_support=min_support)


def test_never_recommends_what_the_user_already_uses() -> None:
    m = model()
    rng = random.Random(1)
    features = sorted(m.popular[ALL])
    for _ in range(300):
        used = rng.sample(features, rng.randint(0, len(features)))
        group = rng.choice([None, "steady", "quick adopters", "nobody"])
        recs = recommend(m, group, used, 3)
        assert not {r.item for r in recs} & set(used)
        assert len(recs) == min(3, len(features) - len(used))
        assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)


def test_the_same_samples_give_the_same_model_and_answers() -> None:
    a, b = model(seed=9), model(seed=9)
    assert a.to_json() == b.to_json()
    assert RecoModel.from_json(a.to_json()) == a
    assert recommend(a, "steady", ["search"], 3) == recommend(b, "steady", ["search"], 3)


def test_counts_below_the_support_floor_are_not_in_the_model() -> None:
    samples = [("steady", ["search", "export"])] * 5 + [("steady", ["search", "api"])] * 2
    m = train(samples, version=1, now_ms=0, min_support=3)
    assert m.popular["steady"] == {"export": 5, "search": 7}
    assert m.next["steady"]["search"] == {"export": 5}  # the path two users took is not there
    assert "api" not in m.to_json().decode()


def test_a_user_follows_their_own_path_not_the_clusters_most_popular_feature() -> None:
    """Quick adopters split between an API path and a dashboards path: after "api, automation"
    comes the API path's next feature, not the cluster's most adopted one."""
    m = model(2000)
    api_path, _dashboards_path = FEATURE_PATHS["quick_adopter"]
    used = list(api_path[:2])
    recs = recommend(m, "quick adopters", used, 3)
    assert recs[0].item == api_path[2] and "right after automation" in recs[0].reason, recs
    assert popular_baseline(m, "quick adopters", used, 1) != [api_path[2]]


def test_unknown_users_get_what_everybody_adopts_most() -> None:
    m = model()
    recs = recommend(m, None, [], 3)
    assert [r.item for r in recs] == popular_baseline(m, None, [], 3)
    assert recommend(None, None, [], 3) == [] and recommend(m, None, [], 0) == []


def test_the_adoption_order_is_the_order_of_first_use_without_the_overflow_bucket() -> None:
    doc = new_profile("u")
    doc["features"] = {"search": 3, "export": 1, OTHER: 4, "api": 1}
    assert adoption(doc) == ["search", "export", "api"]


def test_the_model_holds_no_user_ids() -> None:
    users = generate_users(300, 3)
    samples = [(NAMES[u.archetype], adopted_features(user_events(u, 0))) for u in users]
    raw = train(samples, version=1, now_ms=0).to_json().decode()
    assert not any(u.user_id in raw or u.anonymous_id in raw for u in users)
    assert set(orjson.loads(raw)) == {
        "version", "created_ms", "users", "min_support", "group_users", "popular", "next", "after",
    }  # fmt: skip
