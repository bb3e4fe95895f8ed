"""Clusters as delivered by the running engine: coverage and ARI over time, restart stability.

Run: python bench/cluster_coverage.py [--users N] [--interval S]  (also part of bench/clustering.py)

Real worker processes on the embedded broker and a private Redis, default settings but
the training interval. Two ways a team adopts the engine:

* **backlog**: the topic already holds three days of onboarding history of N users
  (records stamped with the times they were produced, live, back then); the worker starts
  on it. Users are applied before any model exists.
* **cold start**: an empty topic; users arrive live (the synthetic stream compressed in
  time, as in the demo) while the engine runs.

Every half second the stored clusters are read from Redis (``engine.cluster`` of each
profile): coverage = users with a cluster / users with a profile who did not refuse
personalization; ARI against the users' archetypes over the users with a cluster. Then the
worker is restarted and the ids compared. Results replace the section in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import orjson
import redis
from common import deploy, isolated_env, machine, produce_backlog, write_section
from confluent_kafka import Producer
from rich.console import Console
from rich.table import Table
from throughput import start_worker

from evaluation.metrics import adjusted_rand_index
from stream_app.contract import iso_ms, parse_timestamp
from stream_app.embedded import EmbeddedBroker, EmbeddedRedis
from stream_app.store.docpack import decode_doc
from stream_app.synthetic import generate_users, interleaved_stream, record_key

SECTION = "## Clustering as delivered: coverage after a cold start and on a backlog"
console = Console()


@dataclass
class Sample:
    t: float  # seconds since the worker started
    version: int
    sweep_version: int
    profiles: int
    coverage: float
    ari: float


@dataclass
class Run:
    name: str
    samples: list[Sample] = field(default_factory=list)
    first_model_s: float | None = None
    kept_after_restart: float = 0.0
    meaning_kept: bool = False

    def at(self, after_model_s: float) -> Sample | None:
        """The last sample at or before ``after_model_s`` seconds after the first model."""
        if self.first_model_s is None:
            return None
        due = self.first_model_s + after_model_s
        earlier = [s for s in self.samples if s.t <= due]
        return earlier[-1] if earlier else None

    def reached(self, coverage: float, ari: float) -> float | None:
        """Seconds after the first model until coverage and ARI both held (and kept holding)."""
        if self.first_model_s is None:
            return None
        ok = None
        for s in self.samples:
            if s.version and s.coverage >= coverage and s.ari >= ari:
                ok = s.t if ok is None else ok
            else:
                ok = None
        return None if ok is None else max(0.0, ok - self.first_model_s)


def stored(client: redis.Redis, prefix: str, archetype: dict[str, str]) -> tuple[dict[str, str | None], int]:
    """Cluster id per consenting user with a profile, and the number of such profiles."""
    pipe = client.pipeline(transaction=False)
    for uid in archetype:
        pipe.hget(f"{prefix}:p:{{{uid}}}", "d")
    out: dict[str, str | None] = {}
    for uid, raw in zip(archetype, pipe.execute(), strict=True):
        if raw is None:
            continue
        doc = decode_doc(raw)
        if "merged_into" in doc or doc["consent"]["personalization"] is False:
            continue
        out[uid] = ((doc.get("engine") or {}).get("cluster") or {}).get("id")
    return out, len(out)


def observe(client: redis.Redis, prefix: str, archetype: dict[str, str], t: float) -> Sample:
    found, profiles = stored(client, prefix, archetype)
    have = {u: c for u, c in found.items() if c is not None}
    raw = client.hget(f"{prefix}:cluster-model:{{cluster-model}}", "snapshot")
    snap = orjson.loads(raw) if raw else {}
    ari = adjusted_rand_index([archetype[u] for u in have], list(have.values())) if len(have) > 1 else 0.0
    return Sample(
        t,
        int(snap.get("version", 0)),
        int(snap.get("sweep_version", 0)),
        profiles,
        len(have) / profiles if profiles else 0.0,
        ari,
    )


def env_for(broker: str, redis_url: str, tag: str, interval: float) -> dict[str, str]:
    return isolated_env(
        broker,
        redis_url,
        tag,
        CLUSTER_TRAIN_INTERVAL_SECONDS=str(interval),
        PII_HASH_SALT="bench-salt",
        LOG_LEVEL="WARNING",
    )


def restart_check(run: Run, env: dict[str, str], client: redis.Redis, archetype: dict[str, str]) -> None:
    before, _ = stored(client, env["REDIS_KEY_PREFIX"], archetype)
    proc, _url = start_worker(env)
    time.sleep(3 * float(env["CLUSTER_TRAIN_INTERVAL_SECONDS"]))
    after, _ = stored(client, env["REDIS_KEY_PREFIX"], archetype)
    proc.terminate()
    proc.wait(30)
    both = [u for u in before if before[u] is not None]
    run.kept_after_restart = sum(1 for u in both if after.get(u) == before[u]) / max(1, len(both))

    def majority(found: dict[str, str | None]) -> dict[str, str | None]:
        votes: dict[str, Counter[str | None]] = {}
        for uid, cid in found.items():
            votes.setdefault(archetype[uid], Counter())[cid] += 1
        return {a: c.most_common(1)[0][0] for a, c in votes.items()}

    run.meaning_kept = majority(before) == majority(after)


def watch(
    run: Run, client: redis.Redis, prefix: str, archetype: dict[str, str], started: float, until: float
) -> None:
    while time.monotonic() < until:
        sample = observe(client, prefix, archetype, time.monotonic() - started)
        run.samples.append(sample)
        if run.first_model_s is None and sample.version:
            run.first_model_s = sample.t
        time.sleep(0.5)


def backlog(broker: str, redis_url: str, users: int, interval: float) -> Run:
    tag = f"bl{uuid.uuid4().hex[:6]}"
    env = env_for(broker, redis_url, tag, interval)
    settings = deploy(env, broker)
    population = generate_users(users, 101)
    archetype = {u.user_id: u.archetype for u in population}
    with console.status(f"producing the history of {users} users…"):
        produce_backlog(broker, settings.topic_events, population, 101)
    client = redis.Redis.from_url(redis_url)
    run = Run("backlog")
    with console.status("worker on the backlog…"):
        started = time.monotonic()
        proc, _url = start_worker(env)
        watch(run, client, tag, archetype, started, started + 15 * interval)
        proc.terminate()
        proc.wait(30)
    with console.status("restart…"):
        restart_check(run, env, client, archetype)
    return run


def cold_start(broker: str, redis_url: str, users: int, interval: float, seconds: float) -> Run:
    tag = f"cs{uuid.uuid4().hex[:6]}"
    env = env_for(broker, redis_url, tag, interval)
    settings = deploy(env, broker)
    population = generate_users(users, 202)
    archetype = {u.user_id: u.archetype for u in population}
    # a day of arrivals compressed into the run (time_scale as in the demo), sent in real time
    scale = seconds / 86_400 / 2
    t0 = int(time.time() * 1000) + 5000
    events = list(interleaved_stream(population, t0, 202, time_scale=scale, arrival_spread_s=86_400))
    client = redis.Redis.from_url(redis_url)
    producer = Producer({"bootstrap.servers": broker, "linger.ms": 5})
    run = Run("cold start")
    proc, _url = start_worker(env)
    started = time.monotonic()
    next_look = started
    with console.status("cold start: users arriving live…"):
        for event in events:
            due = parse_timestamp(event["timestamp"]) / 1000
            while time.time() < due:
                if time.monotonic() >= next_look:
                    run.samples.append(observe(client, tag, archetype, time.monotonic() - started))
                    if run.first_model_s is None and run.samples[-1].version:
                        run.first_model_s = run.samples[-1].t
                    next_look += 0.5
                time.sleep(min(0.05, max(0.0, due - time.time())))
            event = dict(event, timestamp=iso_ms(int(time.time() * 1000)))
            producer.produce(settings.topic_events, key=record_key(event), value=orjson.dumps(event))
            producer.poll(0)
            if time.monotonic() - started > seconds:
                break
        producer.flush(30)
        watch(run, client, tag, archetype, started, time.monotonic() + 3 * interval)
    proc.terminate()
    proc.wait(30)
    with console.status("restart…"):
        restart_check(run, env, client, archetype)
    return run


def section(runs: list[Run], users: int, interval: float, cold_seconds: float) -> str:
    rows = []
    for run in runs:
        cells = []
        for k in (0, 1, 2):
            s = run.at(k * interval + 0.01)
            cells.append("-" if s is None else f"{s.coverage:.0%} / {s.ari:.2f}")
        final = run.samples[-1]
        reached = run.reached(0.95, 0.8)
        rows.append(
            f"| {run.name} | {run.first_model_s or float('nan'):.1f} s | "
            + " | ".join(cells)
            + f" | {final.coverage:.0%} / {final.ari:.2f} (v{final.version}, sweep v{final.sweep_version}) | "
            + ("never" if reached is None else f"{reached:.1f} s")
            + f" | {run.kept_after_restart:.1%}{'' if run.meaning_kept else ' (ids changed meaning!)'} |"
        )
    timeline = []
    for run in runs:
        if run.first_model_s is None:
            continue
        points = [s for s in run.samples if s.t >= run.first_model_s][:: max(1, int(interval))][:12]
        timeline.append(
            f"- {run.name}: "
            + ", ".join(f"+{s.t - run.first_model_s:.0f} s {s.coverage:.0%}/{s.ari:.2f}" for s in points)
        )
    body = "\n".join(rows)
    lines = "\n".join(timeline)
    return f"""{SECTION}

