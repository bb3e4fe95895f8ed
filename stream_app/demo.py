"""``stream-app demo``: the whole engine on one machine, fed a synthetic stream, with a live view.

With nothing configured it starts an embedded Tansu broker and a private redis-server
on free ports (KAFKA_BOOTSTRAP_SERVERS / REDIS_URL, when set, are used instead),
applies the topics, runs the worker as a subprocess and produces the synthetic
onboarding stream of :mod:`stream_app.synthetic` in real time: an event is sent when
its (compressed) event time comes, at most ``rate`` events per second, and its
timestamp is rewritten to the send time, so the latencies shown are real. About 0.5%
of extra records are deliberately broken and 0.5% are re-sent copies, so the
dead-letter and dedup counters move.

Ctrl-C (or ``--duration``) stops producing, lets the worker drain, stops every
process it started and prints a summary whose last line is machine-readable::

    summary: sent=7469 broken=38 resent=35 applied=7469 dead_lettered=38 duplicates=35 ...
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from stream_app.contract import iso_ms, parse_timestamp
from stream_app.embedded import EmbeddedBroker, EmbeddedRedis, free_port
from stream_app.observe import histogram_quantile, scrape, total
from stream_app.settings import Settings
from stream_app.synthetic import SimUser, generate_users, record_key, user_events
from stream_app.topics import apply_topics, kafka_client_config

STATE_DIR = Path(".stream-app")  # in the current directory; `stream-app profile` reads demo.json
STATE_FILE = STATE_DIR / "demo.json"
WORKER_LOG = STATE_DIR / "worker.log"

LATENCY = "onboarding_event_to_profile_latency_seconds"
BROKEN_SHARE = 0.005  # extra records that are not valid events (they go to the DLQ)
RESEND_SHARE = 0.005  # extra copies of recently sent events (dropped as duplicates)
READY_TIMEOUT_S = 120.0  # worker start-up: import, Redis, consumer-group join
DRAIN_TIMEOUT_S = 20.0  # after the last event: how long to wait for the worker to catch up
METRICS_EVERY_S = 0.5
SUMMARIES_EVERY_S = 2.0
LATENCY_WINDOW_S = 10.0


class DemoError(Exception):
    """The worker died or never became ready; the message carries its last log lines."""


class Activity(NamedTuple):
    time: str
    user: str
    event: str
    detail: str
    user_id: str | None  # set when the event names a userId (whose profile the view can show)


@dataclass
class LiveStats:
    """Everything the live view and the summary show; written by the producer loop and the
    observer thread, read by the renderer."""

    started: float = field(default_factory=time.monotonic)
    phase: str = "streaming"
    cohorts: int = 0
    sent: int = 0  # synthetic events produced
    broken: int = 0  # extra invalid records produced
    resent: int = 0  # extra copies of earlier events produced
    delivery_errors: int = 0
    consumed: int = 0  # records the worker read (events, broken records and copies)
    applied: int = 0
    invalid: int = 0
    duplicates: int = 0
    profile_keys: int = 0  # {prefix}:p:* keys: profiles and the anonymous ids linked to them
    linked_ids: int = 0
    sent_rate: float = 0.0
    applied_rate: float = 0.0
    p50: float | None = None  # over the last LATENCY_WINDOW_S
    p99: float | None = None
    p50_all: float | None = None  # over the whole run
    p99_all: float | None = None
    triggers: dict[str, int] = field(default_factory=dict)  # delivered, by type
    held_out: int = 0
    suppressed: int = 0  # cooldown, cap, consent, ... (not holdout)
    segment_changes: int = 0
    cluster_model: int = 0
    timer_lag_p50: float | None = None
    observer_error: str = ""
    recent: deque[Activity] = field(default_factory=lambda: deque(maxlen=8))
    summaries: OrderedDict[str, str] = field(default_factory=OrderedDict)

    @property
    def records(self) -> int:
        return self.sent + self.broken + self.resent

    @property
    def profiles(self) -> int:
        return max(0, self.profile_keys - self.linked_ids)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def summary_text(self) -> str:
        return (
            f"sent {self.sent} events (+{self.broken} deliberately broken records, {self.resent} re-sent "
            f"copies); applied {self.applied}; dead-lettered {self.invalid}; duplicates dropped "
            f"{self.duplicates}; {self.profiles} profiles; latency p50 {_ms(self.p50_all)}, "
            f"p99 {_ms(self.p99_all)}; {sum(self.triggers.values())} triggers "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.triggers.items())) or 'none'}), "
            f"{self.held_out} held out; {self.segment_changes} segment changes; "
            f"cluster model v{self.cluster_model}"
        )

    def summary_line(self) -> str:
        def ms(value: float | None) -> str:
            return "na" if value is None else f"{value * 1000:.0f}"

        return (
            f"summary: sent={self.sent} broken={self.broken} resent={self.resent} applied={self.applied} "
            f"dead_lettered={self.invalid} duplicates={self.duplicates} profiles={self.profiles} "
            f"p50_ms={ms(self.p50_all)} p99_ms={ms(self.p99_all)} "
            f"triggers={sum(self.triggers.values())} held_out={self.held_out} "
            f"segment_changes={self.segment_changes} cluster_model={self.cluster_model}"
        )


# --- services and the worker ------------------------------------------------------------------


@dataclass(frozen=True)
class Services:
    bootstrap: str
    redis_url: str


def start_services(stack: contextlib.ExitStack, console: Console) -> Services:
    """The configured Kafka and Redis, or embedded ones (stopped when ``stack`` closes)."""
    configured = Settings.load()  # a wrong setting stops here, naming the variable
    if configured.kafka_bootstrap_servers:
        bootstrap = configured.kafka_bootstrap_servers
        console.print(f"Kafka: [bold]{bootstrap}[/] (from KAFKA_BOOTSTRAP_SERVERS)")
    else:
        bootstrap = stack.enter_context(EmbeddedBroker()).bootstrap
        console.print(f"Kafka: embedded Tansu broker on [bold]{bootstrap}[/]")
    if configured.redis_url:
        redis_url = configured.redis_url
        console.print(f"Redis: [bold]{redis_url}[/] (from REDIS_URL)")
    else:
        redis_url = stack.enter_context(EmbeddedRedis()).url
        console.print(f"Redis: private redis-server on [bold]{redis_url}[/]")
    return Services(bootstrap, redis_url)


class WorkerProcess:
    """``stream-app worker`` as a subprocess, in its own session (Ctrl-C reaches the demo only,
    which then stops the worker itself)."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, services: Services) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = dict(
            os.environ,
            KAFKA_BOOTSTRAP_SERVERS=services.bootstrap,
            REDIS_URL=services.redis_url,
            WEB_HOST="127.0.0.1",
            WEB_PORT=str(port),
            LOG_FORMAT="json",
        )
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stream_app", "worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def check(self) -> None:
        """Raise :class:`DemoError` with the last log lines if the worker has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(
                f"the worker exited with code {self.proc.returncode}; last log lines:\n{self.tail()}"
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until /healthz reports partitions of the events topic assigned (group joined)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            health = _get_json(self.url + "/healthz")
            if isinstance(health, dict) and health.get("partitions"):
                return
            time.sleep(0.3)
        raise DemoError(f"the worker was not ready after {timeout:.0f} s; last log lines:\n{self.tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def tail(self, lines: int = 20) -> str:
        """The last log lines, JSON records shown as ``level logger: msg``."""
        try:
            raw = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "\n".join(_log_line(line) for line in raw)


def _log_line(line: str) -> str:
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line
    if not isinstance(rec, dict):
        return line
    text = f"{rec.get('level', '')} {rec.get('logger', '')}: {rec.get('msg', '')}"
    return text + ("\n" + str(rec["exc"]) if rec.get("exc") else "")


def _get_json(url: str, timeout: float = 1.0) -> Any:
    """GET ``url`` as JSON; None when unreachable or not JSON (also on 404/503)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return orjson.loads(resp.read())
    except (OSError, ValueError):
        return None


