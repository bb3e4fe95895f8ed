"""Triggers and segment changes as a notification service sees them, in real time.

Small thresholds (a default step mean of 1-3 s, so a stall after 2-6 s) make the real
clock usable. Each test reads the output topics with a plain Kafka consumer.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from stream_app.contract import iso_ms

from .conftest import Deployment, wait_until

pytestmark = pytest.mark.e2e

CONFIG = """
[limits]
cap_per_day = 100
allowed_lateness = 0
[stalled_step]
multiplier = 2.0
min_samples = 1000
default_mean = {mean}
min_threshold = 0.5
cooldown = 0
holdout = 0.0
[[stalled_step.actions]]
segment = "struggling"
action = {{ kind = "live_chat" }}
[[stalled_step.actions]]
action = {{ kind = "in_app_tutorial" }}
"""


def use_config(deployment: Deployment, tmp_path: Path, mean_s: float) -> None:
    path = tmp_path / "triggers.toml"
    path.write_text(CONFIG.format(mean=mean_s))
    deployment.env["TRIGGERS_FILE"] = str(path)
    deployment.env["TIMER_INTERVAL_SECONDS"] = "0.1"


def read_topic(
    deployment: Deployment, topic: str, idle_s: float = 2.0, timeout_s: float = 30, meta: bool = False
) -> list[Any]:
    """Every message of ``topic`` from the beginning, until nothing new arrives for ``idle_s``
    (``meta``: each with ``_kafka``: partition, offset, record timestamp, to tell copies apart)."""
    consumer = Consumer(
        {
            "bootstrap.servers": deployment.settings.kafka_bootstrap_servers,
            "group.id": f"reader-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(8)])
    out: list[Any] = []
    last_new = time.monotonic() + 2.5  # a new consumer needs a moment for its first fetch
    deadline = time.monotonic() + timeout_s
    while time.monotonic() - last_new < idle_s and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            value = orjson.loads(msg.value())
            assert msg.key() == value["user_id"].encode()
            if meta:
                value["_kafka"] = (msg.partition(), msg.offset(), msg.timestamp()[1])
            out.append(value)
            last_new = time.monotonic() + 2.5  # a new consumer needs a moment for its first fetch
    consumer.close()
    return out


def step(
    uid: str, name: str, at_ms: int, n: int, consent: bool | None = None, **props: str
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "track",
        "messageId": f"{uid}-{n}",
        "userId": uid,
        "timestamp": iso_ms(at_ms),
        "event": name,
        "properties": {"flow": "signup", **props},
    }
    if consent is not None:
        event["context"] = {"consent": {"categoryPreferences": {"personalization": consent}}}
    return event


def backlog(t0: int) -> list[dict[str, Any]]:
    """Twelve finishers and four stuck users over 30 s from ``t0``: each finisher's completion
    comes 1.5 s (event time) after its start, under a 2 s threshold, with 150 other users'
    events between them in the log."""
    events: list[dict[str, Any]] = []
    n = 0
    for i in range(12):
        base = t0 + i * 3000
        events.append(step(f"fin{i}", "Onboarding Step Started", base, 1, step="profile"))
        events.append(step(f"stuck{i % 4}", "Onboarding Step Started", base, 1, step="profile"))
        for j in range(150):  # filler: other users' events between start and completion
            n += 1
            events.append(
                {
                    "type": "page",
                    "messageId": f"filler-{n}",
                    "userId": f"filler{n % 97}",
                    "timestamp": iso_ms(base + j * 9),
                    "name": "Docs",
                }
            )
        events.append(step(f"fin{i}", "Onboarding Step Completed", base + 1500, 2, step="profile"))
    return events


def diagnose(worker: Any) -> Any:
    def text() -> str:
        metrics = worker.wait_http("/metrics", 10).decode().splitlines()
        wanted = ("onboarding_deadline", "onboarding_watermark", "onboarding_trigger", "onboarding_events")
        return worker.tail() + "\n" + "\n".join(m for m in metrics if m.startswith(wanted))

    return text


def stalled_counts(triggers: list[Any]) -> Counter[str]:
    return Counter(t["user_id"] for t in triggers if t["type"] == "stalled_step")


@pytest.mark.brokers("embedded")  # on Apache Kafka: the rebalance and rolling-restart tests
def test_stalled_user_gets_exactly_one_trigger_finisher_and_opted_out_none(
    deployment: Deployment, worker_factory: Any, tmp_path: Path
) -> None:
    use_config(deployment, tmp_path, mean_s=1.0)  # stalled after 2 s
    worker = worker_factory().start()
    now = int(time.time() * 1000)
    deployment.send(
        [
            step("stuck", "Onboarding Step Started", now, 1, step="profile"),
            step("finisher", "Onboarding Step Started", now, 1, step="profile"),
            step("finisher", "Onboarding Step Completed", now + 500, 2, step="profile"),
            step("no-thanks", "Onboarding Step Started", now, 1, consent=False, step="profile"),
        ]
    )
    topic = deployment.settings.topic_triggers
    wait_until(lambda: stalled_counts(read_topic(deployment, topic, 0.5)), 30, "the stall", diagnose(worker))
    time.sleep(3)  # more timer passes: nothing else may come
    triggers = read_topic(deployment, topic)
    assert stalled_counts(triggers) == {"stuck": 1}
    trig = next(t for t in triggers if t["type"] == "stalled_step")
    assert trig["evidence"]["step"] == "profile" and trig["evidence"]["threshold_s"] == 2.0
    assert trig["evidence"]["baseline"] == "default" and trig["evidence"]["elapsed_s"] >= 2.0
    assert trig["action"] == {"kind": "in_app_tutorial"} and trig["group"] == "treatment"
    assert len(trig["trigger_id"]) == 32
    status, refused = worker.get("/profiles/no-thanks")
    assert status == 200 and refused["segments"] == [] and refused["triggers"] == []
    assert worker.metric("onboarding_timer_lag_seconds_count") >= 1

    changes = read_topic(deployment, deployment.settings.topic_segments)
    entered = {(c["user_id"], c["segment"]) for c in changes if c["change"] == "entered"}
    assert ("stuck", "passive") in entered and ("finisher", "passive") in entered
    assert not any(c["user_id"] == "no-thanks" for c in changes)  # said no from the start
    status, profile = worker.get("/profiles/stuck")
    assert status == 200 and [t["type"] for t in profile["triggers"]] == ["stalled_step"]
    assert "engine" not in profile and "passive" in profile["segments"]


@pytest.mark.brokers("embedded")  # on Apache Kafka: the rebalance and rolling-restart tests
def test_sigkill_with_pending_deadlines_then_restart_fires_each_once(
    deployment: Deployment, worker_factory: Any, tmp_path: Path
) -> None:
    use_config(deployment, tmp_path, mean_s=4.0)  # stalled after 8 s
    first = worker_factory().start()
    now = int(time.time() * 1000)
    users = [f"k{i}" for i in range(20)]
    deployment.send([step(u, "Onboarding Step Started", now, 1, step="connect") for u in users])
    wait_until(
        lambda: first.metric("onboarding_events_applied_total") >= len(users),
        30,
        "events applied",
        first.tail,
    )
    first.kill()  # deadlines pending in Redis, none due yet
    assert read_topic(deployment, deployment.settings.topic_triggers, 0.5) == []
    second = worker_factory().start()
    topic = deployment.settings.topic_triggers
    wait_until(
        lambda: len(stalled_counts(read_topic(deployment, topic, 0.5))) == len(users),
        60,
        "all stalls",
        second.tail,
    )
    time.sleep(2)
    assert stalled_counts(read_topic(deployment, topic)) == {u: 1 for u in users}


def test_replaying_a_backlog_fires_no_false_stalls(
    deployment: Deployment, worker_factory: Any, tmp_path: Path
) -> None:
    """Ten minutes of history read at once: a completion still unread must cancel its stall.

    Each finisher's completion comes 1.5 s (event time) after its start, under the 2 s
    threshold, but hundreds of other users' events lie between them in the log, and
    batches are small, so the worker reads the start long before the completion. By the
    wall clock every start is 10 minutes old; only the partition watermark knows better.
    The records carry the times they were produced at (live, ten minutes ago), which is
    what the watermark follows.
    """
    use_config(deployment, tmp_path, mean_s=1.0)
    deployment.env["BATCH_MAX_EVENTS"] = "10"
    events = backlog(int(time.time() * 1000) - 600_000)
    deployment.send(events, record_times=True)  # the backlog, produced live back then
    worker = worker_factory().start()
    wait_until(
        lambda: worker.metric("onboarding_events_applied_total") >= len(events) - 8,
        120,
        "the backlog",
        worker.tail,
    )
    time.sleep(2)
    counts = stalled_counts(read_topic(deployment, deployment.settings.topic_triggers))
    assert not [u for u in counts if u.startswith("fin")], counts  # no false stalls
    assert counts == {f"stuck{i}": 1 for i in range(4)}  # the real ones still fire, once


def test_a_restart_in_the_middle_of_a_backlog_fires_no_false_stalls(
    deployment: Deployment, worker_factory: Any, tmp_path: Path
) -> None:
    """A worker that takes over a half-read backlog (after a crash, a deploy or a rebalance)
    finds the partitions' watermarks in Redis and the rest of the backlog in its fetch
    buffers: the partition is caught up only once what is buffered was processed, or the
    seconds of the restart would move shared time past every finisher's unread completion."""
    use_config(deployment, tmp_path, mean_s=1.0)
    deployment.env["BATCH_MAX_EVENTS"] = "2"  # a slow replay, to stop it in the middle
    events = backlog(int(time.time() * 1000) - 600_000)
    deployment.send(events, record_times=True)
    first = worker_factory().start()
    wait_until(
        lambda: first.metric("onboarding_events_applied_total") >= 400, 60, "part of the backlog", first.tail
    )
    first.kill()
    time.sleep(3)  # the restart's gap in wall-clock time
    second = worker_factory().start()

    def finished(uid: str) -> bool:
        status, doc = second.get(f"/profiles/{uid}")
        return status == 200 and "profile" in doc["onboarding"]["signup"]["completed_steps"]

    topic = deployment.settings.topic_triggers
    wait_until(
        lambda: (
            all(finished(f"fin{i}") for i in range(12))
            and len(stalled_counts(read_topic(deployment, topic, 0.5))) >= 4
        ),
        120,
        "the rest of the backlog and the real stalls",
        diagnose(second),
    )
    time.sleep(2)
    stalls = [
        t for t in read_topic(deployment, deployment.settings.topic_triggers) if t["type"] == "stalled_step"
    ]
    decided: dict[str, set[str]] = {}
    for t in stalls:
        decided.setdefault(t["user_id"], set()).add(t["trigger_id"])
    assert not [u for u in decided if u.startswith("fin")], decided  # no false stalls
    # the real ones still fire, each decided once. A SIGKILL between a publish and its mark
    # on the profile sends that trigger again with the same trigger_id (at-least-once; the
    # consumers deduplicate by it): a copy, not a second decision.
    assert {u: len(ids) for u, ids in decided.items()} == {f"stuck{i}": 1 for i in range(4)}, stalls


