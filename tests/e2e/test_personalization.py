"""GET /v1/personalization as a frontend uses it: events in through the front door, a real
worker deciding segments, clusters and the recommender's model, and the collector answering
a page on another origin (headless Chromium) with the checklist it then renders."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream_app.collector.decisions import user_hash
from stream_app.contract import iso_ms
from stream_app.embedded import EmbeddedRedis

from .conftest import CollectorHandle, Deployment, wait_until
from .test_collector import PageServer, applied, basic, run_page

pytestmark = [pytest.mark.e2e, pytest.mark.brokers("embedded")]  # HTTP and Redis: any broker


def event(uid: str, kind: str = "track", consent: bool = True, **fields: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "userId": uid,
        "messageId": str(uuid.uuid4()),
        "timestamp": iso_ms(int(time.time() * 1000)),
        "context": {"consent": {"categoryPreferences": {"personalization": consent}}},
        **fields,
    }


def journey(uid: str, help_views: int = 0, features: tuple[str, ...] = (), consent: bool = True) -> list[Any]:
    out = [event(uid, "identify", consent, traits={"plan": "plan-secret-7", "email": f"{uid}@example.com"})]
    for _ in range(help_views):
        out.append(event(uid, consent=consent, event="Help Viewed", properties={"step": "profile"}))
    for feature in features:
        out.append(event(uid, consent=consent, event="Feature Used", properties={"feature": feature}))
    return out


def decide(collector: CollectorHandle, query: str, key: str = "wk-web") -> tuple[int, Any]:
    return collector.get(f"/v1/personalization?{query}", headers=basic(key))


def test_a_page_asks_what_to_show_and_renders_the_checklist_it_gets(
    deployment: Deployment, worker_factory: Any, collector_factory: Any, tmp_path: Path
) -> None:
    page = PageServer()
    try:
        worker = worker_factory(RECO_TRAIN_INTERVAL_SECONDS="1").start()
        collector: CollectorHandle = collector_factory(
            COLLECTOR_ALLOWED_ORIGINS=page.origin, PERSONALIZATION_REFRESH_SECONDS="0.2"
        ).start()
        tag = uuid.uuid4().hex[:6]
        struggler, power, refuser = f"s-{tag}", f"p-{tag}", f"r-{tag}"
        events = journey(struggler, help_views=4)
        events += journey(power, features=("search", "export", "alerts", "sharing", "comments"))
        events += journey(refuser, help_views=5, consent=False)
        for i in range(8):  # a population whose adoption order the recommender learns
            events += journey(f"pop{i}-{tag}", features=("search", "export", "api"))
        events.append(event(f"early-{tag}", event="Feature Used", properties={"feature": "search"}))
        status, body, _ = collector.post("/v1/batch", orjson.dumps({"batch": events}), basic("wk-web"))
        assert status == 200, body
        wait_until(lambda: applied(worker) >= len(events), 60, "every event applied", worker.tail)

        def learned() -> bool:
            got = decide(collector, f"userId=early-{tag}")[1]
            return [r["item"] for r in got["recommendations"]][:1] == ["export"]

        wait_until(learned, 60, "the recommender's first model, served by the collector", collector.tail)
        status, early = decide(collector, f"userId=early-{tag}")
        assert status == 200 and early["personalized"] and early["versions"]["recommender"] >= 1
        assert "right after search" in early["recommendations"][0]["reason"]

        users = [struggler, power, refuser, f"nobody-{tag}", "undefined"]
        log = run_page(
            f"{page.origin}/checklist.html?collector={collector.port}&key=wk-web&users={','.join(users)}",
            tmp_path,
        )
        lines = dict(line.split(" ", 1) for line in log.splitlines())
        assert "checklist=struggling items=3 personalized=true flags=live_chat" in lines[f"user={struggler}"]
        assert (
            "checklist=power items=3 personalized=true flags=advanced_setup_first" in lines[f"user={power}"]
        )
        for other in (refuser, f"nobody-{tag}", "undefined"):
            assert (
                "status=200 checklist=standard items=3 personalized=false flags=-" in lines[f"user={other}"]
            ), log
        assert "recs=-" not in lines[f"user={power}"] and "recs=api" in lines[f"user={power}"]

        status, answer = decide(collector, f"userId={struggler}")
        raw = orjson.dumps(answer).decode()
        assert "example.com" not in raw and "plan-secret" not in raw  # no trait leaves
        assert answer["segments"] == ["struggling"]
        assert "api" in [r["item"] for r in answer["recommendations"]]  # not used yet
        assert decide(collector, f"userId={struggler}", key="wk-wrong")[0] == 401
        assert decide(collector, "")[0] == 400
        cached = collector.metric('onboarding_collector_decisions_total{outcome="cached"}')
        assert decide(collector, f"userId={struggler}")[1] == answer
        assert collector.metric('onboarding_collector_decisions_total{outcome="cached"}') == cached + 1
        # a new event changes the profile: the answer is decided again, not served from the cache
        more = [event(struggler, event="Feature Used", properties={"feature": "api"})]
        assert collector.post("/v1/batch", orjson.dumps({"batch": more}), basic("wk-web"))[0] == 200
        wait_until(
            lambda: (
                all(
                    r["item"] != "api" for r in decide(collector, f"userId={struggler}")[1]["recommendations"]
                )
                and collector.metric('onboarding_collector_decisions_total{outcome="computed"}') > 0
            ),
            30,
            "the changed profile's answer",
            worker.tail,
        )
    finally:
        page.close()


def test_with_a_user_hash_secret_the_write_key_alone_reads_nobodys_decision(
    deployment: Deployment, collector_factory: Any
) -> None:
    collector: CollectorHandle = collector_factory(PERSONALIZATION_USER_HASH_SECRET="backend-secret").start()
    assert decide(collector, "userId=u-1")[0] == 401
    assert decide(collector, "userId=u-1&userHash=" + "0" * 64)[0] == 401
    status, body = decide(collector, "userId=u-1&userHash=" + user_hash(b"backend-secret", "u-1"))
    assert status == 200 and body["personalized"] is False


def test_without_redis_the_collector_still_takes_events_and_says_decisions_are_off(
    deployment: Deployment, collector_factory: Any
) -> None:
    collector: CollectorHandle = collector_factory(REDIS_URL="").start()
    status, body = decide(collector, "userId=u-1")
    assert status == 404 and body["code"] == "not_enabled"
    status, body, _ = collector.post(
        "/v1/track",
        orjson.dumps(event("u-1", event="Feature Used", properties={"feature": "x"})),
        basic("wk-web"),
    )
    assert status == 200


def test_a_redis_that_does_not_answer_gets_the_page_the_default_answer(
    deployment: Deployment, collector_factory: Any
) -> None:
    with EmbeddedRedis() as frozen:
        collector: CollectorHandle = collector_factory(
            REDIS_URL=frozen.url, REDIS_TIMEOUT_SECONDS="0.2"
        ).start()
        os.kill(frozen.pid, signal.SIGSTOP)  # Redis hangs: no answers, no errors
        try:
            started = time.monotonic()
            status, body = decide(collector, "userId=u-1")
            assert status == 200 and body["personalized"] is False
            assert time.monotonic() - started < 5
            assert collector.metric('onboarding_collector_decisions_total{outcome="fallback"}') == 1
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
