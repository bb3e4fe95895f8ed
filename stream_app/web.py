"""HTTP views on the worker's web server: profiles, step statistics, Prometheus metrics, health.

The views get only what they read (the profile reader, the metrics registry, the health
checks); they never reach into the worker's other roles. ``/profiles`` and ``/stats`` serve
behavioural data: with API_TOKENS set they need ``Authorization: Bearer <token>``.
``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (readiness) stay open and say nothing
internal (no exception texts).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import faust
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from stream_app.worker.reader import ProfileReader

log = logging.getLogger(__name__)


class HealthCheck(Protocol):
    async def live(self) -> tuple[bool, dict[str, Any]]:
        """Is the process able to work at all (a short Redis blip must not make this false)."""
        ...

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """Should it get work: Redis reachable, partitions assigned, not stuck retrying."""
        ...


def register(
    app: faust.App,
    reader: ProfileReader,
    registry: CollectorRegistry,
    health: HealthCheck,
    tokens: frozenset[str] = frozenset(),
) -> None:
    def guarded(view: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def check(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            if tokens and not _authorized(request.headers.get("Authorization", ""), tokens):
                return self.bytes(
                    orjson.dumps({"error": "unauthorized", "message": "send Authorization: Bearer <token>"}),
                    status=401,
                    content_type="application/json",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            try:
                return await view(self, request, *args, **kwargs)
            except Exception:  # the store is down or a bug: logged here, never shown to the caller
                log.exception("a request failed", extra={"path": str(getattr(request, "path", ""))})
                return self.bytes(
                    orjson.dumps({"error": "unavailable", "message": "try again later"}),
                    status=503,
                    content_type="application/json",
                    headers={"Retry-After": "5"},
                )

        return check

    @app.page("/profiles/{user_id}")
    @guarded
    async def profile(self: Any, request: Any, user_id: str) -> Any:
        doc = await reader.read(user_id)
        if doc is None:
            return self.bytes(
                orjson.dumps({"error": "not_found", "user_id": user_id}),
                status=404,
                content_type="application/json",
            )
        return self.bytes(orjson.dumps(doc), content_type="application/json")

    @app.page("/stats/steps")
    @guarded
    async def step_stats(self: Any, request: Any) -> Any:
        rows = [
            {
                "flow": s.flow,
                "step": s.step,
                "group": s.group or "all",
                "count": s.count,
                "mean_s": s.mean_s,
                "stddev_s": s.stddev_s,
            }
            for s in await reader.step_stats()
        ]
        return self.bytes(orjson.dumps(rows), content_type="application/json")

    previous: list[Any] = []  # the last /debug/memory snapshot, to report growth since

    @app.page("/debug/memory")
    @guarded
    async def memory(self: Any, request: Any) -> Any:
        """Where the worker's Python memory is (needs PYTHONTRACEMALLOC=N at start): the largest
        allocation sites, and their growth since the previous call."""
        import tracemalloc

        if not tracemalloc.is_tracing():
            body = {"tracing": False, "hint": "start the worker with PYTHONTRACEMALLOC=10"}
            return self.bytes(orjson.dumps(body), content_type="application/json")
        snap = tracemalloc.take_snapshot()  # pauses the worker: seconds on a busy one
        top = [
            {"site": str(st.traceback[0]), "kib": round(st.size / 1024, 1), "blocks": st.count}
            for st in snap.statistics("lineno")[:25]
        ]
        growth = []
        if previous:
            growth = [
                {"site": str(st.traceback[0]), "kib": round(st.size_diff / 1024, 1), "blocks": st.count_diff}
                for st in snap.compare_to(previous[0], "lineno")[:25]
            ]
        previous[:] = [snap]
        traced, _peak = tracemalloc.get_traced_memory()
        body = {
            "tracing": True,
            "traced_mib": round(traced / 2**20, 1),
            "top": top,
            "growth_since_last": growth,
        }
        return self.bytes(orjson.dumps(body), content_type="application/json")

    @app.page("/metrics")
    async def metrics(self: Any, request: Any) -> Any:
        return self.bytes(generate_latest(registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/healthz")
    async def healthz(self: Any, request: Any) -> Any:
        ok, body = await health.live()
        return self.json(body, status=200 if ok else 503)

    @app.page("/readyz")
    async def readyz(self: Any, request: Any) -> Any:
        ok, body = await health.ready()
        return self.json(body, status=200 if ok else 503)


def _authorized(header: str, tokens: frozenset[str]) -> bool:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return any(hmac.compare_digest(token.strip(), known) for known in tokens)


def api_tokens(setting: str | None) -> frozenset[str]:
    return frozenset(t.strip() for t in (setting or "").split(",") if t.strip())
