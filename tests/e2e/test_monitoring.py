"""Monitoring as an SRE runs it: a real Prometheus scraping a real worker.

* the worker's and the collector's ``/metrics`` pass ``promtool check metrics``, and every
  metric the alert rules and the dashboard use is on them;
* a real Prometheus (Debian's package) scraping the worker has the consumer-lag series, and
  an alert whose condition holds (Redis out of memory) fires through it; once memory is
  back the worker applies everything, once.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from stream_app.embedded import EmbeddedRedis, free_port
from tests.conftest import require_tool

from .conftest import CollectorHandle, Deployment, WorkerHandle, wait_until
from .test_worker import applied_total, synthetic_events

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))


def exposed(text: str) -> set[str]:
    """Every sample name a scrape can carry, also for labelled metrics with no child yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        suffixes = {
            "counter": ["_total", "_created"],
            "histogram": ["_bucket", "_sum", "_count", "_created"],
            "summary": ["_sum", "_count", "_created"],
        }.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def used_in(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in re.findall(r"\b(onboarding_[a-z0-9_]+)\b", expr)}


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    """Every query of every dashboard (the SRE one and the product one)."""
    exprs: list[str] = []
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        exprs += [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
        exprs += [v["query"] for v in doc["templating"]["list"]]
    return exprs


def scrape(handle: WorkerHandle | CollectorHandle) -> str:
    with urllib.request.urlopen(handle.url + "/metrics", timeout=10) as resp:
        return str(resp.read().decode())


@pytest.mark.brokers("embedded")
def test_live_metrics_pass_promtool_and_have_every_name_the_rules_and_dashboard_use(
    deployment: Deployment, worker_factory: Any, collector_factory: Any
) -> None:
    promtool = require_tool("promtool", "Debian package prometheus; .ci/deps installs it")
    worker: WorkerHandle = worker_factory().start()
    collector: CollectorHandle = collector_factory().start()
    events = synthetic_events(users=5, seed=41, start_ms=1_795_000_000_000)
    deployment.send(events)
    wait_until(lambda: applied_total(worker) >= len(events), 60, "events applied", worker.tail)
    for handle in (worker, collector):
        text = scrape(handle)
        lint = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert lint.returncode == 0, f"{handle.command}: {lint.stdout}{lint.stderr}"
    names = exposed(scrape(worker)) | exposed(scrape(collector))
    assert used_in(rule_exprs()) - names == set(), "alert rules use metrics no process exposes"
    assert used_in(dashboard_exprs()) - names == set(), "the dashboard uses metrics no process exposes"
    assert "onboarding_consumer_lag_records" in names and "onboarding_consumer_lag_seconds" in names


class Prometheus:
    """Debian's prometheus binary scraping one worker every second, with the engine's rules
    (their ``for:`` shortened to 1 s so that a held condition fires within the test)."""

    def __init__(self, target: str, directory: Path) -> None:
        binary = require_tool("prometheus", "Debian package prometheus; .ci/deps installs it")
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                rule["for"] = "1s"
        (directory / "rules.yml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(directory / "rules.yml")],
            "scrape_configs": [{"job_name": "onboarding-worker", "static_configs": [{"targets": [target]}]}],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        try:
            return list(self.api("query", query=promql)["result"])
        except OSError:
            return []  # not listening yet

    def firing(self) -> set[str]:
        try:
            alerts = self.api("alerts")["alerts"]
        except OSError:
            return set()
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.mark.brokers("embedded")
def test_real_prometheus_sees_the_lag_series_and_fires_the_out_of_memory_alert(
    deployment: Deployment, worker_factory: Any, tmp_path: Path
) -> None:
    with EmbeddedRedis() as private_redis:
        deployment.env["REDIS_URL"] = private_redis.url
        worker: WorkerHandle = worker_factory(REDIS_TIMEOUT_SECONDS="1").start()
        prometheus = Prometheus(f"127.0.0.1:{worker.port}", tmp_path)
        try:

            def tails() -> str:
                return f"--- prometheus\n{prometheus.tail()}\n--- worker\n{worker.tail()}"

            def lag_series() -> list[dict[str, Any]]:
                return prometheus.query('onboarding_consumer_lag_records{position="processed"}')

            wait_until(lambda: len(lag_series()) > 0, 60, "the lag series in Prometheus", tails)
            assert all("partition" in s["metric"] for s in lag_series())
            assert prometheus.query("onboarding_consumer_lag_seconds")
            assert prometheus.firing() == set(), prometheus.firing()  # a healthy worker: none

            # Redis refuses writes (maxmemory reached under noeviction): the batch waits
            client = redis.Redis.from_url(private_redis.url)
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", 1)
            events = synthetic_events(users=5, seed=42, start_ms=1_795_000_000_000)
            deployment.send(events)
            wait_until(
                lambda: "OnboardingRedisOutOfMemory" in prometheus.firing(), 60, "the OOM alert", tails
            )
            assert worker.get("/readyz")[0] == 503
            assert applied_total(worker) == 0

            client.config_set("maxmemory", 0)  # memory is back: everything applies, once
            wait_until(lambda: applied_total(worker) >= len(events), 60, "events applied", tails)
            wait_until(lambda: "OnboardingRedisOutOfMemory" not in prometheus.firing(), 30, "resolved", tails)
            time.sleep(1)
            assert applied_total(worker) == len(events)
        finally:
            prometheus.stop()
