"""Every Prometheus metric of the engine, declared in one place.

Units are in the names (``_seconds``, ``_bytes``, ``_total``); label values are
bounded sets (event type, reason code, operation). A user id is never a label.
The registry is injectable so tests and benchmarks get a fresh one.
"""

from __future__ import annotations

import gc
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000)
STEP_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 86_400)
#: distinct (flow, step) label pairs the live funnel keeps per process; later ones count as
#: flow="other", step="other" (flows and steps are the senders' strings: never unbounded labels)
FUNNEL_MAX_STEPS = 200


class Metrics:
    """The engine's metrics on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_consumed = Counter(
            "onboarding_events_consumed_total",
            "Records read from the events topic, by event type (invalid records count as type=invalid).",
            ["type"],
            registry=r,
        )
        self.events_invalid = Counter(
            "onboarding_events_invalid_total",
            "Records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.events_duplicate = Counter(
            "onboarding_events_duplicate_total",
            "Valid events dropped because their messageId was already applied.",
            registry=r,
        )
        self.events_clock_ahead = Counter(
            "onboarding_events_clock_ahead_total",
            "Events whose client timestamp was later than their Kafka record timestamp (a fast client "
            "clock); their time was capped at the record time.",
            registry=r,
        )
        self.traits_dropped = Counter(
            "onboarding_traits_dropped_total",
            "Traits not stored because the traits policy drops them (or they exceed its bounds).",
            registry=r,
        )
        self.events_applied = Counter(
            "onboarding_events_applied_total", "Events applied to a profile.", registry=r
        )
        self.event_latency = Histogram(
            "onboarding_event_to_profile_latency_seconds",
            "Event time to profile written.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "onboarding_batch_processing_seconds",
            "Wall time to process one batch (validate, dedup, update, publish).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_phase_seconds = Histogram(
            "onboarding_batch_phase_seconds",
            "Time per batch in each phase: process (parse, links, profiles, reactions), publish "
            "(dead letters, segment changes, triggers), segments_and_samples, deadlines.",
            ["phase"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "onboarding_batch_size_events", "Records per batch.", buckets=SIZE_BUCKETS, registry=r
        )
        self.redis_seconds = Histogram(
            "onboarding_redis_seconds",
            "Time spent in Redis calls, by operation.",
            ["operation"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.gc_pause_seconds = Histogram(
            "onboarding_gc_pause_seconds",
            "How long each Python garbage collection stopped the process, by generation (2: a "
            "full collection; the worker freezes what start-up allocated, which keeps those short).",
            ["generation"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.profiles_written = Counter(
            "onboarding_profiles_written_total",
            "Profile documents written (one per user per batch).",
            registry=r,
        )
        self.write_conflicts = Counter(
            "onboarding_profile_write_conflicts_total",
            "Compare-and-set writes refused because another writer got there first (re-read and retried).",
            registry=r,
        )
        self.identity_merges = Counter(
            "onboarding_identity_merges_total",
            "Identity links by outcome (merged, linked, already_merged, conflict, refused_identified, "
            "refused_limit).",
            ["outcome"],
            registry=r,
        )
        self.profiles_erased = Counter(
            "onboarding_profiles_erased_total", "Users erased on a Data Deletion Requested event.", registry=r
        )
        self.store_errors = Counter(
            "onboarding_store_errors_total",
            "Failed attempts to reach a store (store=redis|kafka|other) by error class; the work is "
            "retried, nothing is acked meanwhile.",
            ["store", "error"],
            registry=r,
        )
        self.records_parked = Counter(
            "onboarding_records_parked_total",
            "Valid records whose processing failed for good, parked on the dead-letter topic "
            "(reason processing_failed), by error class.",
            ["error"],
            registry=r,
        )
        self.dead_letters_published = Counter(
            "onboarding_dead_letters_published_total", "Records written to the dead-letter topic.", registry=r
        )
        self.input_bounded = Counter(
            "onboarding_input_bounded_total",
            "Input not kept because it would grow state past a bound: what=flows (per profile, "
            "MAX_FLOWS), steps (per flow, MAX_STEPS_PER_FLOW), step_stats_rows (in total, "
            "STEP_STATS_MAX_ROWS). The events still count in the profile's event totals.",
            ["what"],
            registry=r,
        )
        self.step_stats_updates = Counter(
            "onboarding_step_stats_contributions_total",
            "Step durations folded into the per-step statistics (after dedup).",
            registry=r,
        )
        self.last_batch_unixtime = Gauge(
            "onboarding_last_batch_timestamp_seconds", "Unix time the last batch finished.", registry=r
        )
        self.profile_cache_bytes = Gauge(
            "onboarding_profile_cache_bytes",
            "Serialized profile documents held in this worker's cache (bounded by PROFILE_CACHE_MB).",
            registry=r,
        )
        # --- lag and health --------------------------------------------------------------------
        self.consumer_lag_records = Gauge(
            "onboarding_consumer_lag_records",
            "Records of an owned events partition not yet processed (position=processed) or not yet "
            "committed (position=committed): its log-end offset minus that position.",
            ["partition", "position"],
            registry=r,
        )
        self.consumer_lag_seconds = Gauge(
            "onboarding_consumer_lag_seconds",
            "Age of the oldest unprocessed record of an owned events partition (0 when caught up), "
            "estimated from the log-end offsets sampled every second.",
            ["partition"],
            registry=r,
        )
        self.batch_retrying_seconds = Gauge(
            "onboarding_batch_retrying_seconds",
            "How long the batch in hand has been failing and retrying (0: no batch is failing).",
            registry=r,
        )
        self.redis_out_of_memory = Gauge(
            "onboarding_redis_out_of_memory",
            "1 while Redis refuses writes with OOM (maxmemory reached under noeviction), else 0.",
            registry=r,
        )
        # --- segments and clusters ---------------------------------------------------------
        self.segment_changes = Counter(
            "onboarding_segment_changes_total",
            "Membership changes published to onboarding.segments.",
            ["source", "change"],
            registry=r,
        )
        self.segment_members = Gauge(
            "onboarding_segment_members",
            "Users currently in each segment (rule segments and clusters; cluster-wide count kept in Redis).",
            ["source", "segment"],
            registry=r,
        )
        self.cluster_reassignments = Counter(
            "onboarding_cluster_reassignments_total",
            "Users moved from one cluster to another (cluster churn; first assignments excluded).",
            registry=r,
        )
        self.cluster_sweep_checked = Counter(
            "onboarding_cluster_sweep_profiles_total",
            "Profiles re-checked by the cluster sweep (users without a new event brought to a new model).",
            registry=r,
        )
        self.cluster_sweep_behind = Gauge(
            "onboarding_cluster_sweep_partitions_behind",
            "Owned partitions whose members are not yet all checked against the latest model's sweep "
            "version.",
            registry=r,
        )
        self.cluster_model_created = Gauge(
            "onboarding_cluster_model_created_timestamp_seconds",
            "Unix time the cluster model snapshot in use was trained (alert when it stops moving).",
            registry=r,
        )
        self.cluster_model_version = Gauge(
            "onboarding_cluster_model_version",
            "Version of the shared cluster model snapshot in use.",
            registry=r,
        )
        # --- triggers ------------------------------------------------------------------------------
        self.triggers_emitted = Counter(
            "onboarding_triggers_emitted_total",
            "Triggers published to onboarding.triggers (delivered group).",
            ["type"],
            registry=r,
        )
        self.bandit_counted = Counter(
            "onboarding_bandit_counted_total",
            "The bandit's pulls (treated triggers it chose the variant of) and rewards (their "
            "outcome of the type's reward kind), each counted once per trigger id.",
            ["type", "variant", "kind"],
            registry=r,
        )
        self.triggers_suppressed = Counter(
            "onboarding_triggers_suppressed_total",
            "Would-be triggers not delivered, by reason (holdout ones go to onboarding.triggers.holdout).",
            ["type", "reason"],
            registry=r,
        )
        self.timer_lag = Histogram(
            "onboarding_timer_lag_seconds",
            "Deadline-driven triggers: publish time minus the deadline (event time).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.deadlines_pending = Gauge(
            "onboarding_deadlines_pending",
            "Users with a scheduled deadline in this worker's partitions.",
            registry=r,
        )
        self.deadlines_fired = Counter(
            "onboarding_deadlines_fired_total", "Due deadlines looked at by the timer.", registry=r
        )
        self.funnel_steps = Counter(
            "onboarding_funnel_steps_total",
            "The live funnel: users who started a step (it became their current step), completed "
            "it, or dropped at it (a stall decided for the step, or the flow abandoned on it), "
            "counted in each of their groups: all, segment:<rule segment>, cluster:<name>.",
            ["flow", "step", "stage", "group"],
            registry=r,
        )
        self.funnel_step_seconds = Histogram(
            "onboarding_funnel_step_duration_seconds",
            "Time from a step's start to its completion (client clock), per group as above.",
            ["flow", "step", "group"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self._funnel_steps: set[tuple[str, str]] = set()
        self.watermark_lag = Gauge(
            "onboarding_watermark_lag_seconds",
            "Wall clock minus the event-time watermark, worst owned partition.",
            registry=r,
        )

    def count_funnel(
        self, flow: str, step: str, stage: str, groups: tuple[str, ...], took: float | None
    ) -> None:
        """One user's step started / completed / dropped, in each of their groups."""
        if (flow, step) not in self._funnel_steps:
            if len(self._funnel_steps) >= FUNNEL_MAX_STEPS:
                flow, step = "other", "other"
            else:
                self._funnel_steps.add((flow, step))
        for group in groups:
            self.funnel_steps.labels(flow, step, stage, group).inc()
            if took is not None:
                self.funnel_step_seconds.labels(flow, step, group).observe(took)

    def store_error(self, exc: BaseException) -> None:
        """Count a failed attempt, labelled with the store it came from and the error class."""
        from redis.exceptions import RedisError

        from stream_app.errors import ContentionError

        if isinstance(exc, RedisError | ContentionError):
            store = "redis"
        elif type(exc).__module__.split(".")[0] in {"aiokafka", "confluent_kafka", "faust", "mode"}:
            store = "kafka"
        else:
            store = "other"
        self.store_errors.labels(store, type(exc).__name__).inc()


