"""End-to-end harness: the worker as a real process, fed like a frontend feeds it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from stream_app.contract import parse_timestamp
from stream_app.embedded import free_port
from stream_app.settings import Settings
from stream_app.topics import apply_topics

PII_SALT = "e2e-salt"


@dataclass
class WorkerHandle:
    """One `stream-app worker` process plus what a test needs to talk to it."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    logs: list[Path] = field(default_factory=list)

    def start(self) -> WorkerHandle:
        self.port = free_port()
        env = dict(self.env, WEB_PORT=str(self.port))
        log = self.log_path.with_suffix(f".{len(self.logs)}.log")
        self.logs.append(log)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream_app", "worker"],
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while not orjson.loads(self.wait_http("/healthz", 60)).get("partitions"):
            assert time.monotonic() < deadline, f"no partitions assigned\n{self.tail()}"
            time.sleep(0.25)  # the consumer group has not assigned partitions yet
        return self

    def wait_http(self, path: str, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.tail()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as resp:
                    return bytes(resp.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        raise AssertionError(f"worker did not serve {path} in {timeout} s\n{self.tail()}")

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read())

    def metric(self, name: str) -> float:
        text = self.wait_http("/metrics", 10).decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def tail(self, lines: int = 30) -> str:
        if not self.logs:
            return ""
        return "\n".join(self.logs[-1].read_text(errors="replace").splitlines()[-lines:])


@dataclass
class CollectorHandle:
    """One `stream-app collector` process (the HTTP front door)."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CollectorHandle:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream_app", "collector"],
            env=dict(self.env, COLLECTOR_PORT=str(self.port)),
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.tail()
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        raise AssertionError(f"collector did not answer /healthz\n{self.tail()}")

    def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        request = urllib.request.Request(self.url + path, data=body, headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, orjson.loads(resp.read()), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read()), dict(exc.headers)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + " ") or line.startswith(name + "{")
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


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
        for item in events:
            stamp = 0
            if isinstance(item, tuple):
                key, value = item
            else:
                key = (item.get("userId") or item.get("anonymousId") or "").encode() or None
                value = orjson.dumps(item)
                if record_times and isinstance(item.get("timestamp"), str):
                    stamp = parse_timestamp(item["timestamp"])
            self.producer.produce(self.settings.topic_events, key=key, value=value, timestamp=stamp)
            self.producer.poll(0)
        assert self.producer.flush(30) == 0


@pytest.fixture
def deployment(services: Any, tmp_path: Path) -> Iterator[Deployment]:
    tag = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "REDIS_", "TOPIC_", "WEB_"))}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=services.kafka_bootstrap,
        REDIS_URL=services.redis_url,
        REDIS_KEY_PREFIX=f"e2e{tag}",
        APP_ID=f"e2e-{tag}",
        TOPIC_EVENTS=f"events-{tag}",
        TOPIC_DLQ=f"dlq-{tag}",
        TOPIC_TRIGGERS=f"triggers-{tag}",
        TOPIC_TRIGGERS_HOLDOUT=f"holdout-{tag}",
        TOPIC_SEGMENTS=f"segments-{tag}",
        PII_HASH_SALT=PII_SALT,
        LOG_LEVEL="INFO",
        BATCH_MAX_EVENTS="500",
    )
    settings = Settings(**{k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields})
    apply_topics(settings, services.kafka_bootstrap)
    producer = Producer({"bootstrap.servers": services.kafka_bootstrap, "linger.ms": 5})
    yield Deployment(settings, env, producer)


@pytest.fixture
def worker_factory(deployment: Deployment, tmp_path: Path) -> Iterator[Callable[[], WorkerHandle]]:
    handles: list[WorkerHandle] = []

    def make() -> WorkerHandle:
        handle = WorkerHandle(deployment.env, tmp_path / f"worker{len(handles)}")
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
