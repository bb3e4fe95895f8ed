"""Chaos: live load, a seeded schedule of faults, and an oracle that is not the engine's code.

Run: python bench/chaos.py [--seconds 300] [--seed 7] [--broker embedded|kafka] [--short]
     (make chaos: both brokers, five minutes each; --short: about a minute, what the test
     suite runs; --no-results: do not touch bench/RESULTS.md)

Set-up: the embedded broker (or Apache Kafka), a private redis-server with AOF
(``appendfsync always``), two workers, the HTTP collector. Load: the synthetic onboarding
stream (anonymous visits, identify, steps, features; a fifth of it through the collector's
``/v1/batch`` with retries, as SDKs do), 1 % malformed records, and a *stall cohort*: users
who start a step of their own flow and never finish it, users who finish it in a second,
and users who start it having refused personalization.

Faults, drawn from the seed over the load (each at least once): SIGKILL a worker (a new
one starts), SIGTERM a worker (rolling restart), freeze Redis (SIGSTOP), crash and restart
Redis (SIGKILL; AOF replays), freeze the broker, fill Redis to ``maxmemory`` (noeviction)
and free it, add a worker, remove one; on Apache Kafka also restart the broker.

The oracle replays what was produced through a small model of its own (not the engine's):
* every user's profile has exactly their distinct valid events (the anonymous visit linked
  by ``identify`` included), the steps they completed, and the anonymous id merged in;
* the dead-letter topic holds exactly the malformed records (copies counted, not failures);
* every stuck cohort user has exactly one ``stalled_step`` decision (delivered or held out),
  no finisher and no opted-out user any; an occurrence never has two trigger ids (re-sent
  copies of one id are counted and reported);
* segment changes alternate entered/exited per user and segment.

It prints a table (faults, time to recover after each, events, invariants, worst trigger
lag), replaces its section of bench/RESULTS.md and exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, isolated_env, machine, redis_memory_by_kind, write_section

from stream_app.contract import iso_ms, parse_timestamp
from stream_app.demo.services import EngineProcess, collector_ready, worker_ready
from stream_app.embedded import ApacheKafka, EmbeddedBroker, EmbeddedRedis
from stream_app.settings import Settings
from stream_app.store.docpack import decode_doc
from stream_app.synthetic import generate_users, interleaved_stream, record_key
from stream_app.topics import apply_topics

SECTION = "## Chaos: faults under live load, checked by an independent oracle"
console = Console()
COHORT_FLOW, COHORT_STEP = "chaos", "wait"
STALL_MEAN_S = 3.0  # stalled after 6 s
TRIGGERS = f"""
[limits]
cap_per_day = 1000
allowed_lateness = 0
max_delay = 3600
[stalled_step]
multiplier = 2.0
min_samples = 100000
default_mean = {STALL_MEAN_S}
min_threshold = 0.5
cooldown = 0
holdout = 0.1
[[stalled_step.actions]]
action = {{ kind = "in_app_tutorial" }}
"""
FAULTS = (
    "sigkill_worker",
    "sigterm_worker",
    "freeze_redis",
    "restart_redis",
    "freeze_broker",
    "fill_redis",
    "add_worker",
    "remove_worker",
)


@dataclass
class Fault:
    at_s: float
    kind: str
    hold_s: float
    started: float = 0.0
    ended: float = 0.0
    recovered_s: float | None = None
    note: str = ""


def schedule(seed: int, seconds: float, kinds: tuple[str, ...]) -> list[Fault]:
    """Every kind once, in a seeded order, spread over the first 70 % of the load."""
    rng = random.Random(seed)
    order = list(kinds)
    rng.shuffle(order)
    span = seconds * 0.7
    gap = span / len(order)
    return [
        Fault(
            at_s=seconds * 0.08 + i * gap + rng.uniform(0, gap * 0.2),
            kind=kind,
            hold_s=round(rng.uniform(2, min(12, max(3, gap * 0.5))), 1)
            if kind.startswith(("freeze", "fill"))
            else 0.0,
        )
        for i, kind in enumerate(order)
    ]


@dataclass
class Load:
    """What was produced: the oracle's input."""

    valid: dict[str, dict[str, Any]] = field(default_factory=dict)  # messageId -> event
    bad: list[bytes] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    finishers: list[str] = field(default_factory=list)
    opted_out: list[str] = field(default_factory=list)
    http_retries: int = 0
    done: bool = False


