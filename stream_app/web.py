"""HTTP views on the worker's web server: profiles, step statistics, Prometheus metrics, health.

The views get only what they read (the profile reader, the metrics registry, a health
check); they never reach into the worker's other roles.
"""

from __future__ import annotations

from typing import Any, Protocol

import faust
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from stream_app.worker.reader import ProfileReader


class HealthCheck(Protocol):
    async def check(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, the body to answer with)."""
        ...


def register(app: faust.App, reader: ProfileReader, registry: CollectorRegistry, health: HealthCheck) -> None:
    @app.page("/profiles/{user_id}")
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

    @app.page("/metrics")
    async def metrics(self: Any, request: Any) -> Any:
        return self.bytes(generate_latest(registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/healthz")
    async def healthz(self: Any, request: Any) -> Any:
        ok, body = await health.check()
        return self.json(body, status=200 if ok else 503)
