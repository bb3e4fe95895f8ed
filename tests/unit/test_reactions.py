"""Segment changes, triggers and deadlines through the pipeline, on both profile stores.

Covers the delivery guarantees that do not need a broker: the outbox written with the
profile, re-published after a restart with the same ids, deadlines fired once even by
two timers, cancelled by completion and erasure.
"""

from __future__ import annotations

import copy
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from stream_app.contract import ContractRules
from stream_app.metrics import Metrics
from stream_app.outbox import HOLDOUT, SEGMENTS, TRIGGERS
from stream_app.paths import CONFIG_DIR
from stream_app.pipeline import BatchOutcome, EventProcessor, TimerOutcome
from stream_app.profile import ProfileRules
from stream_app.reactions import ReactionContext
from stream_app.segments.rules import load_segments
from stream_app.store.keys import Keys
from stream_app.store.profiles import InMemoryProfileStore, ProfileStore, RedisProfileStore
from stream_app.triggers.config import parse_config
from tests.unit.test_pipeline import T0, ev, records, track

RAW = {
    "stalled_step": {
        "multiplier": 2,
        "default_mean": 60,
        "min_threshold": 1,
        "actions": [{"action": {"kind": "tip"}}],
    },
    "onboarding_completed": {"actions": [{"action": {"kind": "welcome"}}]},
    "limits": {"allowed_lateness": 0},
}


def context(**changes: Any) -> ReactionContext:
    raw = copy.deepcopy(RAW)
    for key, value in changes.items():
        raw.setdefault(key, {}).update(value)
    return ReactionContext(load_segments(CONFIG_DIR / "segments.toml"), parse_config(raw), ProfileRules())


StoreFactory = Callable[[], ProfileStore]


