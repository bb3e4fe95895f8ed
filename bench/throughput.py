"""Issue 2 benchmark: full worker vs a bare Faust agent, memory per profile, latency at half rate.

Run: python bench/throughput.py [--events N] [--quick] [--repeat R] [--profile] [--no-write]
     python bench/throughput.py --latency-at RATE [--broker embedded|kafka]   (the latency run alone)
Everything runs in one go on an embedded Tansu broker and a private redis-server: the bare
agent and the worker alternate R times (default 3) on the same events and their medians are
compared, with CPU per event of each and of Redis; ``--profile`` samples the first worker
run with py-spy. The results replace the "Foundation" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flame
import orjson
import redis
from common import cpu_seconds, machine, redis_cpu_seconds, write_section
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from stream_app.contract import iso_ms
from stream_app.demo.services import EngineProcess, worker_ready
from stream_app.embedded import ApacheKafka, EmbeddedBroker, EmbeddedRedis
from stream_app.observe import histogram_quantile, scrape, total
from stream_app.store.docpack import decode_doc
from stream_app.synthetic import generate_users, interleaved_stream, record_key

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Foundation: worker throughput, latency, memory"
PARTITIONS = 8
LATENCY = "onboarding_event_to_profile_latency_seconds"
WARMUP_S = 5.0  # the latency run's first seconds, reported apart (a worker's start)
SLOW_S = 0.3  # a latency bucket bound: events slower than this are "slow" in the latency timeline
GC = "onboarding_gc_pause_seconds"
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
    log = Path(os.environ.get("BENCH_WORKER_LOG") or os.devnull)  # keep the worker's log to diagnose
    worker = EngineProcess("worker", env, log, "WEB_PORT", worker_ready).start()
    worker.wait_ready(120)
    assert worker.proc is not None
    return worker.proc, worker.url


def processed(metrics: dict[str, Any]) -> float:
    return total(metrics, "onboarding_events_consumed_total")


def run_worker(env: dict[str, str], n: int, profile: Path | None = None) -> dict[str, float]:
    """One worker from the start of the topic to its ``n``-th event. Progress is scraped every
    0.25 s until the first batch, then every second (a scrape costs the worker CPU: at 4 Hz
    ~5 % of it); the run ends at the worker's own ``onboarding_last_batch_timestamp_seconds``."""
    proc, url = start_worker(env)
    sampler = flame.record(proc.pid, profile) if profile is not None else None
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
            if first is None and done > 0:
                first = (time.time(), done)
                cpu0, redis0 = cpu_seconds(proc.pid), redis_cpu_seconds(env["REDIS_URL"])
            progress.update(task, completed=done)
            if done >= n:
                cpu1, redis1 = cpu_seconds(proc.pid), redis_cpu_seconds(env["REDIS_URL"])
                break
            time.sleep(0.25 if first is None else 1.0)
    if sampler is not None:
        flame.stop(sampler)
    proc.terminate()
    proc.wait(20)
    assert first is not None
    elapsed = total(m, "onboarding_last_batch_timestamp_seconds") - first[0]
    return {
        "events": n - first[1],
        "seconds": elapsed,
        "cpu_s": cpu1 - cpu0,
        "redis_cpu_s": redis1 - redis0,
        "rate": (n - first[1]) / elapsed,
        "batch_p50_s": histogram_quantile(m, "onboarding_batch_processing_seconds", 0.5) or 0.0,
        "batch_size_p50": histogram_quantile(m, "onboarding_batch_size_events", 0.5) or 0.0,
        "batches": total(m, "onboarding_batch_size_events_count"),
        "busy_s": total(m, "onboarding_batch_processing_seconds_sum"),
        "redis_load_p50_s": histogram_quantile(m, "onboarding_redis_seconds", 0.5) or 0.0,
        "outputs": sum(
            total(m, name)
            for name in (
                "onboarding_segment_changes_total",
                "onboarding_triggers_emitted_total",
                "onboarding_dead_letters_published_total",
            )
        ),
        **{
            f"phase_{phase}_s": total(m, "onboarding_batch_phase_seconds_sum", phase=phase)
            for phase in ("process", "publish", "segments_and_samples", "deadlines")
        },
        **{
            f"redis_{labels['operation']}_s": value
            for labels, value in m.get("onboarding_redis_seconds_sum", [])
        },
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
            seen_key = key.replace(f"{prefix}:p:".encode(), f"{prefix}:dd:".encode())
            seen_bytes.append(int(client.memory_usage(seen_key) or 0))
    return {
        "used_memory": used,
        "profiles": profiles,
        "tombstones": tombstones,
        "profile_key_bytes": sum(doc_bytes) / max(1, len(doc_bytes)),
        "seen_key_bytes": sum(seen_bytes) / max(1, len(seen_bytes)),
    }


#: how the latency run's users arrive, in event time (the live stream is in event-time order):
#: ``burst`` over 10 minutes, so every user's signup and identify land in the run's first ~9 s
#: (~110 identifies/s, 13 % of the events then) and the rest is their later sessions; ``steady``
#: over 30 days, so signups, onboarding and returning users mix through the run (~20
#: identifies/s, ~2 %), the way a deployment's traffic looks at half its rate
ARRIVALS = {"burst": 600.0, "steady": 30 * 86_400.0}


def produce_live(
    bootstrap: str,
    topic: str,
    rate: float,
    seconds: float,
    arrivals: str,
    each_second: Callable[[float], None] | None = None,
) -> int:
    """Events at ``rate`` for ``seconds``, each stamped with its send time; how many were sent."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    needed = int(rate * seconds) + 100
    users = generate_users(needed // 40 + 50, seed=int(time.time()))
    shaped = interleaved_stream(users, 0, seed=99, arrival_spread_s=ARRIVALS[arrivals])
    stream = iter([e for _, e in zip(range(needed), shaped, strict=False)])
    sent, t0, ticked = 0, time.perf_counter(), 0.0
    with Progress(
        TextColumn(f"live load at {rate:.0f} events/s"), BarColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("lat", total=seconds)
        while (elapsed := time.perf_counter() - t0) < seconds:
            if each_second is not None and elapsed - ticked >= 1.0:
                ticked = elapsed
                each_second(elapsed)
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
    return sent


def bare_live(bootstrap: str, rate: float, seconds: float, arrivals: str) -> dict[str, float]:
    """The baseline under the same live load: a bare Faust agent (bench/bare_agent.py, the
    worker's fetch and batch settings) on a fresh topic; its CPU from its first batch on."""
    topic = f"bare-{uuid.uuid4().hex[:6]}"
    make_topic(bootstrap, topic)
    result: dict[str, Any] = {}

    def agent() -> None:
        result.update(run_bare(bootstrap, topic, int(rate * seconds * 0.95)))

    thread = threading.Thread(target=agent, daemon=True)
    thread.start()
    time.sleep(8)  # its group join (~5 s), as the worker's start is waited for
    produce_live(bootstrap, topic, rate, seconds, arrivals)
    thread.join(120)
    if not result:
        raise RuntimeError("the bare agent did not read the live load")
    return {"cpu_us_per_event": result["cpu_s"] / result["events"] * 1e6, "events": result["events"]}


def latency_at(
    bootstrap: str,
    env: dict[str, str],
    rate: float,
    seconds: float,
    arrivals: str = "burst",
    idle_s: float = 0.0,
) -> dict[str, Any]:
    """``idle_s``: first measure the fresh worker's CPU while no event comes (its polling,
    timers and fetches of an empty topic), as a share of one core."""
    topic = f"lat-{uuid.uuid4().hex[:6]}"
    make_topic(bootstrap, topic)
    env = {**env, "TOPIC_EVENTS": topic, "APP_ID": f"lat-{uuid.uuid4().hex[:6]}", "REDIS_KEY_PREFIX": "lat"}
    proc, url = start_worker(env)
    idle_share = None
    if idle_s:
        time.sleep(5)  # past the group join
        idle_before = cpu_seconds(proc.pid)
        time.sleep(idle_s)
        idle_share = (cpu_seconds(proc.pid) - idle_before) / idle_s
    base = scrape(url + "/metrics")
    cpu_before, redis_before = cpu_seconds(proc.pid), redis_cpu_seconds(env["REDIS_URL"])
    timeline = [(0.0, base)]  # the worker's metrics once a second: when the slow events came

    def each_second(elapsed: float) -> None:
        timeline.append((elapsed, scrape(url + "/metrics")))

    t0 = time.perf_counter()
    sent = produce_live(bootstrap, topic, rate, seconds, arrivals, each_second)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and processed(scrape(url + "/metrics")) - processed(base) < sent:
        time.sleep(0.25)
    m = scrape(url + "/metrics")
    timeline.append((time.perf_counter() - t0, m))
    cpu = cpu_seconds(proc.pid) - cpu_before  # the worker's, over the live load and its drain
    redis_cpu = redis_cpu_seconds(env["REDIS_URL"]) - redis_before
    proc.terminate()
    proc.wait(20)
    slow = []  # (second of the run, events written then, of which slower than SLOW_S)
    for (_t, before), (t, after) in itertools.pairwise(timeline):
        n = total(after, LATENCY + "_count") - total(before, LATENCY + "_count")
        fast = total(after, LATENCY + "_bucket", le=str(SLOW_S)) - total(
            before, LATENCY + "_bucket", le=str(SLOW_S)
        )
        slow.append((t, n, n - fast))
    # after the warm-up: the first seconds after a worker starts are slow on Apache Kafka (the
    # group's first fetches), which is a start, not the live latency this run is about
    warm = next((snapshot for t, snapshot in timeline if t >= WARMUP_S), base)
    return {
        "warm_p50_s": histogram_quantile(m, LATENCY, 0.5, warm) or 0.0,
        "warm_p99_s": histogram_quantile(m, LATENCY, 0.99, warm) or 0.0,
        "slow_seconds": sorted(slow, key=lambda w: -w[2])[:5],
        "rate": rate,
        "sent": sent,
        "p50_s": histogram_quantile(m, LATENCY, 0.5, base) or 0.0,
        "p99_s": histogram_quantile(m, LATENCY, 0.99, base) or 0.0,
        "batch_p50_s": histogram_quantile(m, "onboarding_batch_processing_seconds", 0.5, base) or 0.0,
        "batch_p99_s": histogram_quantile(m, "onboarding_batch_processing_seconds", 0.99, base) or 0.0,
        "batch_size_p50": histogram_quantile(m, "onboarding_batch_size_events", 0.5, base) or 0.0,
        # full garbage collections during the run, and the time they stopped the worker
        "gc2_count": total(m, GC + "_count", generation="2") - total(base, GC + "_count", generation="2"),
        "gc2_s": total(m, GC + "_sum", generation="2") - total(base, GC + "_sum", generation="2"),
        "cpu_us_per_event": cpu / max(1, sent) * 1e6,
        "redis_cpu_us_per_event": redis_cpu / max(1, sent) * 1e6,
        # the target's own terms: the share of events (after the warm-up) written within 100 ms
        "warm_within_100ms": within(m, warm, 0.1),
        "idle_cpu_share": idle_share,
    }


def within(m: Any, base: Any, bound: float) -> float:
    """Share of the latency histogram's increase since ``base`` at or below ``bound`` (a bucket)."""
    n = total(m, LATENCY + "_count") - total(base, LATENCY + "_count")
    fast = total(m, LATENCY + "_bucket", le=str(bound)) - total(base, LATENCY + "_bucket", le=str(bound))
    return fast / n if n else 0.0


def bench_env(bootstrap: str, redis_url: str, topic: str | None = None) -> dict[str, str]:
    """A worker's environment on this broker and Redis (the caller's KAFKA_/REDIS_/TOPIC_
    settings dropped), the deployment's topics created (``topic``: the events topic)."""
    from stream_app.settings import Settings
    from stream_app.topics import apply_topics

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "REDIS_", "TOPIC_"))}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        REDIS_URL=redis_url,
        LOG_LEVEL="WARNING",
        PII_HASH_SALT="bench-salt",
    )
    overrides = {"kafka_bootstrap_servers": bootstrap}
    if topic is not None:
        env["TOPIC_EVENTS"] = topic
        overrides["topic_events"] = topic
    apply_topics(Settings.load(**overrides), bootstrap)
    return env


