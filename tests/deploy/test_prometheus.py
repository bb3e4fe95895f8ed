"""The alert rules as code: valid for Prometheus, and each alert tested firing and not firing
with ``promtool test rules`` (deploy/prometheus/rules.test.yml)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.conftest import require_tool

PROMETHEUS_DIR = Path(__file__).parents[2] / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("promtool", "Debian package prometheus; .ci/deps installs it")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS_DIR)


def alerts() -> dict[str, dict]:
    doc = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    return {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule}


def test_rules_and_scrape_config_are_valid() -> None:
    out = promtool("check", "config", "prometheus.yml")  # also checks the rule files it loads
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 1 rule files found" in out.stdout


def test_every_alert_passes_its_promtool_unit_tests() -> None:
    out = promtool("test", "rules", "rules.test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_firing_and_a_not_firing_case_and_a_runbook() -> None:
    tests = yaml.safe_load((PROMETHEUS_DIR / "rules.test.yml").read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    rules = alerts()
    assert set(rules) == firing, f"alerts without a firing test: {set(rules) - firing}"
    assert set(rules) == quiet, f"alerts without a not-firing test: {set(rules) - quiet}"
    for name, rule in rules.items():
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert len(annotations["runbook"]) > 80, f"{name}: a runbook says what to do"


def test_the_alerts_cover_what_an_sre_needs() -> None:
    assert {
        "OnboardingWorkerDown",
        "OnboardingConsumerLagHigh",
        "OnboardingConsumerLagGrowing",
        "OnboardingNoProgress",
        "OnboardingDeadLetterSpike",
        "OnboardingBatchRetrying",
        "OnboardingStoreErrors",
        "OnboardingRedisOutOfMemory",
        "OnboardingTriggerTimerLagHigh",
        "OnboardingDeadlinesPendingGrowing",
        "OnboardingClusterModelStale",
        "OnboardingCollectorErrors",
        "OnboardingCollectorDown",
    } <= set(alerts())