Run: `python bench/cluster_coverage.py --users {users} --interval {interval:g}` \
on {time.strftime("%Y-%m-%d")}.
Machine: {machine()}.

Real worker processes (embedded broker, private Redis), default settings but
`CLUSTER_TRAIN_INTERVAL_SECONDS={interval:g}`. **Backlog**: {users} users' three days of onboarding
history is in the topic before the worker starts (records stamped with the times they were
produced back then). **Cold start**: an empty topic; {users} users arrive live over
{cold_seconds:.0f} s (a day of arrivals compressed). Coverage = consenting users with a profile
who have a stored cluster; ARI = stored clusters against the users' archetypes.

| run | first model after worker start | at first model | +1 interval | +2 intervals | end \
| ≥ 95 % and ARI ≥ 0.8 from | ids kept across a restart |
|---|---|---|---|---|---|---|---|
{body}

Cells are coverage / ARI. Over time after the first model (coverage/ARI):
{lines}

How: each partition's member set is swept at `CLUSTER_SWEEP_RATE` profiles/s (cursor in Redis)
whenever the model's `sweep_version` is ahead of the partition's; the first model always moves
users, a later one only if it would move ≥ `CLUSTER_SWEEP_MIN_CHANGE` of the training sample
(with the hysteresis). The sweep also refreshes the training vectors, so the second model is
trained on users' current states (on a backlog the first one sees many users mid-journey, from
the batches that happened to sample them). The worker is then restarted: "ids kept" is the
share of users whose stored id is the same three training intervals after the restart.
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1000, help="users per run (default 1000)")
    parser.add_argument("--interval", type=float, default=10.0, help="CLUSTER_TRAIN_INTERVAL_SECONDS (10)")
    parser.add_argument("--cold-seconds", type=float, default=90.0, help="length of the cold start (90 s)")
    args = parser.parse_args()
    main_with(args.users, args.interval, args.cold_seconds)


