"""The worker's group consumer on a real broker: where a partition starts after a rebalance.

Faust seeks every assigned partition to its committed offset after a rebalance; aiokafka
skips one with none, which then goes on from where its last fetch stopped (past records
Faust's queues held and the revocation cleared). The worker's consumer starts such a
partition from its beginning instead.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stream_app.worker.app import _install_group_consumer


def _topic_with_records(bootstrap: str, n: int) -> str:
    topic = f"gc-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(n):
        producer.produce(topic, value=str(i).encode(), partition=0)
    assert producer.flush(30) == 0
    return topic


async def _next_offset(consumer: Any) -> int:
    record = await consumer.getone()
    return int(record.offset)


async def _started(cls: Any, bootstrap: str, topic: str) -> Any:
    consumer = cls(
        bootstrap_servers=bootstrap,
        group_id=f"gc-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=3,
    )
    await consumer.start()
    consumer.assign([TopicPartition(topic, 0)])
    return consumer


async def test_a_partition_never_committed_starts_from_its_beginning_and_one_committed_from_its_commit(
    kafka_bootstrap: str,
) -> None:
    _install_group_consumer(100)
    import aiokafka

    worker_consumer = aiokafka.AIOKafkaConsumer  # what Faust builds in the worker
    plain = worker_consumer.__mro__[1]
    topic = _topic_with_records(kafka_bootstrap, 10)
    tp = TopicPartition(topic, 0)

    # aiokafka's own: a partition without a commit goes on past what was fetched
    consumer = await _started(plain, kafka_bootstrap, topic)
    try:
        assert [await _next_offset(consumer) for _ in range(4)] == [0, 1, 2, 3]
        await consumer.seek_to_committed()
        assert await _next_offset(consumer) >= 4
    finally:
        await consumer.stop()

    consumer = await _started(worker_consumer, kafka_bootstrap, topic)
    try:
        assert [await _next_offset(consumer) for _ in range(4)] == [0, 1, 2, 3]
        assert (await consumer.seek_to_committed())[tp] is None
        assert await _next_offset(consumer) == 0  # from the beginning: nothing skipped

        await consumer.commit({tp: OffsetAndMetadata(7, "")})
        assert [await _next_offset(consumer) for _ in range(3)] == [1, 2, 3]
        assert (await consumer.seek_to_committed())[tp] == 7
        assert await _next_offset(consumer) == 7  # a committed partition: as before
    finally:
        await consumer.stop()


async def test_the_worker_consumer_asks_the_broker_for_fuller_fetches(kafka_bootstrap: str) -> None:
    """KAFKA_FETCH_MIN_BYTES and KAFKA_FETCH_MAX_WAIT_MS reach the fetch requests of the group
    consumer Faust builds (Faust passes neither); a consumer outside a group keeps aiokafka's."""
    _install_group_consumer(40, 16384)
    import aiokafka

    topic = _topic_with_records(kafka_bootstrap, 3)
    consumer = await _started(aiokafka.AIOKafkaConsumer, kafka_bootstrap, topic)
    try:
        fetcher = consumer._fetcher
        assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (16384, 40)
        # fewer bytes than asked for: the broker answers once the wait is over, with all of them
        assert [await _next_offset(consumer) for _ in range(3)] == [0, 1, 2]
    finally:
        await consumer.stop()
        _install_group_consumer(100)
    plain = aiokafka.AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        assert (plain._fetch_min_bytes, plain._fetch_max_wait_ms) == (1, 500)
    finally:
        await plain.stop()
