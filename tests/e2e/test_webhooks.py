"""`stream-app deliver` against a real local HTTP server that fails, hangs and recovers.

Triggers on a real broker; the relay as a process; the receiver checks every signature the
way the README tells receivers to. Nothing may be lost (every trigger reaches a 2xx or the
webhook dead-letter topic, also across a SIGKILL of the relay), and what an endpoint refuses
for good is dead-lettered with its reason, not retried forever.
"""

from __future__ import annotations

import http.server
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from stream_app.delivery.policy import SIGNATURE_HEADER, verify
from stream_app.demo.services import EngineProcess, collector_ready
from stream_app.embedded import free_port
from stream_app.observe import scrape, total

from .conftest import Deployment, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.brokers("embedded")]  # a consumer like any other

SECRET = "whsec-e2e-0123456789"


class Receiver:
    """Two endpoints: /flaky fails with 500s, then hangs past the timeout, then answers 200;
    /strict refuses everything with 410 (a receiver that no longer exists)."""

    def __init__(self, failures: int, hangs: int) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, bool, int]] = []  # (path, trigger_id, signature ok, status)
        self.failures, self.hangs = failures, hangs
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = verify(SECRET.encode(), body, self.headers.get(SIGNATURE_HEADER, ""), int(time.time()))
                key = self.headers.get("Idempotency-Key", "")
                ok = ok and orjson.loads(body)["trigger_id"] == key
                with receiver.lock:
                    n = sum(1 for p, *_ in receiver.seen if p == self.path)
                    if self.path == "/strict":
                        status = 410
                    elif n < receiver.failures:
                        status = 500
                    elif n < receiver.failures + receiver.hangs:
                        status = 0
                    else:
                        status = 200
                    receiver.seen.append((self.path, key, ok, status))
                if status == 0:
                    time.sleep(2.5)  # past the endpoint's 1 s timeout
                    status = 200  # answered too late: the relay has given up on this attempt
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self, path: str) -> Counter[str]:
        with self.lock:
            return Counter(key for p, key, _ok, status in self.seen if p == path and status == 200)

    def close(self) -> None:
        self.server.shutdown()


def trigger(kind: str, n: int) -> dict[str, Any]:
    return {
        "trigger_id": uuid.uuid4().hex,
        "type": kind,
        "user_id": f"user-{n}",
        "created_at": "2026-12-01T10:00:00.000Z",
        "due_at": "2026-12-01T10:00:00.000Z",
        "group": "treatment",
        "evidence": {"flow": "signup", "step": "profile"},
        "action": {"kind": "tip"},
        "segments": [],
        "cluster": None,
    }


def read_all(deployment: Deployment, topic: str, idle_s: float = 2.0) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": deployment.settings.kafka_bootstrap_servers,
            "group.id": f"reader-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    out: list[Any] = []
    last = time.monotonic() + 2.5
    while time.monotonic() - last < idle_s:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            out.append((orjson.loads(msg.value()), dict(msg.headers() or [])))
            last = time.monotonic()
    consumer.close()
    return out


def relay(deployment: Deployment, receiver: Receiver, tmp_path: Path, name: str) -> EngineProcess:
    config = tmp_path / "webhooks.toml"
    config.write_text(
        "[[endpoints]]\n"
        f'name = "flaky"\nurl = "{receiver.url}/flaky"\nsecret_env = "WH_SECRET"\n'
        "timeout_seconds = 1\nmax_attempts = 50\n\n"
        "[[endpoints]]\n"
        f'name = "strict"\nurl = "{receiver.url}/strict"\ntypes = ["stalled_step"]\n'
        'secret_env = "WH_SECRET"\nmax_attempts = 3\n'
    )
    env = dict(deployment.env, WEBHOOKS_FILE=str(config), WH_SECRET=SECRET, DELIVER_BATCH="10")
    proc = EngineProcess("deliver", env, tmp_path / f"{name}.log", "DELIVER_PORT", collector_ready)
    return proc.start()


def test_every_trigger_reaches_the_endpoint_or_the_dead_letter_topic_across_a_kill(
    deployment: Deployment, tmp_path: Path
) -> None:
    receiver = Receiver(failures=6, hangs=2)
    first = second = None
    try:
        triggers = [trigger("stalled_step" if n % 2 else "onboarding_completed", n) for n in range(60)]
        for t in triggers:  # as the workers publish them
            deployment.producer.produce(
                deployment.settings.topic_triggers, key=t["user_id"].encode(), value=orjson.dumps(t)
            )
        assert deployment.producer.flush(30) == 0
        first = relay(deployment, receiver, tmp_path, "relay1")
        first.wait_ready(60)
        wait_until(
            lambda: len(receiver.delivered("/flaky")) >= 15, 90, "deliveries after the outage", first.tail
        )
        first.kill()  # SIGKILL mid-run: the uncommitted batch is delivered again by the next relay
        second = relay(deployment, receiver, tmp_path, "relay2")
        second.wait_ready(60)
        ids = {t["trigger_id"] for t in triggers}
        wait_until(
            lambda: set(receiver.delivered("/flaky")) == ids, 120, "every trigger delivered", second.tail
        )
        stalled = {t["trigger_id"] for t in triggers if t["type"] == "stalled_step"}
        wait_until(
            lambda: (
                {v["trigger_id"] for v, _h in read_all(deployment, deployment.settings.topic_webhook_dlq)}
                == stalled
            ),
            60,
            "the refused triggers on the webhook dead-letter topic",
            second.tail,
        )
        dead = read_all(deployment, deployment.settings.topic_webhook_dlq)
        for value, headers in dead:
            assert headers["webhook.endpoint"] == b"strict" and headers["webhook.reason"] == b"refused"
            assert headers["webhook.detail"] == b"HTTP 410" and value["type"] == "stalled_step"
        with receiver.lock:
            assert all(ok for _p, _k, ok, _s in receiver.seen), "a request with a bad signature"
            assert not any(p == "/strict" and k not in stalled for p, k, _ok, _s in receiver.seen)
            strict_attempts = Counter(k for p, k, _ok, _s in receiver.seen if p == "/strict")
        assert max(strict_attempts.values()) <= 2  # refused: not retried (twice only if re-delivered)
        # the first relay's counters died with it: the second's show the dead letters it wrote
        m = scrape(second.url + "/metrics")
        assert total(m, "onboarding_webhook_dead_letters_total", endpoint="strict", reason="refused") >= 1
        assert total(m, "onboarding_webhook_deliveries_total", endpoint="flaky", outcome="delivered") >= 1
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.stop()
        receiver.close()
