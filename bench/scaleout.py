"""Issue 12: does throughput scale with workers? 1, 2 and N workers in one consumer group.

Run: python bench/scaleout.py [--events N] [--layouts 1x8,2x8,8x32] [--repeat R]

For each layout ``WORKERSxPARTITIONS``: a fresh events topic with that many partitions, that
many `stream-app worker` processes in one group (each its own process, as on separate
machines), all joined and idle before the backlog is produced (no rebalance during the
run), then the same synthetic backlog. Measured from the first batch of any worker to the
last batch of all: aggregate events/s, the ratio to N x the one-worker rate, the CPU
seconds per 1,000 events of all workers together and of Redis, and where the batches'
time went (``onboarding_batch_phase_seconds``, summed over workers). On a 2-core machine
more than two workers share the cores: the events per CPU second say whether the
engine itself adds cost per worker (coordination, Redis contention); the rate cannot.
The section "Scale-out" of bench/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from common import ROOT, cpu_seconds, deploy, isolated_env, machine, redis_cpu_seconds, write_section
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from stream_app.demo.services import EngineProcess, get_json, worker_ready
from stream_app.embedded import EmbeddedBroker, EmbeddedRedis
from stream_app.observe import scrape, total
from stream_app.synthetic import generate_users, interleaved_stream, record_key

SECTION = "## Scale-out: workers in one group (issue 12)"
PHASES = ("process", "publish", "segments_and_samples", "deadlines")
console = Console()


def with_partitions(home: Path, partitions: int) -> Path:
    """A STREAM_APP_HOME like the checkout's whose events topic has ``partitions`` partitions
    (how a deployment declares its own topics without editing the package's files)."""
    (home / "topics").mkdir(parents=True, exist_ok=True)
    for folder in ("schemas", "config"):
        if not (home / folder).exists():
            (home / folder).symlink_to(ROOT / folder)
    text = (ROOT / "topics" / "topics.toml").read_text()
    events = text.index("[topics.events]")
    line = text.index("partitions = ", events)
    end = text.index("\n", line)
    (home / "topics" / "topics.toml").write_text(text[:line] + f"partitions = {partitions}" + text[end:])
    return home


def run_layout(
    broker: str, redis_url: str, workers: int, partitions: int, events: list[dict[str, Any]]
) -> dict[str, float]:
    tag = f"so{workers}x{partitions}-{uuid.uuid4().hex[:4]}"
    logs = Path("/tmp/stream-app-bench") / tag
    home = with_partitions(logs / "home", partitions)
    env = isolated_env(broker, redis_url, tag, LOG_LEVEL="WARNING", PII_HASH_SALT="bench-salt",
                       STREAM_APP_HOME=str(home))  # fmt: skip
    admin = AdminClient({"bootstrap.servers": broker})
    admin.create_topics([NewTopic(env["TOPIC_EVENTS"], partitions, 1)])[env["TOPIC_EVENTS"]].result(30)
    deploy(env, broker)  # the other topics; the events topic exists with its partitions
    procs = [
        EngineProcess("worker", {**env, "DATA_DIR": str(logs / f"w{i}")}, logs / f"w{i}.log", "WEB_PORT",
                      worker_ready).start()
        for i in range(workers)
    ]  # fmt: skip
    try:
        for proc in procs:
            proc.wait_ready(180)
        # every worker owns partitions and the group is settled: no rebalance mid-run
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            owned = [len((get_json(p.url + "/healthz") or {}).get("partitions") or []) for p in procs]
            if sum(owned) == partitions and all(owned):
                break
            time.sleep(0.5)
        cpu0 = sum(cpu_seconds(p.pid) for p in procs)
        redis0 = redis_cpu_seconds(redis_url)
        producer = Producer({"bootstrap.servers": broker, "linger.ms": 20, "enable.idempotence": True})
        t_produce = time.time()
        for event in events:
            producer.produce(env["TOPIC_EVENTS"], key=record_key(event), value=orjson.dumps(event))
            producer.poll(0)
        producer.flush(60)
        n = len(events)
        with Progress(TextColumn(f"{workers} worker(s) x {partitions} partitions"), BarColumn(),
                      TextColumn("{task.completed:.0f}/{task.total}"), TimeElapsedColumn(),
                      console=console) as progress:  # fmt: skip
            task = progress.add_task("run", total=n)
            while True:
                metrics = [scrape(p.url + "/metrics") for p in procs]
                done = sum(total(m, "onboarding_events_consumed_total") for m in metrics)
                progress.update(task, completed=done)
                if done >= n:
                    break
                for p in procs:
                    p.check()
                time.sleep(1.0)
        cpu1 = sum(cpu_seconds(p.pid) for p in procs)
        redis1 = redis_cpu_seconds(redis_url)
        end = max(total(m, "onboarding_last_batch_timestamp_seconds") for m in metrics)
        elapsed = end - t_produce
        out = {
            "workers": workers,
            "partitions": partitions,
            "events": n,
            "seconds": elapsed,
            "rate": n / elapsed,
            "cpu_ms_per_1k": (cpu1 - cpu0) / n * 1e6,
            "redis_cpu_ms_per_1k": (redis1 - redis0) / n * 1e6,
            "busy_s": sum(total(m, "onboarding_batch_processing_seconds_sum") for m in metrics),
        }
        for phase in PHASES:
            out[f"phase_{phase}_s"] = sum(
                total(m, "onboarding_batch_phase_seconds_sum", phase=phase) for m in metrics
            )
        return out
    finally:
        for proc in procs:
            if proc.proc is not None:
                proc.proc.terminate()
        for proc in procs:
            if proc.proc is not None:
                proc.proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--layouts", default="1x8,2x8,8x32", help="WORKERSxPARTITIONS, comma-separated")
    parser.add_argument("--repeat", type=int, default=2, help="runs per layout, alternated; medians")
    args = parser.parse_args()
    try:
        layouts = [(int(w), int(p)) for w, p in (item.split("x") for item in args.layouts.split(","))]
    except ValueError:
        parser.error(f"--layouts: {args.layouts!r} is not WORKERSxPARTITIONS[,...] (e.g. 1x8,2x8)")
    if any(w < 1 or p < w for w, p in layouts):
        parser.error("--layouts: every layout needs at least one worker and a partition per worker")
    users = max(500, args.events // 45)
    console.print(f"generating {args.events} events for {users} simulated users…")
    stream = interleaved_stream(generate_users(users, seed=42), 1_795_000_000_000, seed=42)
    events = [e for _, e in zip(range(args.events), stream, strict=False)]
    runs: dict[tuple[int, int], list[dict[str, float]]] = {layout: [] for layout in layouts}
    with EmbeddedBroker() as broker, EmbeddedRedis() as redis_server:
        for i in range(args.repeat):
            for workers, partitions in layouts:
                result = run_layout(broker.bootstrap, redis_server.url, workers, partitions, events)
                runs[(workers, partitions)].append(result)
                console.print(
                    f"[{i + 1}/{args.repeat}] {workers}x{partitions}: {result['rate']:.0f} events/s, "
                    f"{result['cpu_ms_per_1k']:.0f} ms CPU per 1k events (workers), "
                    f"{result['redis_cpu_ms_per_1k']:.0f} (Redis)"
                )
    one = statistics.median(r["rate"] for r in runs[layouts[0]]) / layouts[0][0]
    rows = []
    for (workers, partitions), results in runs.items():
        rate = statistics.median(r["rate"] for r in results)
        cpu = statistics.median(r["cpu_ms_per_1k"] for r in results)
        rcpu = statistics.median(r["redis_cpu_ms_per_1k"] for r in results)
        mid = sorted(results, key=lambda r: r["rate"])[len(results) // 2]
        phases = " · ".join(f"{mid[f'phase_{p}_s']:.1f}" for p in PHASES)
        each = " · ".join(f"{r['rate']:.0f}" for r in results)
        rows.append(
            f"| {workers} x {partitions} | **{rate:.0f}** ({each}) | {rate / (workers * one):.0%} | "
            f"{cpu:.0f} ms | {rcpu:.0f} ms | {mid['busy_s']:.1f} s: {phases} |"
        )
    table = "\n".join(rows)
    text = f"""{SECTION}

Run: `python bench/scaleout.py --events {len(events)} --layouts {args.layouts} --repeat {args.repeat}` on \
{time.strftime("%Y-%m-%d")}.
Machine: {machine()}.

| workers x partitions | events/s, median (runs) | vs N x one worker | worker CPU per 1k events | \
Redis CPU per 1k events | time in batches, summed: process · publish · segments · deadlines |
|---|---|---|---|---|---|
{table}

Method. Layouts alternated {args.repeat} times on one embedded broker and one private
Redis; each run a fresh topic, group and key prefix. All workers of a run are joined and
own their partitions before the backlog ({len(events)} events of {users} users) is
produced, so no rebalance falls inside the measurement; the span runs from the first
produce to the last batch of any worker. CPU is user + system of all worker processes
(`/proc`) and Redis' `used_cpu_user + used_cpu_sys` over the span.
"""
    write_section(SECTION, text)
    console.print(text)


if __name__ == "__main__":
    main()
