"""Watching the running engine for the live view: the worker's and the collector's /metrics, the
profile count in Redis, a few recent users' profiles. In a background thread, so slow reads
never hold up the sender."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.parse
from collections import deque
from typing import Any

from stream_app.demo.services import get_json
from stream_app.demo.stats import LATENCY_WINDOW_S, LiveStats
from stream_app.observe import histogram_quantile, scrape, total

LATENCY = "onboarding_event_to_profile_latency_seconds"
METRICS_EVERY_S = 0.5
SUMMARIES_EVERY_S = 2.0


class Observer:
    """A background thread that reads the worker's /metrics, counts profile keys in Redis and
    fetches a few profiles, so that slow reads never hold up the producer."""

    def __init__(
        self, stats: LiveStats, web_url: str, collector_url: str, redis_client: Any, key_prefix: str
    ) -> None:
        self.stats, self.web_url, self.redis, self.prefix = stats, web_url, redis_client, key_prefix
        self.collector_url = collector_url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-observer", daemon=True)
        self._rates: deque[tuple[float, int, int]] = deque()  # (t, sent, applied) samples
        self._snapshots: deque[tuple[float, Any]] = deque()  # (t, metrics) for windowed latency
        self._next_scan = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        next_summaries = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                self.read_metrics()
                if now >= self._next_scan:
                    self.count_profiles()
                if now >= next_summaries:
                    self.fetch_summaries()
                    next_summaries = now + SUMMARIES_EVERY_S
                self.stats.observer_error = ""
            except Exception as exc:  # keep observing: a failed read shows, it never stops the demo
                self.stats.observer_error = f"{type(exc).__name__}: {exc}"
            self._stop.wait(METRICS_EVERY_S)

    def read_metrics(self) -> None:
        try:
            metrics = scrape(self.web_url + "/metrics", timeout=2.0)
        except (OSError, ValueError):
            return  # worker busy or gone; the producer loop notices a dead worker
        s, now = self.stats, time.monotonic()
        s.consumed = int(total(metrics, "onboarding_events_consumed_total"))
        s.applied = int(total(metrics, "onboarding_events_applied_total"))
        s.invalid = int(total(metrics, "onboarding_events_invalid_total"))
        s.duplicates = int(total(metrics, "onboarding_events_duplicate_total"))
        s.linked_ids = int(
            total(metrics, "onboarding_identity_merges_total", outcome="merged")
            + total(metrics, "onboarding_identity_merges_total", outcome="linked")
        )
        s.triggers = {
            labels["type"]: int(value)
            for labels, value in metrics.get("onboarding_triggers_emitted_total", [])
        }
        s.held_out = int(total(metrics, "onboarding_triggers_suppressed_total", reason="holdout"))
        s.suppressed = int(total(metrics, "onboarding_triggers_suppressed_total")) - s.held_out
        s.segment_changes = int(total(metrics, "onboarding_segment_changes_total"))
        s.cluster_model = int(total(metrics, "onboarding_cluster_model_version"))
        s.timer_lag_p50 = histogram_quantile(metrics, "onboarding_timer_lag_seconds", 0.5)
        s.p50_all = histogram_quantile(metrics, LATENCY, 0.5)
        s.p99_all = histogram_quantile(metrics, LATENCY, 0.99)
        self._snapshots.append((now, metrics))
        while len(self._snapshots) > 2 and now - self._snapshots[1][0] >= LATENCY_WINDOW_S:
            self._snapshots.popleft()
        baseline = self._snapshots[0][1] if len(self._snapshots) > 1 else None
        with contextlib.suppress(OSError, ValueError):
            front = scrape(self.collector_url + "/metrics", timeout=2.0)
            s.collector_dead_lettered = int(
                total(front, "onboarding_collector_events_total", outcome="dead_lettered")
            )
        s.p50 = histogram_quantile(metrics, LATENCY, 0.5, baseline)
        s.p99 = histogram_quantile(metrics, LATENCY, 0.99, baseline)
        self._rates.append((now, s.sent, s.applied))
        while len(self._rates) > 2 and now - self._rates[1][0] >= 2.0:
            self._rates.popleft()
        t_old, sent_old, applied_old = self._rates[0]
        if now > t_old:
            s.sent_rate = (s.sent - sent_old) / (now - t_old)
            s.applied_rate = (s.applied - applied_old) / (now - t_old)

    def count_profiles(self) -> None:
        """SCAN ``{prefix}:p:*``; the next scan waits 10x as long as this one took (cheap)."""
        began = time.monotonic()
        self.stats.profile_keys = sum(1 for _ in self.redis.scan_iter(match=f"{self.prefix}:p:*", count=2000))
        took = time.monotonic() - began
        self._next_scan = time.monotonic() + max(2.0, 10 * took)

    def fetch_summaries(self) -> None:
        """One-line summaries of the profiles of the most recently active users."""
        users: list[str] = []
        for activity in list(self.stats.recent):
            if activity.user_id and activity.user_id not in users:
                users.append(activity.user_id)
        summaries = self.stats.summaries
        for user in reversed(users[:3]):
            doc = get_json(f"{self.web_url}/profiles/{urllib.parse.quote(user, safe='')}")
            if isinstance(doc, dict):
                summaries[user] = profile_line(doc)
                summaries.move_to_end(user)
        while len(summaries) > 5:
            summaries.popitem(last=False)

    def final(self) -> None:
        """Stop the thread, then take one last complete reading (after the producer stopped)."""
        self.stop()
        with contextlib.suppress(Exception):
            self.read_metrics()
            self.count_profiles()


def profile_line(doc: dict[str, Any]) -> str:
    """``activated · 2 sessions · signup: completed (5 steps) · 3 features · segments: ...``"""
    parts = [str(doc.get("lifecycle", "?"))]
    sessions = int((doc.get("sessions") or {}).get("count", 0))
    parts.append(f"{sessions} session{'' if sessions == 1 else 's'}")
    flows: dict[str, Any] = doc.get("onboarding") or {}
    for flow, state in flows.items():
        done = len(state.get("completed_steps") or {})
        if state.get("status") == "completed":
            parts.append(f"{flow}: completed ({done} steps)")
        elif state.get("current_step"):
            parts.append(f"{flow}: on {state['current_step']} ({done} done)")
        else:
            parts.append(f"{flow}: {done} steps done")
    if not flows:
        parts.append("onboarding not started")
    parts.append(f"{len(doc.get('features') or {})} features")
    help_views = sum((doc.get("help_views") or {}).values())
    if help_views:
        parts.append(f"{help_views} help views")
    if doc.get("segments"):
        parts.append("segments: " + ", ".join(map(str, doc["segments"])))
    cluster = doc.get("cluster")
    if cluster:
        parts.append(f"cluster: {cluster.get('name', cluster) if isinstance(cluster, dict) else cluster}")
    return " · ".join(parts)
