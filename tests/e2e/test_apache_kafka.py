"""Apache Kafka itself, beyond what the memory-only embedded broker can show.

* a broker restart with its logs kept: the worker and the collector ride it out, nothing
  is lost, nothing counted twice;
* secured listeners (SASL/SCRAM over TLS) configured with the settings the README documents,
  for `topics apply`, the worker and the collector.

Runs where Java and the broker's jars are (``.ci/deps`` fetches them); skips with the reason
elsewhere.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from segment.analytics import Client as SegmentClient

from stream_app.embedded import ApacheKafka, KafkaSecurity
from stream_app.topics import apply_topics

from .conftest import CollectorHandle, WorkerHandle, make_deployment, wait_until
from .test_collector import applied, check_profiles, journey

pytestmark = pytest.mark.e2e

USERS = (("admin", "admin-secret"), ("engine", "engine-secret"))


@pytest.fixture(scope="module")
def secured_kafka() -> Iterator[ApacheKafka]:
    reason = ApacheKafka.available()
    if reason:
        pytest.skip(reason)
    with ApacheKafka(security=KafkaSecurity(users=USERS)) as kafka:
        yield kafka


def sasl_ssl_env(kafka: ApacheKafka, user: str, password: str) -> dict[str, str]:
    """The settings a user sets for a SASL/SCRAM over TLS cluster (README "Configuration")."""
    return {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "KAFKA_SASL_USERNAME": user,
        "KAFKA_SASL_PASSWORD": password,
        "KAFKA_SSL_CAFILE": str(kafka.ca_file),
    }


def test_worker_and_collector_over_sasl_scram_and_tls(
    secured_kafka: ApacheKafka, private_redis_url: str, tmp_path: Path
) -> None:
    security = sasl_ssl_env(secured_kafka, "admin", "admin-secret")
    deployment = make_deployment(secured_kafka.sasl_ssl_bootstrap, private_redis_url, **security)
    worker = WorkerHandle(deployment.env, tmp_path / "worker.log")
    collector = CollectorHandle(
        dict(deployment.env, COLLECTOR_WRITE_KEYS="srv=wk-srv"), tmp_path / "collector.log"
    )
    try:
        worker.start()
        collector.start()
        client = SegmentClient(write_key="wk-srv", host=collector.url, max_retries=3)
        users = {f"tls-{i}": f"anon-tls-{i}" for i in range(20)}
        sent = sum(journey(client, uid, anon) for uid, anon in users.items())
        client.flush()
        client.shutdown()
        wait_until(lambda: applied(worker) >= sent, 90, "events over SASL_SSL", worker.tail)
        check_profiles(worker, users, sent // len(users))
    finally:
        collector.stop()
        worker.stop()

    wrong = deployment.settings.model_copy(update={"kafka_sasl_password": SecretStr("not-the-password")})
    with pytest.raises(Exception, match=r"(?i)authentication|timed out|transport"):
        apply_topics(wrong, secured_kafka.sasl_ssl_bootstrap, timeout=10)


def test_a_broker_restart_with_its_logs_kept_loses_nothing_and_doubles_nothing(
    private_redis_url: str, tmp_path: Path
) -> None:
    reason = ApacheKafka.available()
    if reason:
        pytest.skip(reason)
    with ApacheKafka() as kafka:  # a broker of its own: this test restarts it
        deployment = make_deployment(kafka.bootstrap, private_redis_url)
        worker = WorkerHandle(deployment.env, tmp_path / "worker.log")
        collector = CollectorHandle(
            dict(deployment.env, COLLECTOR_WRITE_KEYS="srv=wk-srv", COLLECTOR_PRODUCE_TIMEOUT_SECONDS="3"),
            tmp_path / "collector.log",
        )
        try:
            worker.start()
            collector.start()
            errors: list[Any] = []
            client = SegmentClient(
                write_key="wk-srv",
                host=collector.url,
                on_error=lambda e, batch: errors.append(e),
                max_retries=10,
                upload_size=40,
            )
            users = {f"rs-{uuid.uuid4().hex[:4]}-{i}": f"anon-rs-{i}" for i in range(90)}
            sent = 0
            stopped_at = 0.0
            for i, (uid, anon) in enumerate(users.items()):
                sent += journey(client, uid, anon)
                if i == 30:
                    client.flush()
                    kafka.stop()  # SIGTERM: a clean shutdown, logs kept
                    stopped_at = time.monotonic()
                if i == 60:
                    time.sleep(max(0.0, 4 - (time.monotonic() - stopped_at)))
                    kafka.start()  # same ports, same log directory
            client.flush()
            client.shutdown()
            assert errors == []
            wait_until(
                lambda: applied(worker) >= sent, 180, "every event applied after the restart", worker.tail
            )
            time.sleep(2)
            assert applied(worker) == sent
            check_profiles(worker, users, sent // len(users))
            assert worker.alive and collector.alive
        finally:
            collector.stop()
            worker.stop()


def test_an_acl_denial_is_a_permanent_error_its_records_are_parked_and_the_rest_goes_on(
    secured_kafka: ApacheKafka, private_redis_url: str, tmp_path: Path
) -> None:
    """The worker's principal may not write the segments topic: that is no outage. Records
    whose effects cannot be published are parked on the dead-letter topic (reason
    ``processing_failed``, the error named) after BATCH_PERMANENT_ATTEMPTS, the worker stays
    up, and records that publish nothing denied (invalid ones, here) still go through."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
    )

    admin_env = sasl_ssl_env(secured_kafka, "admin", "admin-secret")
    deployment = make_deployment(secured_kafka.sasl_ssl_bootstrap, private_redis_url, **admin_env)
    s = deployment.settings
    admin = AdminClient({"bootstrap.servers": secured_kafka.bootstrap})  # ANONYMOUS: a super user
    principal = "User:engine"
    allow, deny = AclPermissionType.ALLOW, AclPermissionType.DENY
    literal = ResourcePatternType.LITERAL
    acls = [
        AclBinding(ResourceType.TOPIC, "*", literal, principal, "*", AclOperation.ALL, allow),
        AclBinding(ResourceType.GROUP, "*", literal, principal, "*", AclOperation.ALL, allow),
        AclBinding(ResourceType.BROKER, "kafka-cluster", literal, principal, "*", AclOperation.ALL, allow),
        AclBinding(ResourceType.TOPIC, s.topic_segments, literal, principal, "*", AclOperation.WRITE, deny),
    ]
    for future in admin.create_acls(acls).values():
        future.result(timeout=30)

    env = dict(
        deployment.env,
        **sasl_ssl_env(secured_kafka, "engine", "engine-secret"),
        BATCH_PERMANENT_ATTEMPTS="2",
        BATCH_MAX_EVENTS="20",
    )
    worker = WorkerHandle(env, tmp_path / "worker.log")
    try:
        worker.start()
        users = [f"acl-{i}" for i in range(3)]
        events = [
            {
                "type": "track",
                "event": "Onboarding Step Started",
                "userId": uid,
                "messageId": f"acl-{uid}-1",
                "timestamp": "2026-12-01T00:00:00Z",
                "properties": {"flow": "signup", "step": "profile"},
            }
            for uid in users
        ]
        deployment.send([*events, (b"acl-bad", b"{not json")])
        wait_until(
            lambda: worker.metric("onboarding_records_parked_total") >= len(events),
            120,
            "records parked",
            worker.tail,
        )
        assert worker.proc is not None and worker.proc.poll() is None  # up, not crashed
        assert worker.get("/healthz")[0] == 200

        reader = Consumer({"bootstrap.servers": secured_kafka.bootstrap, "group.id": "acl-reader"})
        reader.assign([TopicPartition(s.topic_dlq, p, OFFSET_BEGINNING) for p in range(8)])
        letters: dict[bytes, dict[str, str]] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(letters) < len(events) + 1:
            msg = reader.poll(0.5)
            if msg is not None and not msg.error():
                letters[msg.value()] = {k: v.decode() for k, v in msg.headers() or []}
        reader.close()
        parked = [h for h in letters.values() if h["dlq.reason"] == "processing_failed"]
        assert len(parked) == len(events), letters
        assert all("TopicAuthorizationFailed" in h["dlq.message"] for h in parked), parked
        assert letters[b"{not json"]["dlq.reason"] == "not_json"  # the rest went on
        assert "record parked on the dead-letter topic" in worker.tail()
    finally:
        worker.stop()
