"""What an SRE does with the worker: protect its API, probe it, stop it, roll it.

* ``API_TOKENS``: behavioural data (profiles, step statistics) needs a bearer token; the
  probes and ``/metrics`` stay open; Faust's own pages are off.
* Start-up refuses an exposed API without tokens and the public development PII salt.
* ``/readyz`` fails while Redis is unreachable, ``/healthz`` (liveness) does not.
* SIGTERM exits within SHUTDOWN_TIMEOUT_SECONDS under load and with the broker frozen.
* A rolling restart of two workers under load loses no event and applies none twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream_app.embedded import EmbeddedBroker, EmbeddedRedis

from .conftest import Deployment, WorkerHandle, make_deployment, wait_until
from .test_triggers import read_topic, stalled_counts, step, use_config
from .test_worker import (
    applied_total,
    expected_profiles,
    expected_step_counts,
    served_step_counts,
    settled,
    settled_diff,
    stored_profiles,
    synthetic_events,
)

pytestmark = pytest.mark.e2e


def status_of(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.brokers("embedded")
def test_profiles_and_stats_need_a_bearer_token_when_tokens_are_set(
    deployment: Deployment, worker_factory: Any
) -> None:
    worker: WorkerHandle = worker_factory(API_TOKENS="tok-one, tok-two", PYTHONTRACEMALLOC="1").start()
    events = synthetic_events(users=3, seed=31, start_ms=1_795_000_000_000)
    deployment.send(events)
    wait_until(lambda: applied_total(worker) >= len(events), 60, "events applied", worker.tail)

    for path in ("/profiles/user-31-0", "/stats/steps"):
        status, body = worker.get(path)
        assert status == 401 and body["error"] == "unauthorized", (path, status, body)
        assert worker.get(path, {"Authorization": "Bearer wrong"})[0] == 401
        assert worker.get(path, {"Authorization": "Basic tok-one"})[0] == 401
        assert worker.get(path, {"Authorization": "Bearer tok-two"})[0] == 200
    status, doc = worker.get("/profiles/user-31-0", {"Authorization": "bearer tok-one"})
    assert status == 200 and doc["user_id"] == "user-31-0"
    assert worker.get("/profiles/nobody", {"Authorization": "Bearer tok-one"})[0] == 404

    # where the memory goes (tracemalloc, started by PYTHONTRACEMALLOC), behind the token too
    assert worker.get("/debug/memory")[0] == 401

    def memory() -> Any:  # a snapshot of a traced worker takes seconds: a longer timeout
        request = urllib.request.Request(
            worker.url + "/debug/memory", headers={"Authorization": "Bearer tok-one"}
        )
        with urllib.request.urlopen(request, timeout=120) as resp:
            return orjson.loads(resp.read())

    first = memory()
    assert first["tracing"] and first["traced_mib"] > 0 and len(first["top"]) == 25
    assert first["growth_since_last"] == [] and ":" in first["top"][0]["site"]
    second = memory()
    assert second["growth_since_last"] and {"site", "kib", "blocks"} == set(second["growth_since_last"][0])

    # the probes and the metrics stay open; Faust's own pages are not served at all
    assert status_of(worker.url + "/metrics") == 200
    assert status_of(worker.url + "/healthz") == 200
    assert status_of(worker.url + "/readyz") == 200
    for faust_page in ("/router/", "/table/", "/graph/", "/stats/", "/assignor/"):
        assert status_of(worker.url + faust_page) == 404, faust_page


def start_and_fail(env: dict[str, str], tmp_path: Path) -> str:
    """Run `stream-app worker` expecting it to refuse to start; its message."""
    out = subprocess.run(
        [sys.executable, "-m", "stream_app", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    return out.stderr


@pytest.mark.brokers("embedded")
def test_start_up_refuses_an_open_api_and_the_public_salt(deployment: Deployment, tmp_path: Path) -> None:
    exposed = start_and_fail(dict(deployment.env, WEB_HOST="0.0.0.0"), tmp_path)
    assert "API_TOKENS" in exposed and "WEB_HOST=0.0.0.0" in exposed
    public_salt = dict(deployment.env)
    public_salt.pop("PII_HASH_SALT")
    assert "PII_HASH_SALT" in start_and_fail(public_salt, tmp_path)


@pytest.mark.brokers("embedded")
def test_readyz_fails_while_redis_is_frozen_and_healthz_does_not(
    deployment: Deployment, worker_factory: Any
) -> None:
    with EmbeddedRedis() as private_redis:
        deployment.env["REDIS_URL"] = private_redis.url
        worker: WorkerHandle = worker_factory(REDIS_TIMEOUT_SECONDS="1", READY_MAX_RETRY_SECONDS="2").start()
        wait_until(lambda: worker.get("/readyz")[0] == 200, 30, "ready", worker.tail)
        assert private_redis._proc is not None
        os.kill(private_redis._proc.pid, signal.SIGSTOP)
        try:
            deployment.send(synthetic_events(users=2, seed=32, start_ms=1_795_000_000_000))
            wait_until(lambda: worker.get("/readyz")[0] == 503, 30, "not ready", worker.tail)
            body = worker.get("/readyz")[1]
            assert "redis unreachable" in body["reasons"], body
            wait_until(
                lambda: "a batch has been retrying for too long" in worker.get("/readyz")[1]["reasons"],
                30,
                "the retry loop reported",
                worker.tail,
            )
            assert worker.get("/healthz")[0] == 200  # alive: a restart would not help
            status, error = worker.get("/profiles/user-32-0")  # no internals in an error body
            assert (status, error) == (503, {"error": "unavailable", "message": "try again later"})
            assert "Error" not in str(body) and "Traceback" not in str(body)  # no internals
        finally:
            os.kill(private_redis._proc.pid, signal.SIGCONT)
        wait_until(lambda: worker.get("/readyz")[0] == 200, 60, "ready again", worker.tail)


def stop_time(worker: WorkerHandle, bound: float) -> float:
    """SIGTERM the worker; seconds until it exited (fails past ``bound`` + 10 s of slack)."""
    assert worker.proc is not None
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    try:
        worker.proc.wait(bound + 10)
    except subprocess.TimeoutExpired:
        worker.proc.kill()
        raise AssertionError(f"still running {bound + 10} s after SIGTERM\n{worker.tail()}") from None
    return time.monotonic() - started


class Flood:
    """Keeps producing events in a thread (load during a shutdown or a rolling restart)."""

    def __init__(self, deployment: Deployment, events: list[dict[str, Any]], per_second: int) -> None:
        self.deployment, self.events, self.per_second = deployment, events, per_second
        self.sent = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        chunk = max(1, self.per_second // 10)
        try:
            while self.sent < len(self.events):
                self.deployment.send(self.events[self.sent : self.sent + chunk])
                self.sent = min(len(self.events), self.sent + chunk)
                time.sleep(0.1)
        except BaseException as exc:  # re-raised in the test's thread by __exit__
            self.error = exc

    def __enter__(self) -> Flood:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(120)
        if self.error is not None:
            raise AssertionError(f"the load generator failed: {self.error}") from self.error


@pytest.mark.brokers("embedded")
def test_sigterm_exits_within_the_bound_under_load_and_with_the_broker_frozen(
    redis_url: str, tmp_path: Path
) -> None:
    bound = 6.0
    with EmbeddedBroker() as broker:
        deployment = make_deployment(broker.bootstrap, redis_url)
        env = dict(deployment.env, SHUTDOWN_TIMEOUT_SECONDS=str(bound))
        events = synthetic_events(users=400, seed=33, start_ms=1_795_000_000_000)

        under_load = WorkerHandle(env, tmp_path / "loaded.log").start()
        with Flood(deployment, events, per_second=2000):
            wait_until(lambda: applied_total(under_load) > 500, 60, "load", under_load.tail)
            loaded_s = stop_time(under_load, bound)

        frozen = WorkerHandle(env, tmp_path / "frozen.log").start()
        assert broker._proc is not None
        os.kill(broker._proc.pid, signal.SIGSTOP)
        try:
            frozen_s = stop_time(frozen, bound)
        finally:
            os.kill(broker._proc.pid, signal.SIGCONT)
        print(f"SIGTERM to exit: {loaded_s:.1f} s under load, {frozen_s:.1f} s with the broker frozen")
        assert loaded_s <= bound + 3 and frozen_s <= bound + 3, (loaded_s, frozen_s)
        log = (tmp_path / "frozen.log").read_text()
        assert "shutting down" in log


@pytest.mark.brokers("embedded", "kafka")
def test_rolling_restart_of_two_workers_under_load_loses_nothing_and_decides_each_stall_once(
    deployment: Deployment, worker_factory: Any, tmp_path: Path
) -> None:
    use_config(deployment, tmp_path, mean_s=5.0)  # stalled 10 s after a step start: mid-restart
    events = synthetic_events(users=300, seed=34, start_ms=1_795_000_000_000)
    expected = expected_profiles(events)
    a: WorkerHandle = worker_factory().start()
    b: WorkerHandle = worker_factory().start()

    def tails() -> str:
        return "\n".join(f"--- {w.log_path.name}\n{w.tail()}" for w in (a, b))

    def diff_and_tails() -> str:
        return settled_diff(settled(stored_profiles(deployment, user_ids)), want) + "\n" + tails()

    now = int(time.time() * 1000)
    stuck = [f"roll-stuck-{i}" for i in range(20)]
    finishers = [f"roll-done-{i}" for i in range(5)]
    deployment.send(
        [
            step(u, "Onboarding Step Started", now, 1, flow="rolling", step="connect")
            for u in stuck + finishers
        ]
        + [
            step(u, "Onboarding Step Completed", now + 1000, 2, flow="rolling", step="connect")
            for u in finishers
        ]
    )
    with Flood(deployment, events, per_second=300) as flood:
        for name in ("a", "b"):  # one worker at a time, as a rolling deploy does
            old = a if name == "a" else b
            wait_until(lambda: flood.sent > 0, 30, "load", tails)
            old.stop(timeout=30)
            assert old.proc is not None and old.proc.returncode == 0, old.tail()  # a clean exit
            new = worker_factory().start()
            if name == "a":
                a = new
            else:
                b = new
    assert flood.sent == len(events)
    user_ids = [pid for pid in expected if pid.startswith("user-")]
    want = settled({p: expected[p] for p in user_ids})
    wait_until(
        lambda: settled(stored_profiles(deployment, user_ids)) == want,
        120,
        "every event applied",
        diff_and_tails,
    )
    # no step counted twice
    assert served_step_counts(a) == expected_step_counts(expected) | {"rolling/connect": len(finishers)}
    topic = deployment.settings.topic_triggers
    wait_until(
        lambda: set(stalled_counts(read_topic(deployment, topic, 0.5))) >= set(stuck), 60, "stalls", tails
    )
    time.sleep(2)  # more timer passes: nothing else may come
    stalls = [t for t in read_topic(deployment, topic, meta=True) if t["type"] == "stalled_step"]
    # A trigger is one stall occurrence (user, flow, step, when the step started), decided once:
    # one trigger id per occurrence, never two. Delivery is at-least-once: a copy with the same
    # id can appear around a handover (consumers deduplicate by trigger_id). Reported, not
    # failed. Until 2026-12-02 each run on the embedded broker showed 4-5, 1-2 ms apart: a
    # profile written twice in one batch (events redirected from a linked id) queued its first
    # write's messages again; 0 in 9 runs since (test_reactions covers the cause).
    ids: dict[tuple[str, str, str, str], set[str]] = {}
    for t in stalls:
        ev = t["evidence"]
        occurrence = (t["user_id"], ev["flow"], ev["step"], ev["step_started_at"])
        ids.setdefault(occurrence, set()).add(t["trigger_id"])
    assert {o: i for o, i in ids.items() if len(i) > 1} == {}, "one stall occurrence decided twice"
    copies = Counter(t["trigger_id"] for t in stalls)
    print(
        f"stall occurrences: {len(ids)}, re-sent copies (same id): {sum(n - 1 for n in copies.values())}",
        sorted(
            (t["user_id"], t["trigger_id"][:8], t["_kafka"]) for t in stalls if copies[t["trigger_id"]] > 1
        ),
    )
    distinct = {t["trigger_id"]: t for t in stalls}.values()
    per_user = Counter(t["user_id"] for t in distinct if t["user_id"].startswith("roll-"))
    assert per_user == dict.fromkeys(stuck, 1)  # each stuck user one trigger id, finishers none


@pytest.mark.brokers("embedded", "kafka")
def test_a_worker_joining_under_load_makes_the_other_read_nothing_again(
    deployment: Deployment, worker_factory: Any
) -> None:
    """Scale-out under load: at the revocation the running worker commits what it processed,
    so neither worker applies a record again (without it, up to a commit interval was)."""
    events = synthetic_events(users=300, seed=36, start_ms=1_795_000_000_000)
    expected = expected_profiles(events)
    a: WorkerHandle = worker_factory().start()
    with Flood(deployment, events, per_second=400):
        wait_until(lambda: applied_total(a) > 300, 60, "load", a.tail)
        b: WorkerHandle = worker_factory().start()
        wait_until(lambda: applied_total(b) > 0, 60, "the second worker's first batch", b.tail)
    user_ids = [pid for pid in expected if pid.startswith("user-")]
    want = settled({p: expected[p] for p in user_ids})
    wait_until(
        lambda: settled(stored_profiles(deployment, user_ids)) == want,
        120,
        "every event applied",
        lambda: settled_diff(settled(stored_profiles(deployment, user_ids)), want) + a.tail() + b.tail(),
    )
    again = {name: w.metric("onboarding_events_duplicate_total") for name, w in (("a", a), ("b", b))}
    assert sum(again.values()) == 0, f"records applied before and read again: {again}\n{a.tail()}"
    assert "processed offsets committed at revocation" in a.log_path.read_text()