class Cluster:
    """Broker, Redis and engine processes of one chaos run."""

    def __init__(self, broker_kind: str, workdir: Path) -> None:
        self.broker_kind, self.workdir = broker_kind, workdir
        self.broker: EmbeddedBroker | ApacheKafka = (
            ApacheKafka().start() if broker_kind == "kafka" else EmbeddedBroker().start()
        )
        self.redis = EmbeddedRedis().start(extra=["--appendonly", "yes", "--appendfsync", "always"])
        tag = self.prefix = f"chaos{uuid.uuid4().hex[:6]}"
        triggers = workdir / "triggers.toml"
        triggers.write_text(TRIGGERS)
        env = isolated_env(
            self.bootstrap,
            self.redis.url,
            tag,
            TRIGGERS_FILE=str(triggers),
            TIMER_INTERVAL_SECONDS="0.25",
            REDIS_TIMEOUT_SECONDS="1",
            BATCH_ATTEMPT_TIMEOUT_SECONDS="5",
            SHUTDOWN_TIMEOUT_SECONDS="10",
            KAFKA_SESSION_TIMEOUT_SECONDS="10",
            PII_HASH_SALT="chaos-salt",
            LOG_LEVEL="INFO",
            COLLECTOR_WRITE_KEYS="chaos=wk-chaos",
            COLLECTOR_PRODUCE_TIMEOUT_SECONDS="5",
        )
        self.env = env
        self.settings = Settings(
            **{k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields}
        )
        apply_topics(self.settings, self.bootstrap)
        self.workers: list[EngineProcess] = []
        self.spawned = 0
        self.collector = EngineProcess(
            "collector", env, workdir / "collector.log", "COLLECTOR_PORT", collector_ready
        ).start()
        self.collector.wait_ready(60)

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    def add_worker(self, wait: bool = True) -> EngineProcess:
        self.spawned += 1
        worker = EngineProcess(
            "worker", self.env, self.workdir / f"worker{self.spawned}.log", "WEB_PORT", worker_ready
        ).start()
        if wait:
            worker.wait_ready(120)
        self.workers.append(worker)
        return worker

    def live(self) -> list[EngineProcess]:
        return [w for w in self.workers if w.alive]

    def lag(self) -> float | None:
        """Records of the events topic the group has not committed yet, over all partitions
        (read from the broker, so partitions of a dead worker count too; None: no answer)."""
        topic = self.settings.topic_events
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": self.settings.app_id,
                "enable.auto.commit": False,
            }
        )
        try:
            parts = [TopicPartition(topic, p) for p in range(8)]
            committed = consumer.committed(parts, timeout=5)
            total = 0
            for tp in committed:
                _low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=5)
                total += high - max(tp.offset, 0)
            return float(total)
        except Exception:
            return None
        finally:
            consumer.close()

    def close(self) -> None:
        for w in self.workers:
            w.stop(20)
        self.collector.stop(20)
        self.redis.stop()
        if isinstance(self.broker, ApacheKafka):
            self.broker.close()
        else:
            self.broker.stop()


def cohort_event(uid: str, name: str, at_ms: int, n: int, consent: bool = True) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": f"{uid}-{n}",
        "userId": uid,
        "timestamp": iso_ms(at_ms),
        "event": name,
        "properties": {"flow": COHORT_FLOW, "step": COHORT_STEP},
        "context": {"consent": {"categoryPreferences": {"personalization": consent}}},
    }


BAD = (
    b"{not json",
    b"[1,2,3]",
    orjson.dumps({"type": "track", "userId": "u", "event": "x"}),  # no messageId
    orjson.dumps({"type": "teleport", "messageId": "m", "userId": "u"}),
)


