"""Issue 12 measurement: Redis bytes per profile, by key kind.

Run: python bench/memory.py [--users N] [--label TEXT] [--idle-after SECONDS] [--uuid-ids]

One worker on the embedded broker and a private redis-server, default settings (the
default key prefix too: a key's name is part of what it costs, rounded up to the
allocator's size class; rows before 2026-12-02 "later" had an 8-character prefix). The
synthetic stream of N users (their whole onboarding and first weeks, ~43 events each,
anonymous ids linked to user ids on identify) is produced, the worker applies it, and then
Redis is measured: ``used_memory`` after minus before, divided by the number of user
profiles (linked anonymous ids leave a tombstone each, counted in the total), and
``MEMORY USAGE`` summed per key kind (``<prefix>:<kind>:...``).

Each run adds one row to the "Memory per profile" table of bench/RESULTS.md (``--label``
names it: what changed), so changes are compared against the same method.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import uuid

import orjson
import redis
from common import deploy, isolated_env, machine, redis_memory_by_kind
from confluent_kafka import Producer
from rich.console import Console
from rich.table import Table
from throughput import RESULTS, start_worker

from stream_app.embedded import EmbeddedBroker, EmbeddedRedis
from stream_app.observe import scrape, total
from stream_app.settings import Settings
from stream_app.store.docpack import decode_doc
from stream_app.synthetic import generate_users, interleaved_stream, record_key

SECTION = "## Memory per profile (issue 12)"
DEFAULT_PREFIX = str(Settings.model_fields["redis_key_prefix"].default)  # the engine's REDIS_KEY_PREFIX
console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=2000, help="synthetic users (default 2000)")
    parser.add_argument("--label", default="", help="what this run measures (a row label)")
    parser.add_argument(
        "--idle-after",
        type=int,
        default=0,
        metavar="SECONDS",
        help="run with DEDUP_WINDOW_SECONDS=SECONDS, then wait that long with no traffic and "
        "measure again: what an idle user costs (the row's idle column)",
    )
    parser.add_argument(
        "--uuid-ids",
        action="store_true",
        help="every user id and anonymous id a UUID (36 characters, as analytics.js's anonymousId "
        "and many apps' user ids are) instead of the synthetic ~18: what longer ids cost",
    )
    parser.add_argument(
        "--key-prefix",
        default=DEFAULT_PREFIX,
        help=f"REDIS_KEY_PREFIX of the run (default: the engine's, {DEFAULT_PREFIX!r})",
    )
    args = parser.parse_args()
    population = generate_users(args.users, 505)
    if args.uuid_ids:
        population = [
            dataclasses.replace(u, user_id=str(uuid.uuid5(uuid.NAMESPACE_OID, u.user_id)),
                                anonymous_id=str(uuid.uuid5(uuid.NAMESPACE_OID, u.anonymous_id)))
            for u in population
        ]  # fmt: skip
    tag = f"mm{uuid.uuid4().hex[:6]}"
    prefix = args.key_prefix  # the Redis is private: no need for the run's tag
    with EmbeddedBroker() as broker, EmbeddedRedis() as redis_server:
        env = isolated_env(
            broker.bootstrap, redis_server.url, tag, PII_HASH_SALT="bench-salt", LOG_LEVEL="WARNING"
        )
        env["REDIS_KEY_PREFIX"] = prefix
        if args.idle_after:
            env["DEDUP_WINDOW_SECONDS"] = str(args.idle_after)
        settings = deploy(env, broker.bootstrap)
        client = redis.Redis.from_url(redis_server.url)
        before = int(client.info("memory")["used_memory"])
        stats_before = memory_stats(client)
        producer = Producer(
            {"bootstrap.servers": broker.bootstrap, "linger.ms": 20, "enable.idempotence": True}
        )
        now = int(time.time() * 1000)
        sent = 0
        with console.status(f"producing {args.users} users' events…"):
            for event in interleaved_stream(population, now - 30 * 86_400_000, 505, arrival_spread_s=86_400):
                producer.produce(settings.topic_events, key=record_key(event), value=orjson.dumps(event))
                producer.poll(0)
                sent += 1
            producer.flush(60)
        proc, url = start_worker(env)
        try:
            with console.status(f"applying {sent} events…"):
                while total(scrape(url + "/metrics"), "onboarding_events_consumed_total") < sent:
                    time.sleep(1)
                time.sleep(3)
        finally:
            proc.terminate()
            proc.wait(30)
        used = int(client.info("memory")["used_memory"]) - before
        overheads = {k: v - stats_before.get(k, 0) for k, v in memory_stats(client).items()}
        kinds = redis_memory_by_kind(redis_server.url, prefix)
        idle = None
        if args.idle_after:
            with console.status(f"idle for {args.idle_after + 5} s (the dedup window, and some)…"):
                time.sleep(args.idle_after + 5)
                for key in client.scan_iter(f"{prefix}:*", count=2000):
                    client.ttl(key)  # expire what is due now rather than by Redis' sampling
            idle = int(client.info("memory")["used_memory"]) - before
        profiles = tombstones = 0
        doc_bytes = 0
        hash_bytes = {"p(user)": [0, 0], "p(tombstone)": [0, 0]}  # the profile hashes, split
        for key in client.scan_iter(f"{prefix}:p:*", count=2000):
            raw = client.hget(key, "d") or b""
            doc_bytes += len(raw)
            kind = "p(tombstone)" if "merged_into" in decode_doc(raw or b"{}") else "p(user)"
            hash_bytes[kind][0] += 1
            hash_bytes[kind][1] += int(client.memory_usage(key, samples=0) or 0)
        profiles, tombstones = hash_bytes["p(user)"][0], hash_bytes["p(tombstone)"][0]
        if "p" in kinds:  # measured before the idle wait, like the other kinds
            kinds.pop("p")
            kinds.update({k: (n, size) for k, (n, size) in hash_bytes.items()})
        client.close()
    report(args, sent, used, profiles, tombstones, doc_bytes, kinds, idle)
    per = max(1, profiles)
    console.print(
        "used_memory growth by Redis' own accounting (MEMORY STATS, bytes per profile): "
        + ", ".join(f"{k} {v / per:.0f}" for k, v in overheads.items() if abs(v / per) >= 1)
    )


def memory_stats(client: redis.Redis) -> dict[str, int]:
    """The numeric top-level fields of ``MEMORY STATS`` (where used_memory goes)."""
    raw = client.execute_command("MEMORY STATS")
    pairs = dict(zip(raw[::2], raw[1::2], strict=True)) if isinstance(raw, list) else dict(raw)
    out = {}
    for key, value in pairs.items():
        name = key.decode() if isinstance(key, bytes) else str(key)
        if isinstance(value, int) and not name.startswith(("peak", "keys.count", "db.")):
            out[name] = value
    return out


def report(
    args: argparse.Namespace,
    sent: int,
    used: int,
    profiles: int,
    tombstones: int,
    doc_bytes: int,
    kinds: dict[str, tuple[int, int]],
    idle: int | None = None,
) -> None:
    per = used / max(1, profiles)
    idle_text = f"{idle / max(1, profiles):.0f}" if idle is not None else "-"
    table = Table(title=f"Redis per profile: {per:.0f} bytes ({profiles} profiles, {tombstones} tombstones)")
    for column in ("kind", "keys", "bytes", "bytes per profile"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, (keys, size) in kinds.items():
        table.add_row(kind, str(keys), str(size), f"{size / max(1, profiles):.0f}")
    console.print(table)
    breakdown = ", ".join(
        f"{k} {s / max(1, profiles):.0f}" for k, (_n, s) in kinds.items() if s / max(1, profiles) >= 5
    )
    label = (args.label or "-") + (" (UUID ids)" if args.uuid_ids else "")
    if args.key_prefix != DEFAULT_PREFIX:
        label += f" (key prefix {args.key_prefix!r})"
    row = (
        f"| {time.strftime('%Y-%m-%d')} | {label} | {args.users} / {sent} | **{per:.0f}** "
        f"| {idle_text} | {doc_bytes / max(1, profiles + tombstones):.0f} | {breakdown} |"
    )
    head = f"""{SECTION}