@pytest.fixture(params=["memory", "redis"])
async def new_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Each scenario on both implementations (Redis: the suite's private server); each call,
    a store of its own (a fresh key prefix)."""
    if request.param == "memory":
        yield InMemoryProfileStore
        return
    client = aioredis.Redis.from_url(request.getfixturevalue("private_redis_url"))
    yield lambda: RedisProfileStore(client, Keys(f"r{uuid.uuid4().hex[:8]}"), 3600, 3600)
    await client.aclose()


def processor(store: ProfileStore, ctx: ReactionContext | None = None) -> EventProcessor:
    """A worker process on ``store``'s data: on Redis with a client of its own, which knows
    what this process published, as the runtime wires it."""
    ctx = ctx or context()
    if isinstance(store, RedisProfileStore):
        store = RedisProfileStore(store.client, store.keys, store.ttl_seconds, store.dedup_window_ms // 1000)
    p = EventProcessor(
        store,
        ContractRules(pii_salt=b"s"),
        ProfileRules(),
        Metrics(),
        clock=lambda: T0 / 1000,
        reactions=lambda: ctx,
    )
    store.known_published = p.outbox.published
    return p


async def process(p: EventProcessor, recs: Any) -> BatchOutcome:
    """What the runtime does: process, publish, then remember the outbox as published (in the
    process, and on the stored profiles, as the Publisher does)."""
    out = await p.process(recs)
    p.mark_published(out.outbox_keys)
    await p.store.mark_published(dict(out.outbox_keys))
    return out


async def fire(p: EventProcessor, due: list[tuple[str, int]], now_ms: int) -> TimerOutcome:
    out = await p.fire(0, due, now_ms)
    p.mark_published(out.outbox_keys)
    await p.store.mark_published(dict(out.outbox_keys))
    return out


def sent(outcome: BatchOutcome | TimerOutcome, to: str) -> list[dict[str, Any]]:
    return [dict(m.value) for m in outcome.outbox if m.kind == to]


def start(uid: str = "u1", at: int = 0, step: str = "profile", mid: str = "s1") -> dict[str, Any]:
    return track("Onboarding Step Started", mid, uid=uid, at=at, flow="signup", step=step)


async def test_events_publish_segment_changes_and_schedule_the_stall(new_store: StoreFactory) -> None:
    store = new_store()
    p = processor(store)
    out = await process(p, records(start()))
    assert out.deadlines == {0: {"u1": T0 + 120_000}}
    changes = sent(out, SEGMENTS)
    assert {(c["segment"], c["change"], c["source"]) for c in changes} == {("passive", "entered", "rule")}
    assert changes[0]["reason"].startswith("matches: ")
    doc = await store.get("u1")
    assert doc is not None and doc["engine"]["segments"] == ["passive"]


async def test_the_timer_fires_once_even_when_two_timers_race(new_store: StoreFactory) -> None:
    store = new_store()
    p = processor(store)
    await process(p, records(start()))
    early = await fire(p, [("u1", T0 + 120_000)], T0 + 100_000)
    assert sent(early, TRIGGERS) == [] and early.settled == [("u1", T0 + 120_000, T0 + 120_000)]
    first = await fire(p, [("u1", T0 + 120_000)], T0 + 121_000)
    second = await fire(processor(store), [("u1", T0 + 120_000)], T0 + 122_000)  # another worker
    assert [t["type"] for t in sent(first, TRIGGERS)] == ["stalled_step"]
    # the second worker decides nothing new; it re-sends the stored outbox it cannot know
    # was published, under the same trigger id (consumers deduplicate by trigger_id)
    ids = {t["trigger_id"] for t in sent(first, TRIGGERS) + sent(second, TRIGGERS)}
    assert len(ids) == 1
    doc = await store.get("u1")
    assert doc is not None and len(doc["engine"]["fired"]) == 1


async def test_completion_cancels_the_stall(new_store: StoreFactory) -> None:
    store = new_store()
    p = processor(store)
    await process(p, records(start()))
    done = await process(
        p, records(track("Onboarding Step Completed", "c1", at=30, flow="signup", step="profile"))
    )
    doc = await store.get("u1")
    assert doc is not None
    # the next deadline is no longer the stall: it is when a time-relative segment can flip
    flip = load_segments(CONFIG_DIR / "segments.toml").next_change_ms(doc, T0 + 30_000)
    assert flip is not None and done.deadlines[0]["u1"] == flip != T0 + 120_000
    fired = await fire(p, [("u1", T0 + 120_000)], T0 + 200_000)
    assert sent(fired, TRIGGERS) == []


async def test_a_user_who_said_no_gets_no_trigger_and_leaves_segments(new_store: StoreFactory) -> None:
    store = new_store()
    p = processor(store)
    await process(p, records(start()))
    no = ev(
        "track",
        "n1",
        at=5,
        event="Consent Updated",
        context={"consent": {"categoryPreferences": {"personalization": False}}},
    )
    out = await process(p, records(no))
    assert out.deadlines == {0: {"u1": None}}
    assert [(c["segment"], c["change"], c["reason"]) for c in sent(out, SEGMENTS)] == [
        ("passive", "exited", "consent withdrawn")
    ]
    fired = await fire(p, [("u1", T0 + 120_000)], T0 + 500_000)
    assert sent(fired, TRIGGERS) == [] and ("stalled_step", "consent") in fired.suppressed


async def test_an_outbox_cut_off_by_a_crash_is_republished_with_the_same_ids(new_store: StoreFactory) -> None:
    store = new_store()
    batch = records(start(), track("Onboarding Completed", "oc", at=10, flow="signup"))
    first = await processor(store).process(batch)  # written; then the worker dies before publishing
    assert sent(first, TRIGGERS)
    restarted = processor(store)
    again = await restarted.process(batch)  # redelivered: all duplicates, outbox re-sent
    assert again.applied == 0
    assert [m.value for m in again.outbox] == [m.value for m in first.outbox]
    restarted.mark_published(again.outbox_keys)
    assert (await restarted.process(batch)).outbox == []  # published once here: not again


async def test_an_outbox_recorded_as_published_is_not_sent_again_by_another_process(
    new_store: StoreFactory,
) -> None:
    """A rolling restart or a rebalance: the next process to load the profile learns from the
    store that its outbox went out, and sends only what is new."""
    store = new_store()
    first = await processor(store).process(records(start()))
    assert first.outbox
    await store.mark_published(dict(first.outbox_keys))  # what the Publisher does after sending
    restarted = processor(store)
    again = await restarted.process(records(start()))  # the same batch, redelivered
    assert again.outbox == [] and again.applied == 0
    later = await restarted.process(records(track("Onboarding Completed", "oc", at=10, flow="signup")))
    old_ids = {m.id for m in first.outbox}
    assert later.outbox and not {m.id for m in later.outbox} & old_ids


async def test_a_cached_profile_whose_publication_this_process_forgot_is_not_sent_again(
    new_store: StoreFactory,
) -> None:
    """The profile cache outlives the bounded memory of published outboxes: a user idle
    while many others' outboxes went out is read from the cache, and the store (not the
    forgotten memory) says that their outbox was published (the soak's same-id copies)."""
    store = new_store()
    p = processor(store)
    p.cache.max_entries = 100
    p.outbox.memory = 2
    first = await process(p, records(start()))
    assert first.outbox
    for n in range(3):  # three other users' outboxes go out: u1's is forgotten
        await process(p, records(start(uid=f"other{n}", mid=f"o{n}")))
    assert not p.outbox.published(first.outbox_keys[0][1])
    assert "u1" in p.cache
    later = await process(p, records(track("Page Viewed", "pv", uid="u1", at=5)))
    assert not {m.id for m in later.outbox} & {m.id for m in first.outbox}


async def test_a_published_mark_never_recreates_an_erased_profile(new_store: StoreFactory) -> None:
    store = new_store()
    await store.mark_published({"ghost": "t-1"})
    assert await store.get("ghost") is None and (await store.load({"ghost": []}))["ghost"].published is None


async def test_messages_survive_two_crashes_when_the_profile_changes_in_between(
    new_store: StoreFactory,
) -> None:
    """Batch 1 is written and not published; batch 2 (new events, a new outbox) is written
    and not published either: the redelivery after the second crash still sends both."""
    store = new_store()
    one = records(start())
    two = records(track("Onboarding Completed", "oc", at=10, flow="signup"))
    first = await processor(store).process(one)  # crash before publishing
    second = await processor(store).process(one + two)  # batch 1 redelivered with batch 2; crash again
    assert sent(second, TRIGGERS)  # batch 2 decided something new
    third = await processor(store).process(one + two)
    ids = {m.id for m in third.outbox}
    for m in first.outbox + second.outbox:
        assert m.id in ids


async def test_erasure_drops_pending_messages_and_deadlines(new_store: StoreFactory) -> None:
    store = new_store()
    p = processor(store)
    out = await process(p, records(start(), track("Data Deletion Requested", "del", at=2)))
    assert out.outbox == [] and out.deadlines == {0: {}}
    assert await store.get("u1") is None


async def test_holdout_users_go_to_the_holdout_topic(new_store: StoreFactory) -> None:
    store = new_store()
    p = processor(store, context(stalled_step={"holdout": 1.0}))
    await process(p, records(start()))
    fired = await fire(p, [("u1", T0 + 120_000)], T0 + 130_000)
    assert sent(fired, TRIGGERS) == [] and [t["group"] for t in sent(fired, HOLDOUT)] == ["control"]


@pytest.mark.parametrize("crash_after", ["write", "publish"])
async def test_timer_replay_after_a_crash_sends_the_same_trigger(
    crash_after: str, new_store: StoreFactory
) -> None:
    store = new_store()
    await processor(store).process(records(start()))
    due = [("u1", T0 + 120_000)]
    first = await processor(store).fire(0, due, T0 + 130_000)
    restarted = processor(store)
    if crash_after == "publish":
        restarted.mark_published(first.outbox_keys)
    second = await restarted.fire(0, due, T0 + 131_000)  # the index was never settled
    ids = [t["trigger_id"] for t in sent(first, TRIGGERS) + sent(second, TRIGGERS)]
    assert len(set(ids)) == 1
    assert len(ids) == (2 if crash_after == "write" else 1)


def _validator(name: str) -> Any:
    import json

    from jsonschema import Draft202012Validator

    from stream_app.paths import SCHEMAS_DIR

    return Draft202012Validator(json.loads((SCHEMAS_DIR / name).read_text()))


async def test_messages_match_their_published_schemas(new_store: StoreFactory) -> None:
    store = new_store()
    p = processor(store, context(stalled_step={"holdout": 0.5}))
    out = await process(
        p,
        records(
            start(uid="a"),
            start(uid="b", mid="s2"),
            track("Onboarding Completed", "oc", uid="a", at=3, flow="signup"),
        ),
    )
    fired = await fire(p, [("b", T0 + 120_000)], T0 + 130_000)
    messages = out.outbox + fired.outbox
    triggers = _validator("onboarding.triggers.schema.json")
    segments = _validator("onboarding.segments.schema.json")
    kinds = set()
    for m in messages:
        (segments if m.kind == SEGMENTS else triggers).validate(m.value)
        kinds.add(m.kind)
    assert kinds >= {SEGMENTS, TRIGGERS} or kinds >= {SEGMENTS, HOLDOUT}


async def test_an_anonymous_ids_memberships_end_when_it_is_linked(new_store: StoreFactory) -> None:
    """A visitor's profile joins segments before they identify; the link ends those
    memberships (published once, sizes decremented) and the user carries on."""
    store = new_store()
    p = processor(store)
    visit = await process(p, records(start(uid="", mid="a1") | {"anonymousId": "anon-7"}))
    joined = {c["segment"] for c in sent(visit, SEGMENTS) if c["user_id"] == "anon-7"}
    assert joined and visit.size_deltas == {f"rule:{s}": 1 for s in joined}
    identify = ev("identify", "i1", uid="u7", anon="anon-7", at=5)
    linked = await process(p, records(identify))
    exits = [c for c in sent(linked, SEGMENTS) if c["user_id"] == "anon-7"]
    assert {(c["segment"], c["change"]) for c in exits} == {(s, "exited") for s in joined}
    assert all(c["reason"].startswith("linked into another profile") for c in exits)
    assert all(linked.size_deltas.get(f"rule:{s}", 0) == 0 for s in joined)  # u7 entered, anon-7 left
    assert {c["segment"] for c in sent(linked, SEGMENTS) if c["user_id"] == "u7"} == joined
    # a redelivered identify links nothing again and publishes no second exit
    again = await process(p, records(identify))
    assert [c for c in sent(again, SEGMENTS) if c["user_id"] == "anon-7"] == []
    assert again.size_deltas == {}


async def test_link_exits_survive_a_crash_before_publishing(new_store: StoreFactory) -> None:
    store = new_store()
    await process(processor(store), records(start(uid="", mid="a1") | {"anonymousId": "anon-8"}))
    crashed = processor(store)
    await crashed.process(records(ev("identify", "i1", uid="u8", anon="anon-8", at=5)))  # never published
    restarted = processor(store)
    replay = await process(restarted, records(ev("identify", "i1", uid="u8", anon="anon-8", at=5)))
    exits = [c for c in sent(replay, SEGMENTS) if c["user_id"] == "anon-8"]
    assert exits and all(c["change"] == "exited" for c in exits)


async def test_a_visitors_unpublished_entries_go_out_ahead_of_the_link_exits(new_store: StoreFactory) -> None:
    """The visitor's worker wrote its segment entries and died before publishing them; the
    identify arrives on another worker, which tombstones the visitor: the entries are sent
    with the target's outbox, before the exits, so no consumer sees an exit without an entry."""
    store = new_store()
    died = processor(store)
    visit = await died.process(records(start(uid="", mid="a1") | {"anonymousId": "anon-9"}))  # not published
    entered = [c for c in sent(visit, SEGMENTS) if c["user_id"] == "anon-9"]
    assert entered and all(c["change"] == "entered" for c in entered)
    other = processor(store)
    linked = await process(other, records(ev("identify", "i1", uid="u9", anon="anon-9", at=5)))
    order = [(c["change"], c["change_id"]) for c in sent(linked, SEGMENTS) if c["user_id"] == "anon-9"]
    assert [change for change, _id in order] == ["entered"] * len(entered) + ["exited"] * len(entered)
    assert {cid for change, cid in order if change == "entered"} == {c["change_id"] for c in entered}
    assert linked.size_deltas.get("rule:passive", 0) <= 0  # the carried entries were counted before


async def test_a_profile_written_twice_in_one_batch_sends_each_message_once(new_store: StoreFactory) -> None:
    """A linked visitor's event is redirected to its user in a second round of the same batch:
    the user's profile is written twice, and the first write's messages (not published yet)
    must not be queued again as a stored outbox left unpublished (seen as copies with the
    same id, sent 1-2 ms apart, in rolling restarts)."""
    store = new_store()
    p = processor(store)
    await process(p, records(ev("identify", "i1", uid="u1", anon="anon-a")))
    redirected = track(
        "Onboarding Step Started", "s2", uid=None, anon="anon-a", at=1, flow="signup", step="x"
    )
    out = await process(p, records(track("Onboarding Completed", "c1", flow="signup"), redirected))
    assert out.applied == 2
    ids = Counter(m.id for m in out.outbox)
    assert ids and max(ids.values()) == 1, ids


async def test_a_model_that_renames_the_users_cluster_publishes_an_exit_and_an_entry(
    new_store: StoreFactory,
) -> None:
    """Cluster ids persist across models but names are matched to the centroids again, and
    two clusters can swap names (a chaos run on Apache Kafka saw 'steady' and 'quick
    adopters' swap). The segments topic names the cluster, so each name's memberships must
    alternate entered/exited as a consumer follows them: a rename is an exit and an entry."""
    names = {"c1": "steady", "c3": "quick adopters"}
    placed = {"u1": "c1"}

    def assign(doc: Any, now_ms: int, current: Any) -> tuple[dict[str, Any], str]:
        cid = placed[str(doc["user_id"])]
        return {"id": cid, "name": names[cid]}, "nearest centroid"

    ctx = ReactionContext(
        load_segments(CONFIG_DIR / "segments.toml"), parse_config(copy.deepcopy(RAW)), ProfileRules(),
        assign_cluster=assign,
    )  # fmt: skip
    p = processor(new_store(), ctx)
    published: list[dict[str, Any]] = []
    sizes: Counter[str] = Counter()
    for at, mid in ((0, "a"), (10, "b"), (20, "c"), (30, "d")):
        if mid == "b":  # the next model swaps the two names
            names.update(c1="quick adopters", c3="steady")
        if mid == "c":  # and the one after moves the user to the other cluster
            placed["u1"] = "c3"
        out = await process(p, records(start(at=at, mid=mid)))
        published += [m for m in sent(out, SEGMENTS) if m["source"] == "cluster"]
        sizes.update({k: v for k, v in out.size_deltas.items() if k.startswith("cluster:")})

    assert [(m["change"], m["segment"], m["cluster_id"]) for m in published] == [
        ("entered", "steady", "c1"),
        ("exited", "steady", "c1"),  # renamed: same cluster, the other name
        ("entered", "quick adopters", "c1"),
        ("exited", "quick adopters", "c1"),  # moved: c3 is now called 'steady'
        ("entered", "steady", "c3"),
    ]
    assert "renamed from 'steady'" in published[1]["reason"]
    assert +sizes == Counter({"cluster:steady": 1})  # one member, under the name it has now
    doc = await p.store.get("u1")
    assert doc is not None and doc["engine"]["cluster"]["name"] == "steady"