def produce_load(cluster: Cluster, load: Load, seconds: float, rate: float, seed: int) -> None:
    """Produce for ``seconds`` at ``rate`` events/s; a fifth through the collector."""
    rng = random.Random(seed)
    users = generate_users(max(50, int(rate * seconds / 25)), seed)
    stream: Iterator[dict[str, Any]] = interleaved_stream(
        users, int(time.time() * 1000), seed, time_scale=0.01, arrival_spread_s=seconds * 50
    )
    producer = Producer(
        {"bootstrap.servers": cluster.bootstrap, "linger.ms": 20, "acks": "all", "enable.idempotence": True}
    )
    topic = cluster.settings.topic_events
    batch_http: list[dict[str, Any]] = []
    started = time.monotonic()
    sent = 0
    cohort_n = 0
    while time.monotonic() - started < seconds:
        due = int((time.monotonic() - started) * rate)
        while sent < due:
            event = next(stream, None)
            if event is None:
                break
            sent += 1
            load.valid[event["messageId"]] = event
            if rng.random() < 0.2:
                batch_http.append(event)
            else:
                producer.produce(topic, key=record_key(event), value=orjson.dumps(event))
            if rng.random() < 0.01:
                raw = rng.choice(BAD) + b" " * len(load.bad)  # each one distinct, still malformed
                load.bad.append(raw)
                producer.produce(topic, key=b"bad", value=raw)
            producer.poll(0)
        if len(batch_http) >= 20:
            post_batch(cluster, batch_http, load)
            batch_http = []
        if time.monotonic() - started > cohort_n * 1.5 and time.monotonic() - started < seconds * 0.85:
            now = int(time.time() * 1000)
            cohort_n += 1
            kind = ("stuck", "stuck", "finisher", "optout")[cohort_n % 4]
            uid = f"cohort-{kind}-{cohort_n}-{uuid.uuid4().hex[:4]}"
            events = [cohort_event(uid, "Onboarding Step Started", now, 1, consent=kind != "optout")]
            if kind == "finisher":
                events.append(cohort_event(uid, "Onboarding Step Completed", now + 1000, 2))
            {"stuck": load.stuck, "finisher": load.finishers, "optout": load.opted_out}[kind].append(uid)
            for event in events:
                load.valid[event["messageId"]] = event
                producer.produce(topic, key=uid.encode(), value=orjson.dumps(event))
        time.sleep(0.02)
    if batch_http:
        post_batch(cluster, batch_http, load)
    while producer.flush(10) > 0:
        console.log("waiting for the broker to take the last records…")
    load.done = True


def post_batch(cluster: Cluster, events: list[dict[str, Any]], load: Load) -> None:
    """POST /v1/batch until the collector says 200, as the SDKs retry (same messageIds)."""
    body = orjson.dumps({"batch": events, "writeKey": "wk-chaos"})
    delay = 0.2
    while True:
        request = urllib.request.Request(
            cluster.collector.url + "/v1/batch", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        load.http_retries += 1
        time.sleep(delay)
        delay = min(delay * 2, 5)


def inject(cluster: Cluster, fault: Fault, rng: random.Random) -> None:
    fault.started = time.monotonic()
    kind = fault.kind
    if kind in ("sigkill_worker", "sigterm_worker", "remove_worker"):
        live = cluster.live()
        if kind == "remove_worker" and len(live) < 2:
            fault.note = "only one worker: skipped removal"
        elif live:
            victim = rng.choice(live)
            assert victim.proc is not None
            if kind == "sigkill_worker":
                victim.kill()
            else:
                began = time.monotonic()
                victim.stop(30)
                fault.note = f"exited in {time.monotonic() - began:.1f} s"
            if kind != "remove_worker":
                cluster.add_worker()
    elif kind == "add_worker":
        cluster.add_worker()
    elif kind in ("freeze_redis", "freeze_broker"):
        pid = cluster.redis.pid if kind == "freeze_redis" else cluster.broker.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(fault.hold_s)
        finally:
            os.kill(pid, signal.SIGCONT)
    elif kind == "restart_redis":
        cluster.redis.crash_and_restart(down_s=2.0)
    elif kind == "restart_broker":
        assert isinstance(cluster.broker, ApacheKafka)
        cluster.broker.stop()
        time.sleep(2)
        cluster.broker.start()
    elif kind == "fill_redis":
        client = redis.Redis.from_url(cluster.redis.url)
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)
        time.sleep(fault.hold_s)
        client.config_set("maxmemory", 0)
    fault.ended = time.monotonic()


