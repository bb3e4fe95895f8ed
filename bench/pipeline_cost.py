"""Issue 12: where a worker's CPU per event goes, without Kafka in the way.

Run: python bench/pipeline_cost.py [--events N] [--rounds R]

The worker's own batch runner (:class:`stream_app.worker.runtime.Runtime`: validation,
dedup, identity links, profile CAS writes, segments, clusters, triggers, deadlines,
outputs to in-memory sinks) is driven in this process over the throughput benchmark's
synthetic events, in batches like the worker's, two ways:

* stores in memory — the engine's Python work alone;
* stores on a private redis-server — plus the Redis client (packing commands, Lua calls,
  replies) and deflating documents;

each at the batch size a worker reaches on a backlog today (~110 events) and at the
largest (BATCH_MAX_EVENTS, 2000). Ways alternate within each round; medians of the rounds.
Set next to the bare Faust agent's CPU per event (`bench/throughput.py`), this splits the
full worker's cost into Faust's intake, our pipeline and the Redis client. The section
"Pipeline cost" of bench/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import orjson
from common import machine, own_cpu_seconds, write_section
from rich.console import Console

from stream_app.embedded import EmbeddedRedis
from stream_app.pipeline import Record
from stream_app.synthetic import generate_users, interleaved_stream, record_key

SECTION = "## Pipeline cost: CPU per event without Kafka (issue 12)"
console = Console()


async def one_run(events: int, batch: int, redis_url: str | None) -> float:
    """CPU µs per event of the batch runner over ``events`` events (a fresh key prefix)."""
    from stream_app.settings import Settings
    from stream_app.worker.publisher import Sinks
    from stream_app.worker.runtime import Runtime, Stores

    settings = Settings.load(
        kafka_bootstrap_servers="unused:9092",
        redis_url=redis_url or "redis://unused",
        pii_hash_salt="bench-salt",
        redis_key_prefix=f"pc{time.time_ns()}",
    )
    runtime = Runtime(settings, Sinks.in_memory(), Stores(settings, in_memory=redis_url is None))
    if redis_url:
        await runtime.wait_for_store()
    users = generate_users(max(500, events // 45), seed=42)
    stream = interleaved_stream(users, 1_795_000_000_000, seed=42)
    values = [e for _, e in zip(range(events), stream, strict=False)]
    records = [
        Record(orjson.dumps(e), record_key(e), "events", hash(record_key(e)) % 8, i, None)
        for i, e in enumerate(values)
    ]
    c0 = own_cpu_seconds()
    for start in range(0, len(records), batch):
        await runtime.batches.handle(records[start : start + batch])
    spent = own_cpu_seconds() - c0
    await runtime.close()
    return spent / len(records) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", nargs=3, metavar=("EVENTS", "BATCH", "REDIS_URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child run: a fresh interpreter per measurement (no warm caches between ways)
        events, batch, url = int(args.one[0]), int(args.one[1]), args.one[2]
        print(asyncio.run(one_run(events, batch, None if url == "-" else url)))
        return
    ways = [("memory", 110), ("memory", 2000), ("redis", 110), ("redis", 2000)]
    results: dict[tuple[str, int], list[float]] = {way: [] for way in ways}
    with EmbeddedRedis() as redis_server:
        for i in range(args.rounds):
            for store, batch in ways:
                url = redis_server.url if store == "redis" else "-"
                done = subprocess.run(
                    [sys.executable, __file__, "--one", str(args.events), str(batch), url],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "LOG_LEVEL": "WARNING"},
                    timeout=1200,
                )
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-2000:])
                value = float(done.stdout.strip().splitlines()[-1])
                results[(store, batch)].append(value)
                console.print(f"[{i + 1}/{args.rounds}] {store}, batches of {batch}: {value:.0f} µs/event")
    med = {way: statistics.median(v) for way, v in results.items()}
    rows = "\n".join(
        f"| {store} | {batch} | **{med[(store, batch)]:.0f} µs** "
        f"({' · '.join(f'{v:.0f}' for v in results[(store, batch)])}) |"
        for store, batch in ways
    )
    text = f"""{SECTION}

Run: `python bench/pipeline_cost.py --events {args.events} --rounds {args.rounds}` on \
{time.strftime("%Y-%m-%d")}.
Machine: {machine()}.

| stores | events per batch | CPU per event, median (runs) |
|---|---|---|
{rows}

The worker's batch runner in this process (no Kafka: records in, outputs to in-memory
sinks), a fresh interpreter and key prefix per run, ways alternated in each round. The
Redis rows add the client's work (commands packed, Lua calls, replies read; documents
deflated and digests computed) and Redis' replies' latency is not CPU. Read with the bare
Faust agent's CPU per event in "Foundation" above: a full worker's CPU per event is
roughly Faust's intake (the bare agent) + the Redis row at the worker's batch size + the
output messages, timers and metrics.
"""
    write_section(SECTION, text)
    console.print(text)


if __name__ == "__main__":
    main()
