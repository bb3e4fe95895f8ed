"""Personalization as delivered: next-feature hit rate at 3, and the decision endpoint's latency.

Run: python bench/recommend.py [--train-users N] [--test-users N] [--rate R] [--seconds S]

Real processes on the embedded broker and a private Redis: one `stream-app worker` and one
`stream-app collector`, default settings but the training intervals.

* **Quality.** A training population (synthetic users whose archetypes adopt features along
  two typical orders each, ``stream_app.synthetic.FEATURE_PATHS``) goes through the engine
  as a backlog. Then a held-out population: each user's history up to a random point of
  their adoption order (at least one feature adopted, at least one still to come). Once the
  worker has applied everything and retrained, the collector is asked
  ``GET /v1/personalization`` for every held-out user: a hit when the feature the user
  actually adopts next is among the 3 recommendations. The baselines use the same stored
  state and the same served model: the features most adopted by all users, and the ones
  most adopted in the user's (stored) cluster, both without what the user already uses.
* **Latency.** An open-loop load of R requests/s for S seconds (one request every 1/R s,
  latency measured from when it was due, so a stall is not hidden) over the held-out users,
  the collector pinned to one core; once with the per-user answer cache and once without.

Results replace the section in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis
from common import deploy, isolated_env, machine, write_section
from confluent_kafka import Producer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from stream_app.contract import parse_timestamp
from stream_app.demo.services import EngineProcess, collector_ready, worker_ready
from stream_app.embedded import EmbeddedBroker, EmbeddedRedis
from stream_app.observe import scrape, total
from stream_app.personalization.recommend import RecoModel, adoption, popular_baseline
from stream_app.store.docpack import decode_doc
from stream_app.store.keys import Keys
from stream_app.synthetic import adopted_features, generate_users, interleaved_stream, record_key, user_events

SECTION = "## Personalization as delivered: next-feature recommendations and the decision endpoint"
console = Console()
KEY = "wk-bench"
TIME_SCALE = 0.1  # journeys of days compressed to hours: every event lies in the past


@dataclass
class HeldOut:
    user_id: str
    archetype: str
    events: list[dict[str, Any]]  # the history up to the cut
    target: str  # the feature adopted next


def held_out(users: int, seed: int) -> list[HeldOut]:
    rng = random.Random(seed)
    out = []
    for user in generate_users(users, seed):
        events = user_events(user, 0, time_scale=TIME_SCALE)
        order = adopted_features(events)
        if len(order) < 2:
            continue
        cut = rng.randint(1, len(order) - 1)
        first_use = next(
            i
            for i, e in enumerate(events)
            if e.get("event") == "Feature Used" and e["properties"]["feature"] == order[cut]
        )
        out.append(HeldOut(user.user_id, user.archetype, events[:first_use], order[cut]))
    return out


def produce(broker: str, topic: str, events: list[dict[str, Any]]) -> None:
    producer = Producer({"bootstrap.servers": broker, "linger.ms": 20})
    for event in events:
        stamp = parse_timestamp(event["timestamp"])
        producer.produce(topic, key=record_key(event), value=orjson.dumps(event), timestamp=stamp)
        producer.poll(0)
    producer.flush(60)


def shift(events: list[dict[str, Any]], offset_ms: int) -> list[dict[str, Any]]:
    """The same events ``offset_ms`` later (held-out histories were generated from time 0)."""
    from stream_app.contract import iso_ms

    return [dict(e, timestamp=iso_ms(parse_timestamp(e["timestamp"]) + offset_ms)) for e in events]


def wait_applied(url: str, n: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("worker applying", total=n)
        while time.monotonic() < deadline:
            done = total(scrape(url + "/metrics"), "onboarding_events_consumed_total")  # applied or not
            progress.update(task, completed=done)
            if done >= n:
                return
            time.sleep(0.5)
    raise SystemExit(f"the worker applied fewer than {n} events in {timeout} s")


async def ask_all(url: str, users: list[str]) -> dict[str, Any]:
    auth = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(headers=auth) as session:
        for uid in users:
            async with session.get(f"{url}/v1/personalization", params={"userId": uid}) as resp:
                assert resp.status == 200, await resp.text()
                out[uid] = await resp.json()
    return out


async def open_loop(url: str, users: list[str], rate: float, seconds: float) -> list[float]:
    """Latencies (s) of requests due every 1/rate s, measured from when each was due."""
    auth = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
    connector = aiohttp.TCPConnector(limit=200)
    latencies: list[float] = []
    errors = 0
    rng = random.Random(5)

    async def one(due: float, uid: str) -> None:
        nonlocal errors
        async with session.get(f"{url}/v1/personalization", params={"userId": uid}) as resp:
            await resp.read()
            if resp.status != 200:
                errors += 1
        latencies.append(time.perf_counter() - due)

    async with aiohttp.ClientSession(headers=auth, connector=connector) as session:
        start = time.perf_counter() + 0.5
        tasks = set()
        for i in range(int(rate * seconds)):  # each request started when it is due, not before
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            task = asyncio.create_task(one(due, rng.choice(users)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    if errors:
        raise SystemExit(f"{errors} requests failed")
    return latencies


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start(kind: str, env: dict[str, str]) -> EngineProcess:
    ready = worker_ready if kind == "worker" else collector_ready
    port = "WEB_PORT" if kind == "worker" else "COLLECTOR_PORT"
    proc = EngineProcess(kind, env, Path(os.devnull), port, ready).start()
    proc.wait_ready(120)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--train-users", type=int, default=3000)
    parser.add_argument("--test-users", type=int, default=1000)
    parser.add_argument(
        "--rate", type=float, default=1000, help="decision requests per second (default 1000)"
    )
    parser.add_argument("--seconds", type=float, default=20, help="length of each latency run (default 20)")
    args = parser.parse_args()
    started = time.monotonic()
    with EmbeddedBroker() as broker, EmbeddedRedis() as private_redis:
        tag = f"rc{uuid.uuid4().hex[:6]}"
        env = isolated_env(
            broker.bootstrap,
            private_redis.url,
            tag,
            CLUSTER_TRAIN_INTERVAL_SECONDS="3",
            RECO_TRAIN_INTERVAL_SECONDS="3",
            PII_HASH_SALT="bench-salt",
            LOG_LEVEL="WARNING",
            COLLECTOR_WRITE_KEYS=f"bench={KEY}",
        )
        settings = deploy(env, broker.bootstrap)
        now = int(time.time() * 1000)
        train_users = generate_users(args.train_users, 301)
        history = list(
            interleaved_stream(
                train_users,
                now - 4 * 86_400_000,
                301,
                time_scale=TIME_SCALE,
                arrival_spread_s=86_400 / TIME_SCALE,
            )
        )
        tests = held_out(args.test_users, 302)
        test_events = [e for t in tests for e in shift(t.events, now - 2 * 86_400_000)]
        with console.status(f"producing {len(history):,} + {len(test_events):,} events…"):
            produce(broker.bootstrap, settings.topic_events, history)
            produce(broker.bootstrap, settings.topic_events, test_events)
        worker = start("worker", env)
        wait_applied(worker.url, len(history) + len(test_events))
        client = redis.Redis.from_url(private_redis.url)
        keys = Keys(tag)
        with console.status("waiting for a model trained on everything…"):
            time.sleep(2 * 3 + 2)
            base = int(client.hget(keys.model("reco", "model"), "version") or 0)
            while int(client.hget(keys.model("reco", "model"), "version") or 0) < base + 1:
                time.sleep(0.5)
        model = RecoModel.from_json(client.hget(keys.model("reco", "model"), "snapshot"))  # type: ignore[arg-type]
        worker.stop()  # the answers need Redis only; a training worker would share the cores
        collector = start("collector", env)
        # the collector alone on core 0; the load generator and Redis on core 1
        os.sched_setaffinity(collector.pid, {0})
        os.sched_setaffinity(0, {1})
        os.sched_setaffinity(private_redis.pid, {1})
        answers = asyncio.run(ask_all(collector.url, [t.user_id for t in tests]))
        hits = {"engine": 0, "cluster popular": 0, "most popular": 0}
        clustered = 0
        by_archetype: dict[str, list[int]] = {}
        for t in tests:
            doc = decode_doc(client.hget(keys.profile(t.user_id), "d"))  # type: ignore[arg-type]
            used = adoption(doc)
            cluster = ((doc.get("engine") or {}).get("cluster") or {}).get("name")
            clustered += cluster is not None
            got = [r["item"] for r in answers[t.user_id]["recommendations"]]
            hit = t.target in got[:3]
            hits["engine"] += hit
            hits["cluster popular"] += t.target in popular_baseline(model, cluster, used, 3)
            hits["most popular"] += t.target in popular_baseline(model, None, used, 3)
            by_archetype.setdefault(t.archetype, []).append(int(hit))
        n = len(tests)
        latency: dict[str, tuple[float, float, float]] = {}
        users = [t.user_id for t in tests]
        for label, cache in (("answer cache on", None), ("answer cache off", "0")):
            if cache is not None:
                collector.stop()
                collector = start("collector", dict(env, PERSONALIZATION_CACHE_SIZE=cache))
                os.sched_setaffinity(collector.pid, {0})
            asyncio.run(ask_all(collector.url, users[:50]))  # warm up connections
            with console.status(f"{args.rate:.0f} requests/s for {args.seconds:.0f} s ({label})…"):
                cpu_before = _cpu_seconds(collector.pid)
                lat = asyncio.run(open_loop(collector.url, users, args.rate, args.seconds))
                busy = (_cpu_seconds(collector.pid) - cpu_before) / args.seconds
            latency[label] = (quantile(lat, 0.5) * 1000, quantile(lat, 0.99) * 1000, busy)
        collector.stop()
    elapsed = time.monotonic() - started
    report(args, n, clustered, hits, by_archetype, latency, model, elapsed)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(
    args: argparse.Namespace,
    n: int,
    clustered: int,
    hits: dict[str, int],
    by_archetype: dict[str, list[int]],
    latency: dict[str, tuple[float, float, float]],
    model: RecoModel,
    elapsed: float,
) -> None:
    table = Table(title="next feature, hit rate at 3 (held-out users)")
    table.add_column("recommender")
    table.add_column("hit@3", justify="right")
    rows = []
    for name, count in hits.items():
        table.add_row(name, f"{count / n:.1%}")
        rows.append(f"| {name} | {count / n:.1%} |")
    console.print(table)
    engine = hits["engine"] / n
    margin = engine - max(hits["cluster popular"], hits["most popular"]) / n
    arche = ", ".join(f"{a} {sum(v) / len(v):.0%} (n={len(v)})" for a, v in sorted(by_archetype.items()))
    lat_rows = [
        f"| {label} | {p50:.1f} ms | {p99:.1f} ms | {busy:.0%} of a core |"
        for label, (p50, p99, busy) in latency.items()
    ]
    for line in lat_rows:
        console.print(line)
    text = "\n".join(
        [
            SECTION,
            "",
            f"`python bench/recommend.py --train-users {args.train_users} --test-users {args.test_users} "
            f"--rate {args.rate:.0f} --seconds {args.seconds:.0f}` "
            f"({time.strftime('%Y-%m-%d')}, {elapsed:.0f} s; "
            f"{machine()}). One worker and one collector as processes, embedded broker, private Redis; "
            "method in the script's docstring.",
            "",
            f"Next feature a held-out user actually adopts, among the 3 recommended ({n} held-out users, "
            f"{clustered} of them with a stored cluster; model v{model.version} trained on {model.users:,} "
            f"adoption orders, groups {sorted(g or 'all' for g in model.group_users)}):",
            "",
            "| recommender | hit@3 |",
            "|---|---|",
            *rows,
            "",
            f"Margin over the better baseline: **{margin:+.1%}** (points). Engine by archetype: {arche}.",
            "",
            f"Decision endpoint, {args.rate:.0f} requests/s open loop for {args.seconds:.0f} s over the "
            "held-out users, collector pinned to one core (latency from when each request was due):",
            "",
            "| run | p50 | p99 | collector CPU |",
            "|---|---|---|---|",
            *lat_rows,
        ]
    )
    write_section(SECTION, text)


if __name__ == "__main__":
    main()
