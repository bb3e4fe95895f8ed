"""Baseline for bench/throughput.py: a bare Faust agent that only decodes the events.

Same broker, topic, batching (take 2000 within the worker's default window), session
timeout and fetch settings (the worker's defaults) as the worker. Prints one JSON line
with its rate once it has read ``N`` events.
Usage: python bench/bare_agent.py BOOTSTRAP TOPIC N APP_ID
"""

from __future__ import annotations

import os
import sys
import time

import faust
import orjson
from common import own_cpu_seconds

from stream_app.settings import Settings
from stream_app.worker.app import _install_group_consumer

bootstrap, topic_name, total, app_id = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
DEFAULTS = Settings.model_fields
_install_group_consumer(
    DEFAULTS["kafka_fetch_max_wait_ms"].default, DEFAULTS["kafka_fetch_min_bytes"].default
)
WINDOW = DEFAULTS["batch_window_seconds"].default
app = faust.App(
    app_id,
    broker=f"kafka://{bootstrap}",
    store="memory://",
    topic_disable_leader=True,
    topic_allow_declare=False,
    web_enabled=False,
    broker_session_timeout=6.0,
    broker_heartbeat_interval=1.0,
    consumer_auto_offset_reset="earliest",
    autodiscover=False,
    datadir=f"/tmp/stream-app-bench/{app_id}",
)
topic = app.topic(topic_name, key_serializer="raw", value_serializer="raw")
state = {"n": 0, "first": 0.0, "cpu": 0.0}


@app.agent(topic, concurrency=1)
async def decode(stream):  # type: ignore[no-untyped-def]
    async for batch in stream.take(2000, within=WINDOW):
        if not state["n"]:
            state["first"], state["cpu"] = time.perf_counter(), own_cpu_seconds()
        for value in batch:
            orjson.loads(value)
        state["n"] += len(batch)
        if state["n"] >= total:
            elapsed = time.perf_counter() - state["first"]
            print(
                orjson.dumps(
                    {
                        "events": state["n"],
                        "seconds": elapsed,
                        "rate": state["n"] / elapsed,
                        "cpu_s": own_cpu_seconds() - state["cpu"],
                    }
                ).decode(),
                flush=True,
            )
            os._exit(0)


if __name__ == "__main__":
    os.makedirs(f"/tmp/stream-app-bench/{app_id}", exist_ok=True)
    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    app.main()