class CollectorMetrics:
    """The HTTP collector's metrics (``stream-app collector``), on their own registry.

    Labels are bounded: ``route`` is one of the API's route names (or ``other``), ``status``
    an HTTP status code, ``reason`` a dead-letter reason code. Never a write key or an id.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "onboarding_collector_requests_total",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=r,
        )
        self.events = Counter(
            "onboarding_collector_events_total",
            "Events received in accepted requests: outcome=accepted (to onboarding.events) or "
            "dead_lettered (broke the contract; to the dead-letter topic).",
            ["outcome"],
            registry=r,
        )
        self.events_rejected = Counter(
            "onboarding_collector_events_rejected_total",
            "Events dead-lettered by the collector, by reason code.",
            ["reason"],
            registry=r,
        )
        self.produce_seconds = Histogram(
            "onboarding_collector_produce_seconds",
            "Time from producing a request's records to the broker's acknowledgement of all of them.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "onboarding_collector_request_seconds",
            "Time to answer an event request (read, parse, validate, produce, acknowledged).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "onboarding_collector_in_flight_requests",
            "Event requests being handled now.",
            registry=r,
        )
        self.decisions = Counter(
            "onboarding_collector_decisions_total",
            "Answers of GET /v1/personalization: outcome=computed, cached (profile unchanged), "
            "default (unknown id, no profile, or refused personalization) or fallback (Redis did "
            "not answer in time: the default answer was served).",
            ["outcome"],
            registry=r,
        )
        self.recommender_version = Gauge(
            "onboarding_collector_recommender_model_version",
            "Version of the recommender model the collector answers with (0: none yet).",
            registry=r,
        )


class GcPauses:
    """Times every garbage collection into ``onboarding_gc_pause_seconds``.

    The ``gc.callbacks`` hook only appends to a deque: observing a histogram takes a lock,
    and a collection that started while this thread held it would wait on itself. ``drain``
    (a worker timer, once a second) moves the pauses into the histogram.
    """

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self.pending: deque[tuple[int, float]] = deque(maxlen=10_000)
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pending.append((info["generation"], time.perf_counter() - self._started))

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def drain(self) -> int:
        drained = 0
        while self.pending:
            generation, seconds = self.pending.popleft()
            self.histogram.labels(str(generation)).observe(seconds)
            drained += 1
        return drained
