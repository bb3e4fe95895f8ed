"""End-to-end harness: the worker as a real process, fed like a frontend feeds it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from stream_app.contract import parse_timestamp
from stream_app.demo.services import EngineProcess, collector_ready, worker_ready
from stream_app.settings import Settings
from stream_app.topics import apply_topics, kafka_client_config

PII_SALT = "e2e-salt"


class _HttpChecks:
    """What the tests ask of an engine process over HTTP."""

    url: str

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read())

    def metric(self, name: str) -> float:
        """Sum of the samples of ``name`` (a full label set may be given: ``x{a="1",b="2"}``)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


class WorkerHandle(EngineProcess, _HttpChecks):
    """One `stream-app worker` process; ``start`` returns once it owns partitions."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        super().__init__("worker", env, log_path, "WEB_PORT", worker_ready)

    def start(self) -> WorkerHandle:
        super().start()
        self.wait_ready(90)
        return self

    def tail(self, lines: int = 30) -> str:
        """The last log lines and, while it runs, where its tasks are (py-spy), for a failure."""
        text = super().tail(lines)
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if self.alive and Path(spy).exists():
            dump = subprocess.run(
                [spy, "dump", "--pid", str(self.pid)], capture_output=True, text=True, timeout=30
            )
            text += "\n--- py-spy dump of the worker ---\n" + (dump.stdout or dump.stderr)[-6000:]
        return text

    def wait_http(self, path: str, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as resp:
                    return bytes(resp.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        raise AssertionError(f"worker did not serve {path} in {timeout} s\n{self.tail()}")


class CollectorHandle(EngineProcess, _HttpChecks):
    """One `stream-app collector` process (the HTTP front door); ``start`` returns once it answers."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        super().__init__("collector", env, log_path, "COLLECTOR_PORT", collector_ready)

    def start(self) -> CollectorHandle:
        super().start()
        self.wait_ready(60)
        return self

    def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        request = urllib.request.Request(self.url + path, data=body, headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, orjson.loads(resp.read()), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read()), dict(exc.headers)


WRITE_KEYS = "web=wk-web,server=wk-server"


@pytest.fixture
def collector_factory(deployment: Deployment, tmp_path: Path) -> Iterator[Callable[..., CollectorHandle]]:
    handles: list[CollectorHandle] = []

    def make(**env: str) -> CollectorHandle:
        merged = dict(deployment.env, COLLECTOR_WRITE_KEYS=WRITE_KEYS, **env)
        handle = CollectorHandle(merged, tmp_path / f"collector{len(handles)}.log")
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.stop()


@dataclass
class Deployment:
    """Fresh topic names, consumer group and Redis key prefix for one test."""

    settings: Settings
    env: dict[str, str]
    producer: Producer

    def send(
        self, events: list[dict[str, Any] | tuple[bytes | None, bytes]], record_times: bool = False
    ) -> None:
        """Produce to the events topic. ``record_times``: give each record its event's own
        ``timestamp`` as Kafka timestamp, as a producer that was live back then did (a backlog)."""
        refused: list[str] = []

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                refused.append(f"partition {msg.partition()}: {err}")

        for item in events:
            stamp = 0
            if isinstance(item, tuple):
                key, value = item
            else:
                key = (item.get("userId") or item.get("anonymousId") or "").encode() or None
                value = orjson.dumps(item)
                if record_times and isinstance(item.get("timestamp"), str):
                    stamp = parse_timestamp(item["timestamp"])
            self.producer.produce(
                self.settings.topic_events, key=key, value=value, timestamp=stamp, on_delivery=delivered
            )
            self.producer.poll(0)
        assert self.producer.flush(30) == 0
        # a record the broker did not take is the test's loss, not the engine's: say so
        assert not refused, f"the broker did not take {len(refused)} of {len(events)} records: {refused[:5]}"


def make_deployment(kafka_bootstrap: str, redis_url: str, **extra: str) -> Deployment:
    """Fresh topic names, consumer group and key prefix on these services; topics applied
    with ``extra`` settings (e.g. the security ones) in force."""
    tag = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "REDIS_", "TOPIC_", "WEB_"))}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        REDIS_URL=redis_url,
        REDIS_KEY_PREFIX=f"e2e{tag}",
        APP_ID=f"e2e-{tag}",
        TOPIC_EVENTS=f"events-{tag}",
        TOPIC_DLQ=f"dlq-{tag}",
        TOPIC_TRIGGERS=f"triggers-{tag}",
        TOPIC_TRIGGERS_HOLDOUT=f"holdout-{tag}",
        TOPIC_SEGMENTS=f"segments-{tag}",
        TOPIC_WEBHOOK_DLQ=f"webhook-dlq-{tag}",
        PII_HASH_SALT=PII_SALT,
        LOG_LEVEL="INFO",
        BATCH_MAX_EVENTS="500",
        **extra,
    )
    settings = Settings(**{k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields})
    apply_topics(settings, kafka_bootstrap)
    # idempotent, as the collector's: a retried request (the topics are seconds old) keeps its
    # place in the partition, so the log holds the events in the order they were sent
    producer = Producer(
        kafka_client_config(settings, kafka_bootstrap) | {"linger.ms": 5, "enable.idempotence": True}
    )
    return Deployment(settings, env, producer)


@pytest.fixture
def deployment(services: Any) -> Deployment:
    return make_deployment(services.kafka_bootstrap, services.redis_url)


@pytest.fixture
def worker_factory(deployment: Deployment, tmp_path: Path) -> Iterator[Callable[..., WorkerHandle]]:
    handles: list[WorkerHandle] = []

    def make(**env: str) -> WorkerHandle:
        """A worker on the deployment, with ``env`` settings of its own."""
        handle = WorkerHandle(dict(deployment.env, **env), tmp_path / f"worker{len(handles)}.log")
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.stop()


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, tail: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}\n{tail()}")