def write_results(text: str) -> None:
    write_section(SECTION, text)


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median rate (its other figures kept together with it)."""
    return sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="30k events, 15 s latency run")
    parser.add_argument(
        "--repeat", type=int, default=3, help="bare/worker pairs, alternated; medians reported (default 3)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="sample the first worker run with py-spy (flame summary)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    parser.add_argument(
        "--latency-at",
        type=float,
        metavar="RATE",
        help="only the latency run: a fresh worker under live load at RATE events/s for 30 s "
        "(15 with --quick); prints p50/p99, writes nothing",
    )
    parser.add_argument(
        "--broker",
        choices=("embedded", "kafka"),
        default="embedded",
        help="with --latency-at: the embedded broker (Tansu) or Apache Kafka (Java 17, fetched once)",
    )
    parser.add_argument(
        "--arrivals",
        choices=tuple(ARRIVALS),
        default="burst",
        help="with --latency-at: burst (default; every user's signup in the first ~9 s, as the "
        "full run measures) or steady (signups spread through the run, ~2 %% of the events)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="with --latency-at: then a bare Faust agent under the same live load (its CPU per event)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --latency-at: first measure the fresh worker's CPU for this long with no events",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with --latency-at: a worker setting for the run (repeatable), e.g. KAFKA_FETCH_MAX_WAIT_MS=10",
    )
    args = parser.parse_args()
    if any("=" not in item for item in args.set):
        parser.error("--set takes NAME=VALUE, e.g. --set CLUSTER_SWEEP_RATE=100")
    overrides = dict(item.split("=", 1) for item in args.set)
    if args.latency_at:
        with contextlib.ExitStack() as stack:
            if args.broker == "kafka":
                kafka = ApacheKafka().start()
                stack.callback(kafka.close)
                bootstrap = kafka.bootstrap
            else:
                bootstrap = stack.enter_context(EmbeddedBroker()).bootstrap
            redis_server = stack.enter_context(EmbeddedRedis())
            env = {**bench_env(bootstrap, redis_server.url), **overrides}
            seconds = 15 if args.quick else 30
            lat = latency_at(bootstrap, env, args.latency_at, seconds, args.arrivals, args.idle)
            bare = bare_live(bootstrap, args.latency_at, seconds, args.arrivals) if args.baseline else None
        console.print(
            f"latency on {args.broker} {' '.join(args.set)}, {args.arrivals} arrivals, "
            f"at {lat['rate']:.0f} events/s ({lat['sent']:.0f} sent): "
            f"p50 {lat['p50_s'] * 1000:.0f} ms, p99 {lat['p99_s'] * 1000:.0f} ms "
            f"(after the first {WARMUP_S:.0f} s: p50 {lat['warm_p50_s'] * 1000:.0f} ms, "
            f"p99 {lat['warm_p99_s'] * 1000:.0f} ms); batches: "
            f"{lat['batch_size_p50']:.0f} events (p50), processing p50 {lat['batch_p50_s'] * 1000:.0f} ms, "
            f"p99 {lat['batch_p99_s'] * 1000:.0f} ms; full GCs {lat['gc2_count']:.0f}, "
            f"{lat['gc2_s'] * 1000:.0f} ms in all; CPU per event: worker {lat['cpu_us_per_event']:.0f} µs, "
            f"Redis {lat['redis_cpu_us_per_event']:.0f} µs; after the first {WARMUP_S:.0f} s, "
            f"{lat['warm_within_100ms']:.1%} of events were written within 100 ms"
        )
        if bare is not None:
            console.print(
                f"baseline: a bare Faust agent under the same load: {bare['cpu_us_per_event']:.0f} µs of CPU "
                f"per event ({bare['events']:.0f} events)"
            )
        if lat["idle_cpu_share"] is not None:
            console.print(f"idle before the load: worker CPU {lat['idle_cpu_share']:.1%} of a core")
        console.print(
            f"seconds with the most events slower than {SLOW_S * 1000:.0f} ms "
            "(second of the run: slow/written): "
            + ", ".join(f"{t:.0f} s: {k:.0f}/{n:.0f}" for t, n, k in lat["slow_seconds"])
        )
        return
    if args.profile and not flame.available():
        parser.error("--profile needs py-spy (pip install py-spy)")
    n = 30_000 if args.quick else args.events
    users = max(500, n // 45)
    console.print(f"generating {n} events for {users} simulated users…")
    stream = interleaved_stream(generate_users(users, seed=42), 1_795_000_000_000, seed=42)
    events = [e for _, e in zip(range(n), stream, strict=False)]
    n = len(events)
    profile_path = Path(f"/tmp/stream-app-bench/worker-{os.getpid()}.flame") if args.profile else None
    if profile_path is not None:
        profile_path.parent.mkdir(parents=True, exist_ok=True)
    bares: list[dict[str, float]] = []
    fulls: list[dict[str, float]] = []
    with EmbeddedBroker() as broker, EmbeddedRedis() as redis_server:
        topic = "bench.events"
        make_topic(broker.bootstrap, topic)
        produce_s = pre_produce(broker.bootstrap, topic, events)
        console.print(f"pre-produced {n} events in {produce_s:.1f} s")
        base_env = bench_env(broker.bootstrap, redis_server.url, topic)
        mem: dict[str, float] = {}
        before = 0.0
        for i in range(args.repeat):
            bares.append(run_bare(broker.bootstrap, topic, n))
            console.print(f"[{i + 1}/{args.repeat}] bare Faust agent: {bares[-1]['rate']:.0f} events/s")
            # a fresh group and key prefix: each worker run starts from empty profiles
            env = {**base_env, "APP_ID": f"bench-{uuid.uuid4().hex[:6]}", "REDIS_KEY_PREFIX": f"bench{i}"}
            if i == 0:
                before = float(redis.Redis.from_url(redis_server.url).info("memory")["used_memory"])
            fulls.append(run_worker(env, n, profile_path if i == 0 else None))
            console.print(f"[{i + 1}/{args.repeat}] full worker: {fulls[-1]['rate']:.0f} events/s")
            if i == 0:
                mem = memory(redis_server.url, "bench0")
        bare, full = median_run(bares), median_run(fulls)
        half = full["rate"] / 2
        lat = latency_at(broker.bootstrap, {**base_env, "APP_ID": "lat"}, half, 15 if args.quick else 30)
    per_profile = (mem["used_memory"] - before) / max(1, mem["profiles"])
    ratio = full["rate"] / bare["rate"]
    worker_runs = " · ".join(f"{f['rate']:.0f}" for f in fulls)
    ratios = " · ".join(f"{f['rate'] / b['rate']:.0%}" for b, f in zip(bares, fulls, strict=True))
    today = time.strftime("%Y-%m-%d")
    batch_row = (
        f"{full['batches']:.0f} / {full['batch_size_p50']:.0f} events / {full['batch_p50_s'] * 1000:.0f} ms"
    )
    phases = " · ".join(
        f"{phase} {full[f'phase_{phase}_s']:.1f} s"
        for phase in ("process", "publish", "segments_and_samples", "deadlines")
    )
    cpu_row = (
        f"{bare['cpu_s'] / bare['events'] * 1e6:.0f} µs / {full['cpu_s'] / full['events'] * 1e6:.0f} µs / "
        f"{full['redis_cpu_s'] / full['events'] * 1e6:.0f} µs"
    )
    repeat = f" --repeat {args.repeat}" if args.repeat != 3 else ""
    # the argument given (the stream it generates can be shorter: ``n`` is what it produced)
    command = f"python bench/throughput.py{' --quick' if args.quick else f' --events {args.events}'}{repeat}"
    text = f"""{SECTION}