def write_state(services: Services, worker: WorkerProcess) -> None:
    """``.stream-app/demo.json``: how `stream-app profile` finds the running demo."""
    if STATE_FILE.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            other = int(json.loads(STATE_FILE.read_text())["pid"])
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(other, 0)
                print(f"note: replacing {STATE_FILE} of another demo (worker pid {other})", file=sys.stderr)
    state = {
        "redis_url": services.redis_url,
        "kafka_bootstrap": services.bootstrap,
        "web_url": worker.url,
        "pid": worker.pid,
    }
    STATE_FILE.write_text(json.dumps(state, indent=2) + "\n")


# --- the synthetic stream --------------------------------------------------------------------


class SyntheticFeed:
    """The synthetic stream as a schedule of events, by offset in seconds from the start.

    Cohorts of ``users`` users sign up one after another, a new cohort every ``wave_s``
    seconds; a cohort's users arrive over its first seconds (so the view starts busy),
    and a user's events are generated when the user arrives. Events later than the end
    of the user's wave (the sparse later sessions, hours of simulated time apart) are
    cut off: memory stays bounded however long the demo runs.
    """

    def __init__(self, users: int, time_scale: float, rate: float) -> None:
        self.users = users
        self.time_scale = time_scale
        self.arrival_s = max(60.0, users / 5) * time_scale
        self.wave_s = max(60.0, 30.0 * users / rate, 3 * self.arrival_s)
        self.cohorts = 0  # generated so far (the next one is generated when its first user is due)
        self._arrivals: list[tuple[float, float, SimUser]] = []  # (arrival, wave end, user), latest first
        self._heap: list[tuple[float, int, dict[str, Any], deque[tuple[float, dict[str, Any]]]]] = []
        self._tie = itertools.count()
        self.position = 0.0  # offset of the last event popped

    @property
    def cohorts_started(self) -> int:
        return int(self.position // self.wave_s) + 1

    def next_offset(self) -> float:
        """Offset (s) of the next event; admits the users who have arrived by then."""
        while True:
            if not self._arrivals:
                self._start_cohort()
            arrival, wave_end, user = self._arrivals[-1]
            if self._heap and self._heap[0][0] <= arrival:
                return self._heap[0][0]
            self._arrivals.pop()
            self._admit(user, arrival, wave_end)

    def pop(self) -> dict[str, Any]:
        """The next event (call :meth:`next_offset` first)."""
        self.position, _, event, rest = heapq.heappop(self._heap)
        if rest:
            offset, following = rest.popleft()
            heapq.heappush(self._heap, (offset, next(self._tie), following, rest))
        return event

    def _start_cohort(self) -> None:
        start = self.cohorts * self.wave_s
        seed = self.cohorts + 1
        rng = random.Random(seed)
        arrivals = [(start + rng.uniform(0, self.arrival_s), u) for u in generate_users(self.users, seed)]
        arrivals.sort(key=lambda pair: pair[0], reverse=True)
        self._arrivals = [(at, start + self.wave_s, user) for at, user in arrivals]
        self.cohorts += 1

    def _admit(self, user: SimUser, arrival: float, wave_end: float) -> None:
        timed = deque(
            (offset, event)
            for event in user_events(user, int(arrival * 1000), self.time_scale)
            if (offset := parse_timestamp(event["timestamp"]) / 1000) < wave_end
        )
        if timed:
            offset, event = timed.popleft()
            heapq.heappush(self._heap, (offset, next(self._tie), event, timed))


def broken_record(rng: random.Random) -> bytes:
    """A record the contract rejects: a mix of the usual ways producers get it wrong."""
    kind = rng.randrange(4)
    if kind == 0:
        return b'{"type": "track", "event": "Feature Used", "properties": {'  # truncated JSON
    if kind == 1:  # no messageId
        return orjson.dumps({"type": "track", "userId": "someone", "event": "Feature Used"})
    if kind == 2:  # unknown type
        return orjson.dumps({"type": "screen", "messageId": f"bad-{rng.getrandbits(64):x}", "userId": "x"})
    return b"\xff\xfe not UTF-8, not JSON"


class Sender:
    """Produces the feed on time, at most ``rate`` events/s, adding broken and re-sent records."""

    def __init__(self, producer: Any, topic: str, feed: SyntheticFeed, rate: float, stats: LiveStats) -> None:
        self.producer, self.topic, self.feed, self.stats = producer, topic, feed, stats
        self.rate = rate
        self.burst = max(1.0, rate / 20)  # token bucket: at most 50 ms worth of events at once
        self.tokens = self.burst
        self.t0 = self.last = time.monotonic()
        self.rng = random.Random(7)
        self.history: deque[tuple[bytes, bytes]] = deque(maxlen=500)  # candidates for a re-send

    def send_due(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        while self.tokens >= 1 and self.t0 + self.feed.next_offset() <= now:
            self._send(self.feed.pop())
            self.tokens -= 1
        self.stats.cohorts = self.feed.cohorts_started
        self.producer.poll(0)

    def pause(self) -> float:
        """Seconds to sleep before the next :meth:`send_due` (short: keeps the pace smooth)."""
        due_in = self.t0 + self.feed.next_offset() - time.monotonic()
        return min(0.01, max(0.002, due_in))

    def _send(self, event: dict[str, Any]) -> None:
        event["timestamp"] = iso_ms(int(time.time() * 1000))  # event time = send time: real latency
        key, value = record_key(event), orjson.dumps(event)
        self._produce(key, value)
        self.stats.sent += 1
        self.stats.recent.appendleft(_activity(event))
        self.history.append((key, value))
        roll = self.rng.random()
        if roll < BROKEN_SHARE:
            self._produce(key, broken_record(self.rng))
            self.stats.broken += 1
        elif roll < BROKEN_SHARE + RESEND_SHARE:  # a client retry, possibly seconds later
            self._produce(*self.history[self.rng.randrange(len(self.history))])
            self.stats.resent += 1

    def _produce(self, key: bytes, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value=value, key=key, on_delivery=self._delivered)
                return
            except BufferError:  # local queue full: the broker is behind; wait for deliveries
                self.producer.poll(0.05)

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.stats.delivery_errors += 1


def _activity(event: dict[str, Any]) -> Activity:
    props = event.get("properties") or {}
    detail = " / ".join(str(props[k]) for k in ("flow", "step", "feature", "path") if k in props)
    user_id = event.get("userId")
    name = event.get("event") or (f"page {event['name']}" if event.get("name") else event["type"])
    return Activity(
        time.strftime("%H:%M:%S"), str(user_id or event.get("anonymousId")), str(name), detail, user_id
    )


# --- observing the worker ---------------------------------------------------------------------


class Observer:
    """A background thread that reads the worker's /metrics, counts profile keys in Redis and
    fetches a few profiles, so that slow reads never hold up the producer."""

    def __init__(self, stats: LiveStats, web_url: str, redis_client: Any, key_prefix: str) -> None:
        self.stats, self.web_url, self.redis, self.prefix = stats, web_url, redis_client, key_prefix
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-observer", daemon=True)
        self._rates: deque[tuple[float, int, int]] = deque()  # (t, sent, applied) samples
        self._snapshots: deque[tuple[float, Any]] = deque()  # (t, metrics) for windowed latency
        self._next_scan = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        next_summaries = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                self.read_metrics()
                if now >= self._next_scan:
                    self.count_profiles()
                if now >= next_summaries:
                    self.fetch_summaries()
                    next_summaries = now + SUMMARIES_EVERY_S
                self.stats.observer_error = ""
            except Exception as exc:  # keep observing: a failed read shows, it never stops the demo
                self.stats.observer_error = f"{type(exc).__name__}: {exc}"
            self._stop.wait(METRICS_EVERY_S)

    def read_metrics(self) -> None:
        try:
            metrics = scrape(self.web_url + "/metrics", timeout=2.0)
        except (OSError, ValueError):
            return  # worker busy or gone; the producer loop notices a dead worker
        s, now = self.stats, time.monotonic()
        s.consumed = int(total(metrics, "onboarding_events_consumed_total"))
        s.applied = int(total(metrics, "onboarding_events_applied_total"))
        s.invalid = int(total(metrics, "onboarding_events_invalid_total"))
        s.duplicates = int(total(metrics, "onboarding_events_duplicate_total"))
        s.linked_ids = int(
            total(metrics, "onboarding_identity_merges_total", outcome="merged")
            + total(metrics, "onboarding_identity_merges_total", outcome="linked")
        )
        s.triggers = {
            labels["type"]: int(value)
            for labels, value in metrics.get("onboarding_triggers_emitted_total", [])
        }
        s.held_out = int(total(metrics, "onboarding_triggers_suppressed_total", reason="holdout"))
        s.suppressed = int(total(metrics, "onboarding_triggers_suppressed_total")) - s.held_out
        s.segment_changes = int(total(metrics, "onboarding_segment_changes_total"))
        s.cluster_model = int(total(metrics, "onboarding_cluster_model_version"))
        s.timer_lag_p50 = histogram_quantile(metrics, "onboarding_timer_lag_seconds", 0.5)
        s.p50_all = histogram_quantile(metrics, LATENCY, 0.5)
        s.p99_all = histogram_quantile(metrics, LATENCY, 0.99)
        self._snapshots.append((now, metrics))
        while len(self._snapshots) > 2 and now - self._snapshots[1][0] >= LATENCY_WINDOW_S:
            self._snapshots.popleft()
        baseline = self._snapshots[0][1] if len(self._snapshots) > 1 else None
        s.p50 = histogram_quantile(metrics, LATENCY, 0.5, baseline)
        s.p99 = histogram_quantile(metrics, LATENCY, 0.99, baseline)
        self._rates.append((now, s.sent, s.applied))
        while len(self._rates) > 2 and now - self._rates[1][0] >= 2.0:
            self._rates.popleft()
        t_old, sent_old, applied_old = self._rates[0]
        if now > t_old:
            s.sent_rate = (s.sent - sent_old) / (now - t_old)
            s.applied_rate = (s.applied - applied_old) / (now - t_old)

    def count_profiles(self) -> None:
        """SCAN ``{prefix}:p:*``; the next scan waits 10x as long as this one took (cheap)."""
        began = time.monotonic()
        self.stats.profile_keys = sum(1 for _ in self.redis.scan_iter(match=f"{self.prefix}:p:*", count=2000))
        took = time.monotonic() - began
        self._next_scan = time.monotonic() + max(2.0, 10 * took)

    def fetch_summaries(self) -> None:
        """One-line summaries of the profiles of the most recently active users."""
        users: list[str] = []
        for activity in list(self.stats.recent):
            if activity.user_id and activity.user_id not in users:
                users.append(activity.user_id)
        summaries = self.stats.summaries
        for user in reversed(users[:3]):
            doc = _get_json(f"{self.web_url}/profiles/{urllib.parse.quote(user, safe='')}")
            if isinstance(doc, dict):
                summaries[user] = profile_line(doc)
                summaries.move_to_end(user)
        while len(summaries) > 5:
            summaries.popitem(last=False)

    def final(self) -> None:
        """Stop the thread, then take one last complete reading (after the producer stopped)."""
        self.stop()
        with contextlib.suppress(Exception):
            self.read_metrics()
            self.count_profiles()


def profile_line(doc: dict[str, Any]) -> str:
    """``activated · 2 sessions · signup: completed (5 steps) · 3 features · segments: ...``"""
    parts = [str(doc.get("lifecycle", "?"))]
    sessions = int((doc.get("sessions") or {}).get("count", 0))
    parts.append(f"{sessions} session{'' if sessions == 1 else 's'}")
    flows: dict[str, Any] = doc.get("onboarding") or {}
    for flow, state in flows.items():
        done = len(state.get("completed_steps") or {})
        if state.get("status") == "completed":
            parts.append(f"{flow}: completed ({done} steps)")
        elif state.get("current_step"):
            parts.append(f"{flow}: on {state['current_step']} ({done} done)")
        else:
            parts.append(f"{flow}: {done} steps done")
    if not flows:
        parts.append("onboarding not started")
    parts.append(f"{len(doc.get('features') or {})} features")
    help_views = sum((doc.get("help_views") or {}).values())
    if help_views:
        parts.append(f"{help_views} help views")
    if doc.get("segments"):
        parts.append("segments: " + ", ".join(map(str, doc["segments"])))
    cluster = doc.get("cluster")
    if cluster:
        parts.append(f"cluster: {cluster.get('name', cluster) if isinstance(cluster, dict) else cluster}")
    return " · ".join(parts)


# --- the view ---------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def render(stats: LiveStats, feed: SyntheticFeed) -> Group:
    """The live view: counters, the latest events sent, a few users' profiles."""
    s = stats
    minutes, seconds = divmod(int(s.elapsed()), 60)
    head = Table.grid(padding=(0, 2))
    for style in ("dim", "bold", "dim", "bold"):
        head.add_column(style=style, no_wrap=True)
    head.add_row(
        "elapsed",
        f"{minutes}:{seconds:02d} ({s.phase})",
        "users",
        f"{s.cohorts} x {feed.users} (a new cohort every {feed.wave_s:.0f} s)",
    )
    head.add_row(
        "sent", f"{s.sent:,} ({s.sent_rate:,.0f}/s)", "applied", f"{s.applied:,} ({s.applied_rate:,.0f}/s)"
    )
    head.add_row(
        "dead-lettered",
        f"{s.invalid:,} / {s.broken:,} broken",
        "duplicates",
        f"{s.duplicates:,} / {s.resent:,} re-sent",
    )
    window = f"(last {LATENCY_WINDOW_S:.0f} s)"
    head.add_row("latency p50", f"{_ms(s.p50)} {window}", "latency p99", f"{_ms(s.p99)} {window}")
    head.add_row("profiles", f"{s.profiles:,}", "linked anon ids", f"{s.linked_ids:,}")
    fired = ", ".join(f"{k} {v}" for k, v in sorted(s.triggers.items())) or "none yet"
    head.add_row("triggers", fired, "held out / suppressed", f"{s.held_out:,} / {s.suppressed:,}")
    model = f"v{s.cluster_model}" if s.cluster_model else "training… (needs 200 samples)"
    head.add_row("segment changes", f"{s.segment_changes:,}", "cluster model", model)
    head.add_row("timer lag p50", _ms(s.timer_lag_p50), "", "")
    if s.delivery_errors or s.observer_error:
        head.add_row("[red]problems", f"{s.delivery_errors} delivery errors", s.observer_error[:60], "")

    activity = Table(title="latest activity", title_justify="left", expand=True, box=box.SIMPLE_HEAD)
    activity.add_column("time", no_wrap=True, min_width=8)
    activity.add_column("user", no_wrap=True, min_width=18)
    activity.add_column("event", no_wrap=True, min_width=25)
    activity.add_column("step / feature", overflow="ellipsis")
    for row in list(s.recent):
        activity.add_row(row.time, row.user, row.event, row.detail)

    profiles = Table(
        title="recently active users (GET /profiles/<id>)",
        title_justify="left",
        expand=True,
        box=box.SIMPLE_HEAD,
    )
    profiles.add_column("user", no_wrap=True, min_width=18)
    profiles.add_column("profile")
    for user, line in reversed(list(s.summaries.items())):
        profiles.add_row(user, line)
    return Group(
        Panel(head, title="onboarding engine · live · Ctrl-C stops", title_align="left"), activity, profiles
    )


def progress_line(stats: LiveStats) -> str:
    """One plain line for logs when stdout is not a terminal (CI, pipes)."""
    s = stats
    return (
        f"[{s.elapsed():4.0f} s] sent {s.sent} ({s.sent_rate:.0f}/s) · applied {s.applied} "
        f"({s.applied_rate:.0f}/s) · dead-lettered {s.invalid} · duplicates {s.duplicates} · "
        f"profiles {s.profiles} · p50/p99 {_ms(s.p50)}/{_ms(s.p99)}"
    )


# --- the demo ---------------------------------------------------------------------------------


class Demo:
    """Set-up, the producing loop and the teardown of one demo run."""

    def __init__(self, users: int, rate: float, time_scale: float, console: Console) -> None:
        self.console = console
        self.rate = rate
        self.stats = LiveStats()
        self.feed = SyntheticFeed(users, time_scale, rate)
        self.stack = contextlib.ExitStack()
        self.worker = WorkerProcess(WORKER_LOG)
        self.observer: Observer | None = None
        self.producer: Any = None
        self.sender: Sender | None = None
        self.settings: Settings | None = None

    def setup(self) -> None:
        services = start_services(self.stack, self.console)
        self.settings = settings = Settings.load(
            kafka_bootstrap_servers=services.bootstrap, redis_url=services.redis_url
        )
        for line in apply_topics(settings, services.bootstrap):
            if not line.endswith("partitions)") and not line.endswith(": exists"):
                self.console.print(f"topic {line}")
        STATE_DIR.mkdir(exist_ok=True)
        self.worker.start(services)
        self.stack.callback(self.worker.stop)
        write_state(services, self.worker)
        self.stack.callback(_remove_state)
        self._wait_for_worker()

        from confluent_kafka import Producer

        conf = kafka_client_config(settings, services.bootstrap)
        conf.update({"client.id": "stream-app-demo", "linger.ms": 5, "log_level": 4})
        self.producer = Producer(conf)
        self.observer = Observer(
            self.stats, self.worker.url, _redis_client(settings), settings.redis_key_prefix
        )
        self.stack.callback(self.observer.stop)
        self.observer.start()

    def _wait_for_worker(self) -> None:
        text = "starting worker… (joining the consumer group takes a few seconds)"
        if not self.console.is_terminal:
            self.console.print(text)
        with self.console.status(text):
            self.worker.wait_ready()
        self.console.print(
            f"worker ready (log: {WORKER_LOG})\n"
            f"  profiles: {self.worker.url}/profiles/<user_id>  or  stream-app profile <user_id>\n"
            f"  metrics:  {self.worker.url}/metrics",
            highlight=False,
        )

    def stream(self, duration: float | None) -> None:
        """Produce until ``duration`` (or Ctrl-C), then let the worker drain."""
        assert self.settings is not None
        self.sender = sender = Sender(
            self.producer, self.settings.topic_events, self.feed, self.rate, self.stats
        )
        self.stats.started = time.monotonic()
        with self._display():
            next_line = time.monotonic() + 5
            while duration is None or self.stats.elapsed() < duration:
                sender.send_due()
                self.worker.check()
                if not self.console.is_terminal and time.monotonic() >= next_line:
                    self.console.print(progress_line(self.stats), highlight=False, soft_wrap=True)
                    next_line += 5
                time.sleep(sender.pause())
            self.stats.phase = "draining"
            self.producer.flush(10)
            self._wait_drained()
            self.stats.phase = "done"
            if self.observer:
                self.observer.final()
        if not self.console.is_terminal:  # no live view was drawn: print its final state once
            self.console.print(render(self.stats, self.feed))

    @contextlib.contextmanager
    def _display(self) -> Iterator[None]:
        if not self.console.is_terminal:
            yield
            return
        with Live(
            console=self.console,
            refresh_per_second=4,
            get_renderable=lambda: render(self.stats, self.feed),
            redirect_stderr=False,
        ):
            yield

    def _wait_drained(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Until the worker has read every record sent, it stalls for 5 s, or ``timeout``."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline and self.stats.consumed < self.stats.records:
            self.worker.check()
            if self.stats.consumed != last:
                last, last_change = self.stats.consumed, time.monotonic()
            elif time.monotonic() - last_change > 5:
                return
            time.sleep(0.2)

    def teardown(self, interrupted: bool) -> None:
        """Stop producing, stop the worker (SIGTERM, SIGKILL after 10 s), stop the services."""
        if self.producer is not None:
            self.producer.flush(5)
            self.producer = self.sender = None  # closes its connections before the broker goes away
        worker_alive = self.worker.proc is not None and self.worker.proc.poll() is None
        if interrupted and self.observer is not None and worker_alive:
            with contextlib.suppress(DemoError):
                self._wait_drained(timeout=3.0)  # a short grace: Ctrl-C should stop promptly
            self.observer.final()
        self.stack.close()


def _remove_state() -> None:
    with contextlib.suppress(FileNotFoundError):
        STATE_FILE.unlink()


def _redis_client(settings: Settings) -> Any:
    import redis
    from redis.cluster import RedisCluster

    assert settings.redis_url is not None
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, socket_timeout=5)
    return redis.Redis.from_url(settings.redis_url, socket_timeout=5)


@contextlib.contextmanager
def _signal(signum: int, handler: Callable[..., Any] | int) -> Iterator[None]:
    """Install a signal handler for the block (a no-op outside the main thread)."""
    try:
        previous = signal.signal(signum, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def run_demo(users: int, rate: float, time_scale: float, duration: float | None) -> int:
    """Run the demo; 0 after Ctrl-C or ``duration``, 1 if the worker died, 2 on bad arguments."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=110)  # logs and pipes: room for the tables
    if users < 1 or rate <= 0 or time_scale <= 0 or (duration is not None and duration <= 0):
        console.print("stream-app demo: --users, --rate, --time-scale and --duration must be positive")
        return 2
    demo = Demo(users, rate, time_scale, console)
    code, interrupted = 0, False
    with _signal(signal.SIGTERM, _interrupt):  # `kill <pid>` cleans up like Ctrl-C
        try:
            demo.setup()
            demo.stream(duration)
        except KeyboardInterrupt:
            interrupted = True
            console.print("\nstopping…")
        except DemoError as exc:
            console.print(f"[red]{exc}[/]", highlight=False)
            code = 1
        finally:
            with _signal(signal.SIGINT, signal.SIG_IGN), _signal(signal.SIGTERM, signal.SIG_IGN):
                demo.teardown(interrupted)
    console.print(demo.stats.summary_text(), highlight=False)
    print(demo.stats.summary_line(), flush=True)
    return code
