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
    )
    first = apply_topics(settings, kafka_bootstrap)
    assert sum("created" in line for line in first) == 5
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
