"""Outcomes reported back: a notification service (through Kafka) and the app (through the
collector) say what happened to a trigger; redelivered and repeated reports count once, and
`stream-app report engagement` shows them per trigger type and variant."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as redis

from stream_app.contract import iso_ms
from stream_app.store.bandit import RedisBanditStore
from stream_app.store.keys import Keys
from stream_app.triggers.bandit import ArmStats
from tests.unit.test_runtime import BANDIT_TRIGGERS

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


def test_a_bandit_counts_each_trigger_and_each_click_once_across_a_crash(
    deployment: Deployment, worker_factory: Any, tmp_path: Any
) -> None:
    """Pulls and rewards in Redis are exact: a click reported twice, a record sent twice, and a
    SIGKILL right after the clicks were counted (the restarted worker reads again what was not
    committed yet, and the outbox of any profile not marked published is sent again)."""
    config = tmp_path / "triggers.toml"
    config.write_text(BANDIT_TRIGGERS)
    deployment.env.update(TRIGGERS_FILE=str(config), BASELINE_REFRESH_SECONDS="0.2")
    first = worker_factory().start()
    now = int(time.time() * 1000)

    def track(uid: str, name: str, mid: str, **props: str) -> dict[str, Any]:
        return {"type": "track", "messageId": mid, "userId": uid, "timestamp": iso_ms(now),
                "event": name, "properties": props}  # fmt: skip

    users = [f"bd-{i}" for i in range(6)]
    deployment.send([track(u, "Onboarding Completed", f"{u}-done", flow="signup") for u in users])
    topic = deployment.settings.topic_triggers
    wait_until(lambda: len(read_topic(deployment, topic, idle_s=0.5)) >= 6, 60, "six triggers", first.tail)
    triggers = {t["user_id"]: t for t in read_topic(deployment, topic)}
    assert all(t["policy"] == {"kind": "bandit", "context": "all"} for t in triggers.values())
    clicked = users[:3]
    clicks = [
        track(u, "Intervention Clicked", f"{u}-click-{n}", trigger_id=triggers[u]["trigger_id"],
              variant=triggers[u]["variant"])
        for u in clicked for n in (1, 2)
    ]  # fmt: skip
    deployment.send(clicks + clicks[:2])  # two clicks each, and a record sent twice
    expect: dict[tuple[str, str, str], ArmStats] = {}
    for u, t in triggers.items():
        key = ("onboarding_completed", "all", t["variant"])
        was = expect.get(key, ArmStats())
        expect[key] = ArmStats(was.pulls + 1, was.rewards + (u in clicked))

    def arms() -> dict[tuple[str, str, str], ArmStats]:
        """The counts in Redis, as the workers read them."""

        async def read() -> dict[tuple[str, str, str], ArmStats]:
            client = redis.Redis.from_url(deployment.settings.redis_url)
            try:
                store = RedisBanditStore(client, Keys(deployment.settings.redis_key_prefix), 3600)
                return await store.arms(["onboarding_completed"])
            finally:
                await client.aclose()

        return asyncio.run(read())

    wait_until(lambda: sum(a.rewards for a in arms().values()) >= 3, 60, "the rewards", first.tail)
    first.kill()
    second = worker_factory().start()
    wait_until(lambda: arms() == expect, 30, f"the counts {expect}", lambda: f"{arms()}\n{second.tail()}")
    time.sleep(3)  # the restarted worker has read everything again meanwhile: nothing more counted
    assert arms() == expect
    assert second.metric("onboarding_events_applied_total") == 0  # all were applied before the crash
    shown = {(r["context"], r["variant"]): (r["pulls"], r["rewards"]) for r in report(deployment, "bandit")}
    assert shown == {(c, v): (a.pulls, a.rewards) for (_t, c, v), a in expect.items()}
