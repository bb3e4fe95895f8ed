"""A wrong setting stops start-up with a message naming it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stream_app.errors import ConfigError
from stream_app.settings import Settings


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"WEB_PORT": "eighty"}, "WEB_PORT"),
        ({"WEB_PORT": "70000"}, "WEB_PORT"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "localhost"}, "KAFKA_BOOTSTRAP_SERVERS"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"BATCH_MAX_EVENTS": "0"}, "BATCH_MAX_EVENTS"),
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"REDIS_KEY_PREFIX": "a b"}, "REDIS_KEY_PREFIX"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], name: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        Settings.load()
    assert info.value.setting == name
    assert name in str(info.value)


def test_sasl_needs_its_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="KAFKA_SASL_MECHANISM") as info:
        Settings.load()
    assert info.value.setting == "KAFKA_SECURITY_PROTOCOL"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CLUSTER_K": "12", "CLUSTER_MIN_SAMPLES": "10"}, "CLUSTER_MIN_SAMPLES"),
        ({"CLUSTER_K": "12", "CLUSTER_TRAIN_SAMPLES": "10"}, "CLUSTER_TRAIN_SAMPLES"),
        ({"CLUSTER_SAMPLE_CAP": "150", "CLUSTER_MIN_SAMPLES": "200"}, "CLUSTER_SAMPLE_CAP"),
    ],
)
def test_clustering_settings_must_fit_together(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=named) as info:
        Settings.load()
    assert info.value.setting == named


def test_worker_without_services_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP_SERVERS"):
        Settings.load().require_services()


def test_the_cli_exits_2_with_the_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream_app", "worker"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "WEB_PORT": "nope"},
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid setting WEB_PORT" in result.stderr


def test_help_explains_every_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream_app", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for command in ("demo", "worker", "topics", "profile", "KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL"):
        assert command in result.stdout