def main_with(users: int, interval: float, cold_seconds: float) -> None:
    runs = measure(users, interval, cold_seconds)
    write_section(SECTION, section(runs, users, interval, cold_seconds))
    console.print(f"wrote {SECTION!r} to bench/RESULTS.md")


def measure(users: int, interval: float, cold_seconds: float) -> list[Run]:
    with EmbeddedRedis() as redis_server, EmbeddedBroker() as broker:
        runs = [
            backlog(broker.bootstrap, redis_server.url, users, interval),
            cold_start(broker.bootstrap, redis_server.url, users, interval, cold_seconds),
        ]
    table = Table(title="clusters as delivered (coverage / ARI)")
    for col in ("run", "first model", "+0", "+1 interval", "+2 intervals", "end", "restart kept"):
        table.add_column(col)
    for run in runs:
        cells = [run.at(k * interval + 0.01) for k in (0, 1, 2)]
        table.add_row(
            run.name,
            f"{run.first_model_s or float('nan'):.1f} s",
            *("-" if s is None else f"{s.coverage:.0%} / {s.ari:.2f}" for s in cells),
            f"{run.samples[-1].coverage:.0%} / {run.samples[-1].ari:.2f}",
            f"{run.kept_after_restart:.1%}",
        )
    console.print(table)
    return runs


if __name__ == "__main__":
    main()