def test_fast_client_clocks_fire_no_one_elses_stall(
    deployment: Deployment, worker_factory: Any, tmp_path: Path
) -> None:
    """The field case: finishers, stuck users, and 64 clients whose clocks run an hour ahead."""
    use_config(deployment, tmp_path, mean_s=2.0)  # stalled after 4 s
    worker = worker_factory().start()
    now = int(time.time() * 1000)
    finishers = [f"fin{i}" for i in range(30)]
    stuck = [f"stuck{i}" for i in range(3)]
    deployment.send([step(u, "Onboarding Step Started", now, 1, step="profile") for u in finishers + stuck])
    fast = [
        {
            "type": "track",
            "messageId": f"fast{i}",
            "userId": f"fast{i}",
            "timestamp": iso_ms(now + 3_600_000),
            "event": "Session Started",
        }
        for i in range(64)
    ]
    deployment.send(fast)  # they arrive now, stamped an hour ahead
    time.sleep(1.5)
    done = int(time.time() * 1000)
    deployment.send([step(u, "Onboarding Step Completed", done, 2, step="profile") for u in finishers])
    topic = deployment.settings.topic_triggers
    wait_until(
        lambda: len(stalled_counts(read_topic(deployment, topic, 0.5))) >= len(stuck),
        30,
        "the real stalls",
        diagnose(worker),
    )
    time.sleep(2)
    assert stalled_counts(read_topic(deployment, topic)) == {u: 1 for u in stuck}  # no finisher
    assert worker.metric("onboarding_events_clock_ahead_total") == 64
