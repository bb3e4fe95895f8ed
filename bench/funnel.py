"""Issue 16 measurement: the live funnel (Prometheus) against the report read from profiles.

Run: python bench/funnel.py [--users N]

One worker on the embedded broker and a private redis-server, the shipped configuration.
The topic holds three days of the synthetic population's onboarding (records stamped as
produced back then); the worker replays it: stalls are decided as the watermark passes
them, clusters form while it runs. Then the live counters (``onboarding_funnel_steps_total``,
``onboarding_funnel_step_duration_seconds``) are set against ``stream-app report funnel``
(which reads the profiles at the end), per step for all users and per cluster.

The two differ by design, and the bench shows by how much: the live funnel counts each
event as it happens, in the groups the user was in *then* (a user applied before the
first cluster model counts in no cluster); the report reads each profile's state at the
end (the current step of a user who dropped and then completed is no longer a drop).

Results replace the "Funnel" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import orjson
from common import deploy, isolated_env, machine, produce_backlog, write_section
from rich.console import Console
from throughput import start_worker

from stream_app.embedded import EmbeddedBroker, EmbeddedRedis
from stream_app.observe import histogram_quantile, scrape, total
from stream_app.synthetic import generate_users

SECTION = "## Funnel: live metrics against the report"
STAGES = ("started", "completed", "dropped")
console = Console()


def report(env: dict[str, str], by: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "stream_app", "report", "funnel", "--by", by, "--json"],
        capture_output=True, env={**os.environ, **env}, timeout=300, check=True,
    )  # fmt: skip
    rows: list[dict[str, Any]] = orjson.loads(out.stdout)
    return rows


def live(metrics: dict[str, Any], group: str, step: str) -> dict[str, float]:
    name = "onboarding_funnel_steps_total"
    return {s: total(metrics, name, group=group, step=step, stage=s, flow="signup") for s in STAGES}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1000, help="synthetic users (default 1000)")
    args = parser.parse_args()
    population = generate_users(args.users, 404)
    tag = f"fn{uuid.uuid4().hex[:6]}"
    with EmbeddedBroker() as broker, EmbeddedRedis() as redis_server:
        env = isolated_env(
            broker.bootstrap, redis_server.url, tag, PII_HASH_SALT="bench-salt", LOG_LEVEL="WARNING"
        )
        settings = deploy(env, broker.bootstrap)
        with console.status(f"producing three days of {args.users} users…"):
            sent = produce_backlog(broker.bootstrap, settings.topic_events, population, 404)
        proc, url = start_worker(env)
        try:
            with console.status(f"replaying {sent} events…"):
                while total(scrape(url + "/metrics"), "onboarding_events_consumed_total") < sent:
                    time.sleep(1)
                time.sleep(5)  # timer passes for what the watermark reached
            metrics = scrape(url + "/metrics")
        finally:
            proc.terminate()
            proc.wait(30)
        with console.status("reading the profiles (stream-app report funnel)…"):
            by_all = report(env, "all")
            by_cluster = report(env, "cluster")
    write(args, sent, metrics, by_all, by_cluster)


def write(
    args: argparse.Namespace,
    sent: int,
    metrics: dict[str, Any],
    by_all: list[dict[str, Any]],
    by_cluster: list[dict[str, Any]],
) -> None:
    steps = [r["step"] for r in by_all if r["flow"] == "signup"]
    rows = []
    for r in (r for r in by_all if r["flow"] == "signup"):
        lv = live(metrics, "all", r["step"])
        median = histogram_quantile(
            {k: [(lb, v) for lb, v in s if lb.get("group") == "all" and lb.get("step") == r["step"]]
             for k, s in metrics.items()},
            "onboarding_funnel_step_duration_seconds", 0.5,
        )  # fmt: skip
        cells = [f"{lv[s]:.0f} / {r[s]}" for s in STAGES]
        took = f"{median or float('nan'):.0f} s / {r['median_s']:.0f} s"
        rows.append(f"| {r['step']} | {' | '.join(cells)} | {took} |")
    clusters = sorted({r["group"] for r in by_cluster if r["group"] != "(no cluster)"})
    worst = []
    for c in clusters:
        mine = [r for r in by_cluster if r["group"] == c and r["flow"] == "signup" and r["started"]]
        rep = max(mine, key=lambda r: r["dropped"] / r["started"], default=None)
        rates = {}
        for step in steps:
            lv = live(metrics, f"cluster:{c}", step)
            if lv["started"]:
                rates[step] = lv["dropped"] / lv["started"]
        lv_step = max(rates, key=rates.__getitem__, default="-")
        users = sum(r["started"] for r in mine if r["step"] == steps[0]) if steps else 0
        if rep is not None:
            worst.append(
                f"| {c} | {users} | {lv_step} ({rates.get(lv_step, 0):.0%}) "
                f"| {rep['step']} ({rep['dropped'] / rep['started']:.0%}) |"
            )
    all_started = total(metrics, "onboarding_funnel_steps_total", group="all", stage="started")
    in_cluster = sum(
        v
        for labels, v in metrics.get("onboarding_funnel_steps_total", [])
        if labels.get("group", "").startswith("cluster:") and labels.get("stage") == "started"
    )
    series = len(metrics.get("onboarding_funnel_steps_total", []))
    text = f"""{SECTION}

Run: `python bench/funnel.py --users {args.users}` on {time.strftime("%Y-%m-%d")}. Machine: {machine()}.
One worker (embedded broker, private Redis), the shipped configuration; {sent} events (three
days of {args.users} synthetic users, records stamped as produced) replayed from the start.
Live = `onboarding_funnel_steps_total` / `onboarding_funnel_step_duration_seconds` scraped at
the end; report = `stream-app report funnel --json` over the profiles at the end.

Flow `signup`, all users — live / report:

| step | started | completed | dropped | median time to complete |
|---|---|---|---|---|
{chr(10).join(rows)}

Where each cluster drops off (the step with the highest dropped / started) — live / report:

| cluster | users | live | report |
|---|---|---|---|
{chr(10).join(worst)}

- Starts counted in a cluster, live: {in_cluster:.0f} of {all_started:.0f} (the rest happened before
  the user had a cluster: the first model comes after the replay began). The report groups
  every user by the cluster they have at the end.
- Live "dropped" counts every stall decided (a user who then completes counts in both);
  the report's counts a user still on the step at the end with a stall or abandonment on
  record. Live "started" counts a step becoming the user's current step; the report counts
  steps completed or current.
- The funnel's series: {series} `onboarding_funnel_steps_total` series for the groups all,
  segment:*, cluster:* (bounded by the steps, segments and clusters; at most 200 flow/step pairs).
"""
    write_section(SECTION, text)
    console.print(text)


if __name__ == "__main__":
    main()
