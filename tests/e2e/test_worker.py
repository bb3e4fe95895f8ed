"""The worker as a user runs it: a frontend produces with confluent-kafka, profiles come back over HTTP."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from jsonschema import Draft202012Validator

from stream_app.contract import ContractRules, iso_ms
from stream_app.metrics import Metrics
from stream_app.paths import CONFIG_DIR, SCHEMAS_DIR
from stream_app.pipeline import EventProcessor, Record
from stream_app.profile import ProfileRules, lifecycle_stage
from stream_app.segments.facts import profile_facts
from stream_app.segments.rules import load_segments
from stream_app.store.docpack import decode_doc
from stream_app.store.keys import Keys
from stream_app.store.profiles import InMemoryProfileStore

from .conftest import PII_SALT, Deployment, WorkerHandle, wait_until

pytestmark = pytest.mark.e2e

DLQ_SCHEMA = Draft202012Validator(json.loads((SCHEMAS_DIR / "onboarding.events.dlq.schema.json").read_text()))

STEPS = ["account", "profile", "connect_data", "invite_team"]


def synthetic_events(users: int, seed: int, start_ms: int) -> list[dict[str, Any]]:
    """A small, varied onboarding stream: sessions, steps, help, features, identify, consent."""
    rnd = random.Random(seed)
    out: list[dict[str, Any]] = []
    for u in range(users):
        uid, anon = f"user-{seed}-{u}", f"anon-{seed}-{u}"
        t = start_ms + rnd.randint(0, 60_000)
        mid = 0

        def add(ids: dict[str, str], kind: str, uid: str = uid, **fields: Any) -> None:
            nonlocal mid, t
            mid += 1
            t += rnd.randint(500, 20_000)
            out.append({"type": kind, "messageId": f"{uid}-{mid}", "timestamp": iso_ms(t), **ids, **fields})

        anon_ids = {"anonymousId": anon}
        add(anon_ids, "page", name="Landing")
        add(anon_ids, "track", event="Session Started")
        user_ids = {"userId": uid, "anonymousId": anon}
        add(
            user_ids,
            "identify",
            traits={"email": f"{uid}@example.com", "plan": rnd.choice(["free", "pro"])},
            context={"consent": {"categoryPreferences": {"personalization": rnd.random() > 0.1}}},
        )
        for step in STEPS[: rnd.randint(1, len(STEPS))]:
            add(
                {"userId": uid},
                "track",
                event="Onboarding Step Started",
                properties={"flow": "signup", "step": step},
            )
            if rnd.random() < 0.3:
                add({"userId": uid}, "track", event="Help Viewed", properties={"step": step})
            if rnd.random() < 0.8:
                add(
                    {"userId": uid},
                    "track",
                    event="Onboarding Step Completed",
                    properties={"flow": "signup", "step": step},
                )
        for _ in range(rnd.randint(0, 4)):
            add({"userId": uid}, "track", event="Feature Used", properties={"feature": rnd.choice("abcdef")})
    out.sort(key=lambda e: e["timestamp"])
    return out


def expected_profiles(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What one clean pass of the pure pipeline (in memory) makes of the events."""
    store = InMemoryProfileStore()
    processor = EventProcessor(store, ContractRules(pii_salt=PII_SALT.encode()), ProfileRules(), Metrics())
    recs = [Record(orjson.dumps(e), None, "t", 0, i, None) for i, e in enumerate(events)]
    asyncio.run(processor.process(recs))
    return {pid: orjson.loads(raw) for pid, (_v, raw) in store.profiles.items()}


def stored_profiles(deployment: Deployment, ids: list[str]) -> dict[str, Any]:
    client = redis.Redis.from_url(deployment.settings.redis_url or "")
    keys = Keys(deployment.settings.redis_key_prefix)
    out = {}
    for pid in ids:
        raw = client.hget(keys.profile(pid), "d")
        if raw is not None:
            out[pid] = decode_doc(raw)
    return out


