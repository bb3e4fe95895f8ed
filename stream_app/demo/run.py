"""``stream-app demo``: set-up, the sending loop and the teardown of one demo run."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.live import Live

from stream_app.demo.feed import CollectorSender, SyntheticFeed
from stream_app.demo.observer import Observer
from stream_app.demo.services import (
    STATE_DIR,
    EngineProcess,
    ProcessError,
    collector_ready,
    engine_env,
    remove_state,
    start_services,
    worker_ready,
    write_state,
)
from stream_app.demo.stats import LiveStats
from stream_app.demo.view import progress_line, render
from stream_app.settings import Settings
from stream_app.topics import apply_topics

WORKER_LOG = STATE_DIR / "worker.log"
COLLECTOR_LOG = STATE_DIR / "collector.log"
DRAIN_TIMEOUT_S = 20.0  # after the last event: how long to wait for the worker to catch up


class Demo:
    def __init__(self, users: int, rate: float, time_scale: float, console: Console) -> None:
        self.console = console
        self.rate = rate
        self.stats = LiveStats()
        self.feed = SyntheticFeed(users, time_scale, rate)
        self.stack = contextlib.ExitStack()
        self.worker: EngineProcess | None = None
        self.collector: EngineProcess | None = None
        self.observer: Observer | None = None
        self.sender: CollectorSender | None = None

    def setup(self) -> None:
        services = start_services(self.stack, self.console)
        settings = Settings.load(kafka_bootstrap_servers=services.bootstrap, redis_url=services.redis_url)
        for line in apply_topics(settings, services.bootstrap):
            if not line.endswith("partitions)") and not line.endswith(": exists"):
                self.console.print(f"topic {line}")
        STATE_DIR.mkdir(exist_ok=True)
        for log in (WORKER_LOG, COLLECTOR_LOG):
            log.write_bytes(b"")
        env = engine_env(services, WEB_HOST="127.0.0.1", COLLECTOR_ALLOW_ANONYMOUS="true")
        self.worker = EngineProcess("worker", env, WORKER_LOG, "WEB_PORT", worker_ready, own_session=True)
        self.collector = EngineProcess(
            "collector", env, COLLECTOR_LOG, "COLLECTOR_PORT", collector_ready, own_session=True
        )
        for process in (self.worker, self.collector):
            process.start()
            self.stack.callback(process.stop)
        write_state(services, self.worker, self.collector)
        self.stack.callback(remove_state)
        text = "starting the worker and the collector… (joining the consumer group takes a few seconds)"
        if not self.console.is_terminal:
            self.console.print(text)
        with self.console.status(text):
            self.collector.wait_ready()
            self.worker.wait_ready()
        self.console.print(
            f"worker ready (log: {WORKER_LOG}); collector ready (log: {COLLECTOR_LOG})\n"
            f"  front door: {self.collector.url}/v1/batch  (point an analytics SDK here)\n"
            f"  profiles:   {self.worker.url}/profiles/<user_id>  or  stream-app profile <user_id>\n"
            f"  metrics:    {self.worker.url}/metrics  and  {self.collector.url}/metrics",
            highlight=False,
        )
        self.stats.front_door = self.collector.url
        self.observer = Observer(
            self.stats,
            self.worker.url,
            self.collector.url,
            _redis_client(settings),
            settings.redis_key_prefix,
        )
        self.stack.callback(self.observer.stop)
        self.observer.start()

    def check(self) -> None:
        for process in (self.worker, self.collector):
            if process is not None:
                process.check()

    def stream(self, duration: float | None) -> None:
        """Send until ``duration`` (or Ctrl-C), then let the worker drain."""
        assert self.collector is not None
        self.sender = sender = CollectorSender(self.collector.url, self.feed, self.rate, self.stats)
        self.stats.started = time.monotonic()
        with self._display():
            next_line = time.monotonic() + 5
            while duration is None or self.stats.elapsed() < duration:
                sender.send_due()
                self.check()
                if not self.console.is_terminal and time.monotonic() >= next_line:
                    self.console.print(progress_line(self.stats), highlight=False, soft_wrap=True)
                    next_line += 5
                time.sleep(sender.pause())
            self.stats.phase = "draining"
            self._flush_pending()
            self._wait_drained()
            self.stats.phase = "done"
            if self.observer:
                self.observer.final()
        if not self.console.is_terminal:  # no live view was drawn: print its final state once
            self.console.print(render(self.stats, self.feed))

    def _flush_pending(self, timeout: float = 10.0) -> None:
        assert self.sender is not None
        deadline = time.monotonic() + timeout
        while self.sender.pending and time.monotonic() < deadline:
            self.sender.flush()
            if self.sender.pending:
                time.sleep(0.2)

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
            self.check()
            if self.stats.consumed != last:
                last, last_change = self.stats.consumed, time.monotonic()
            elif time.monotonic() - last_change > 5:
                return
            time.sleep(0.2)

    def teardown(self, interrupted: bool) -> None:
        """Stop sending, stop the collector and the worker (SIGTERM, then SIGKILL), the services."""
        if self.sender is not None:
            with contextlib.suppress(Exception):
                self._flush_pending(timeout=3.0)
            self.sender.close()
            self.sender = None
        if interrupted and self.observer is not None and self.worker is not None and self.worker.alive:
            with contextlib.suppress(ProcessError):
                self._wait_drained(timeout=3.0)  # a short grace: Ctrl-C should stop promptly
            self.observer.final()
        self.stack.close()


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
    """Run the demo; 0 after Ctrl-C or ``duration``, 1 if a process died, 2 on bad arguments."""
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
        except ProcessError as exc:
            console.print(f"[red]{exc}[/]", highlight=False)
            code = 1
        finally:
            with _signal(signal.SIGINT, signal.SIG_IGN), _signal(signal.SIGTERM, signal.SIG_IGN):
                demo.teardown(interrupted)
    console.print(demo.stats.summary_text(), highlight=False)
    print(demo.stats.summary_line(), flush=True)
    return code
