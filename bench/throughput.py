"""Issue 2 benchmark: full worker vs a bare Faust agent, memory per profile, latency at half rate.

Run: python bench/throughput.py [--events N] [--quick]
Everything runs in one go on an embedded Tansu broker and a private redis-server, and
the results replace the "Foundation" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import redis
from common import machine, write_section
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from stream_app.contract import iso_ms
from stream_app.demo.services import EngineProcess, worker_ready
from stream_app.embedded import EmbeddedBroker, EmbeddedRedis
from stream_app.observe import histogram_quantile, scrape, total
from stream_app.store.docpack import decode_doc
from stream_app.synthetic import generate_users, interleaved_stream, record_key

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Foundation: worker throughput, latency, memory"
PARTITIONS = 8
LATENCY = "onboarding_event_to_profile_latency_seconds"
console = Console()


def make_topic(bootstrap: str, name: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, PARTITIONS, 1)])[name].result(30)


def pre_produce(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> float:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000})
    t0 = time.perf_counter()
    for event in events:
        producer.produce(topic, key=record_key(event), value=orjson.dumps(event))
        producer.poll(0)
    producer.flush(60)
    return time.perf_counter() - t0


def run_bare(bootstrap: str, topic: str, n: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bare_agent.py"),
            bootstrap,
            topic,
            str(n),
            f"bare-{uuid.uuid4().hex[:6]}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    found = re.search(r'\{"events".*?\}', out.stdout + out.stderr)  # Faust routes stdout to its log
    if found is None:
        raise RuntimeError(f"bare agent failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return orjson.loads(found.group(0))  # type: ignore[no-any-return]


def start_worker(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """A `stream-app worker` that owns its partitions; its process and base URL."""
    worker = EngineProcess("worker", env, Path(os.devnull), "WEB_PORT", worker_ready).start()
    worker.wait_ready(120)
    assert worker.proc is not None
    return worker.proc, worker.url


def processed(metrics: dict[str, Any]) -> float:
    return total(metrics, "onboarding_events_consumed_total")


def run_worker(env: dict[str, str], n: int) -> dict[str, float]:
    proc, url = start_worker(env)
    first = None
    with Progress(
        TextColumn("full worker"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("worker", total=n)
        while True:
            m = scrape(url + "/metrics")
            done = processed(m)
            now = time.perf_counter()
            if first is None and done > 0:
                first = (now, done)
            progress.update(task, completed=done)
            if done >= n:
                break
            time.sleep(0.25)
    proc.terminate()
    proc.wait(20)
    assert first is not None
    elapsed = now - first[0]
    return {
        "events": n - first[1],
        "seconds": elapsed,
        "rate": (n - first[1]) / elapsed,
        "batch_p50_s": histogram_quantile(m, "onboarding_batch_processing_seconds", 0.5) or 0.0,
        "batch_size_p50": histogram_quantile(m, "onboarding_batch_size_events", 0.5) or 0.0,
        "batches": total(m, "onboarding_batch_size_events_count"),
        "busy_s": total(m, "onboarding_batch_processing_seconds_sum"),
        "redis_load_p50_s": histogram_quantile(m, "onboarding_redis_seconds", 0.5) or 0.0,
    }


def memory(redis_url: str, prefix: str) -> dict[str, float]:
    client = redis.Redis.from_url(redis_url)
    used = float(client.info("memory")["used_memory"])
    profiles = tombstones = 0
    doc_bytes: list[int] = []
    seen_bytes: list[int] = []
    for key in client.scan_iter(f"{prefix}:p:*", count=2000):
        raw = client.hget(key, "d") or b""
        if "merged_into" in decode_doc(raw or b"{}"):
            tombstones += 1
            continue
        profiles += 1
        if len(doc_bytes) < 200:
            doc_bytes.append(int(client.memory_usage(key) or 0))
            seen_key = key.replace(f"{prefix}:p:".encode(), f"{prefix}:sd:".encode())
            seen_bytes.append(int(client.memory_usage(seen_key) or 0))
    return {
        "used_memory": used,
        "profiles": profiles,
        "tombstones": tombstones,
        "profile_key_bytes": sum(doc_bytes) / max(1, len(doc_bytes)),
        "seen_key_bytes": sum(seen_bytes) / max(1, len(seen_bytes)),
    }


def latency_at(bootstrap: str, env: dict[str, str], rate: float, seconds: float) -> dict[str, float]:
    topic = f"lat-{uuid.uuid4().hex[:6]}"
    make_topic(bootstrap, topic)
    env = {**env, "TOPIC_EVENTS": topic, "APP_ID": f"lat-{uuid.uuid4().hex[:6]}", "REDIS_KEY_PREFIX": "lat"}
    proc, url = start_worker(env)
    base = scrape(url + "/metrics")
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    needed = int(rate * seconds) + 100
    users = generate_users(needed // 40 + 50, seed=int(time.time()))
    stream = iter([e for _, e in zip(range(needed), interleaved_stream(users, 0, seed=99), strict=False)])
    sent, t0 = 0, time.perf_counter()
    with Progress(
        TextColumn(f"live load at {rate:.0f} events/s"), BarColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("lat", total=seconds)
        while (elapsed := time.perf_counter() - t0) < seconds:
            due = int(elapsed * rate)
            while sent < due:
                event = next(stream)
                event["timestamp"] = iso_ms(int(time.time() * 1000))
                producer.produce(topic, key=record_key(event), value=orjson.dumps(event))
                sent += 1
            producer.poll(0)
            progress.update(task, completed=elapsed)
            time.sleep(0.002)
    producer.flush(30)
    if sent < rate * seconds * 0.95:
        raise RuntimeError(f"the load generator fell behind: sent {sent} of {rate * seconds:.0f}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and processed(scrape(url + "/metrics")) - processed(base) < sent:
        time.sleep(0.25)
    m = scrape(url + "/metrics")
    proc.terminate()
    proc.wait(20)
    return {
        "rate": rate,
        "sent": sent,
        "p50_s": histogram_quantile(m, LATENCY, 0.5, base) or 0.0,
        "p99_s": histogram_quantile(m, LATENCY, 0.99, base) or 0.0,
    }


def write_results(text: str) -> None:
    write_section(SECTION, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="30k events, 15 s latency run")
    args = parser.parse_args()
    n = 30_000 if args.quick else args.events
    users = max(500, n // 45)
    console.print(f"generating {n} events for {users} simulated users…")
    stream = interleaved_stream(generate_users(users, seed=42), 1_795_000_000_000, seed=42)
    events = [e for _, e in zip(range(n), stream, strict=False)]
    n = len(events)
    with EmbeddedBroker() as broker, EmbeddedRedis() as redis_server:
        topic = "bench.events"
        make_topic(broker.bootstrap, topic)
        produce_s = pre_produce(broker.bootstrap, topic, events)
        console.print(f"pre-produced {n} events in {produce_s:.1f} s")
        bare = run_bare(broker.bootstrap, topic, n)
        console.print(f"bare Faust agent: {bare['rate']:.0f} events/s")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "REDIS_", "TOPIC_"))}
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
            REDIS_URL=redis_server.url,
            TOPIC_EVENTS=topic,
            APP_ID=f"bench-{uuid.uuid4().hex[:6]}",
            LOG_LEVEL="WARNING",
            REDIS_KEY_PREFIX="bench",
            PII_HASH_SALT="bench-salt",
        )
        from stream_app.settings import Settings
        from stream_app.topics import apply_topics

        apply_topics(
            Settings.load(kafka_bootstrap_servers=broker.bootstrap, topic_events=topic), broker.bootstrap
        )
        before = float(redis.Redis.from_url(redis_server.url).info("memory")["used_memory"])
        full = run_worker(env, n)
        console.print(f"full worker: {full['rate']:.0f} events/s")
        mem = memory(redis_server.url, "bench")
        half = full["rate"] / 2
        lat = latency_at(broker.bootstrap, env, half, 15 if args.quick else 30)
    per_profile = (mem["used_memory"] - before) / max(1, mem["profiles"])
    ratio = full["rate"] / bare["rate"]
    today = time.strftime("%Y-%m-%d")
    batch_row = (
        f"{full['batches']:.0f} / {full['batch_size_p50']:.0f} events / {full['batch_p50_s'] * 1000:.0f} ms"
    )
    text = f"""{SECTION}

