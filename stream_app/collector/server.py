"""``stream-app collector``: the Segment-compatible HTTP front door in front of ``onboarding.events``.

A stateless process (scale it behind a load balancer, independently of the workers).
Each request's events are validated with the engine's own contract: those that meet it go
to ``onboarding.events`` keyed by the id the engine uses, those that break it to the
dead-letter topic with their reason; the answer is 200 only once the broker acknowledged
every record of the request. The decisions about the HTTP protocol are in
:mod:`stream_app.collector.protocol`; this module does the I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream_app.collector.decisions import Decisions, user_hash
from stream_app.collector.producer import AsyncProducer, Headers, ProduceRejected, ProduceUnavailable
from stream_app.collector.protocol import (
    ROUTES,
    ApiError,
    Limits,
    WriteKeys,
    authenticate,
    events_from_request,
    parse_json,
    read_body,
)
from stream_app.configure import contract_rules, personalization_config
from stream_app.contract import ContractRules, Invalid, parse_event
from stream_app.errors import ConfigError
from stream_app.metrics import CollectorMetrics
from stream_app.paths import CONFIG_DIR
from stream_app.settings import Settings
from stream_app.topics import kafka_client_config, load_topics

log = logging.getLogger("stream_app.collector")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OK = orjson.dumps({"success": True})
RETRY_AFTER_SECONDS = "2"


class Collector:
    """The request handlers and what they share."""

    def __init__(
        self,
        settings: Settings,
        producer: AsyncProducer,
        contract: ContractRules,
        metrics: CollectorMetrics | None = None,
        limits: Limits | None = None,
        decisions: Decisions | None = None,
    ) -> None:
        self.keys = write_keys(settings)
        origins = [o.strip().rstrip("/") for o in settings.collector_allowed_origins.split(",") if o.strip()]
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)
        self.settings = settings
        self.producer = producer
        self.contract = contract
        self.metrics = metrics or CollectorMetrics()
        self.limits = limits or Limits()
        topics = load_topics(settings)
        self.events_topic = topics["events"].name
        self.dlq_topic = topics["dlq"].name
        self.slots = asyncio.Semaphore(settings.collector_max_in_flight)
        self.decisions = decisions
        secret = settings.personalization_user_hash_secret
        self.user_hash_secret = secret.get_secret_value().encode() if secret else None

    # --- CORS -----------------------------------------------------------------------------------
    def origin_allowed(self, origin: str) -> bool:
        return self.any_origin or origin.rstrip("/") in self.origins

    def cors(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin and self.origin_allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
            response.headers["Vary"] = "Origin"

    async def preflight(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        if not origin or not self.origin_allowed(origin):
            return _error(ApiError(403, "origin_not_allowed", f"origin {origin!r} is not allowed"))
        response = web.Response(status=204)
        self.cors(request, response)
        response.headers["Access-Control-Allow-Methods"] = "POST, GET, OPTIONS"
        asked = request.headers.get("Access-Control-Request-Headers")
        response.headers["Access-Control-Allow-Headers"] = asked or "Authorization, Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
        return response

    # --- events ---------------------------------------------------------------------------------
    async def ingest(self, request: web.Request) -> web.StreamResponse:
        route = request.match_info["route"]
        label = route if route in ROUTES else "other"
        started = time.perf_counter()
        response = await self._ingest(request, route)
        self.cors(request, response)
        self.metrics.requests.labels(label, str(response.status)).inc()
        self.metrics.request_seconds.labels(label).observe(time.perf_counter() - started)
        return response

    async def _ingest(self, request: web.Request, route: str) -> web.StreamResponse:
        if route not in ROUTES:
            return _error(ApiError(404, "not_found", f"no route /v1/{route}"))
        origin = request.headers.get("Origin")
        if origin and not self.origin_allowed(origin):
            # a text/plain POST or a beacon needs no preflight: refuse it here, by its Origin
            return _error(ApiError(403, "origin_not_allowed", f"origin {origin!r} is not allowed"))
        if self.slots.locked():
            return _unavailable("too many requests in flight")
        async with self.slots:
            self.metrics.in_flight.inc()
            try:
                return await self._accept(request, route)
            finally:
                self.metrics.in_flight.dec()

    async def _accept(self, request: web.Request, route: str) -> web.StreamResponse:
        raw = await _read_limited(request, self.limits.max_request_bytes + 1)
        body = read_body(raw, request.headers.get("Content-Encoding"), self.limits)
        if isinstance(body, ApiError):
            return _error(body)
        authorization = request.headers.get("Authorization")
        if authorization:  # a wrong key is 401 whatever the body is
            early = authenticate(authorization, {}, self.keys)
            if isinstance(early, ApiError):
                return _error(early)
        doc = parse_json(body)
        if isinstance(doc, ApiError):
            return _error(doc)
        source = authenticate(authorization, doc, self.keys)
        if isinstance(source, ApiError):
            return _error(source)
        now_ms = int(time.time() * 1000)
        events = events_from_request(ROUTES[route], doc, now_ms, source, self.limits)
        if isinstance(events, ApiError):
            return _error(events)
        records: list[tuple[str, bytes | None, bytes, Headers | None]] = []
        rejected: list[str] = []
        failed_at = datetime.now(UTC).isoformat().encode()
        for normalized in events:
            event, value = normalized.event, normalized.raw
            parsed = parse_event(value, self.contract, now_ms, now_ms)
            if isinstance(parsed, Invalid):
                rejected.append(parsed.reason.value)
                key = event.get("userId") or event.get("anonymousId")
                headers = [
                    ("dlq.reason", parsed.reason.value.encode()),
                    ("dlq.message", parsed.message.encode()),
                    ("dlq.source.topic", f"http:{request.path}".encode()),
                    ("dlq.source.timestamp", str(now_ms).encode()),
                    ("dlq.failed_at", failed_at),
                ]
                records.append((self.dlq_topic, str(key).encode() if key else None, value, headers))
            else:
                records.append((self.events_topic, parsed.profile_id.encode(), value, None))
        produce_started = time.perf_counter()
        try:
            await self.producer.send_all(records, self.settings.collector_produce_timeout_seconds)
        except ProduceUnavailable as exc:
            log.warning("events not acknowledged; the client will retry", extra={"error": str(exc)})
            return _unavailable("the event log is not reachable right now; retry later")
        except ProduceRejected as exc:
            log.error("the broker refused the collector's records", extra={"error": str(exc)})
            return _error(ApiError(500, "broker_rejected", "the event log refused the events"))
        self.metrics.produce_seconds.observe(time.perf_counter() - produce_started)
        self.metrics.events.labels("accepted").inc(len(events) - len(rejected))
        if rejected:
            self.metrics.events.labels("dead_lettered").inc(len(rejected))
            for reason in rejected:
                self.metrics.events_rejected.labels(reason).inc()
        return web.Response(body=OK, content_type="application/json")

    # --- decisions ------------------------------------------------------------------------------
    async def personalization(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        response = await self._personalization(request)
        self.cors(request, response)
        response.headers["Cache-Control"] = "private, no-store"
        self.metrics.requests.labels("personalization", str(response.status)).inc()
        self.metrics.request_seconds.labels("personalization").observe(time.perf_counter() - started)
        return response

    async def _personalization(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin and not self.origin_allowed(origin):
            return _error(ApiError(403, "origin_not_allowed", f"origin {origin!r} is not allowed"))
        query = request.query
        source = authenticate(
            request.headers.get("Authorization"), {"writeKey": query.get("writeKey")}, self.keys
        )
        if isinstance(source, ApiError):
            return _error(source)
        if self.decisions is None:
            return _error(ApiError(404, "not_enabled", "decisions need REDIS_URL on the collector"))
        user, anonymous = query.get("userId"), query.get("anonymousId")
        if not user and not anonymous:
            return _error(ApiError(400, "missing_id", "give userId or anonymousId"))
        pid = user or anonymous or ""
        if self.user_hash_secret is not None:
            given = query.get("userHash") or ""
            if not hmac.compare_digest(given.lower(), user_hash(self.user_hash_secret, pid)):
                return _error(ApiError(401, "invalid_user_hash", "userHash does not match the id"))
        body = await self.decisions.decide(pid)
        return web.Response(body=body, content_type="application/json")

    # --- operations -----------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def metrics_page(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=generate_latest(self.metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0]
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_request_bytes + 1)
        app.router.add_get("/v1/personalization", self.personalization)
        app.router.add_post("/v1/{route}", self.ingest)
        app.router.add_route("OPTIONS", "/v1/{route}", self.preflight)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/metrics", self.metrics_page)

        async def flush(_app: web.Application) -> None:
            left = await asyncio.to_thread(self.producer.close, self.settings.collector_shutdown_seconds)
            if self.decisions is not None:
                await self.decisions.store.close()
            log.info("collector stopped", extra={"undelivered_records": left})

        app.on_cleanup.append(flush)
        return app


async def _read_limited(request: web.Request, limit: int) -> bytes:
    """The body, but never more than ``limit`` bytes (it arrives in chunks: read until done)."""
    body = bytearray()
    while len(body) < limit:
        chunk = await request.content.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def _error(error: ApiError) -> web.Response:
    return web.Response(status=error.status, body=error.body(), content_type="application/json")


def _unavailable(message: str) -> web.Response:
    response = _error(ApiError(503, "unavailable", message))
    response.headers["Retry-After"] = RETRY_AFTER_SECONDS
    return response


def write_keys(settings: Settings) -> WriteKeys:
    """The accepted write keys; without any (and not anonymous) start-up stops, naming the setting."""
    keys = settings.collector_write_keys.get_secret_value() if settings.collector_write_keys else ""
    parsed = WriteKeys.parse(keys, settings.collector_allow_anonymous)
    if not parsed.sources and not parsed.allow_anonymous:
        raise ConfigError(
            "COLLECTOR_WRITE_KEYS",
            "not set: name the write keys the SDKs send (or COLLECTOR_ALLOW_ANONYMOUS=true for a demo)",
        )
    return parsed


def build(settings: Settings) -> Collector:
    """The collector for these settings (stops with a ConfigError naming a bad one)."""
    bootstrap = settings.kafka_bootstrap_servers
    if not bootstrap:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS", "not set; the collector produces to it")
    write_keys(settings)  # before connecting to anything
    timeout_ms = int(settings.collector_produce_timeout_seconds * 1000)
    producer = AsyncProducer(
        {**kafka_client_config(settings, bootstrap), "delivery.timeout.ms": max(30_000, timeout_ms)}
    )
    try:
        contract = contract_rules(settings)
        metrics = CollectorMetrics()
        return Collector(
            settings, producer, contract, metrics, decisions=decisions(settings, contract, metrics)
        )
    except BaseException:
        producer.close(0)
        raise


def decisions(settings: Settings, contract: ContractRules, metrics: CollectorMetrics) -> Decisions | None:
    """The decision endpoint's reader (None without REDIS_URL: the endpoint answers 404)."""
    config = personalization_config(settings)  # a bad file stops start-up, naming the setting
    if not settings.redis_url:
        log.info("decision endpoint off: REDIS_URL is not set")
        return None
    from stream_app.worker.runtime import Stores

    stores = Stores(settings)
    path = settings.personalization_file or CONFIG_DIR / "personalization.toml"
    return Decisions(
        stores.profiles,
        stores.reco,
        config,
        hashlib.sha256(path.read_bytes()).hexdigest()[:12],
        metrics,
        contract.blocked_ids,
        cache_size=settings.personalization_cache_size,
        refresh_seconds=settings.personalization_refresh_seconds,
    )


def run(settings: Settings) -> None:
    collector = build(settings)
    log.info(
        "collector listening",
        extra={
            "host": settings.collector_host,
            "port": settings.collector_port,
            "topic": collector.events_topic,
        },
    )
    web.run_app(
        collector.app(),
        host=settings.collector_host,
        port=settings.collector_port,
        shutdown_timeout=settings.collector_shutdown_seconds,
        access_log=None,
        print=None,
        auto_decompress=False,  # protocol.read_body inflates, within the request size limit
    )
