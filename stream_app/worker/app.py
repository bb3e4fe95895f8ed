"""The worker as a Faust app: topics, the agent, HTTP views and timers wired to a :class:`Runtime`.

The composition root of the worker process (``stream-app worker``). The roles themselves
live in :mod:`stream_app.worker`; the agent (``agents/events.py``) and the views
(``stream_app/web.py``) get only what they call, so nothing imports back into this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
import time
from collections.abc import Mapping
from typing import Any

import faust
from redis.exceptions import RedisError

from agents import events
from stream_app import web
from stream_app.errors import ConfigError, RedisDataLost
from stream_app.lag import LagTracker
from stream_app.metrics import GcPauses
from stream_app.pipeline import Record
from stream_app.settings import DEV_PII_SALT, Settings
from stream_app.web import api_tokens
from stream_app.worker.batches import is_transient
from stream_app.worker.publisher import Sinks
from stream_app.worker.runtime import Runtime, Stores
from stream_app.worker.shutdown import die

log = logging.getLogger("stream_app")


def _credentials(settings: Settings) -> Any:
    protocol = settings.kafka_security_protocol
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
        if settings.kafka_ssl_certfile:
            context.load_cert_chain(
                str(settings.kafka_ssl_certfile),
                str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
            )
    if protocol.startswith("SASL_"):
        password = settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=password,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def _install_group_consumer(fetch_max_wait_ms: int, fetch_min_bytes: int = 1) -> None:
    """Faust's aiokafka group consumer, with three changes. Faust looks the class up on the
    aiokafka module at call time, so a subclass installed there is the one it builds; the
    worker is a process of its own and nothing else in it builds group consumers.

    * ``fetch_max_wait_ms``: Faust passes 1500 and has no setting for it. A broker that holds
      a fetch until that wait expires (Tansu does) then adds up to 1.5 s to every event's
      latency.
    * ``fetch_min_bytes``: Faust passes nothing, so aiokafka asks for 1 byte and live traffic
      comes in a fetch every few events (85-260 fetches a second at 864 events/s), each a
      request, a reply to parse and a hand-over to Faust's thread. Asking the broker to
      gather this many bytes (or ``fetch_max_wait_ms``) makes fewer, fuller fetches.
    * After a rebalance Faust seeks each partition to its committed offset, and aiokafka
      skips a partition with none (never committed, or 0): it goes on from where the last
      fetch stopped. What that fetch brought sat in Faust's queues, which the revocation
      clears, so those records were never processed. A rolling restart on Apache Kafka lost
      a few records of partitions not yet committed that way (seen 2 times in ~20 runs).
      Such a partition now starts from its beginning, as a new group's would
      (``auto_offset_reset=earliest``); what is processed again is applied once (messageIds).
    """
    import aiokafka
    from faust.transport.drivers import aiokafka as faust_aiokafka

    base = aiokafka.AIOKafkaConsumer
    if getattr(base, "_stream_app_fetch_wait", None) is not None:
        base._stream_app_fetch_wait = fetch_max_wait_ms
        base._stream_app_fetch_min_bytes = fetch_min_bytes
        return

    class _Consumer(base):  # type: ignore[misc,valid-type]
        _stream_app_fetch_wait = fetch_max_wait_ms
        _stream_app_fetch_min_bytes = fetch_min_bytes

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("group_id") is not None:
                kwargs["fetch_max_wait_ms"] = type(self)._stream_app_fetch_wait
                kwargs["fetch_min_bytes"] = type(self)._stream_app_fetch_min_bytes
            super().__init__(*args, **kwargs)

        async def seek_to_committed(self, *partitions: Any) -> dict[Any, int | None]:
            committed: dict[Any, int | None] = await super().seek_to_committed(*partitions)
            never = sorted(tp for tp, offset in committed.items() if not offset)
            if never:
                await self.seek_to_beginning(*never)
            return committed

    faust_aiokafka.aiokafka.AIOKafkaConsumer = _Consumer


def _supports_idempotence(settings: Settings, bootstrap: str) -> bool:
    """Whether the brokers grant a producer id (InitProducerId): Apache Kafka does; the
    embedded broker (Tansu) answers aiokafka's request with an error. Probed once at start-up
    with a producer of the worker's own settings, in a thread of its own (no event loop is
    needed or disturbed)."""
    import concurrent.futures

    import aiokafka
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    async def probe() -> bool:
        producer = aiokafka.AIOKafkaProducer(
            bootstrap_servers=[b.strip() for b in bootstrap.split(",")],
            enable_idempotence=True,
            acks="all",
            request_timeout_ms=10_000,
            **credentials_to_aiokafka_auth(_credentials(settings)),
        )
        try:
            await asyncio.wait_for(producer.start(), 20)
            return True
        except (TimeoutError, aiokafka.errors.KafkaConnectionError) as exc:
            # not reachable yet: no answer is not a refusal; Apache Kafka grants producer ids
            log.info(
                "idempotence not probed (brokers not reachable yet); assumed", extra={"error": repr(exc)}
            )
            return True
        except Exception as exc:  # the brokers answered, and refused
            log.warning(
                "the brokers do not grant idempotent producer ids; outputs are sent without "
                "idempotence (a retried request can write a record twice: consumers dedupe by id)",
                extra={"error": repr(exc)[:200]},
            )
            return False
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, probe()).result()


def _idempotent_producer() -> None:
    """Faust builds its aiokafka producer idempotent only inside transactions (exactly-once).

    Without it, a produce request the broker wrote but answered late or with a retriable
    error is sent again by aiokafka, and the record lands twice: the same trigger twice on
    the topic (the soak saw 2-3 copies 30-50 ms apart with an overloaded broker and no
    fault). With idempotence the broker drops the retried copy by producer id and sequence.
    As for the consumer above, the worker is a process of its own.
    """
    from faust.transport.drivers import aiokafka as faust_aiokafka

    producer = faust_aiokafka.Producer
    if getattr(producer, "_stream_app_idempotent", False):
        return
    extra = producer._settings_extra

    def _settings_extra(self: Any) -> Mapping[str, Any]:
        return {**extra(self), "acks": "all", "enable_idempotence": True}

    producer._settings_extra = _settings_extra  # type: ignore[method-assign]
    producer._stream_app_idempotent = True  # type: ignore[attr-defined]


class ProducerSink:
    """An output topic written through the app's producer (Faust's aiokafka producer: its
    acks, idempotence and credentials), not through ``Topic.send``.

    ``Topic.send`` wraps every record in Faust's message, callback and sensor machinery:
    ~280 us of CPU per record on our bench machine against ~62 us for the producer's own
    ``send`` (``bench/producer.py``); both return a future resolved by the broker's ack, and
    both partition by the key with the same default partitioner."""

    def __init__(self, app: faust.App, topic: str) -> None:
        self.app, self.topic = app, topic
        self.producer: Any = None  # the app's producer, once started

    async def send(
        self, *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None
    ) -> Any:
        if self.producer is None:
            self.producer = await self.app.maybe_start_producer()
        return await self.producer.send(self.topic, key, value, None, None, headers)


def create_app(settings: Settings) -> tuple[faust.App, Runtime]:
    """The Faust app with its agent, views and timers registered, and the runtime they drive."""
    bootstrap, _ = settings.require_services()
    check_safe_to_serve(settings)
    tokens = api_tokens(settings.api_tokens.get_secret_value() if settings.api_tokens else None)
    stores = Stores(settings)
    _install_group_consumer(settings.kafka_fetch_max_wait_ms, settings.kafka_fetch_min_bytes)
    if _supports_idempotence(settings, bootstrap):
        _idempotent_producer()
    (settings.data_dir / settings.app_id).mkdir(parents=True, exist_ok=True)
    brokers = ";".join(f"kafka://{b.strip()}" for b in bootstrap.split(","))
    app = faust.App(
        settings.app_id,
        broker=brokers,
        broker_credentials=_credentials(settings),
        store="memory://",
        datadir=str(settings.data_dir / settings.app_id),
        autodiscover=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        topic_partitions=stores.topics["events"].partitions,
        broker_session_timeout=settings.kafka_session_timeout_seconds,
        broker_heartbeat_interval=max(0.5, settings.kafka_session_timeout_seconds / 6),
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        web_enabled=True,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_in_thread=False,
        # Faust's own pages (routing, tables, graph, stats) are not ours to serve
        web_router_enabled=False,
        web_tables_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        web_metrics_enabled=False,
    )

    def topic(role: str) -> Any:
        return app.topic(stores.topics[role].name, key_serializer="raw", value_serializer="raw")

    def sink(role: str) -> ProducerSink:
        return ProducerSink(app, stores.topics[role].name)

    sinks = Sinks(sink("dlq"), sink("segments"), sink("triggers"), sink("triggers_holdout"))
    events_topic = topic("events")
    events_name = stores.topics["events"].name

    def unprocessed(partition: int) -> int | None:
        """Records of an events partition not processed yet: its log end minus the processed
        position; None while either is unknown (not fetched yet, not assigned)."""
        try:
            highwater = app.consumer.highwater(faust.types.TP(events_name, partition))
        except Exception:
            return None
        position = runtime.batches.position(partition, committed(partition))
        if highwater is None or position is None:
            return None
        return max(0, int(highwater) - position)

    async def caught_up(partition: int) -> bool:
        return unprocessed(partition) == 0  # unknown is not caught up

    def committed(partition: int) -> int | None:
        """The group's committed offset of an events partition (Faust keeps them per partition)."""
        offsets = getattr(app.consumer, "_committed_offset", {})
        value = offsets.get(faust.types.TP(events_name, partition))
        return int(value) if value is not None else None

    def lagging(partition: int) -> bool:
        """A full batch or more not processed yet in this partition (a backlog)."""
        return (unprocessed(partition) or 0) >= settings.batch_max_events

    runtime = Runtime(settings, sinks, stores, caught_up=caught_up, committed=committed, lagging=lagging)

    async def handle(records: list[Record]) -> object:
        try:
            return await runtime.batches.handle(records)
        except RedisDataLost as exc:
            die(str(exc))  # a restart would find the same: it exits with the same message
            raise

    def backlog() -> int:
        """Records of the owned events partitions not processed yet (unknown counts 0)."""
        return sum(unprocessed(partition) or 0 for partition in list(runtime.timer.owned))

    events.register(app, events_topic, handle, settings, backlog)
    health = Health(runtime, settings)
    web.register(app, runtime.reader, runtime.metrics.registry, health, tokens)
    lag = LagTracker()
    gc_pauses = GcPauses(runtime.metrics.gc_pause_seconds)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _joined(app: faust.App, assigned: Any, *args: Any, **kwargs: Any) -> None:
        health.joined = True

    @app.timer(interval=1.0)
    async def _check_epochs() -> None:
        """Also while no events arrive: a Redis that restarted empty is caught within a second."""
        owned = sorted(runtime.timer.owned)
        if not runtime.ready or not owned or app.rebalancing:
            return
        try:
            await runtime.guard.check(owned)
        except RedisDataLost as exc:
            die(str(exc))
        except Exception as exc:  # an outage: the batches and their retries report it
            log.debug("epoch check failed", extra={"error": repr(exc)[:200]})

    @app.timer(interval=1.0)
    async def _consumer_lag() -> None:
        """Lag per owned partition, in records and seconds, updated while idle too."""
        owned = set(runtime.timer.owned)
        now = time.time()
        gauges = runtime.metrics
        for partition in sorted(owned):
            tp = faust.types.TP(events_name, partition)
            try:
                log_end = int(app.consumer.highwater(tp))
            except Exception:  # not fetched yet
                continue
            lag.observe(partition, log_end, now)
            # Faust keeps the committed position (the next offset to consume) per partition
            committed = getattr(app.consumer, "_committed_offset", {}).get(tp)
            batches = runtime.batches
            # the position: past what was processed; else where the batch in hand (maybe stuck
            # retrying) starts; else the committed offset; an empty partition has no lag at all
            processed = batches.position(partition, committed)
            if processed is None:
                if log_end != 0:
                    continue
                processed = 0
            records, seconds = lag.lag(partition, processed, now)
            gauges.consumer_lag_records.labels(str(partition), "processed").set(records)
            gauges.consumer_lag_seconds.labels(str(partition)).set(seconds)
            if committed is not None:
                gauges.consumer_lag_records.labels(str(partition), "committed").set(
                    max(0, log_end - committed)
                )
        for gone in set(lag.samples) - owned:  # a revoked partition is no longer this worker's lag
            for position in ("processed", "committed"):
                with contextlib.suppress(KeyError):
                    gauges.consumer_lag_records.remove(str(gone), position)
            with contextlib.suppress(KeyError):
                gauges.consumer_lag_seconds.remove(str(gone))
        lag.forget(owned)
        busy = runtime.batches.retrying_since
        gauges.batch_retrying_seconds.set(time.monotonic() - busy if busy is not None else 0)

    @app.task
    async def _wait_for_store() -> None:
        await runtime.wait_for_store()
        # What start-up allocated (Faust, river, numpy, settings) lives as long as the process:
        # out of the collector's reach, a full collection stops the loop for ~2-6 ms instead of
        # ~100-150 ms (measured under bench load; onboarding_gc_pause_seconds shows it).
        gc.collect()
        gc.freeze()
        gc_pauses.install()

    @app.timer(interval=1.0)
    async def _gc_pauses() -> None:
        gc_pauses.drain()

    @app.timer(interval=settings.cluster_train_interval_seconds)
    async def _train_clusters() -> None:
        if not runtime.ready or not settings.cluster_enabled:
            return
        try:
            await runtime.clusters.train_once()
        except (RedisError, OSError) as exc:
            runtime.metrics.store_error(exc)
            log.warning(
                "cluster training pass failed; retried next interval", extra={"error": repr(exc)[:300]}
            )

    @app.timer(interval=settings.reco_train_interval_seconds)
    async def _train_recommender() -> None:
        if not runtime.ready or not settings.reco_enabled:
            return
        try:
            await runtime.recommender.train_once()
        except (RedisError, OSError) as exc:
            runtime.metrics.store_error(exc)
            log.warning(
                "recommender training pass failed; retried next interval", extra={"error": repr(exc)[:300]}
            )

    @app.timer(interval=settings.timer_interval_seconds)
    async def _fire_deadlines() -> None:
        if not runtime.ready or app.rebalancing:
            return
        try:
            await asyncio.wait_for(runtime.timer.fire_due(), settings.batch_attempt_timeout_seconds)
            await asyncio.wait_for(runtime.timer.sweep(), settings.batch_attempt_timeout_seconds)
        except Exception as exc:
            runtime.metrics.store_error(exc)
            (log.warning if is_transient(exc) else log.error)(
                "timer pass failed; due deadlines stay and are retried", extra={"error": repr(exc)[:300]}
            )

    @app.timer(interval=5.0)
    async def _watchdog() -> None:
        """A batch in flight far longer than its attempts may take: say where every task waits."""
        busy = runtime.batches.busy_since
        limit = 3 * settings.batch_attempt_timeout_seconds
        if busy is not None and time.monotonic() - busy > limit:
            stacks = [
                f"{task.get_name()}: "
                + " <- ".join(
                    f"{f.f_code.co_name}@{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno}"
                    for f in task.get_stack(limit=8)
                )
                for task in asyncio.all_tasks()
            ]
            log.error(
                "a batch has not finished for a long time",
                extra={"seconds": round(time.monotonic() - busy), "tasks": stacks[:60]},
            )

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # mode types receivers narrowly
    async def _assigned(app: faust.App, assigned: Any, *args: Any, **kwargs: Any) -> None:
        runtime.timer.owned = {tp.partition for tp in assigned if tp.topic == events_name}
        runtime.watermarks.forget()
        runtime.batches.next_offsets.clear()
        log.info("partitions assigned", extra={"events_partitions": sorted(runtime.timer.owned)})

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(app: faust.App, revoked: Any, *args: Any, **kwargs: Any) -> None:
        runtime.timer.owned -= {tp.partition for tp in revoked if tp.topic == events_name}
        log.info("partitions revoked", extra={"revoked": sorted(tp.partition for tp in revoked)})
        # Let the pass in hand (a batch or a timer pass) publish what it decided and record it
        # before the partitions' next owner loads those profiles: otherwise the new owner finds
        # the outbox not yet marked published and sends it again (same ids, but twice).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.batch_attempt_timeout_seconds):
                async with runtime.lock:
                    pass
        await commit_processed(revoked)

    async def commit_processed(revoked: Any) -> None:
        """Commit how far this worker processed the revoked events partitions, while the group
        still lets it. Faust drops a revoked partition's acks before its next commit, so its
        next owner read again what was processed since the last commit (up to
        ``broker_commit_interval`` of records, applied once: messageIds); committing in the
        revocation, as Kafka clients do, spares that. Only batches that fully took effect
        count (``next_offsets``: published and recorded), so nothing unprocessed is passed."""
        done = runtime.batches.next_offsets
        offsets = {
            tp: done[tp.partition] for tp in revoked if tp.topic == events_name and tp.partition in done
        }
        if not offsets:
            return
        try:
            async with asyncio.timeout(settings.kafka_session_timeout_seconds / 3):
                consumer: Any = app.consumer  # Faust commits through it (acks dropped at the revocation)
                committed = await consumer._commit_offsets(offsets)
        except Exception as exc:  # the group moved on: the next owner reads from the last commit
            log.warning("commit at revocation failed", extra={"error": repr(exc)[:200]})
            return
        log.info(
            "processed offsets committed at revocation",
            extra={"committed": bool(committed), "offsets": {tp.partition: o for tp, o in offsets.items()}},
        )

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def _quiesce(app: faust.App, *args: Any, **kwargs: Any) -> None:
        """On SIGTERM, once intake stopped: wait for the pass in hand to finish publishing and
        recording its outputs, then hold the lock so that no other pass starts (a pass cut in
        half by the shutdown would leave its outbox to be sent again by the next owner)."""
        try:
            await asyncio.wait_for(runtime.lock.acquire(), settings.shutdown_timeout_seconds / 3)
        except TimeoutError:
            log.warning("shutdown: the batch in hand did not finish in time; it is redelivered")

    return app, runtime


