"""The decision for one profile: first matching checklist, flags, recommendations; only decisions
leave (no trait, no event history); refused, unknown and linked-away ids get the default."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from stream_app.configure import personalization_config
from stream_app.personalization.decide import answer, default_answer
from stream_app.personalization.recommend import train
from stream_app.profile import Profile, new_profile
from stream_app.settings import Settings

CONFIG = personalization_config(Settings())
MODEL = train(
    [("quick adopters", ["api", "automation", "integrations"])] * 6 + [("steady", ["search", "export"])] * 6,
    version=4,
    now_ms=0,
)


def profile(segments: list[str], cluster: str | None = None, **extra: Any) -> Profile:
    doc = new_profile("u1")
    doc["engine"] = {
        "segments": segments,
        "cluster": {"id": "c2", "name": cluster, "model_version": 7} if cluster else None,
    }
    doc.update(extra)
    return doc


def test_the_first_matching_checklist_wins_by_segment_or_cluster() -> None:
    both = answer(profile(["power_user", "struggling"]), CONFIG, MODEL, "cfg")
    assert both["checklist"]["name"] == "struggling"  # listed first in the file
    by_cluster = answer(profile([], "quick adopters"), CONFIG, MODEL, "cfg")
    assert by_cluster["checklist"]["name"] == "power"
    assert by_cluster["flags"] == {
        "live_chat": False,
        "advanced_setup_first": True,
        "basic_walkthrough": False,
    }
    assert by_cluster["cluster"] == {"id": "c2", "name": "quick adopters"}
    assert by_cluster["versions"] == {"cluster_model": 7, "recommender": 4, "config": "cfg"}
    nothing = answer(profile(["dormant"]), CONFIG, MODEL, "cfg")
    assert nothing["checklist"]["name"] == "standard" and nothing["personalized"] is True


def test_recommendations_follow_the_users_cluster_and_skip_what_they_use() -> None:
    doc = profile([], "quick adopters", features={"api": 3})
    recs = answer(doc, CONFIG, MODEL, "cfg")["recommendations"]
    assert [r["item"] for r in recs][:1] == ["automation"]
    assert all(r["item"] != "api" for r in recs) and {"item", "score", "reason"} == set(recs[0])


@pytest.mark.parametrize(
    "doc",
    [
        None,
        profile(["struggling"], "struggling", consent={"personalization": False, "updated_ms": 1}),
        {"user_id": "anon-1", "merged_into": "u1"},
    ],
    ids=["unknown", "refused", "tombstone"],
)
def test_unknown_refused_and_linked_away_ids_get_the_default_answer(doc: Profile | None) -> None:
    got = answer(doc, CONFIG, MODEL, "cfg")
    assert got == default_answer(CONFIG, MODEL, "cfg")
    assert got["personalized"] is False and got["segments"] == [] and got["cluster"] is None
    assert got["checklist"]["name"] == "standard" and not any(got["flags"].values())
    assert [r["item"] for r in got["recommendations"]] == ["api", "automation", "export"]  # all users'


def test_no_trait_or_event_history_is_in_an_answer() -> None:
    doc = profile(
        ["struggling"],
        "struggling",
        traits={"email_sha256": "ab12cd", "plan": "enterprise-secret", "name": "Ada Lovelace"},
        events={"Secret Report Exported": 3},
        city="Reykjavik",
        merged_from=["anon-xyz"],
    )
    raw = orjson.dumps(answer(doc, CONFIG, MODEL, "cfg")).decode()
    for private in ("ab12cd", "enterprise-secret", "Ada", "Secret Report", "Reykjavik", "anon-xyz", "u1"):
        assert private not in raw
    assert set(orjson.loads(raw)) == {
        "personalized", "segments", "cluster", "checklist", "recommendations", "flags", "versions",
    }  # fmt: skip
