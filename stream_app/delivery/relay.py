"""The webhook relay: ``onboarding.triggers`` -> HTTPS endpoints, at least once.

A consumer group of its own (``<APP_ID>-deliver``; run several relays and Kafka splits the
partitions) reads a batch of triggers, POSTs each to every endpoint that wants it (retries
with back-off while the endpoint is down or slow), dead-letters what an endpoint refuses for
good or what keeps failing (``onboarding.triggers.webhooks.dlq``, headers say which endpoint
and why), and only then commits the batch's offsets. A crash before the commit delivers the
batch again, with the same ``Idempotency-Key``: receivers dedupe by ``trigger_id``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
from confluent_kafka import Consumer, KafkaException, Message, Producer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stream_app.delivery.policy import SIGNATURE_HEADER, Target, Verdict, backoff, judge, signature
from stream_app.metrics import LATENCY_BUCKETS
from stream_app.settings import Settings
from stream_app.topics import kafka_client_config

log = logging.getLogger("stream_app.deliver")


class DeliveryMetrics:
    """Labels are bounded: ``endpoint`` is a configured endpoint's name; never an id."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.deliveries = Counter(
            "onboarding_webhook_deliveries_total",
            "Triggers settled per endpoint: outcome=delivered (a 2xx) or dead_lettered.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.attempts = Counter(
            "onboarding_webhook_attempts_total",
            "HTTP attempts per endpoint: result=2xx, 4xx, 5xx, timeout or error (no answer).",
            ["endpoint", "result"],
            registry=r,
        )
        self.dead_letters = Counter(
            "onboarding_webhook_dead_letters_total",
            "Triggers put on the webhook dead-letter topic: reason=refused (a 4xx), "
            "attempts_exhausted, bad_record (not a trigger).",
            ["endpoint", "reason"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "onboarding_webhook_delivery_seconds",
            "From reading a trigger to the endpoint's 2xx, retries included.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.last_commit = Gauge(
            "onboarding_webhook_last_commit_timestamp_seconds",
            "Unix time the relay last committed a delivered batch.",
            registry=r,
        )


class Relay:
    def __init__(
        self,
        settings: Settings,
        targets: Sequence[Target],
        metrics: DeliveryMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings, self.targets = settings, list(targets)
        self.metrics = metrics or DeliveryMetrics()
        self.rng = rng or random.Random()
        bootstrap = settings.kafka_bootstrap_servers or ""
        base = kafka_client_config(settings, bootstrap)
        self.consumer = Consumer(
            {
                **base,
                "group.id": f"{settings.app_id}-deliver",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": int(settings.kafka_session_timeout_seconds * 1000),
            }
        )
        self.producer = Producer({**base, "enable.idempotence": True, "acks": "all", "linger.ms": 5})
        self.stopping = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.healthy_at = time.time()

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        """Deliver until :meth:`stop`; a batch cut short by the stop is not committed."""
        self.consumer.subscribe([self.settings.topic_triggers])
        self.session = aiohttp.ClientSession()
        try:
            while not self.stopping.is_set():
                batch = await asyncio.to_thread(self.consumer.consume, self.settings.deliver_batch, 0.5)
                self.healthy_at = time.time()
                records = [m for m in batch if m.error() is None]
                for m in batch:
                    if m.error() is not None:
                        log.warning("consumer error", extra={"error": str(m.error())})
                if not records:
                    continue
                work = asyncio.ensure_future(self._settle(records))
                stop = asyncio.ensure_future(self.stopping.wait())
                await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done():  # stopping mid-batch: not committed, delivered again later
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
                    break
                stop.cancel()
                work.result()
                await self._commit()
        finally:
            await self.session.close()
            await asyncio.to_thread(self.consumer.close)
            await asyncio.to_thread(self.producer.flush, 10)

    async def _commit(self) -> None:
        try:
            await asyncio.to_thread(lambda: self.consumer.commit(asynchronous=False))
            self.metrics.last_commit.set(time.time())
        except KafkaException as exc:  # a rebalance took the partitions: their new owner re-delivers
            log.warning("commit failed; the batch will be delivered again", extra={"error": str(exc)})

    async def _settle(self, records: list[Message]) -> None:
        dead: list[DeadLetter] = []
        jobs = []
        for rec in records:
            try:
                trigger = orjson.loads(rec.value() or b"")
            except orjson.JSONDecodeError:
                trigger = None
            if not isinstance(trigger, dict) or not isinstance(trigger.get("trigger_id"), str):
                dead.append((rec, "", "bad_record", "not a trigger (JSON object with trigger_id)"))
                continue
            for target in self.targets:
                if target.wants(trigger):
                    jobs.append(self._deliver(target, rec, trigger, dead))
        await asyncio.gather(*jobs)
        if dead:
            await self._dead_letter(dead)

    async def _deliver(
        self, target: Target, rec: Message, trigger: dict[str, Any], dead: list[DeadLetter]
    ) -> None:
        assert self.session is not None
        body = rec.value() or b""
        started = time.perf_counter()
        endpoint = target.endpoint
        detail = ""
        for attempt in range(1, endpoint.max_attempts + 1):
            self.healthy_at = time.time()  # retrying an endpoint that is down is not being stuck
            headers = {
                "Content-Type": "application/json",
                "Idempotency-Key": trigger["trigger_id"],
                "Onboarding-Trigger-Type": str(trigger.get("type", "")),
                SIGNATURE_HEADER: signature(target.secret, body, int(time.time())),
                "User-Agent": "stream-app-deliver",
            }
            status: int | None = None
            try:
                timeout = aiohttp.ClientTimeout(total=endpoint.timeout_seconds)
                async with self.session.post(
                    endpoint.url, data=body, headers=headers, timeout=timeout
                ) as resp:
                    status = resp.status
                    await resp.read()
                result = f"{status // 100}xx"
                detail = f"HTTP {status}"
            except TimeoutError:
                result, detail = "timeout", f"no answer within {endpoint.timeout_seconds} s"
            except aiohttp.ClientError as exc:
                result, detail = "error", f"{type(exc).__name__}: {exc}"[:200]
            self.metrics.attempts.labels(endpoint.name, result).inc()
            verdict = judge(status)
            if verdict is Verdict.DELIVERED:
                self.metrics.deliveries.labels(endpoint.name, "delivered").inc()
                self.metrics.delivery_seconds.labels(endpoint.name).observe(time.perf_counter() - started)
                return
            if verdict is Verdict.REFUSED:
                dead.append((rec, endpoint.name, "refused", detail))
                return
            if attempt < endpoint.max_attempts:
                delay = backoff(attempt, self.rng)
                log.warning(
                    "webhook attempt failed; retrying",
                    extra={
                        "endpoint": endpoint.name,
                        "attempt": attempt,
                        "detail": detail,
                        "retry_in_s": delay,
                    },
                )
                await asyncio.sleep(delay)
        dead.append(
            (rec, endpoint.name, "attempts_exhausted", f"{endpoint.max_attempts} attempts, last: {detail}")
        )

    async def _dead_letter(self, dead: list[DeadLetter]) -> None:
        """Every dead letter acknowledged by the broker before the batch is committed."""
        pending = list(dead)
        delay = 0.5
        while pending:
            acked: set[int] = set()
            for index, (rec, endpoint, reason, detail) in enumerate(pending):
                headers: list[tuple[str, str | bytes | None]] = [
                    ("webhook.endpoint", endpoint),
                    ("webhook.reason", reason),
                    ("webhook.detail", detail),
                    ("dlq.source.topic", rec.topic() or ""),
                    ("dlq.source.partition", str(rec.partition())),
                    ("dlq.source.offset", str(rec.offset())),
                ]
                self.producer.produce(
                    self.settings.topic_webhook_dlq, key=rec.key(), value=rec.value(), headers=headers,
                    on_delivery=functools.partial(_note_ack, acked, index),
                )  # fmt: skip
            await asyncio.to_thread(self.producer.flush, 30)
            for index, (rec, endpoint, reason, detail) in enumerate(pending):
                if index in acked:
                    self.metrics.dead_letters.labels(endpoint or "-", reason).inc()
                    if endpoint:
                        self.metrics.deliveries.labels(endpoint, "dead_lettered").inc()
                    log.error(
                        "trigger dead-lettered",
                        extra={
                            "endpoint": endpoint,
                            "reason": reason,
                            "detail": detail,
                            "offset": rec.offset(),
                        },
                    )
            pending = [item for index, item in enumerate(pending) if index not in acked]
            if pending:
                log.error("cannot write webhook dead letters; retrying", extra={"records": len(pending)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)


DeadLetter = tuple[Message, str, str, str]  # (record, endpoint, reason, detail)


def _note_ack(acked: set[int], index: int, err: Any, _msg: Any) -> None:
    if err is None:
        acked.add(index)


def build(settings: Settings) -> Relay:
    """The relay for these settings; a missing or bad setting stops start-up naming it."""
    from stream_app.delivery.policy import load_targets
    from stream_app.errors import ConfigError

    if not settings.kafka_bootstrap_servers:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS", "not set; `deliver` consumes onboarding.triggers")
    if settings.webhooks_file is None:
        raise ConfigError("WEBHOOKS_FILE", "not set: list the endpoints (see config/webhooks.example.toml)")
    return Relay(settings, load_targets(settings.webhooks_file))


def run(settings: Settings) -> None:
    """``stream-app deliver``: relay until SIGTERM/SIGINT; /metrics and /healthz on DELIVER_PORT."""
    import signal

    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    relay = build(settings)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.stop)

        async def metrics(_request: web.Request) -> web.Response:
            body = generate_latest(relay.metrics.registry)
            return web.Response(body=body, content_type=CONTENT_TYPE_LATEST.split(";")[0])

        async def health(_request: web.Request) -> web.Response:
            stale = time.time() - relay.healthy_at > max(30.0, settings.kafka_session_timeout_seconds)
            return web.json_response({"status": "stalled" if stale else "ok"}, status=503 if stale else 200)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.deliver_host, settings.deliver_port).start()
        log.info(
            "relaying triggers to webhooks",
            extra={"endpoints": [t.name for t in relay.targets], "topic": settings.topic_triggers},
        )
        try:
            await relay.run()
        finally:
            await runner.cleanup()
            log.info("relay stopped")

    asyncio.run(main())
