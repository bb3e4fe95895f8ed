"""The engine's processes on one machine: the broker and Redis (configured or embedded), and
``stream-app worker`` / ``stream-app collector`` as subprocesses that are ready when their
health check says so.

:class:`EngineProcess` is the one way to start an engine process and wait until it is
usable; the demo, the end-to-end tests and the benchmarks all use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from stream_app.embedded import EmbeddedBroker, EmbeddedRedis, free_port
from stream_app.errors import StreamAppError
from stream_app.settings import Settings

STATE_DIR = Path(".stream-app")  # in the current directory; `stream-app profile` reads demo.json
STATE_FILE = STATE_DIR / "demo.json"
READY_TIMEOUT_S = 120.0  # worker start-up: import, Redis, consumer-group join


class ProcessError(StreamAppError):
    """An engine process died or never became ready; the message carries its last log lines."""


def get_json(url: str, timeout: float = 1.0) -> Any:
    """GET ``url`` as JSON; None when unreachable or not JSON (also on 404/503)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return orjson.loads(resp.read())
    except (OSError, ValueError):
        return None


def worker_ready(health: Any) -> bool:
    """The worker is usable once it owns partitions of the events topic (group joined)."""
    return isinstance(health, dict) and bool(health.get("partitions"))


def collector_ready(health: Any) -> bool:
    return isinstance(health, dict) and health.get("status") == "ok"


class EngineProcess:
    """``stream-app <command>`` as a subprocess with its own HTTP port and log file.

    ``port_variable`` names the setting that takes the port (WEB_PORT, COLLECTOR_PORT);
    ``ready`` judges the ``/healthz`` answer. With ``own_session`` the process does not get
    the terminal's Ctrl-C (the demo stops it itself).
    """

    def __init__(
        self,
        command: str,
        env: Mapping[str, str],
        log_path: Path,
        port_variable: str,
        ready: Callable[[Any], bool],
        own_session: bool = False,
    ) -> None:
        self.command, self.env, self.log_path = command, dict(env), log_path
        self.port_variable, self.ready, self.own_session = port_variable, ready, own_session
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def start(self) -> EngineProcess:
        self.port = free_port()
        env = {**self.env, self.port_variable: str(self.port)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stream_app", self.command],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.own_session,
            )
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> EngineProcess:
        """Until ``/healthz`` satisfies ``ready``; :class:`ProcessError` if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            if self.ready(get_json(self.url + "/healthz")):
                return self
            time.sleep(0.2)
        raise ProcessError(
            f"stream-app {self.command} was not ready after {timeout:.0f} s; last log lines:\n{self.tail()}"
        )

    def check(self) -> None:
        """Raise :class:`ProcessError` with the last log lines if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ProcessError(
                f"stream-app {self.command} exited with code {self.proc.returncode}; "
                f"last log lines:\n{self.tail()}"
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if not self.alive:
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, lines: int = 30) -> str:
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


def engine_env(services: Services, **extra: str) -> dict[str, str]:
    """The environment of an engine process on these services (a salt of its own unless one is
    set: the worker refuses the public development salt)."""
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=services.bootstrap,
        REDIS_URL=services.redis_url,
        LOG_FORMAT="json",
        **extra,
    )
    env.setdefault("PII_HASH_SALT", secrets.token_hex(32))
    return env


def write_state(services: Services, worker: EngineProcess, collector: EngineProcess) -> None:
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
        "collector_url": collector.url,
        "pid": worker.pid,
    }
    STATE_FILE.write_text(json.dumps(state, indent=2) + "\n")


def remove_state() -> None:
    with contextlib.suppress(FileNotFoundError):
        STATE_FILE.unlink()