def settled(profiles: dict[str, Any]) -> dict[str, Any]:
    """The fields that do not depend on the order partitions deliver in.

    Anonymous events are keyed by anonymousId, so they may be applied after the identify
    that links them; gap-inferred sessions then depend on arrival order, totals do not.
    """
    view = {}
    for pid, doc in profiles.items():
        view[pid] = {
            **{
                k: doc[k]
                for k in (
                    "event_count",
                    "counts",
                    "events",
                    "features",
                    "help_views",
                    "traits",
                    "consent",
                    "first_seen_ms",
                    "last_seen_ms",
                )
            },
            "merged_from": sorted(doc["merged_from"]),
            "steps": {
                f: {s: d["duration_s"] for s, d in st["completed_steps"].items()}
                for f, st in doc["onboarding"].items()
            },
        }
    return view


def settled_diff(got: dict[str, Any], want: dict[str, Any], limit: int = 8) -> str:
    """What differs between two ``settled`` views, for a failure message: missing profiles,
    and per differing profile its event counts and the fields that differ."""
    missing = sorted(set(want) - set(got))
    lines = [f"{len(missing)} of {len(want)} profiles missing: {missing[:limit]}"]
    differing = [p for p in sorted(want) if p in got and got[p] != want[p]]
    lines.append(f"{len(differing)} differ")
    for pid in differing[:limit]:
        fields = sorted(k for k in want[pid] if got[pid].get(k) != want[pid][k])
        counts = f"{got[pid]['event_count']} (want {want[pid]['event_count']})"
        lines.append(f"  {pid}: event_count {counts}, fields {fields}")
    return "\n".join(lines)


