"""The HTTP front door as frontends use it: the published analytics SDKs, pointed at the collector.

`stream-app collector` and `stream-app worker` run as processes on a real broker and Redis;
the clients are the libraries product teams already ship (PyPI, npm, a real browser), with
nothing changed but the host they send to.
"""

from __future__ import annotations

import base64
import gzip
import html
import http.server
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from jsonschema import Draft202012Validator

from stream_app.embedded import ApacheKafka, EmbeddedBroker, free_port
from stream_app.paths import SCHEMAS_DIR
from stream_app.topics import apply_topics
from tests.conftest import require_tool

from .conftest import CollectorHandle, Deployment, WorkerHandle, wait_until

pytestmark = pytest.mark.e2e

STEPS = ("account", "profile", "connect_data")


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def applied(worker: WorkerHandle) -> float:
    return worker.metric("onboarding_events_applied_total")


def journey(client: Any, uid: str, anon: str) -> int:
    """One user's onboarding through an analytics SDK client; returns the events sent."""
    client.page(anonymous_id=anon, name="Landing", properties={"path": "/"})
    client.identify(uid, {"plan": "pro", "role": "developer"}, anonymous_id=anon)
    for step in STEPS:
        client.track(uid, "Onboarding Step Started", {"flow": "signup", "step": step})
        client.track(uid, "Onboarding Step Completed", {"flow": "signup", "step": step})
    client.screen(uid, name="Home")
    client.group(uid, "acme-1", {"plan": "team"})
    client.alias(f"old-{uid}", uid)
    return 2 + 2 * len(STEPS) + 3


def check_profiles(worker: WorkerHandle, users: dict[str, str], per_user: int) -> None:
    for uid, anon in users.items():
        status, doc = worker.get(f"/profiles/{uid}")
        assert status == 200, (uid, doc)
        assert doc["event_count"] == per_user, (uid, doc["event_count"])
        assert doc["counts"] == {"page": 1, "identify": 1, "track": 2 * len(STEPS), "screen": 1,
                                 "group": 1, "alias": 1}, doc["counts"]  # fmt: skip
        assert sorted(doc["onboarding"]["signup"]["completed_steps"]) == sorted(STEPS)
        assert doc["traits"]["plan"] == "pro" and "acme-1" in doc["groups"]
        assert sorted(doc["merged_from"]) == sorted([anon, f"old-{uid}"])