Run: `{command}{" --profile" if args.profile else ""}` on {today}.
Machine: {machine()}.

| measurement | value |
|---|---|
| events (synthetic stream, {users} users, 8 partitions) | {n} |
| bare Faust agent (`take(2000)` in the worker's window, orjson decode only), median of {args.repeat} | \
**{bare["rate"]:.0f} events/s** (runs: {" · ".join(f"{b['rate']:.0f}" for b in bares)}) |
| full worker (validate, dedup, identity, profile CAS write, DLQ, segments, clusters, triggers, \
deadlines), median of {args.repeat} | **{full["rate"]:.0f} events/s** (runs: {worker_runs}) |
| full / bare (medians) | **{ratio:.0%}** (target ≥ 70%; pair by pair: {ratios}) |
| CPU per event: bare agent / worker / Redis (median runs) | {cpu_row} |
| worker batches: count / size p50 / processing time p50 | {batch_row} |
| time inside batch processing / wall time of the run | {full["busy_s"]:.1f} s / {full["seconds"]:.1f} s |
| batch phases (sums; wall time, other tasks run in their awaits) | {phases} |
| output messages (segment changes, triggers, dead letters) | {full["outputs"]:.0f} |
| Redis memory per profile (used_memory delta / profiles; first run) | **{per_profile:.0f} bytes** |
| of which: profile hash (MEMORY USAGE, mean of 200) | {mem["profile_key_bytes"]:.0f} bytes |
| of which: dedup set of applied messageIds (mean of 200) | {mem["seen_key_bytes"]:.0f} bytes |
| profiles / linked-id tombstones | {mem["profiles"]:.0f} / {mem["tombstones"]:.0f} |
| event-to-profile latency at {half:.0f} events/s (half the max), p50 | **{lat["p50_s"] * 1000:.0f} ms** |
| same, p99 | **{lat["p99_s"] * 1000:.0f} ms** |
{flame_text(profile_path)}
Method. One process each, same broker and topic: the bare agent and the worker read the
same pre-produced events from the start under fresh consumer groups, alternated
{args.repeat} times (bare, worker, bare, worker, …; every worker run on a fresh key prefix,
so each starts from empty profiles); the medians are compared. Rates run from the first
processed batch to the last (the ~5 s group join is excluded). The worker's progress is its
own `onboarding_events_consumed_total`, scraped every 0.25 s until its first batch, then
every second; the end is its `onboarding_last_batch_timestamp_seconds`. CPU per event is the
process's user + system time over the same span (all its threads; `/proc` for the worker,
`getrusage` in the bare agent) and Redis' `used_cpu_user + used_cpu_sys` (on a shared VM
it varies between runs too, by up to ~30 %). Memory is Redis `used_memory` after the first
worker run minus before, divided by the number of profiles (linked anonymous ids leave a
small tombstone each, included in the delta). Latency: a fresh worker on an empty topic,
events produced live at half the measured maximum for {15 if args.quick else 30} s with
`timestamp` = send time; p50/p99 are interpolated inside the buckets of the worker's
`{LATENCY}` histogram (increase over the run), so they are as precise as the bucket bounds
(5, 10, 25, 50, 75, 100, 150, 200, 300, 500 ms…).
"""
    if not args.no_write:
        write_results(text)
    console.print(text)


def flame_text(path: Path | None) -> str:
    if path is None or not path.exists():
        return ""
    summary = flame.summary(path)
    shares = "\n".join(f"| {role} | {share:.1%} |" for role, share in summary.area_shares().items())
    return f"""
Where the worker's CPU went (py-spy, {summary.samples} samples at 97 Hz over the first worker
run; `bench/flame.py` sorts each sample by what is on its stack; CPython 3.11's async stacks
are sometimes cut short, those land in "event loop" or "other"):

| part | share of samples |
|---|---|
{shares}

Functions most on the stack (own = at the top of it):

{summary.table(12)}
"""


if __name__ == "__main__":
    main()