def recovery(cluster: Cluster, fault: Fault, rate: float, limit_s: float = 120) -> None:
    """Seconds from the end of the fault until the uncommitted backlog is below two seconds of
    load (commits trail processing by the commit interval, so this is an upper bound)."""
    while time.monotonic() - fault.ended < limit_s:
        lag = cluster.lag()
        if lag is not None and lag <= max(100, 2 * rate):
            fault.recovered_s = time.monotonic() - fault.ended
            return
        time.sleep(0.5)


def read_topic(bootstrap: str, topic: str, idle_s: float = 3.0) -> list[tuple[Any, int]]:
    """Every record of ``topic`` (value, record timestamp ms), until idle for ``idle_s``."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"oracle-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
        }
    )
    partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    out: list[tuple[Any, int]] = []
    last = time.monotonic() + 3
    while time.monotonic() - last < idle_s:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            out.append((msg.value(), msg.timestamp()[1]))
            last = time.monotonic()
    consumer.close()
    return out


@dataclass
class Verdict:
    checks: dict[str, int] = field(default_factory=dict)  # invariant -> items checked
    violations: list[str] = field(default_factory=list)
    resent_copies: int = 0
    copy_notes: list[str] = field(default_factory=list)  # per re-sent id: type, seconds between copies
    dlq_copies: int = 0
    worst_trigger_lag_s: float = 0.0

    def fail(self, message: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(message)


def expected_profiles(load: Load) -> dict[str, dict[str, Any]]:
    """The oracle's own model: per user, distinct valid events (an anonymous id's events count
    for the user whose identify links it), completed steps per flow, merged anonymous ids."""
    anon_of: dict[str, str] = {}
    for event in load.valid.values():
        if event["type"] == "identify" and event.get("anonymousId"):
            anon_of.setdefault(event["anonymousId"], event["userId"])
    model: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"events": 0, "steps": defaultdict(set), "merged": set()}
    )
    for event in load.valid.values():
        owner = event.get("userId") or anon_of.get(event.get("anonymousId", ""))
        if owner is None:
            continue
        entry = model[owner]
        entry["events"] += 1
        if event.get("anonymousId") and not event.get("userId"):
            entry["merged"].add(event["anonymousId"])
        if event.get("event") == "Onboarding Step Completed":
            entry["steps"][event["properties"]["flow"]].add(event["properties"]["step"])
    return model


def check(cluster: Cluster, load: Load, verdict: Verdict) -> None:
    client = redis.Redis.from_url(cluster.redis.url)
    prefix = cluster.settings.redis_key_prefix
    model = expected_profiles(load)

    def stored(uid: str) -> dict[str, Any] | None:
        for _ in range(300):  # a Redis just restarted answers LOADING while it replays its AOF
            try:
                raw = client.hget(f"{prefix}:p:{{{uid}}}", "d")
            except (redis.exceptions.BusyLoadingError, redis.exceptions.ConnectionError):
                time.sleep(0.2)
                continue
            return decode_doc(raw) if raw else None
        raise RuntimeError("Redis did not answer for a minute")

    deadline = time.monotonic() + 240
    pending = list(model)
    while pending and time.monotonic() < deadline:  # let the backlog drain
        pending = [u for u in pending if (stored(u) or {}).get("event_count") != model[u]["events"]]
        if pending:
            time.sleep(2)
    verdict.checks["profiles"] = len(model)
    for uid, want in model.items():
        doc = stored(uid)
        if doc is None:
            verdict.fail(f"{uid}: no profile")
            continue
        if doc.get("event_count") != want["events"]:
            verdict.fail(f"{uid}: {doc.get('event_count')} events stored, {want['events']} sent")
        steps = {f: set(s["completed_steps"]) for f, s in doc.get("onboarding", {}).items()}
        if {f: s for f, s in steps.items() if s} != {f: s for f, s in want["steps"].items() if s}:
            verdict.fail(f"{uid}: completed steps {steps} != {dict(want['steps'])}")
        if not want["merged"] <= set(doc.get("merged_from", [])):
            verdict.fail(f"{uid}: anonymous ids {want['merged']} not merged")

    bootstrap = cluster.bootstrap
    dead = Counter(value for value, _ts in read_topic(bootstrap, cluster.settings.topic_dlq))
    verdict.checks["dead letters"] = len(load.bad)
    for raw in set(load.bad) - set(dead):
        verdict.fail(f"malformed record not in the DLQ: {raw[:40]!r}")
    for raw in set(dead) - set(load.bad):
        verdict.fail(f"unexpected DLQ record: {raw[:60]!r}")
    verdict.dlq_copies = sum(n - 1 for n in dead.values() if n > 1)

    time.sleep(STALL_MEAN_S * 2 + 3)  # the last cohort's deadlines
    decisions: list[tuple[dict[str, Any], int]] = []
    for topic in (cluster.settings.topic_triggers, cluster.settings.topic_triggers_holdout):
        decisions += [(orjson.loads(v), ts) for v, ts in read_topic(bootstrap, topic)]
    ids_per_occurrence: dict[tuple[str, ...], set[str]] = defaultdict(set)
    copies: Counter[str] = Counter()
    copy_times: dict[str, list[int]] = defaultdict(list)
    cohort_stalls: dict[str, set[str]] = defaultdict(set)
    any_trigger: set[str] = set()
    for value, ts in decisions:
        copies[value["trigger_id"]] += 1
        copy_times[value["trigger_id"]].append(ts)
        any_trigger.add(value["user_id"])
        if value["type"] != "stalled_step":
            continue
        ev = value["evidence"]
        ids_per_occurrence[(value["user_id"], ev["flow"], ev["step"], ev["step_started_at"])].add(
            value["trigger_id"]
        )
        if ev["flow"] == COHORT_FLOW:
            cohort_stalls[value["user_id"]].add(value["trigger_id"])
            lag = ts / 1000 - parse_timestamp(value["due_at"]) / 1000
            verdict.worst_trigger_lag_s = max(verdict.worst_trigger_lag_s, lag)
    verdict.resent_copies = sum(n - 1 for n in copies.values() if n > 1)
    types = {value["trigger_id"]: value["type"] for value, _ts in decisions}
    verdict.copy_notes = [
        f"{types[tid]} +{(max(copy_times[tid]) - min(copy_times[tid])) / 1000:.2f} s"
        for tid, n in copies.items()
        if n > 1
    ]
    verdict.checks["stall occurrences"] = len(ids_per_occurrence)
    for occurrence, ids in ids_per_occurrence.items():
        if len(ids) > 1:
            verdict.fail(f"one stall occurrence, {len(ids)} trigger ids: {occurrence}")
    verdict.checks["cohort users"] = len(load.stuck) + len(load.finishers) + len(load.opted_out)
    for uid in load.stuck:
        if len(cohort_stalls.get(uid, ())) != 1:
            verdict.fail(f"stuck {uid}: {len(cohort_stalls.get(uid, ()))} stalled_step decisions")
    for uid in load.finishers:
        if uid in cohort_stalls:
            verdict.fail(f"finisher {uid} got a stalled_step")
    for uid in load.opted_out:
        if uid in any_trigger:
            verdict.fail(f"opted-out {uid} got a trigger")

    changes = [orjson.loads(v) for v, _ts in read_topic(bootstrap, cluster.settings.topic_segments)]
    seen: set[str] = set()
    state: dict[tuple[str, str, str], str] = {}
    history: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for change in changes:  # per user one partition: in order
        key = (change["user_id"], change["source"], change["segment"])
        history[key].append(
            f"{change['change']}@{change['at']} ({change['reason']}, {change['change_id'][:8]})"
        )
        if change["change_id"] in seen:
            continue
        seen.add(change["change_id"])
        before = state.get(key, "exited")
        if change["change"] == before:
            verdict.fail(f"segment change {change['change']} twice in a row: {key}: {history[key]}")
        state[key] = change["change"]
    verdict.checks["segment changes"] = len(seen)


def run(args: argparse.Namespace) -> int:
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"chaos-{uuid.uuid4().hex[:6]}"
    workdir.mkdir(parents=True)
    kinds = FAULTS + (("restart_broker",) if args.broker == "kafka" else ())
    faults = [] if args.soak else schedule(args.seed, args.seconds, kinds)
    soak = Soak(csv=workdir / "soak.csv")
    rng = random.Random(args.seed)
    load = Load()
    console.print(
        f"[bold]chaos[/] seed {args.seed}, {args.seconds:.0f} s on {args.broker}, logs in {workdir}"
    )
    cluster = Cluster(args.broker, workdir)
    verdict = Verdict()
    started = time.monotonic()
    try:
        with console.status("starting two workers…"):
            cluster.add_worker()
            cluster.add_worker()
        producer = threading.Thread(
            target=produce_load, args=(cluster, load, args.seconds, args.rate, args.seed), daemon=True
        )
        started = time.monotonic()
        producer.start()
        if args.soak:
            traced = 0
            while producer.is_alive():
                soak.sample(cluster, load, time.monotonic() - started)
                now = time.monotonic() - started
                # a tracemalloc snapshot at the half and near the end: growth between them
                if (traced == 0 and now > args.seconds / 2) or (traced == 1 and now > args.seconds * 0.95):
                    soak.trace_memory(cluster, now, args.seconds)
                    traced += 1
                time.sleep(10)
        for fault in faults:
            while time.monotonic() - started < fault.at_s:
                time.sleep(0.2)
            console.log(f"fault: {fault.kind}" + (f" for {fault.hold_s} s" if fault.hold_s else ""))
            inject(cluster, fault, rng)
            recovery(cluster, fault, args.rate)
            console.log(
                f"  recovered in {fault.recovered_s:.1f} s"
                if fault.recovered_s is not None
                else "  not recovered"
            )
        producer.join()
        with console.status("draining, then checking with the oracle…"):
            check(cluster, load, verdict)
        if args.soak:
            soak.breakdown = redis_memory_by_kind(cluster.redis.url, cluster.prefix)
            soak.users = len({e.get("userId") or e.get("anonymousId") for e in load.valid.values()})
    finally:
        cluster.close()
    elapsed = time.monotonic() - started
    report(args, faults, load, verdict, elapsed, soak)
    return 1 if verdict.violations else 0


@dataclass
class Soak:
    """Samples over a fault-free run: what must stay flat."""

    rows: list[dict[str, float]] = field(default_factory=list)
    csv: Path | None = None
    #: at the end: key kind -> (keys, bytes), and the users and events behind them
    breakdown: dict[str, tuple[int, int]] = field(default_factory=dict)
    users: int = 0
    _cpu: dict[int, tuple[float, float]] = field(default_factory=dict)  # pid -> (cpu s, at)
    #: with PYTHONTRACEMALLOC set: the first worker's largest allocation-site growth over the
    #: second half (from its /debug/memory), to tell what a growing RSS is made of
    memory_growth: list[dict[str, Any]] = field(default_factory=list)

    def trace_memory(self, cluster: Cluster, t: float, seconds: float) -> None:
        if not os.environ.get("PYTHONTRACEMALLOC") or self.csv is None:
            return
        first = next(iter(cluster.live()), None)
        if first is None:
            return
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(first.url + "/debug/memory", timeout=60) as resp:
                body = orjson.loads(resp.read())
            (self.csv.parent / f"memory-{t:.0f}s.json").write_bytes(
                orjson.dumps(body, option=orjson.OPT_INDENT_2)
            )
            if t > seconds * 0.9:
                self.memory_growth = body.get("growth_since_last", [])[:8]

    def cpu_share(self, pid: int) -> float:
        """Share of one core ``pid`` used since the previous sample (0 the first time)."""
        try:
            used = cpu_seconds(pid)
        except OSError:
            return 0.0
        now = time.monotonic()
        before = self._cpu.get(pid)
        self._cpu[pid] = (used, now)
        return (used - before[0]) / max(1e-6, now - before[1]) if before else 0.0

    def sample(self, cluster: Cluster, load: Load, t: float) -> None:
        rss = 0.0
        series = 0.0
        cache = 0.0
        worker_cpu = max([0.0, *(self.cpu_share(w.pid) for w in cluster.live())])
        broker_cpu = self.cpu_share(cluster.broker.pid)
        broker_rss = 0.0
        with contextlib.suppress(OSError, ValueError, IndexError):
            status = Path(f"/proc/{cluster.broker.pid}/status").read_text()
            broker_rss = float(status.split("VmRSS:")[1].split()[0]) / 1024
        for w in cluster.live():
            with contextlib.suppress(OSError, ValueError):
                status = Path(f"/proc/{w.pid}/status").read_text()
                rss = max(rss, float(status.split("VmRSS:")[1].split()[0]) / 1024)
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(w.url + "/metrics", timeout=2) as resp:
                    lines = resp.read().decode().splitlines()
                series = max(series, float(sum(1 for ln in lines if ln and not ln.startswith("#"))))
                cache = max(
                    [
                        cache,
                        *(
                            float(ln.split()[-1]) / 2**20
                            for ln in lines
                            if ln.startswith("onboarding_profile_cache_bytes ")
                        ),
                    ]
                )
        info = redis.Redis.from_url(cluster.redis.url).info("memory")
        users = len({e.get("userId") for e in list(load.valid.values()) if e.get("userId")})
        self.rows.append(
            {
                "t": t,
                "rss_mb": rss,
                "redis_bytes_per_user": info["used_memory"] / max(1, users),
                "redis_bytes_per_event": info["used_memory"] / max(1, len(load.valid)),
                "lag": cluster.lag() or 0.0,
                "series": series,
                "cache_mb": cache,
                "worker_cpu": worker_cpu,
                "broker_cpu": broker_cpu,
                "broker_rss_mb": broker_rss,
            }
        )
        if self.csv is not None:
            row = self.rows[-1]
            with self.csv.open("a") as out:
                if len(self.rows) == 1:
                    out.write(",".join(row) + "\n")
                out.write(",".join(f"{v:.1f}" for v in row.values()) + "\n")

    def slopes(self) -> dict[str, tuple[float, float, float, float]]:
        """Per quantity: value at the end, least-squares slope per hour over the second half,
        and the least and greatest value of the second half."""
        half = self.rows[len(self.rows) // 2 :]
        out: dict[str, tuple[float, float, float, float]] = {}
        if len(half) < 3:
            return out
        ts = [r["t"] / 3600 for r in half]
        mean_t = sum(ts) / len(ts)
        for key in (
            "rss_mb", "cache_mb", "redis_bytes_per_user", "redis_bytes_per_event", "lag", "series",
            "worker_cpu", "broker_cpu", "broker_rss_mb",
        ):  # fmt: skip
            ys = [r[key] for r in half]
            mean_y = sum(ys) / len(ys)
            num = sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys, strict=True))
            den = sum((t - mean_t) ** 2 for t in ts) or 1.0
            out[key] = (ys[-1], num / den, min(ys), max(ys))
        return out


def report(
    args: argparse.Namespace,
    faults: list[Fault],
    load: Load,
    verdict: Verdict,
    elapsed: float,
    soak: Soak | None = None,
) -> None:
    table = Table(title=f"chaos, seed {args.seed}, {args.broker}")
    table.add_column("fault")
    table.add_column("at", justify="right")
    table.add_column("held", justify="right")
    table.add_column("recovered after", justify="right")
    table.add_column("note")
    rows = []
    for f in faults:
        recovered = f"{f.recovered_s:.1f} s" if f.recovered_s is not None else "not within 120 s"
        held = f"{f.hold_s:.1f} s" if f.hold_s else "—"
        table.add_row(f.kind, f"{f.at_s:.0f} s", held, recovered, f.note)
        rows.append(f"| {f.kind} | {f.at_s:.0f} s | {held} | {recovered} | {f.note} |")
    console.print(table)
    checks = ", ".join(f"{name}: {n}" for name, n in verdict.checks.items())
    summary = (
        f"{len(load.valid)} valid events ({load.http_retries} HTTP retries), {len(load.bad)} malformed; "
        f"checked {checks}; re-sent trigger copies (same id): {verdict.resent_copies}"
        + (f" ({', '.join(verdict.copy_notes[:10])} after the first)" if verdict.copy_notes else "")
        + "; dead-letter "
        f"copies: {verdict.dlq_copies}; worst stalled-step lag after its deadline: "
        f"{verdict.worst_trigger_lag_s:.1f} s; **violations: {len(verdict.violations)}**"
    )
    console.print(summary)
    for v in verdict.violations[:20]:
        console.print(f"[red]violation[/] {v}")
    soak_lines: list[str] = []
    if soak is not None and soak.rows:
        names = {
            "rss_mb": "worker RSS (MB, largest worker)",
            "cache_mb": "of which the profile cache (MiB of documents, largest worker)",
            "worker_cpu": "worker CPU (share of one core, busiest worker)",
            "broker_cpu": "broker CPU (share of one core)",
            "broker_rss_mb": "broker RSS (MB)",
            "redis_bytes_per_user": "Redis used memory per user (bytes)",
            "redis_bytes_per_event": "Redis used memory per valid event produced (bytes)",
            "lag": "uncommitted backlog (records)",
            "series": "metric samples on /metrics",
        }
        soak_lines = [
            "| quantity | at the end | slope per hour (second half) | second half: least to greatest |",
            "|---|---|---|---|",
        ]
        for key, (end, slope, least, most) in soak.slopes().items():
            soak_lines.append(f"| {names[key]} | {end:,.1f} | {slope:+,.1f} | {least:,.1f} to {most:,.1f} |")
            console.print(f"{names[key]}: {end:,.1f} at the end, {slope:+,.1f} per hour")
        if soak.memory_growth:
            soak_lines += [
                "",
                "Largest growth of traced Python memory in the first worker between the half and the "
                "end (`/debug/memory`, PYTHONTRACEMALLOC=1):",
                "",
                "| allocation site | KiB | blocks |",
                "|---|---|---|",
                *(f"| `{g['site']}` | {g['kib']:+,.0f} | {g['blocks']:+,} |" for g in soak.memory_growth),
            ]
        if soak.breakdown:
            soak_lines += [
                "",
                f"Redis keys at the end by kind (`MEMORY USAGE`; {soak.users:,} users and anonymous "
                f"ids, {len(load.valid):,} valid events):",
                "",
                "| kind | keys | bytes | bytes per user |",
                "|---|---|---|---|",
                *(
                    f"| {kind} | {keys:,} | {size:,} | {size / max(1, soak.users):,.0f} |"
                    for kind, (keys, size) in soak.breakdown.items()
                ),
            ]
            for kind, (keys, size) in soak.breakdown.items():
                console.print(f"redis {kind}: {keys:,} keys, {size / max(1, soak.users):,.0f} bytes per user")
    if args.no_results:
        return
    text = "\n".join(
        [
            SECTION,
            "",
            f"`python bench/chaos.py --seconds {args.seconds:.0f} --seed {args.seed} --broker {args.broker}` "
            f"({time.strftime('%Y-%m-%d')}, {elapsed:.0f} s; {machine()}). Two workers, the collector, "
            "Redis with AOF (`appendfsync always`); faults drawn from the seed; the oracle is "
            "`expected_profiles`/`check` in bench/chaos.py, not the engine's code.",
            "",
            "| fault | at | held | recovered after (backlog < 2 s of load) | note |",
            "|---|---|---|---|---|",
            *rows,
            "",
            summary,
            "",
            *(f"- violation: {v}" for v in verdict.violations[:20]),
            *(["", "Soak (no faults), sampled every 10 s:", "", *soak_lines] if soak_lines else []),
        ]
    )
    title = f"## Soak: {args.seconds / 60:.0f} minutes without faults" if args.soak else SECTION
    title += f" ({args.broker})"
    write_section(title, text.replace(SECTION, title, 1))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=300, help="length of the load (default 300)")
    parser.add_argument("--rate", type=float, default=300, help="events per second (default 300)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--broker", choices=["embedded", "kafka"], default="embedded")
    parser.add_argument("--short", action="store_true", help="about a minute: what the test suite runs")
    parser.add_argument("--no-results", action="store_true", help="do not write bench/RESULTS.md")
    parser.add_argument(
        "--soak",
        action="store_true",
        help="no faults: sample RSS, Redis memory per user and lag; report slopes",
    )
    args = parser.parse_args()
    if args.short:
        args.seconds, args.rate = 60, 150
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