def test_python_sdks_feed_profiles_through_the_collector(
    deployment: Deployment, worker_factory: Any, collector_factory: Any
) -> None:
    from rudderstack.analytics import Client as RudderClient
    from segment.analytics import Client as SegmentClient

    worker = worker_factory().start()
    collector: CollectorHandle = collector_factory().start()
    errors: list[Any] = []
    segment = SegmentClient(
        write_key="wk-server", host=collector.url, on_error=lambda e, batch: errors.append(e), max_retries=5
    )
    rudder = RudderClient(
        write_key="wk-server", host=collector.url, on_error=lambda e, batch: errors.append(e), max_retries=5
    )  # gzip on by default: the collector inflates it
    users: dict[str, str] = {}
    sent = 0
    for i in range(300):
        uid, anon = f"sdk-{i}", f"anon-sdk-{i}"
        users[uid] = anon
        sent += journey(segment if i % 3 else rudder, uid, anon)
    segment.flush()
    rudder.flush()
    segment.shutdown()
    rudder.shutdown()
    assert errors == []
    wait_until(lambda: applied(worker) >= sent, 120, "every event applied", worker.tail)
    time.sleep(1)
    assert applied(worker) == sent
    check_profiles(worker, users, sent // len(users))
    assert collector.metric("onboarding_collector_events_total") == sent
    assert collector.metric('onboarding_collector_requests_total{route="batch",status="200"}') >= 2


def read_dlq(deployment: Deployment) -> list[Any]:
    consumer = Consumer(
        {"bootstrap.servers": deployment.settings.kafka_bootstrap_servers, "group.id": uuid.uuid4().hex}
    )
    consumer.assign([TopicPartition(deployment.settings.topic_dlq, 0, OFFSET_BEGINNING)])
    out = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            out.append(msg)
            deadline = time.monotonic() + 2
    consumer.close()
    return out


@pytest.mark.brokers("embedded")  # the broker's kind is not what this is about
def test_bad_requests_get_clear_errors_and_bad_events_reach_the_dead_letter_topic(
    deployment: Deployment, worker_factory: Any, collector_factory: Any
) -> None:
    worker = worker_factory().start()
    collector: CollectorHandle = collector_factory().start()
    good = {"type": "track", "event": "Feature Used", "properties": {"feature": "export"}}
    body = orjson.dumps({"batch": [dict(good, userId="u-1", messageId="m-1")]})

    status, answer, _ = collector.post("/v1/batch", body, basic("wrong-key"))
    assert status == 401 and answer["code"] == "invalid_write_key"
    status, answer, _ = collector.post("/v1/batch", body)  # no key at all
    assert status == 401
    status, answer, _ = collector.post("/v1/batch", b"{broken", basic("wk-web"))
    assert status == 400 and answer["code"] == "invalid_json"
    status, answer, _ = collector.post(
        "/v1/batch", b"\x1f\x8b\x08 not gzip", {**basic("wk-web"), "Content-Encoding": "gzip"}
    )
    assert status == 400 and answer["code"] == "invalid_gzip"
    huge = orjson.dumps({"batch": [dict(good, userId="u", messageId=f"h{i}") for i in range(2501)]})
    status, answer, _ = collector.post("/v1/batch", huge, basic("wk-web"))
    assert status == 400 and answer["code"] in ("batch_too_large", "request_too_large")
    fat = orjson.dumps(dict(good, userId="u", messageId="fat", properties={"x": "y" * 40_000}))
    status, answer, _ = collector.post("/v1/track", fat, basic("wk-web"))
    assert status == 400 and answer["code"] == "event_too_large"
    status, answer, _ = collector.post("/v1/nope", body, basic("wk-web"))
    assert status == 404

    mixed = {
        "batch": [
            dict(good, userId="mixed-1", messageId="ok-1"),
            {"type": "track", "userId": "mixed-2", "messageId": "bad-1"},  # no event name
            dict(good, userId="undefined", messageId="bad-2"),  # a placeholder id and nothing else
            dict(good, userId="mixed-3", messageId="bad-3", timestamp="not a time"),
            dict(good, anonymousId="mixed-4", messageId="ok-2"),
        ],
        "writeKey": "wk-web",
    }
    gz = gzip.compress(orjson.dumps(mixed))
    status, answer, _ = collector.post(
        "/v1/import", gz, {"Content-Type": "text/plain", "Content-Encoding": "gzip"}
    )
    assert status == 200 and answer == {"success": True}
    wait_until(lambda: applied(worker) >= 2, 60, "the good events", worker.tail)
    for uid in ("mixed-1", "mixed-4"):
        status, doc = worker.get(f"/profiles/{uid}")
        assert status == 200 and doc["features"] == {"export": 1}
    dead = read_dlq(deployment)
    reasons = Counter(dict(m.headers() or [])["dlq.reason"].decode() for m in dead)
    assert reasons == {"missing_field": 1, "blocked_id": 1, "bad_timestamp": 1}
    schema = Draft202012Validator(json.loads((SCHEMAS_DIR / "onboarding.events.dlq.schema.json").read_text()))
    for message in dead:
        headers = dict(message.headers() or [])
        schema.validate({k: v.decode() for k, v in headers.items()})
        assert headers["dlq.source.topic"] == b"http:/v1/import"
        assert "writeKey" not in orjson.loads(message.value())  # the secret never travels on
    assert collector.metric('onboarding_collector_events_total{outcome="dead_lettered"}') == 3
    assert collector.metric('onboarding_collector_requests_total{route="batch",status="401"}') == 2


JS_DIR = Path(__file__).parent / "js"
NODE_MODULES = JS_DIR / "node_modules"


def need_node_modules() -> None:
    if not (NODE_MODULES / "@segment" / "analytics-node").exists():
        message = f"npm packages not installed: run `npm ci` in {JS_DIR} (.ci/deps does)"
        if os.environ.get("REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.brokers("embedded")  # the broker's kind is not what this is about
def test_analytics_node_feeds_profiles_through_the_collector(
    deployment: Deployment, worker_factory: Any, collector_factory: Any
) -> None:
    need_node_modules()
    node = require_tool("node", "Node.js runs the published analytics-node SDK")
    worker = worker_factory().start()
    collector: CollectorHandle = collector_factory().start()
    out = subprocess.run(
        [node, str(JS_DIR / "node_client.js"), collector.url, "wk-server", "150", "node"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=JS_DIR,
    )
    assert out.returncode == 0, out.stderr
    report = orjson.loads(out.stdout.strip().splitlines()[-1])
    assert report["errors"] == [] and report["sent"] == 150 * 11
    wait_until(lambda: applied(worker) >= report["sent"], 120, "every event applied", worker.tail)
    time.sleep(1)
    assert applied(worker) == report["sent"]
    check_profiles(worker, {f"node-{i}": f"anon-node-{i}" for i in range(150)}, 11)


class PageServer:
    """Serves the onboarding page and analytics-next's UMD build on an origin of its own."""

    def __init__(self) -> None:
        umd = NODE_MODULES / "@segment" / "analytics-next" / "dist" / "umd"

        class Handler(http.server.SimpleHTTPRequestHandler):
            def translate_path(self, path: str) -> str:
                path = path.split("?", 1)[0]
                if path.startswith("/analytics-next/bundles/"):
                    return str(umd / path.removeprefix("/analytics-next/bundles/"))
                return str(JS_DIR / path.lstrip("/"))

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def run_page(url: str, tmp_path: Path) -> str:
    """Load ``url`` in headless Chromium until its script is done; the page's log."""
    chromium = require_tool("chromium", "Debian package chromium; .ci/deps installs it")
    out = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / f'chromium-{uuid.uuid4().hex[:6]}'}",
            "--virtual-time-budget=30000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = out.stdout
    assert 'id="status">DONE' in dom, dom[-3000:] + out.stderr[-2000:]
    return html.unescape(dom.split('<pre id="log">', 1)[1].split("</pre>", 1)[0])


@pytest.mark.brokers("embedded")  # the broker's kind is not what this is about
def test_a_browser_page_on_another_origin_sends_through_cors(
    deployment: Deployment, worker_factory: Any, collector_factory: Any, tmp_path: Path
) -> None:
    need_node_modules()
    page = PageServer()
    try:
        worker = worker_factory().start()
        collector: CollectorHandle = collector_factory(COLLECTOR_ALLOWED_ORIGINS=page.origin).start()
        users = 3
        log = run_page(
            f"{page.origin}/onboarding.html?collector={collector.port}&key=wk-web&users={users}&prefix=web",
            tmp_path,
        )
        assert log.count("failed=0") == users, log
        wait_until(lambda: applied(worker) >= users * 8, 60, "the browser's events", worker.tail)
        for i in range(users):
            status, doc = worker.get(f"/profiles/web-{i}")
            assert status == 200 and doc["counts"] == {"page": 1, "identify": 1, "track": 6}, doc
            assert sorted(doc["onboarding"]["signup"]["completed_steps"]) == sorted(STEPS)
            assert len(doc["merged_from"]) == 1  # the browser's anonymousId, linked by identify
        assert collector.metric('onboarding_collector_requests_total{route="t",status="200"}') == users * 6
    finally:
        page.close()


@pytest.mark.brokers("embedded")  # the broker's kind is not what this is about
def test_a_page_from_a_disallowed_origin_gets_nothing_in(
    deployment: Deployment, worker_factory: Any, collector_factory: Any, tmp_path: Path
) -> None:
    need_node_modules()
    page = PageServer()
    try:
        worker = worker_factory().start()
        collector: CollectorHandle = collector_factory(
            COLLECTOR_ALLOWED_ORIGINS="https://app.example.com"
        ).start()
        log = run_page(
            f"{page.origin}/onboarding.html?collector={collector.port}&key=wk-web&users=1&prefix=evil&raw=1",
            tmp_path,
        )
        assert "beacon queued=true" in log, log  # the beacon and the no-cors fetch did go out
        time.sleep(3)
        assert applied(worker) == 0
        assert worker.get("/profiles/evil-0")[0] == 404 and worker.get("/profiles/evil-raw")[0] == 404
        assert collector.metric("onboarding_collector_events_total") == 0
        refused = collector.metric('onboarding_collector_requests_total{route="t",status="403"}')
        assert refused >= 2  # refused by their Origin, not only left unreadable by the browser
    finally:
        page.close()


def test_a_paused_broker_gets_503s_and_after_the_retries_every_event_counts_once(
    services: Any, deployment: Deployment, worker_factory: Any, collector_factory: Any
) -> None:
    from segment.analytics import Client as SegmentClient

    # a broker of its own, of the backend's kind: this test freezes it
    own = ApacheKafka() if services.backend == "kafka" else EmbeddedBroker()
    with own as broker:
        deployment.env["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap
        deployment.settings = deployment.settings.model_copy(
            update={"kafka_bootstrap_servers": broker.bootstrap}
        )
        apply_topics(deployment.settings, broker.bootstrap)
        worker = worker_factory().start()
        collector: CollectorHandle = collector_factory(COLLECTOR_PRODUCE_TIMEOUT_SECONDS="2").start()
        errors: list[Any] = []
        client = SegmentClient(
            write_key="wk-server",
            host=collector.url,
            on_error=lambda e, batch: errors.append(e),
            max_retries=10,
            upload_size=50,
        )
        users = {f"pause-{i}": f"anon-pause-{i}" for i in range(120)}
        refused = 'onboarding_collector_requests_total{route="batch",status="503"}'
        sent = 0
        pid = broker.pid
        assert pid
        try:
            for i, (uid, anon) in enumerate(users.items()):
                sent += journey(client, uid, anon)
                if i == 40:
                    client.flush()
                    os.kill(pid, signal.SIGSTOP)  # the broker hangs mid-load
                    frozen_at = time.monotonic()
                if i == 80:
                    wait_until(lambda: collector.metric(refused) > 0, 30, "a 503", collector.tail)
                    time.sleep(max(0.0, 6 - (time.monotonic() - frozen_at)))
                    os.kill(pid, signal.SIGCONT)
        finally:
            os.kill(pid, signal.SIGCONT)
        client.flush()
        client.shutdown()
        assert errors == []
        assert collector.metric(refused) >= 1
        wait_until(lambda: applied(worker) >= sent, 180, "every event applied", worker.tail)
        time.sleep(2)
        assert applied(worker) == sent  # retried requests and late deliveries dropped by messageId
        check_profiles(worker, users, sent // len(users))
        collector.stop()  # while their broker still runs (a clean exit, not the SIGKILL after 15 s)
        worker.stop()