class Health:
    """Liveness (the process works; a Redis blip does not fail it) and readiness (it should get work)."""

    def __init__(self, runtime: Runtime, settings: Settings) -> None:
        self.runtime, self.settings = runtime, settings
        self.joined = False  # the consumer group assigned this worker its partitions (maybe none)

    async def live(self) -> tuple[bool, dict[str, Any]]:
        partitions = sorted(self.runtime.timer.owned)
        return True, {"status": "ok", "redis": self.runtime.ready, "partitions": partitions}

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        reasons = []
        try:
            await asyncio.wait_for(self.runtime.stores.profiles.ping(), 1.0)
        except Exception:
            reasons.append("redis unreachable")
        if not self.joined:
            reasons.append("no partitions assigned yet")
        since = self.runtime.batches.retrying_since
        if since is not None and time.monotonic() - since > self.settings.ready_max_retry_seconds:
            reasons.append("a batch has been retrying for too long")
        if self.runtime.metrics.redis_out_of_memory._value.get():
            reasons.append("redis is out of memory")
        body = {"status": "ready" if not reasons else "not ready", "reasons": reasons}
        return not reasons, body


LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def check_safe_to_serve(settings: Settings) -> None:
    """Refuse to start in a way that would serve behavioural data to anyone or hash PII with a
    public salt (each with a message naming the setting)."""
    if settings.web_host not in LOOPBACK and not settings.api_tokens:
        raise ConfigError(
            "API_TOKENS",
            f"not set while WEB_HOST={settings.web_host} is reachable from other hosts: set bearer "
            "tokens for /profiles and /stats, or bind WEB_HOST to 127.0.0.1",
        )
    if settings.pii_hash_salt.get_secret_value() == DEV_PII_SALT:
        raise ConfigError(
            "PII_HASH_SALT",
            "is the development default (public in the source): set a long random secret "
            "(`stream-app demo` sets one of its own)",
        )
