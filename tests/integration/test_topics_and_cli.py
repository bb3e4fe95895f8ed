"""`stream-app topics apply` on a real broker, and `stream-app profile` on a real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import orjson
import redis
from confluent_kafka.admin import AdminClient

from stream_app.profile import new_profile
from stream_app.settings import Settings
from stream_app.store.keys import Keys
from stream_app.topics import apply_topics, load_topics


def test_topics_apply_creates_the_declared_topics_and_is_idempotent(kafka_bootstrap: str) -> None:
    tag = uuid.uuid4().hex[:6]
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_events=f"ev-{tag}",
        topic_dlq=f"dlq-{tag}",
        topic_triggers=f"tr-{tag}",
        topic_triggers_holdout=f"ho-{tag}",
        topic_segments=f"sg-{tag}",
        topic_webhook_dlq=f"wh-{tag}",
    )
    first = apply_topics(settings, kafka_bootstrap)
    assert sum("created" in line for line in first) == 6
    second = apply_topics(settings, kafka_bootstrap)
    assert not any("created" in line for line in second)
    metadata = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    for spec in load_topics(settings).values():
        assert len(metadata[spec.name].partitions) == spec.partitions


def test_profile_command_prints_the_profile(redis_url: str) -> None:
    prefix = f"cli{uuid.uuid4().hex[:6]}"
    doc = new_profile("cli-user")
    doc.update(event_count=3, first_seen_ms=1_795_000_000_000, last_seen_ms=1_795_000_000_000)
    redis.Redis.from_url(redis_url).hset(
        Keys(prefix).profile("cli-user"), mapping={"v": 1, "d": orjson.dumps(doc)}
    )
    env = {**os.environ, "REDIS_URL": redis_url, "REDIS_KEY_PREFIX": prefix}
    found = subprocess.run(
        [sys.executable, "-m", "stream_app", "profile", "cli-user"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    shown = orjson.loads(found.stdout)
    assert shown["event_count"] == 3 and shown["first_seen"] == "2026-11-18T11:06:40.000Z"
    missing = subprocess.run(
        [sys.executable, "-m", "stream_app", "profile", "nobody"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert missing.returncode == 1 and "no profile" in missing.stderr


def test_report_command_compares_treated_and_control(redis_url: str) -> None:
    prefix = f"rep{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(redis_url)
    plan = (
        [("treatment", True)] * 6
        + [("treatment", False)] * 2
        + [("control", True)]
        + [("control", False)] * 3
    )
    for i, (group, completes) in enumerate(plan):
        doc = new_profile(f"r{i}")
        doc["onboarding"]["signup"] = {"status": "in_progress", "completed_steps": {}}
        if completes:
            doc["onboarding"]["signup"]["completed_steps"]["profile"] = {"completed_ms": 5000}
        doc["engine"] = {
            "fired": [{"type": "stalled_step", "subject": "signup/profile", "at": 1000, "group": group}]
        }
        client.hset(Keys(prefix).profile(f"r{i}"), mapping={"v": 1, "d": orjson.dumps(doc)})
    client.hset(Keys("other").profile("x"), mapping={"v": 1, "d": orjson.dumps(new_profile("x"))})
    env = {**os.environ, "REDIS_URL": redis_url, "REDIS_KEY_PREFIX": prefix}
    result = subprocess.run(
        [sys.executable, "-m", "stream_app", "report", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    (row,) = orjson.loads(result.stdout)
    assert row["type"] == "stalled_step"
    assert row["treatment"] == {"n": 8, "completed": 6, "rate": 0.75}
    assert row["control"] == {"n": 4, "completed": 1, "rate": 0.25}
    low, high = row["difference_ci95"]
    assert low < 0.5 < high
    table = subprocess.run(
        [sys.executable, "-m", "stream_app", "report"],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "200"},
        timeout=60,
    )
    assert table.returncode == 0 and "stalled_step" in table.stdout and "75.0%" in table.stdout