def expected_step_counts(expected: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for doc in expected.values():
        for flow, state in doc.get("onboarding", {}).items():
            for step, done in state["completed_steps"].items():
                if done["duration_s"] is not None:
                    counts[f"{flow}/{step}"] = counts.get(f"{flow}/{step}", 0) + 1
    return counts


def served_step_counts(worker: WorkerHandle) -> dict[str, int]:
    status, rows = worker.get("/stats/steps")
    assert status == 200
    return {f"{r['flow']}/{r['step']}": r["count"] for r in rows if r["group"] == "all"}


def applied_total(worker: WorkerHandle) -> float:
    return worker.metric("onboarding_events_applied_total")


def test_profiles_appear_over_http(deployment: Deployment, worker_factory: Any) -> None:
    worker = worker_factory().start()
    events = synthetic_events(users=5, seed=1, start_ms=1_795_000_000_000)
    deployment.send(events)
    wait_until(lambda: applied_total(worker) >= len(events), 60, "all events applied", worker.tail)
    status, doc = worker.get("/profiles/user-1-0")
    assert status == 200
    assert doc["user_id"] == "user-1-0" and doc["merged_from"] == ["anon-1-0"]
    expected = expected_profiles(events)["user-1-0"]  # one clean pass of the same events
    now = int(time.time() * 1000)
    assert doc["lifecycle"] == lifecycle_stage(expected, now, ProfileRules())
    assert "email" not in doc["traits"] and "email_sha256" in doc["traits"]
    shipped = load_segments(CONFIG_DIR / "segments.toml")
    refused = expected["consent"]["personalization"] is False
    assert doc["segments"] == ([] if refused else sorted(shipped.evaluate(profile_facts(expected, now))))
    status, via_anon = worker.get("/profiles/anon-1-0")
    assert status == 200 and via_anon["user_id"] == "user-1-0"
    assert worker.get("/profiles/nobody")[0] == 404
    metrics = worker.wait_http("/metrics", 5).decode()
    assert "onboarding_event_to_profile_latency_seconds_bucket" in metrics
    assert "user-1-0" not in metrics


def test_bad_records_go_to_the_dead_letter_topic_and_the_worker_keeps_going(
    deployment: Deployment, worker_factory: Any
) -> None:
    worker = worker_factory().start()
    garbage = bytes(random.Random(7).getrandbits(8) for _ in range(200_000))  # 3x MAX_EVENT_BYTES
    bad: list[tuple[bytes | None, bytes, str]] = [
        (b"k1", b"{this is not json", "not_json"),
        (b"k2", orjson.dumps({"type": "track", "event": "x", "userId": "u"}), "missing_message_id"),
        (b"k3", orjson.dumps({"type": "screenview", "messageId": "s", "userId": "u"}), "unknown_type"),
        (b"k4", orjson.dumps({"type": "track", "messageId": "w", "userId": 42, "event": "x"}), "wrong_type"),
        (None, garbage, "too_large"),
    ]
    good = synthetic_events(users=2, seed=2, start_ms=1_795_000_000_000)
    deployment.send([(k, v) for k, v, _ in bad])
    deployment.send(good)
    wait_until(lambda: applied_total(worker) >= len(good), 60, "valid events after the bad ones", worker.tail)
    assert worker.proc is not None and worker.proc.poll() is None

    consumer = Consumer(
        {
            "bootstrap.servers": deployment.settings.kafka_bootstrap_servers,
            "group.id": "dlq-reader",
            "enable.auto.commit": False,
            "fetch.message.max.bytes": 2_000_000,
        }
    )
    consumer.assign([TopicPartition(deployment.settings.topic_dlq, 0, 0)])
    letters = []
    for _ in range(60):
        msg = consumer.poll(1.0)
        if msg is not None and not msg.error():
            letters.append(msg)
        if len(letters) == len(bad):
            break
    consumer.close()
    assert len(letters) == len(bad)
    by_value = {msg.value(): msg for msg in letters}  # source partitions interleave in any order
    for key, value, reason in bad:
        msg = by_value[value]  # the original bytes, exactly
        headers = {k: v.decode() for k, v in msg.headers()}
        assert headers["dlq.reason"] == reason
        assert headers["dlq.message"]
        assert headers["dlq.source.topic"] == deployment.settings.topic_events
        DLQ_SCHEMA.validate(headers)
        assert msg.key() == key
        # the headers point at the original record: read it back from the events topic
        source = TopicPartition(
            deployment.settings.topic_events,
            int(headers["dlq.source.partition"]),
            int(headers["dlq.source.offset"]),
        )
        assert original(deployment, source) == value
    assert worker.metric("onboarding_events_invalid_total") == len(bad)


def original(deployment: Deployment, where: TopicPartition) -> bytes | None:
    reader = Consumer(
        {
            "bootstrap.servers": deployment.settings.kafka_bootstrap_servers,
            "group.id": "dlq-source-reader",
            "enable.auto.commit": False,
            "fetch.message.max.bytes": 2_000_000,
        }
    )
    reader.assign([where])
    try:
        for _ in range(30):
            msg = reader.poll(1.0)
            if msg is not None and not msg.error():
                return bytes(msg.value())
        return None
    finally:
        reader.close()


def test_every_event_twice_gives_the_profiles_of_one_pass(
    deployment: Deployment, worker_factory: Any
) -> None:
    events = synthetic_events(users=40, seed=3, start_ms=1_795_000_000_000)
    expected = expected_profiles(events)
    worker = worker_factory().start()
    deployment.send(events)
    deployment.send(events)  # the frontend retried everything
    total = 2 * len(events)
    wait_until(
        lambda: applied_total(worker) + worker.metric("onboarding_events_duplicate_total") >= total,
        90,
        "both passes processed",
        worker.tail,
    )
    assert applied_total(worker) == len(events)
    user_ids = [pid for pid in expected if pid.startswith("user-")]
    assert settled(stored_profiles(deployment, user_ids)) == settled({pid: expected[pid] for pid in user_ids})
    assert served_step_counts(worker) == expected_step_counts(expected)  # each completion counted once


def committed_total(deployment: Deployment) -> int:
    """Offsets the worker's consumer group has committed on the events topic, summed."""
    topic = deployment.settings.topic_events
    consumer = Consumer(
        {
            "bootstrap.servers": deployment.settings.kafka_bootstrap_servers,
            "group.id": deployment.settings.app_id,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return sum(max(tp.offset, 0) for tp in committed)
    finally:
        consumer.close()


def test_sigkill_mid_stream_and_restart_loses_nothing_and_double_counts_nothing(
    deployment: Deployment, worker_factory: Any
) -> None:
    events = synthetic_events(users=600, seed=4, start_ms=1_795_000_000_000)
    expected = expected_profiles(events)
    deployment.send(events)
    first = worker_factory().start()
    wait_until(lambda: applied_total(first) >= len(events) // 4, 90, "a quarter applied", first.tail)
    # a fast machine applies a quarter before the first offset commit (every second): wait for one
    wait_until(lambda: committed_total(deployment) > 0, 30, "a first offset commit", first.tail)
    first.kill()  # no shutdown, no final commit
    second = worker_factory().start()
    user_ids = [pid for pid in expected if pid.startswith("user-")]

    def all_done() -> bool:
        stored = stored_profiles(deployment, user_ids)
        return sum(d["event_count"] for d in stored.values()) >= sum(
            expected[p]["event_count"] for p in user_ids
        )

    wait_until(all_done, 120, "the rest applied after restart", second.tail)
    wait_until(
        lambda: served_step_counts(second) == expected_step_counts(expected),
        30,
        "step statistics to equal one clean pass",
        second.tail,
    )
    # it resumed from committed offsets: it read fewer records than the topic holds
    assert second.metric("onboarding_events_consumed_total") < len(events)
    assert settled(stored_profiles(deployment, user_ids)) == settled({pid: expected[pid] for pid in user_ids})


@pytest.mark.brokers("embedded")  # the broker's kind is not what this is about
def test_erased_user_is_gone_everywhere(deployment: Deployment, worker_factory: Any) -> None:
    worker = worker_factory().start()
    events = synthetic_events(users=3, seed=5, start_ms=1_795_000_000_000)
    deployment.send(events)
    wait_until(lambda: applied_total(worker) >= len(events), 60, "events applied", worker.tail)
    assert worker.get("/profiles/user-5-1")[0] == 200
    client = redis.Redis.from_url(deployment.settings.redis_url or "")
    samples = {
        name: Keys(deployment.settings.redis_key_prefix).model(name, "vectors")
        for name in ("cluster", "reco")
    }
    assert b"user-5-1" in client.hkeys(samples["reco"])  # its adoption order is in the recommender's sample
    deployment.send(
        [
            {
                "type": "track",
                "messageId": "erase-1",
                "userId": "user-5-1",
                "event": "Data Deletion Requested",
                "timestamp": iso_ms(1_795_000_900_000),
            }
        ]
    )
    wait_until(lambda: worker.get("/profiles/user-5-1")[0] == 404, 60, "profile erased", worker.tail)
    assert worker.get("/profiles/anon-5-1")[0] == 404
    leftovers = [k for k in client.scan_iter(f"{deployment.settings.redis_key_prefix}:*") if b"5-1}" in k]
    assert leftovers == []
    for key in samples.values():  # nor in the models' training samples
        assert not [f for f in client.hkeys(key) if b"5-1" in f]
    assert worker.get("/profiles/user-5-0")[0] == 200  # others untouched


def test_redis_outage_pauses_and_resumes_without_loss_or_double_counting(
    deployment: Deployment, worker_factory: Any
) -> None:
    import os
    import signal

    from stream_app.embedded import EmbeddedRedis

    with EmbeddedRedis() as private_redis:
        deployment.env["REDIS_URL"] = private_redis.url
        deployment.env["REDIS_TIMEOUT_SECONDS"] = "1"
        deployment.env["BATCH_ATTEMPT_TIMEOUT_SECONDS"] = "5"
        deployment.settings = deployment.settings.model_copy(update={"redis_url": private_redis.url})
        events = synthetic_events(users=60, seed=6, start_ms=1_795_000_000_000)
        expected = expected_profiles(events)
        worker = worker_factory().start()
        half = len(events) // 2
        deployment.send(events[:half])
        wait_until(lambda: applied_total(worker) >= half, 60, "first half applied", worker.tail)
        assert private_redis._proc is not None
        os.kill(private_redis._proc.pid, signal.SIGSTOP)  # Redis hangs: no answers, no errors
        try:
            deployment.send(events[half:])
            wait_until(
                lambda: worker.metric("onboarding_store_errors_total") >= 2,
                60,
                "the worker noticing the outage",
                worker.tail,
            )
            assert worker.proc is not None and worker.proc.poll() is None  # paused, not crashed
        finally:
            os.kill(private_redis._proc.pid, signal.SIGCONT)
        user_ids = [pid for pid in expected if pid.startswith("user-")]

        # An attempt cut off while Redis hung may still have been applied when Redis woke up;
        # its retry then finds those events already applied (counted as duplicates, not again).
        def seen() -> float:
            return applied_total(worker) + worker.metric("onboarding_events_duplicate_total")

        wait_until(lambda: seen() >= len(events), 90, "the rest applied after Redis is back", worker.tail)
        assert seen() == len(events) and applied_total(worker) <= len(events)
        assert settled(stored_profiles(deployment, user_ids)) == settled({p: expected[p] for p in user_ids})
        assert served_step_counts(worker) == expected_step_counts(expected)
