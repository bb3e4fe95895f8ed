"""The dashboard and its provisioning load in Grafana's formats.

No Grafana runs on our machines (no Debian package), so the dashboard is validated against
the JSON Schema of Grafana's own dashboard type: ``@grafana/schema`` (the published npm
package, pinned in tests/e2e/js) turned into JSON Schema by ``ts-json-schema-generator``.
Provisioning files are checked against schemas written from Grafana's provisioning docs.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from tests.conftest import require_tool

ROOT = Path(__file__).parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
JS = ROOT / "tests" / "e2e" / "js"
DASHBOARD_TYPES = JS / "node_modules/@grafana/schema/dist/types/raw/dashboard/x/types.gen.d.ts"


@pytest.fixture(scope="module")
def dashboard_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_tool("node", "Node.js runs ts-json-schema-generator")
    if not DASHBOARD_TYPES.exists():
        message = f"@grafana/schema is not installed: run `npm ci` in {JS} (.ci/deps does)"
        if os.environ.get("REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("grafana") / "dashboard.schema.json"
    generator = JS / "node_modules" / ".bin" / "ts-json-schema-generator"
    args = ["--path", str(DASHBOARD_TYPES), "--type", "Dashboard", "--no-type-check", "-o", str(out)]
    run = subprocess.run([str(generator), *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    schema: dict[str, Any] = json.loads(out.read_text())
    assert "Dashboard" in schema["definitions"] and "Panel" in schema["definitions"]
    return schema


def errors(schema: dict[str, Any], doc: Any) -> list[str]:
    return [
        f"/{'/'.join(map(str, e.absolute_path))}: {e.message[:160]}"
        for e in Draft7Validator(schema).iter_errors(doc)
    ]


DASHBOARDS = ("onboarding.json", "product.json")  # the SRE view, the product view


def dashboard(name: str = "onboarding.json") -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((GRAFANA / "dashboards" / name).read_text())
    return doc


@pytest.mark.parametrize("name", DASHBOARDS)
def test_the_dashboard_is_a_valid_grafana_dashboard(dashboard_schema: dict[str, Any], name: str) -> None:
    assert errors(dashboard_schema, dashboard(name)) == []


def grid_and_units(doc: dict[str, Any]) -> None:
    """Unique ids, the provisioned data source and a unit on every panel, no overlaps."""
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in (p for p in doc["panels"] if p["type"] != "row"):
        assert panel["datasource"]["uid"] == "prometheus"
        assert panel["fieldConfig"]["defaults"]["unit"]
    cells: set[tuple[int, int]] = set()
    for panel in doc["panels"]:
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert g["x"] + g["w"] <= 24 and not (mine & cells), panel["title"]
        cells |= mine


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_query_is_promql_that_prometheus_parses(name: str, tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule), Grafana's variables filled in."""
    promtool = require_tool("promtool", "Debian package prometheus; .ci/deps installs it")
    doc = dashboard(name)
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    fill = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*", "$flow": ".*", "$group": "all"}
    rules = []
    for i, expr in enumerate(exprs):
        for var, value in fill.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(exprs)} rules found" in check.stdout


def test_the_product_dashboard_answers_where_each_group_drops_off() -> None:
    doc = dashboard("product.json")
    grid_and_units(doc)
    variables = {v["name"]: v["query"] for v in doc["templating"]["list"]}
    assert "onboarding_funnel_steps_total" in variables["group"] and "group)" in variables["group"]
    by_title = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in doc["panels"]}
    funnel = by_title["Users per step: started, completed, dropped"]
    assert all(f'stage="{s}"' in funnel for s in ("started", "completed", "dropped")) and "$group" in funnel
    drop_off = by_title["Where each cluster drops off (dropped / started, per step)"]
    assert 'group=~"cluster:.*"' in drop_off and "by (group, step)" in drop_off
    assert "onboarding_funnel_step_duration_seconds_bucket" in by_title["Median time to complete each step"]
    assert "onboarding_bandit_counted_total" in by_title["Bandit: success rate by variant"]


def test_the_schema_rejects_a_broken_dashboard(dashboard_schema: dict[str, Any]) -> None:
    broken = dashboard()
    broken["refresh"] = 10  # a number where Grafana wants "10s"
    broken["panels"][1]["gridPos"] = {"h": "8"}
    found = errors(dashboard_schema, broken)
    assert any(e.startswith("/refresh") for e in found) and any(e.startswith("/panels/1") for e in found)


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    doc = dashboard()
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in (
        "onboarding_events_consumed_total",  # throughput
        "onboarding_consumer_lag_records",  # lag
        "onboarding_consumer_lag_seconds",
        "onboarding_event_to_profile_latency_seconds_bucket",  # latency percentiles
        "onboarding_events_invalid_total",  # DLQ by reason
        "onboarding_triggers_emitted_total",  # triggers by type
        "onboarding_triggers_suppressed_total",  # and suppression reason
        "onboarding_segment_members",  # segment sizes
        "onboarding_cluster_reassignments_total",  # cluster churn
        "onboarding_redis_seconds_bucket",  # Redis latency
    ):
        assert metric in exprs, metric
    grid_and_units(doc)


DATASOURCES = {
    "type": "object",
    "required": ["apiVersion", "datasources"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": 1},
        "deleteDatasources": {"type": "array"},
        "prune": {"type": "boolean"},
        "datasources": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "type"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "type": {"type": "string", "minLength": 1},
                    "uid": {"type": "string", "maxLength": 40},
                    "orgId": {"type": "integer"},
                    "access": {"enum": ["proxy", "direct"]},
                    "url": {"type": "string"},
                    "isDefault": {"type": "boolean"},
                    "editable": {"type": "boolean"},
                    "version": {"type": "integer"},
                    "jsonData": {"type": "object"},
                    "secureJsonData": {"type": "object"},
                },
            },
        },
    },
}
PROVIDERS = {
    "type": "object",
    "required": ["apiVersion", "providers"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": 1},
        "providers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "options"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "orgId": {"type": "integer"},
                    "folder": {"type": "string"},
                    "folderUid": {"type": "string"},
                    "type": {"const": "file"},
                    "disableDeletion": {"type": "boolean"},
                    "updateIntervalSeconds": {"type": "integer", "minimum": 0},
                    "allowUiUpdates": {"type": "boolean"},
                    "options": {
                        "type": "object",
                        "required": ["path"],
                        "additionalProperties": False,
                        "properties": {
                            "path": {"type": "string"},
                            "foldersFromFilesStructure": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def test_provisioning_files_are_valid_and_wired_to_the_dashboard() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "onboarding.yml").read_text())
    assert errors(DATASOURCES, datasources) == []
    assert errors(PROVIDERS, providers) == []
    assert datasources["datasources"][0]["uid"] == "prometheus"  # what every panel names
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    path = providers["providers"][0]["options"]["path"]
    assert any(m.endswith(":" + path + ":ro") and "deploy/grafana/dashboards" in m for m in mounts)
    assert any("deploy/grafana/provisioning" in m for m in mounts)
