"""The recommender's sample set and training: consent and erasure respected, one trainer at a time."""

from __future__ import annotations

from typing import Any

from stream_app.personalization.recommend import RecoModel
from stream_app.profile import Profile, new_profile
from stream_app.settings import Settings
from stream_app.store.models import InMemoryModelStore
from stream_app.worker.recommender import RecommenderService


def doc(
    pid: str, features: list[str], cluster: str | None = "steady", consent: bool | None = True
) -> Profile:
    d = new_profile(pid)
    d["features"] = {f: 1 for f in features}
    d["consent"] = {"personalization": consent, "updated_ms": 1}
    d["engine"] = {"segments": [], "cluster": {"id": "c1", "name": cluster} if cluster else None}
    return d


def service(**settings: Any) -> tuple[RecommenderService, InMemoryModelStore[RecoModel]]:
    store: InMemoryModelStore[RecoModel] = InMemoryModelStore()
    return RecommenderService(Settings(**settings), store, min_support=2), store


async def test_consenting_users_adoption_orders_are_sampled_refusing_and_linked_ones_leave() -> None:
    reco, store = service()
    await reco.sample({"a": doc("a", ["search", "export"]), "b": doc("b", ["api"], cluster=None)})
    assert store.samples == {"a": ["steady", ["search", "export"]], "b": ["", ["api"]]}
    await reco.sample({"a": doc("a", ["search"], consent=False), "n": doc("n", [])}, linked=["b"])
    assert store.samples == {}  # a refused, b was linked into another profile, n has no feature
    await reco.sample({"c": doc("c", ["search"])})
    await reco.forget(["c"])  # erasure
    assert store.samples == {}


async def test_training_publishes_the_next_version_from_aggregates_only() -> None:
    reco, store = service()
    assert await reco.train_once() is None  # fewer samples than the support floor
    await reco.sample({f"u{i}": doc(f"u{i}", ["search", "export", "api"]) for i in range(4)})
    first = await reco.train_once()
    assert first is not None and first.version == 1
    assert first.popular["steady"] == {"api": 4, "export": 4, "search": 4}
    assert "u1" not in first.to_json().decode()
    assert await reco.train_once() is None  # same samples, same counts: no new version
    await reco.sample({"u9": doc("u9", ["search", "api"])})
    second = await reco.train_once()
    assert second is not None and second.version == 2 and second.popular["steady"]["search"] == 5
    assert (await store.latest()) == second


async def test_only_the_lease_holder_trains() -> None:
    first, store = service()
    other = RecommenderService(Settings(), store, min_support=2)
    await first.sample({f"u{i}": doc(f"u{i}", ["search"]) for i in range(3)})
    assert await first.train_once() is not None
    assert await other.train_once() is None
    assert await store.version() == 1


async def test_disabled_it_keeps_and_trains_nothing() -> None:
    reco, store = service(reco_enabled=False)
    await reco.sample({"a": doc("a", ["search"])})
    assert store.samples == {} and await reco.train_once() is None
