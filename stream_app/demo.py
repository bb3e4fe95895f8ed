"""``stream-app demo``: the whole engine on one machine, fed a synthetic stream, with a live view.

Starts (unless KAFKA_BOOTSTRAP_SERVERS / REDIS_URL point elsewhere) an embedded Tansu
broker and a private redis-server on free ports, applies the topics, runs the worker
as a subprocess, and produces the synthetic onboarding stream in real time (event
timestamps are the send times, so latencies are real). A small share of records is
deliberately broken or re-sent so the dead-letter and dedup counters move. Ctrl-C
(or ``--duration``) stops everything and prints a summary; the last line is
machine-readable.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from stream_app.contract import iso_ms
from stream_app.embedded import EmbeddedBroker, EmbeddedRedis, free_port
from stream_app.observe import histogram_quantile, scrape, total
from stream_app.settings import Settings
from stream_app.synthetic import generate_users, interleaved_stream, record_key
from stream_app.topics import apply_topics

STATE_DIR = Path(".stream-app")
LATENCY = "onboarding_event_to_profile_latency_seconds"


@dataclass
class LiveStats:
    started: float = field(default_factory=time.monotonic)
    sent: int = 0
    broken_sent: int = 0
    resent: int = 0
    applied: float = 0.0
    consumed: float = 0.0
    invalid: float = 0.0
    duplicates: float = 0.0
    profiles: int = 0
    p50: float | None = None
    p99: float | None = None
    sent_rate: float = 0.0
    applied_rate: float = 0.0
    recent: deque[tuple[str, str, str, str]] = field(default_factory=lambda: deque(maxlen=8))
    summaries: dict[str, str] = field(default_factory=dict)

    def summary_line(self) -> str:
        return (
            f"summary: sent={self.sent} applied={int(self.applied)} dead_lettered={int(self.invalid)} "
            f"duplicates={int(self.duplicates)} profiles={self.profiles} "
            f"p50_s={self.p50 if self.p50 is not None else 'na'} "
            f"p99_s={self.p99 if self.p99 is not None else 'na'}"
        )


class Demo:
    def __init__(self, users: int, rate: float, time_scale: float, console: Console) -> None:
        self.users, self.rate, self.time_scale, self.console = users, rate, time_scale, console
        self.stats = LiveStats()
        self.rng = random.Random(7)
        self.stack = contextlib.ExitStack()
        self.worker: subprocess.Popen[bytes] | None = None
        self.web = ""
        self.log_path = STATE_DIR / "worker.log"

    # --- set-up -------------------------------------------------------------------------
    def start(self) -> None:
        env_kafka, env_redis = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("REDIS_URL")
        if env_kafka:
            self.bootstrap = env_kafka
            self.console.print(f"using Kafka at [bold]{env_kafka}[/] (KAFKA_BOOTSTRAP_SERVERS)")
        else:
            self.bootstrap = self.stack.enter_context(EmbeddedBroker()).bootstrap
            self.console.print(f"embedded Kafka-protocol broker (Tansu) on [bold]{self.bootstrap}[/]")
        if env_redis:
            self.redis_url = env_redis
            self.console.print(f"using Redis at [bold]{env_redis}[/] (REDIS_URL)")
        else:
            self.redis_url = self.stack.enter_context(EmbeddedRedis()).url
            self.console.print(f"private redis-server on [bold]{self.redis_url}[/]")
        self.settings = Settings.load(kafka_bootstrap_servers=self.bootstrap, redis_url=self.redis_url)
        for line in apply_topics(self.settings, self.bootstrap):
            if "created" in line:
                self.console.print(f"topic {line}")
        STATE_DIR.mkdir(exist_ok=True)
        port = free_port()
        self.web = f"http://127.0.0.1:{port}"
        env = dict(
            os.environ,
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            REDIS_URL=self.redis_url,
            WEB_PORT=str(port),
            LOG_FORMAT="json",
        )
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "stream_app", "worker"],
            env=env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        (STATE_DIR / "demo.json").write_text(
            json.dumps(
                {
                    "redis_url": self.redis_url,
                    "kafka_bootstrap": self.bootstrap,
                    "web_url": self.web,
                    "pid": self.worker.pid,
                }
            )
        )
        with self.console.status("starting worker (consumer-group join takes a few seconds)…"):
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                self.check_worker()
                with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                    health = orjson.loads(urllib.request.urlopen(self.web + "/healthz", timeout=1).read())
                    if health.get("partitions"):  # consumer group joined: events will flow
                        break
                time.sleep(0.3)
        self.console.print(
            f"worker ready: [bold]{self.web}/profiles/<user_id>[/], {self.web}/metrics, "
            f"logs in {self.log_path}"
        )
        from confluent_kafka import Producer

        self.producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, "log_level": 4})

    def check_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            lines = "\n".join(tail)
            raise RuntimeError(
                f"the worker exited with code {self.worker.returncode}; last log lines:\n{lines}"
            )

    # --- producing ----------------------------------------------------------------------------
    def stream(self) -> Any:
        seed = 1
        while True:  # endless: a new cohort of users when one is exhausted
            users = generate_users(self.users, seed)
            yield from interleaved_stream(
                users, 0, seed, time_scale=self.time_scale, arrival_spread_s=max(60.0, self.users / 5)
            )
            seed += 1

    def produce_due(self, events: Any, t0: float, first_ts: list[float], sent_times: deque[float]) -> None:
        topic = self.settings.topic_events
        now = time.monotonic()
        while True:
            if sent_times and len(sent_times) >= self.rate and now - sent_times[0] < 1.0:
                return  # rate cap
            event = events.peek()
            offset_s = (_ts_ms(event) - first_ts[0]) / 1000
            if t0 + offset_s > now:
                return
            next(events)
            event["timestamp"] = iso_ms(int(time.time() * 1000))
            value = orjson.dumps(event)
            roll = self.rng.random()
            if roll < 0.005:
                value = self.rng.choice([b"{broken json", orjson.dumps({"type": "track", "userId": "x"})])
                self.stats.broken_sent += 1
            self.producer.produce(topic, key=record_key(event), value=value)
            if 0.005 <= roll < 0.01:
                self.producer.produce(topic, key=record_key(event), value=value)  # a client retry
                self.stats.resent += 1
            self.stats.sent += 1
            sent_times.append(now)
            while sent_times and now - sent_times[0] > 1.0:
                sent_times.popleft()
            self.stats.recent.appendleft(_describe(event))
            self.producer.poll(0)

    # --- observing -----------------------------------------------------------------------------
    def refresh(self, last: dict[str, float]) -> None:
        self.check_worker()
        now = time.monotonic()
        try:
            m = scrape(self.web + "/metrics")
        except (OSError, urllib.error.URLError):
            return
        s = self.stats
        applied = total(m, "onboarding_events_applied_total")
        dt = max(1e-6, now - last.get("t", s.started))
        s.applied_rate = (applied - last.get("applied", 0.0)) / dt
        s.sent_rate = (s.sent - last.get("sent", 0.0)) / dt
        last.update(t=now, applied=applied, sent=float(s.sent))
        s.applied = applied
        s.consumed = total(m, "onboarding_events_consumed_total")
        s.invalid = total(m, "onboarding_events_invalid_total")
        s.duplicates = total(m, "onboarding_events_duplicate_total")
        s.p50 = histogram_quantile(m, LATENCY, 0.5)
        s.p99 = histogram_quantile(m, LATENCY, 0.99)

    def refresh_profiles(self, client: Any) -> None:
        self.stats.profiles = sum(
            1 for _ in client.scan_iter(f"{self.settings.redis_key_prefix}:p:*", count=1000)
        )
        for _time, user, _event, _detail in list(self.stats.recent)[:4]:
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                doc = orjson.loads(urllib.request.urlopen(f"{self.web}/profiles/{user}", timeout=1).read())
                self.stats.summaries[user] = _profile_line(doc)
        while len(self.stats.summaries) > 6:
            self.stats.summaries.pop(next(iter(self.stats.summaries)))

    def view(self) -> Group:
        s = self.stats
        head = Table.grid(padding=(0, 3))
        for _ in range(4):
            head.add_column()
        head.add_row(
            "elapsed",
            f"{time.monotonic() - s.started:6.0f} s",
            "profile keys",
            f"{s.profiles} (incl. linked ids)",
        )
        head.add_row(
            "sent", f"{s.sent} ({s.sent_rate:.0f}/s)", "applied", f"{int(s.applied)} ({s.applied_rate:.0f}/s)"
        )
        head.add_row("dead-lettered", f"{int(s.invalid)}", "duplicates dropped", f"{int(s.duplicates)}")
        head.add_row("latency p50", _fmt_s(s.p50), "latency p99", _fmt_s(s.p99))
        activity = Table(title="latest activity", expand=True)
        for col in ("time", "user", "event", "detail"):
            activity.add_column(col)
        for row in s.recent:
            activity.add_row(*row)
        profiles = Table(title="profiles (GET /profiles/<id>)", expand=True)
        profiles.add_column("user")
        profiles.add_column("profile")
        for user, line in s.summaries.items():
            profiles.add_row(user, line)
        return Group(Panel(head, title="onboarding engine — live (Ctrl-C to stop)"), activity, profiles)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.producer.flush(10)
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(10)
            except subprocess.TimeoutExpired:
                self.worker.kill()
        with contextlib.suppress(FileNotFoundError):
            (STATE_DIR / "demo.json").unlink()
        self.stack.close()


class _Peekable:
    def __init__(self, it: Any) -> None:
        self.it, self.head = it, next(it)

    def peek(self) -> Any:
        return self.head

    def __next__(self) -> Any:
        value, self.head = self.head, next(self.it)
        return value


def _ts_ms(event: dict[str, Any]) -> float:
    from stream_app.contract import parse_timestamp

    return float(parse_timestamp(event["timestamp"]))


def _describe(event: dict[str, Any]) -> tuple[str, str, str, str]:
    props = event.get("properties") or {}
    detail = " / ".join(str(props[k]) for k in ("flow", "step", "feature", "path") if k in props)
    user = str(event.get("userId") or event.get("anonymousId"))
    return time.strftime("%H:%M:%S"), user, str(event.get("event") or event["type"]), detail


def _profile_line(doc: dict[str, Any]) -> str:
    flows = doc.get("onboarding", {})
    flow: dict[str, Any] = next(iter(flows.values()), {})
    step = flow.get("current_step") or flow.get("status", "-")
    extra = ""
    if doc.get("segments"):
        extra += f" segments={','.join(doc['segments'])}"
    if doc.get("cluster"):
        extra += f" cluster={doc['cluster'].get('name')}"
    return (
        f"{doc.get('lifecycle')} · {doc.get('event_count')} events · {doc['sessions']['count']} sessions"
        f" · onboarding: {step} · {len(doc.get('features', {}))} features"
        f" · help {sum(doc.get('help_views', {}).values())}{extra}"
    )


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def run_demo(users: int, rate: float, time_scale: float, duration: float | None) -> int:
    console = Console()
    demo = Demo(users, rate, time_scale, console)
    code = 0
    try:
        demo.start()
        import redis

        client = redis.Redis.from_url(demo.redis_url)
        events = _Peekable(demo.stream())
        first_ts = [_ts_ms(events.peek())]
        t0 = time.monotonic()
        sent_times: deque[float] = deque()
        last: dict[str, float] = {}
        next_refresh = next_profiles = 0.0
        with Live(demo.view(), console=console, refresh_per_second=4, transient=False) as live:
            while duration is None or time.monotonic() - t0 < duration:
                demo.produce_due(events, t0, first_ts, sent_times)
                now = time.monotonic()
                if now >= next_refresh:
                    demo.refresh(last)
                    next_refresh = now + 0.5
                if now >= next_profiles:
                    demo.refresh_profiles(client)
                    next_profiles = now + 3.0
                live.update(demo.view())
                time.sleep(0.01)
            # let the worker catch up before the summary
            demo.producer.flush(10)
            end = time.monotonic() + 20
            while time.monotonic() < end and demo.stats.consumed < demo.stats.sent + demo.stats.resent:
                time.sleep(0.5)
                demo.refresh(last)
            demo.refresh_profiles(client)
            live.update(demo.view())
    except KeyboardInterrupt:
        console.print("stopping…")
    except RuntimeError as exc:
        console.print(f"[red]{exc}[/]")
        code = 1
    finally:
        demo.stop()
    s = demo.stats
    console.print(
        f"sent {s.sent} events ({s.broken_sent} deliberately broken, {s.resent} re-sent); "
        f"applied {int(s.applied)}; dead-lettered {int(s.invalid)}; {s.profiles} profiles; "
        f"latency p50 {_fmt_s(s.p50)}, p99 {_fmt_s(s.p99)}"
    )
    print(s.summary_line(), flush=True)
    return code