Run: `python bench/throughput.py{" --quick" if args.quick else f" --events {n}"}` on {today}.
Machine: {machine()}.

| measurement | value |
|---|---|
| events (synthetic stream, {users} users, 8 partitions) | {n} |
| bare Faust agent (`take(2000, within=0.05)`, orjson decode only) | **{bare["rate"]:.0f} events/s** |
| full worker (validate, dedup, identity, profile CAS write, DLQ, segments, clusters, triggers, \
deadlines) | **{full["rate"]:.0f} events/s** |
| full / bare | **{ratio:.0%}** (target ≥ 70%) |
| worker batches: count / size p50 / processing time p50 | {batch_row} |
| time inside batch processing / wall time of the run | {full["busy_s"]:.1f} s / {full["seconds"]:.1f} s |
| Redis memory per profile (used_memory delta / profiles) | **{per_profile:.0f} bytes** |
| of which: profile hash (MEMORY USAGE, mean of 200) | {mem["profile_key_bytes"]:.0f} bytes |
| of which: dedup set of applied messageIds (mean of 200) | {mem["seen_key_bytes"]:.0f} bytes |
| profiles / linked-id tombstones | {mem["profiles"]:.0f} / {mem["tombstones"]:.0f} |
| event-to-profile latency at {half:.0f} events/s (half the max), p50 | **{lat["p50_s"] * 1000:.0f} ms** |
| same, p99 | **{lat["p99_s"] * 1000:.0f} ms** |

Method. One process each, same broker and topic: the bare agent and the worker read the
same pre-produced events from the start under fresh consumer groups; rates run from the
first processed batch to the last event (the ~5 s group join is excluded). The worker's
progress is its own `onboarding_events_consumed_total`, scraped every 0.25 s. Memory is
Redis `used_memory` after the run minus before, divided by the number of profiles
(linked anonymous ids leave a small tombstone each, included in the delta). Latency:
a fresh worker on an empty topic, events produced live at half the measured maximum
for {15 if args.quick else 30} s with `timestamp` = send time; p50/p99 are interpolated
inside the buckets of the worker's `{LATENCY}` histogram (increase over the run), so
they are as precise as the bucket bounds (5, 10, 25, 50, 75, 100, 150, 200, 300, 500 ms…).
"""
    write_results(text)
    console.print(text)


if __name__ == "__main__":
    main()
