"""Fault paths beyond a plain outage, with the worker as a real process.

* Redis that lost its data (flushed, as after a restart without persistence) while the
  consumer group's offsets say the events were applied: the worker stops with a clear
  error, a restart refuses the same way, and the documented recoveries work (replay by
  deleting the consumer group; or accept Redis as it is).
* An outage longer than a trigger's ``max_delay``: the intervention that fell due during it
  is dropped as too late and counted, never sent late.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from stream_app.demo.services import EngineProcess
from stream_app.embedded import EmbeddedRedis

from .conftest import Deployment, WorkerHandle, wait_until
from .test_triggers import CONFIG, diagnose, read_topic, stalled_counts, step
from .test_worker import (
    applied_total,
    expected_profiles,
    settled,
    stored_profiles,
    synthetic_events,
)

pytestmark = pytest.mark.e2e


def exit_code(worker: WorkerHandle, timeout: float) -> int:
    assert worker.proc is not None
    try:
        return worker.proc.wait(timeout)
    except Exception:
        raise AssertionError(f"the worker did not stop in {timeout} s\n{worker.tail()}") from None


@pytest.mark.brokers("embedded", "kafka")
def test_redis_that_lost_its_data_stops_the_worker_and_a_replay_recovers(
    deployment: Deployment, worker_factory: Any
) -> None:
    with EmbeddedRedis() as private_redis:
        deployment.env.update(REDIS_URL=private_redis.url, KAFKA_SESSION_TIMEOUT_SECONDS="10")
        deployment.settings = deployment.settings.model_copy(update={"redis_url": private_redis.url})
        events = synthetic_events(users=40, seed=51, start_ms=1_795_000_000_000)
        expected = expected_profiles(events)
        first: WorkerHandle = worker_factory().start()
        deployment.send(events)
        wait_until(lambda: applied_total(first) >= len(events), 60, "events applied", first.tail)
        time.sleep(2)  # a commit interval: the group's offsets now say the events were applied

        redis.Redis.from_url(private_redis.url).flushall()  # Redis restarted without persistence
        assert exit_code(first, 30) == 4, first.tail()
        assert "Redis lost its data" in first.log_path.read_text()

        again: WorkerHandle = worker_factory()
        EngineProcess.start(again)  # started, not waited for: it is expected to refuse
        assert exit_code(again, 90) == 4, again.tail()  # a restart refuses the same way
        assert "ACCEPT_REDIS_STATE" in again.log_path.read_text()

        # recovery: delete the consumer group, so the retained events are replayed
        # (the stopped workers did not leave the group: it empties when their sessions expire)
        admin = AdminClient({"bootstrap.servers": deployment.settings.kafka_bootstrap_servers})

        def deleted() -> bool:
            try:
                for future in admin.delete_consumer_groups([deployment.settings.app_id]).values():
                    future.result(30)
            except KafkaException as exc:
                if "NON_EMPTY_GROUP" in str(exc):
                    return False
                raise
            return True

        wait_until(deleted, 60, "the consumer group deleted")
        replayed: WorkerHandle = worker_factory().start()
        user_ids = [pid for pid in expected if pid.startswith("user-")]
        want = settled({p: expected[p] for p in user_ids})
        wait_until(
            lambda: settled(stored_profiles(deployment, user_ids)) == want, 90, "the replay", replayed.tail
        )


@pytest.mark.brokers("embedded")
def test_accepting_the_redis_state_starts_on_a_redis_without_markers(
    deployment: Deployment, worker_factory: Any
) -> None:
    with EmbeddedRedis() as private_redis:
        deployment.env["REDIS_URL"] = private_redis.url
        events = synthetic_events(users=5, seed=52, start_ms=1_795_000_000_000)
        first: WorkerHandle = worker_factory().start()
        deployment.send(events)
        wait_until(lambda: applied_total(first) >= len(events), 60, "events applied", first.tail)
        time.sleep(2)
        first.stop()
        redis.Redis.from_url(private_redis.url).flushall()
        accepted: WorkerHandle = worker_factory(ACCEPT_REDIS_STATE="true").start()
        more = synthetic_events(users=3, seed=53, start_ms=1_795_000_000_000)
        deployment.send(more)
        wait_until(lambda: applied_total(accepted) >= len(more), 60, "new events applied", accepted.tail)
        assert accepted.alive


@pytest.mark.brokers("embedded")
def test_an_outage_longer_than_max_delay_drops_the_due_intervention_as_too_late(
    deployment: Deployment, worker_factory: Any, tmp_path: Path
) -> None:
    config = tmp_path / "triggers.toml"
    limits = "allowed_lateness = 0\nmax_delay = 3"
    config.write_text(CONFIG.format(mean=1.0).replace("allowed_lateness = 0", limits))
    deployment.env.update(TRIGGERS_FILE=str(config), TIMER_INTERVAL_SECONDS="0.1")
    with EmbeddedRedis() as private_redis:
        deployment.env.update(REDIS_URL=private_redis.url, REDIS_TIMEOUT_SECONDS="1")
        worker: WorkerHandle = worker_factory().start()
        now = int(time.time() * 1000)
        deployment.send([step("late", "Onboarding Step Started", now, 1, step="profile")])
        wait_until(lambda: applied_total(worker) >= 1, 30, "the step start applied", worker.tail)
        assert private_redis._proc is not None
        os.kill(private_redis._proc.pid, signal.SIGSTOP)  # due in 2 s; back only after 9 s
        try:
            time.sleep(9)
        finally:
            os.kill(private_redis._proc.pid, signal.SIGCONT)
        wait_until(
            lambda: (
                worker.metric('onboarding_triggers_suppressed_total{reason="too_late",type="stalled_step"}')
                >= 1
            ),
            30,
            "the stall dropped as too late",
            diagnose(worker),
        )
        assert stalled_counts(read_topic(deployment, deployment.settings.topic_triggers, 1.0)) == {}
        assert worker.get("/healthz")[0] == 200
