"""The demo's synthetic stream and how it reaches the engine: through the collector's HTTP API,
batched and paced like an analytics SDK.

About 0.5% extra events break the contract on purpose (the collector dead-letters them with
their reason) and 0.5% are re-sent copies (dropped downstream by messageId), so those
counters move.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import random
import time
import urllib.parse
from collections import deque
from typing import Any

import orjson

from stream_app.contract import iso_ms, parse_timestamp
from stream_app.demo.stats import LiveStats, activity
from stream_app.synthetic import SimUser, generate_users, user_events

BROKEN_SHARE = 0.005  # extra events that break the contract (dead-lettered by the collector)
RESEND_SHARE = 0.005  # extra copies of recently sent events (dropped as duplicates)
FLUSH_EVERY_S = 0.05  # like an SDK: a batch request at least this often while events are due
MAX_BATCH = 500


class SyntheticFeed:
    """The synthetic stream as a schedule of events, by offset in seconds from the start.

    Cohorts of ``users`` users sign up one after another, a new cohort every ``wave_s``
    seconds; a cohort's users arrive over its first seconds (so the view starts busy),
    and a user's events are generated when the user arrives. Events later than the end
    of the user's wave (the sparse later sessions, hours of simulated time apart) are
    cut off: memory stays bounded however long the demo runs.
    """

    def __init__(self, users: int, time_scale: float, rate: float) -> None:
        self.users = users
        self.time_scale = time_scale
        self.arrival_s = max(60.0, users / 5) * time_scale
        self.wave_s = max(60.0, 30.0 * users / rate, 3 * self.arrival_s)
        self.cohorts = 0  # generated so far (the next one is generated when its first user is due)
        self._arrivals: list[tuple[float, float, SimUser]] = []  # (arrival, wave end, user), latest first
        self._heap: list[tuple[float, int, dict[str, Any], deque[tuple[float, dict[str, Any]]]]] = []
        self._tie = itertools.count()
        self.position = 0.0  # offset of the last event popped

    @property
    def cohorts_started(self) -> int:
        return int(self.position // self.wave_s) + 1

    def next_offset(self) -> float:
        """Offset (s) of the next event; admits the users who have arrived by then."""
        while True:
            if not self._arrivals:
                self._start_cohort()
            arrival, wave_end, user = self._arrivals[-1]
            if self._heap and self._heap[0][0] <= arrival:
                return self._heap[0][0]
            self._arrivals.pop()
            self._admit(user, arrival, wave_end)

    def pop(self) -> dict[str, Any]:
        """The next event (call :meth:`next_offset` first)."""
        self.position, _, event, rest = heapq.heappop(self._heap)
        if rest:
            offset, following = rest.popleft()
            heapq.heappush(self._heap, (offset, next(self._tie), following, rest))
        return event

    def _start_cohort(self) -> None:
        start = self.cohorts * self.wave_s
        seed = self.cohorts + 1
        rng = random.Random(seed)
        arrivals = [(start + rng.uniform(0, self.arrival_s), u) for u in generate_users(self.users, seed)]
        arrivals.sort(key=lambda pair: pair[0], reverse=True)
        self._arrivals = [(at, start + self.wave_s, user) for at, user in arrivals]
        self.cohorts += 1

    def _admit(self, user: SimUser, arrival: float, wave_end: float) -> None:
        timed = deque(
            (offset, event)
            for event in user_events(user, int(arrival * 1000), self.time_scale)
            if (offset := parse_timestamp(event["timestamp"]) / 1000) < wave_end
        )
        if timed:
            offset, event = timed.popleft()
            heapq.heappush(self._heap, (offset, next(self._tie), event, timed))


def broken_event(rng: random.Random) -> dict[str, Any]:
    """An event the contract rejects: the usual ways clients get it wrong."""
    tag = f"bad-{rng.getrandbits(64):x}"
    kind = rng.randrange(4)
    if kind == 0:  # a track call without an event name
        return {"type": "track", "messageId": tag, "userId": "someone", "properties": {}}
    if kind == 1:  # an SDK bug: a placeholder id and nothing else
        return {"type": "track", "messageId": tag, "userId": "undefined", "event": "Feature Used"}
    if kind == 2:
        return {"type": "track", "messageId": tag, "userId": "x", "event": "A", "timestamp": "yesterday"}
    return {"type": "screenview", "messageId": tag, "userId": "x"}


class CollectorSender:
    """Sends the feed on time, at most ``rate`` events/s, as ``POST /v1/batch`` requests to the
    collector over one keep-alive connection; a 503 keeps the batch for the next try."""

    def __init__(self, collector_url: str, feed: SyntheticFeed, rate: float, stats: LiveStats) -> None:
        parts = urllib.parse.urlsplit(collector_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
        self.feed, self.stats, self.rate = feed, stats, rate
        self.burst = max(1.0, rate / 20)  # token bucket: at most 50 ms worth of events at once
        self.tokens = self.burst
        self.t0 = self.last = self.flushed = time.monotonic()
        self.rng = random.Random(7)
        self.history: deque[dict[str, Any]] = deque(maxlen=500)  # candidates for a re-send
        self.pending: list[tuple[str, dict[str, Any]]] = []  # (kind: sent|broken|resent, event)

    def send_due(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        while self.tokens >= 1 and self.t0 + self.feed.next_offset() <= now and len(self.pending) < MAX_BATCH:
            self._add(self.feed.pop())
            self.tokens -= 1
        self.stats.cohorts = self.feed.cohorts_started
        if self.pending and (now - self.flushed >= FLUSH_EVERY_S or len(self.pending) >= MAX_BATCH):
            self.flush()

    def pause(self) -> float:
        """Seconds to sleep before the next :meth:`send_due` (short: keeps the pace smooth)."""
        due_in = self.t0 + self.feed.next_offset() - time.monotonic()
        return min(0.01, max(0.002, due_in))

    def _add(self, event: dict[str, Any]) -> None:
        event["timestamp"] = iso_ms(int(time.time() * 1000))  # event time = send time: real latency
        self.pending.append(("sent", event))
        self.stats.recent.appendleft(activity(event))
        self.history.append(event)
        roll = self.rng.random()
        if roll < BROKEN_SHARE:
            self.pending.append(("broken", broken_event(self.rng)))
        elif roll < BROKEN_SHARE + RESEND_SHARE:  # a client retry, possibly seconds later
            self.pending.append(("resent", self.history[self.rng.randrange(len(self.history))]))

    def flush(self) -> None:
        """One batch request with everything pending; kept for the next call on 503 or no answer."""
        self.flushed = time.monotonic()
        if not self.pending:
            return
        body = orjson.dumps(
            {"batch": [e for _k, e in self.pending], "sentAt": iso_ms(int(time.time() * 1000))}
        )
        try:
            self.conn.request("POST", "/v1/batch", body, {"Content-Type": "application/json"})
            response = self.conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            self.conn.close()  # reconnects on the next request
            self.stats.retried_requests += 1
            return
        if status == 503:
            self.stats.retried_requests += 1
            return
        if status != 200:
            self.stats.delivery_errors += len(self.pending)
        else:
            for kind, _event in self.pending:
                setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        self.pending = []

    def close(self) -> None:
        self.conn.close()
