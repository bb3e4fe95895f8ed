"""Topic definitions from ``topics/topics.toml`` and ``stream-app topics apply``.

Applying is idempotent: missing topics are created, partition counts are raised
(never lowered: Kafka cannot), and declared configs are set. It never deletes a topic.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from stream_app.errors import ConfigError
from stream_app.paths import TOPICS_FILE
from stream_app.settings import Settings
from stream_app.tomlmodels import Strict, TomlError, validate


@dataclass(frozen=True)
class TopicSpec:
    role: str  # events | dlq | triggers | triggers_holdout | segments
    name: str
    partitions: int
    replication_factor: int
    key: str
    value_schema: str
    config: dict[str, str] = field(default_factory=dict)


ROLES = ("events", "dlq", "triggers", "triggers_holdout", "segments", "webhook_dlq")


class _Topic(Strict):
    name: str = Field(min_length=1)
    partitions: int = Field(1, ge=1)
    replication_factor: int = Field(1, ge=1)
    key: str = ""
    value_schema: str = ""
    config: dict[str, str | int] = Field(default_factory=dict)


class _Topics(Strict):
    events: _Topic
    dlq: _Topic
    triggers: _Topic
    triggers_holdout: _Topic
    segments: _Topic
    webhook_dlq: _Topic


class _File(Strict):
    topics: _Topics


def load_topics(settings: Settings, path: Path = TOPICS_FILE) -> dict[str, TopicSpec]:
    """The declared topics by role, names overridden by the TOPIC_* settings."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read topic definitions: {exc}") from exc
    try:
        parsed = validate(_File, raw)
    except TomlError as exc:
        raise ConfigError(f"{path}:{exc.where}", exc.problem) from exc
    specs: dict[str, TopicSpec] = {}
    for role in ROLES:
        entry: _Topic = getattr(parsed.topics, role)
        specs[role] = TopicSpec(
            role=role,
            name=getattr(settings, f"topic_{role}"),
            partitions=entry.partitions,
            replication_factor=entry.replication_factor,
            key=entry.key,
            value_schema=entry.value_schema,
            config={k: str(v) for k, v in entry.config.items()},
        )
    return specs


def kafka_client_config(settings: Settings, bootstrap: str) -> dict[str, Any]:
    """librdkafka (confluent-kafka) settings for the configured security protocol."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "security.protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
        conf["sasl.username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            conf["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    for key, value in (
        ("ssl.ca.location", settings.kafka_ssl_cafile),
        ("ssl.certificate.location", settings.kafka_ssl_certfile),
        ("ssl.key.location", settings.kafka_ssl_keyfile),
    ):
        if value is not None:
            conf[key] = str(value)
    return conf


def apply_topics(settings: Settings, bootstrap: str, timeout: float = 30.0) -> list[str]:
    """Create or update the declared topics; return one line per action taken."""
    from confluent_kafka.admin import AdminClient, ConfigResource, NewPartitions, NewTopic

    admin = AdminClient(kafka_client_config(settings, bootstrap))
    existing = admin.list_topics(timeout=timeout).topics
    actions: list[str] = []
    to_create = []
    for spec in load_topics(settings).values():
        if spec.name not in existing:
            to_create.append(
                NewTopic(spec.name, spec.partitions, spec.replication_factor, config=spec.config)
            )
            continue
        current = len(existing[spec.name].partitions)
        if current < spec.partitions:
            admin.create_partitions([NewPartitions(spec.name, spec.partitions)])[spec.name].result(timeout)
            actions.append(f"{spec.name}: partitions {current} -> {spec.partitions}")
        if spec.config:
            try:
                resource = ConfigResource("topic", spec.name, set_config=spec.config)
                admin.alter_configs([resource])[resource].result(timeout)
            except Exception as exc:  # some brokers (e.g. Tansu) do not support config changes
                actions.append(f"{spec.name}: config not updated ({exc})")
        actions.append(f"{spec.name}: exists ({max(current, spec.partitions)} partitions)")
    if to_create:
        for name, future in admin.create_topics(to_create).items():
            try:
                future.result(timeout)
                actions.append(f"{name}: created")
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
                actions.append(f"{name}: exists")
    return actions
