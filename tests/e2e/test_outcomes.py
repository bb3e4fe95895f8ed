"""Outcomes reported back: a notification service (through Kafka) and the app (through the
collector) say what happened to a trigger; redelivered and repeated reports count once, and
`stream-app report engagement` shows them per trigger type and variant."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import orjson
import pytest

from stream_app.contract import iso_ms

from .conftest import CollectorHandle, Deployment, wait_until
from .test_collector import basic
from .test_triggers import read_topic

pytestmark = [pytest.mark.e2e, pytest.mark.brokers("embedded")]  # HTTP and Redis: any broker


def report(deployment: Deployment, what: str = "engagement") -> Any:
    env = {**os.environ, **deployment.env}
    out = subprocess.run(
        [sys.executable, "-m", "stream_app", "report", what, "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return orjson.loads(out.stdout)


def test_reported_outcomes_count_once_per_trigger_through_kafka_and_the_collector(
    deployment: Deployment, worker_factory: Any, collector_factory: Any
) -> None:
    worker = worker_factory().start()
    collector: CollectorHandle = collector_factory().start()
    now = int(time.time() * 1000)

    def track(uid: str, name: str, mid: str, at_ms: int, **props: str) -> dict[str, Any]:
        return {"type": "track", "messageId": mid, "userId": uid, "timestamp": iso_ms(at_ms),
                "event": name, "properties": props}  # fmt: skip

    users = ["oc-a", "oc-b"]
    deployment.send([track(u, "Onboarding Completed", f"{u}-done", now, flow="signup") for u in users])
    wait_until(
        lambda: len(read_topic(deployment, deployment.settings.topic_triggers, idle_s=0.5)) >= 2,
        60,
        "the two onboarding_completed triggers",
        worker.tail,
    )
    ids = {t["user_id"]: t["trigger_id"] for t in read_topic(deployment, deployment.settings.topic_triggers)}
    a, b = ids["oc-a"], ids["oc-b"]
    # the notification service, through Kafka: delivered (the same record twice: a redelivery)
    delivered = [track(u, "Intervention Delivered", f"{u}-dlv", now + 1000, trigger_id=ids[u]) for u in users]
    deployment.send(delivered + delivered)
    # the app, through the front door: opened twice (an SDK retry, then a second real open)
    opened = track("oc-a", "Intervention Opened", "oc-a-open-1", now + 2000, trigger_id=a, variant="b")
    again = track("oc-a", "Intervention Opened", "oc-a-open-2", now + 9000, trigger_id=a, variant="b")
    for body in (opened, opened, again):
        assert collector.post("/v1/track", orjson.dumps(body), basic("wk-web"))[0] == 200
    dismissed = track("oc-b", "Intervention Dismissed", "oc-b-x", now + 3000, trigger_id=b)
    assert collector.post("/v1/track", orjson.dumps(dismissed), basic("wk-web"))[0] == 200

    def folded() -> bool:
        status, doc = worker.get("/profiles/oc-a")
        return status == 200 and "opened" in (doc.get("interventions") or {}).get(a, {})

    wait_until(folded, 60, "the outcomes folded into the profiles", worker.tail)
    wait_until(
        lambda: "dismissed" in (worker.get("/profiles/oc-b")[1].get("interventions") or {}).get(b, {}),
        60,
        "oc-b's dismissal",
        worker.tail,
    )
    time.sleep(1)
    doc = worker.get("/profiles/oc-a")[1]
    assert doc["interventions"][a]["opened"] - doc["interventions"][a]["delivered"] == 1000  # the first open
    rows = {(r["type"], r["variant"]): r for r in report(deployment)}
    assert set(rows) == {("onboarding_completed", "b"), ("onboarding_completed", "-")}
    shown_b, plain = rows[("onboarding_completed", "b")], rows[("onboarding_completed", "-")]
    assert (shown_b["triggers"], shown_b["delivered"], shown_b["opened"], shown_b["dismissed"]) == (
        1,
        1,
        1,
        0,
    )
    assert (plain["triggers"], plain["delivered"], plain["opened"], plain["dismissed"]) == (1, 1, 0, 1)
    assert shown_b["opened_rate"] == 1.0 and plain["dismissed_rate"] == 1.0
