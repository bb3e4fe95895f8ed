"""Intervention outcomes folded into the profile: once per trigger and outcome, in any order,
kept through identity merges, bounded."""

from __future__ import annotations

import itertools

from stream_app.profile import MAX_INTERVENTIONS
from tests.unit.test_pipeline import Harness, track

TID = "0" * 31 + "1"


def outcome(
    name: str, mid: str, at: int, tid: str = TID, uid: str | None = "u1", **props: str
) -> dict[str, object]:
    return track(f"Intervention {name}", mid, uid=uid, at=at, trigger_id=tid, **props)


async def test_each_outcome_keeps_its_first_time_whatever_the_order_and_the_copies() -> None:
    events = [
        outcome("Delivered", "d1", 10, variant="b"),
        outcome("Opened", "o1", 20),
        outcome("Opened", "o2", 15),  # a second open, reported earlier: the first counts
        outcome("Dismissed", "x1", 30, variant="a"),  # the variant of the earliest report counts
    ]
    results = []
    for order in itertools.permutations(events):
        h = Harness()
        await h.run(*order, *order)  # every event delivered twice
        doc = await h.doc("u1")
        assert doc is not None
        results.append(doc["interventions"])
    first = results[0]
    assert first[TID]["delivered"] < first[TID]["opened"] < first[TID]["dismissed"]
    assert first[TID]["opened"] - first[TID]["delivered"] == 5_000 and "clicked" not in first[TID]
    assert first[TID]["variant"] == "b"
    assert all(r == first for r in results[1:])


async def test_outcomes_without_a_trigger_id_are_dead_lettered() -> None:
    h = Harness()
    out = await h.run(track("Intervention Opened", "o1", at=1))
    assert [inv.reason.value for _rec, inv in out.dead_letters] == ["missing_field"]


async def test_a_merged_visitors_outcomes_join_the_users_and_the_log_is_bounded() -> None:
    h = Harness()
    await h.run(track("Intervention Opened", "o1", uid=None, anon="a1", at=5, trigger_id=TID))
    await h.run(outcome("Delivered", "d1", 3, tid="0" * 31 + "2"))
    await h.run({"type": "identify", "messageId": "i1", "userId": "u1", "anonymousId": "a1",
                 "timestamp": "2026-11-18T10:00:09.000Z"})  # fmt: skip
    doc = await h.doc("u1")
    assert doc is not None and set(doc["interventions"]) == {TID, "0" * 31 + "2"}
    many = [outcome("Delivered", f"m{i}", 10 + i, tid=f"{i:032x}") for i in range(MAX_INTERVENTIONS + 5)]
    await h.run(*many)
    doc = await h.doc("u1")
    assert doc is not None and len(doc["interventions"]) == MAX_INTERVENTIONS
