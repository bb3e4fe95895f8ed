"""Issue 12: what one output message costs the worker, by way of sending it.

Run: python bench/producer.py [--messages N] [--rounds R]

One Faust app (the worker's producer settings: acks=all) on an embedded broker sends the
same segment-change-sized messages to an 8-partition topic in chunks of 250 (a busy
batch's outputs), awaiting every chunk's acks like the publisher does, four ways,
alternated in rounds:

* ``Topic.send`` — what the worker used until 2026-12-01;
* the app's producer, ``app.producer.send`` — what the worker uses now (``ProducerSink``);
* aiokafka's producer ``send`` under it;
* aiokafka's batch API (``create_batch`` / ``send_batch``, partitioned by hand) — the floor.

The CPU time of the process (all threads) and the wall time per message are reported
(medians of the rounds); the section "Output messages" of bench/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import faust
import orjson
from aiokafka.partitioner import DefaultPartitioner
from common import machine, own_cpu_seconds, write_section
from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console

from stream_app.embedded import EmbeddedBroker

SECTION = "## Output messages: cost per message by way of sending (issue 12)"
CHUNK = 250
WAYS = ("Topic.send", "app.producer.send", "aiokafka send", "aiokafka batch")
console = Console()


def messages(n: int) -> list[tuple[bytes, bytes]]:
    """(key, value) like a segment change: a 36-char user id, ~230 bytes of JSON."""
    out = []
    for i in range(n):
        user = f"user-{i:031d}"
        value = {
            "type": "segment_change", "user_id": user, "segment": "needs_help", "change": "entered",
            "source": "rule", "at": "2026-12-01T00:00:00.000Z", "profile_version": i,
            "message_id": f"seg:{user}:needs_help:{i}",
        }  # fmt: skip
        out.append((user.encode(), orjson.dumps(value)))
    return out


async def send_chunk(
    way: str, app: faust.App, topic: Any, name: str, chunk: list[tuple[bytes, bytes]]
) -> None:
    if way == "Topic.send":
        futures = [await topic.send(key=k, value=v) for k, v in chunk]
    elif way == "app.producer.send":
        producer = await app.maybe_start_producer()
        futures = [await producer.send(name, k, v, None, None, None) for k, v in chunk]
    else:
        raw = app.producer._ensure_producer()  # type: ignore[attr-defined]
        if way == "aiokafka send":
            futures = [await raw.send(name, v, key=k) for k, v in chunk]
        else:
            partitions = sorted(await raw.partitions_for(name))
            by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
            for k, v in chunk:
                by_partition.setdefault(DefaultPartitioner()(k, partitions, partitions), []).append((k, v))
            futures = []
            for partition, records in by_partition.items():
                batch = raw.create_batch()
                for k, v in records:
                    batch.append(key=k, value=v, timestamp=None)
                batch.close()
                futures.append(await raw.send_batch(batch, name, partition=partition))
    await asyncio.gather(*futures)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=5000, help="messages per way and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    data = messages(args.messages)
    out_file = Path(f"/tmp/stream-app-bench/producer-{os.getpid()}.json")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker() as broker:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        created = admin.create_topics([NewTopic("bench.out", 8, 1), NewTopic("bench.idle", 1, 1)])
        for future in created.values():
            future.result(30)
        app = faust.App(
            f"bench-producer-{os.getpid()}",
            broker=f"kafka://{broker.bootstrap}",
            store="memory://",
            web_enabled=False,
            autodiscover=False,
            topic_disable_leader=True,
            topic_allow_declare=False,
            producer_acks=-1,
            datadir=str(out_file.parent / "producer-data"),
        )
        topic = app.topic("bench.out", key_serializer="raw", value_serializer="raw")

        @app.agent(app.topic("bench.idle", key_serializer="raw", value_serializer="raw"))
        async def idle(stream: Any) -> None:  # a consumer Faust needs in order to start
            async for _ in stream:
                pass

        @app.task
        async def run() -> None:
            await send_chunk("Topic.send", app, topic, "bench.out", data[:CHUNK])  # warm up
            results: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
            for _round in range(args.rounds):
                for way in WAYS:
                    c0, t0 = own_cpu_seconds(), time.perf_counter()
                    for start in range(0, len(data), CHUNK):
                        await send_chunk(way, app, topic, "bench.out", data[start : start + CHUNK])
                    results[way].append((time.perf_counter() - t0, own_cpu_seconds() - c0))
            out_file.write_bytes(orjson.dumps(results))
            os._exit(0)

        sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
        console.print(f"sending {args.messages} messages x {len(WAYS)} ways x {args.rounds} rounds…")
        pid = os.fork()
        if pid == 0:
            app.main()
        os.waitpid(pid, 0)
    results = orjson.loads(out_file.read_bytes())
    n = args.messages
    rows = []
    for way in WAYS:
        wall = statistics.median(w for w, _c in results[way]) / n * 1e6
        cpu_us = statistics.median(c for _w, c in results[way]) / n * 1e6
        rows.append(f"| {way} | {cpu_us:.0f} µs | {wall:.0f} µs |")
    table = "\n".join(rows)
    text = f"""{SECTION}

Run: `python bench/producer.py --messages {n} --rounds {args.rounds}` on {time.strftime("%Y-%m-%d")}.
Machine: {machine()}.

| way of sending (chunks of {CHUNK}, acks awaited per chunk) | CPU per message | wall per message |
|---|---|---|
{table}

Medians of {args.rounds} rounds, the ways alternated within each round; CPU is the whole
process's (the producer's sender runs in the same event loop). The worker sends through
the app's producer (`ProducerSink` in `stream_app/worker/app.py`) since 2026-12-01, no
longer through `Topic.send`, whose per-record Faust machinery (a message object, callbacks,
sensors) was most of the ~270 µs per output record measured on 11-24. The batch API is
cheaper still, but it needs the partition chosen by hand and one batch per partition; not
worth its code while outputs are ~0.2 per event.
"""
    write_section(SECTION, text)
    console.print(text)


if __name__ == "__main__":
    main()