Run: `python bench/memory.py --users N --label ...`. Machine: {machine()}.
Bytes per profile = Redis `used_memory` after the worker applied the stream minus before,
divided by the user profiles (each user's linked anonymous id leaves a tombstone, counted
in the total). By kind: `MEMORY USAGE` of every key of that kind / profiles (p = profile
hash, split into users' and linked ids' tombstones since 2026-12-02, sd = dedup digests,
stepstats-applied = the step statistics' former dedup sets, members / deadlines /
watermark = the timer's indexes, cluster-* / reco-* = the shared models' sample sets).
Idle (`--idle-after S`): the same, after S seconds with no traffic, the run's dedup window
being S seconds (what a user costs once their last event is older than the window).
Target (issue 12): ≤ 2,048 bytes. The run is on the engine's default key prefix (key names
are part of what a profile costs); `--uuid-ids` measures the same users with 36-character ids.

| date | change | users / events | bytes per profile | idle | stored doc, mean B | \
by kind (bytes per profile) |
|---|---|---|---|---|---|---|
"""
    text = RESULTS.read_text()
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        block = text[start : nxt if nxt >= 0 else len(text)].rstrip() + "\n" + row + "\n"
        text = text[:start] + block + (text[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + head + row + "\n"
    RESULTS.write_text(text)
    console.print(f"added a row to {SECTION!r} in bench/RESULTS.md")


if __name__ == "__main__":
    main()
