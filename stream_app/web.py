"""HTTP views on the worker's web server: profiles, Prometheus metrics, health."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    import faust

    from stream_app.app import Runtime


def register(app: faust.App, runtime: Runtime) -> None:
    @app.page("/profiles/{user_id}")
    async def profile(self: Any, request: Any, user_id: str) -> Any:
        doc = await runtime.read_profile(user_id)
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
            for s in await runtime.step_stats.all()
        ]
        return self.bytes(orjson.dumps(rows), content_type="application/json")

    @app.page("/metrics")
    async def metrics(self: Any, request: Any) -> Any:
        return self.bytes(
            generate_latest(runtime.metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0]
        )

    @app.page("/healthz")
    async def health(self: Any, request: Any) -> Any:
        try:
            await runtime.store.ping()
        except Exception as exc:
            return self.json({"status": "unavailable", "redis": repr(exc)}, status=503)
        events_topic = runtime.topics["events"].name
        partitions = sorted(p for t, p in runtime.assigned if t == events_topic)
        return self.json({"status": "ok", "redis": runtime.ready, "partitions": partitions})
