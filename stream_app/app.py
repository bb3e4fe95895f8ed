"""Builds the Faust app and the runtime its agents and web views share.

:class:`Runtime` owns the connections (Redis), the stores, the pipeline and the
metrics; agents in ``agents/`` are thin glue from topics to its methods. Nothing here
decides what goes into a profile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import faust
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from stream_app.clock import watermark_candidate
from stream_app.configure import contract_rules, identity_rules, profile_rules, trigger_config
from stream_app.contract import iso_ms
from stream_app.errors import ConfigError
from stream_app.metrics import Metrics
from stream_app.paths import CONFIG_DIR
from stream_app.pipeline import BatchOutcome, EventProcessor, Record
from stream_app.privacy import apply_policy
from stream_app.profile import Profile, StepDuration, is_tombstone, render_profile
from stream_app.reactions import HOLDOUT, SEGMENTS, TRIGGERS, ReactionContext
from stream_app.segments.assign import Snapshot, assignment_change, choose_cluster, features
from stream_app.segments.cluster_model import train_model
from stream_app.segments.facts import profile_facts
from stream_app.segments.rules import RuleError, load_segments
from stream_app.settings import DEV_PII_SALT, Settings
from stream_app.store.deadlines import DeadlineStore, InMemoryDeadlineStore, RedisDeadlineStore, SweepState
from stream_app.store.keys import Keys
from stream_app.store.models import ClusterModelStore, InMemoryClusterModelStore, RedisClusterModelStore
from stream_app.store.profiles import AnyRedis, ProfileStore, RedisProfileStore
from stream_app.store.step_stats import InMemoryStepStatsStore, RedisStepStatsStore, StepStatsStore
from stream_app.topics import TopicSpec, load_topics
from stream_app.triggers.decide import StepBaseline

log = logging.getLogger("stream_app")

DAY_MS = 86_400_000


def redis_client(settings: Settings, url: str) -> AnyRedis:
    # Timeouts turn a hung Redis into an error the batch loop retries, instead of a stall.
    timeout = settings.redis_timeout_seconds
    if settings.redis_cluster:
        return aioredis.RedisCluster.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    return aioredis.Redis.from_url(
        url, health_check_interval=30, socket_timeout=timeout, socket_connect_timeout=timeout
    )


class Runtime:
    """What the agents and views share: settings, stores, pipeline, metrics."""

    def __init__(
        self, settings: Settings, store: ProfileStore | None = None, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.keys = Keys(settings.redis_key_prefix)
        self.topics: dict[str, TopicSpec] = load_topics(settings)
        self.redis: AnyRedis | None = None
        if store is None:
            _, redis_url = settings.require_services()
            self.redis = redis_client(settings, redis_url)
            store = RedisProfileStore(
                self.redis, self.keys, settings.profile_ttl_seconds, settings.dedup_window_seconds
            )
        self.store = store
        self.step_stats: StepStatsStore = (
            RedisStepStatsStore(self.redis, self.keys, settings.dedup_window_seconds)
            if self.redis is not None
            else InMemoryStepStatsStore()
        )
        self.profile_rules = profile_rules(settings)
        events_topic = self.topics["events"].name
        self.deadlines: DeadlineStore = (
            RedisDeadlineStore(self.redis, self.keys, events_topic)
            if self.redis is not None
            else InMemoryDeadlineStore()
        )
        self.trigger_config = trigger_config(settings)
        self.models: ClusterModelStore = (
            RedisClusterModelStore(self.redis, self.keys)
            if self.redis is not None
            else InMemoryClusterModelStore()
        )
        self.snapshot: Snapshot | None = None
        self.snapshot_checked_at = 0.0
        self.sizes_read_at = 0.0
        self.step_means: dict[tuple[str, str], float] = {}  # (flow, step) -> mean s, all users
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.rng = random.Random()
        try:
            self.segments = load_segments(
                settings.segments_file or CONFIG_DIR / "segments.toml", settings.segments_max
            )
        except RuleError as exc:
            raise ConfigError("SEGMENTS_FILE", str(exc)) from exc
        self.processor = EventProcessor(
            store,
            contract_rules(settings),
            self.profile_rules,
            self.metrics,
            cache_size=settings.profile_cache_size,
            step_stats=self._fold_step_durations,
            on_erase=self._forget,
            reactions=self.reaction_context,
            identity=identity_rules(settings),
        )
        self.baselines: dict[tuple[str, str, str], StepBaseline] = {}
        self.baselines_read_at = 0.0
        # One batch or one timer pass at a time: both write profiles and the deadline index.
        self.lock = asyncio.Lock()
        self.next_offsets: dict[int, int] = {}  # events partition -> next offset to process
        #: watermarks of owned partitions as last written (only the owner advances them)
        self.marks: dict[int, tuple[int, int]] = {}
        self.pending_read_at = 0.0
        #: partition -> True when this worker has read everything in it (set by create_app)
        self.caught_up: Any = None
        self.dlq_topic: Any = None  # set by the agent module
        self.out_topics: dict[str, Any] = {}  # segments / triggers / holdout, set by the agent module
        self.ready = False
        self.assigned: set[tuple[str, int]] = set()  # (topic, partition) this worker owns now

    async def _fold_step_durations(self, durations: list[StepDuration]) -> None:
        await self.step_stats.add(durations)

    def reaction_context(self) -> ReactionContext:
        assign = self.assign_cluster if self.settings.cluster_enabled else None
        return ReactionContext(self.segments, self.trigger_config, self.profile_rules, self.baselines, assign)

    def assign_cluster(
        self, doc: Profile, now_ms: int, current: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any] | None, str]:
        """The user's cluster under the shared model, with hysteresis against the stored one."""
        snap = self.snapshot
        if snap is None:
            return (dict(current) if current else None), ""
        distances = snap.distances(features(doc, self.step_means))
        cid = choose_cluster(current.get("id") if current else None, distances, self.settings.cluster_margin)
        reason = f"nearest centroid of model v{snap.version} (distance {distances[cid]:.2f})"
        return {"id": cid, "name": snap.names[cid], "model_version": snap.version}, reason

    async def refresh_model(self, force: bool = False) -> None:
        """Pick up a newer shared cluster model (checked at most every BASELINE_REFRESH_SECONDS)."""
        if not self.settings.cluster_enabled:
            return
        if not force and time.monotonic() - self.snapshot_checked_at < self.settings.baseline_refresh_seconds:
            return
        self.snapshot_checked_at = time.monotonic()
        version = await self.models.version()
        if version and (self.snapshot is None or self.snapshot.version != version):
            self.snapshot = await self.models.latest()
            self.metrics.cluster_model_version.set(version)

    async def train_once(self) -> Snapshot | None:
        """If this worker holds the training lease: train on the sample set, publish the next snapshot.

        Each pass trains a fresh model on a random draw of the users' latest vectors
        (:func:`~stream_app.segments.cluster_model.train_model`); ids carry over from
        the previous snapshot by matching centroids.
        """
        s = self.settings
        ttl_ms = int(3 * s.cluster_train_interval_seconds * 1000)
        if not s.cluster_enabled or not await self.models.acquire_lease(self.worker_id, ttl_ms):
            return None
        if await self.models.sample_count() < s.cluster_min_samples:
            return None
        samples = await self.models.sample(s.cluster_train_samples)
        latest = await self.models.latest()
        version = (latest.version if latest else 0) + 1
        base = latest  # the model whose assignments the stored clusters were last swept to
        if latest is not None and latest.sweep_version != latest.version:
            base = next((h for h in await self.models.history() if h.version == latest.sweep_version), None)

        def train() -> tuple[Snapshot, float]:
            snap = train_model(
                samples,
                latest,
                version=version,
                now_ms=int(time.time() * 1000),
                k=s.cluster_k,
                halflife=s.cluster_halflife,
            )
            moved = assignment_change(base, snap, samples, s.cluster_margin)
            # a new version moves stored clusters (a sweep) only when it would move enough users
            keep = latest is not None and base is not None and moved < s.cluster_sweep_min_change
            return replace(snap, sweep_version=latest.sweep_version if keep and latest else version), moved

        # ~0.2 s for 5000 samples: in a thread, so batches and timers keep their turns
        snap, moved = await asyncio.to_thread(train)
        if not await self.models.publish(snap):
            return None
        log.info(
            "cluster model published",
            extra={
                "version": snap.version,
                "samples": snap.samples,
                "clusters": snap.names,
                "moved_share": round(moved, 4),
                "sweep_version": snap.sweep_version,
            },
        )
        await self.refresh_model(force=True)
        return snap

    async def _sample_profiles(
        self, docs: Mapping[str, Profile], linked: Sequence[str] = (), limit: int | None = None
    ) -> None:
        """Keep the latest vector of (a sample of, up to ``limit``) these profiles; drop those of
        users who refused personalization and of ids linked into another profile."""
        if not self.settings.cluster_enabled or (limit is not None and limit <= 0) or not docs:
            return
        consenting: list[str] = []
        gone = list(linked)  # a linked id's history now counts in its user's vector
        for pid, doc in docs.items():
            (gone if doc.get("consent", {}).get("personalization") is False else consenting).append(pid)
        if gone:
            await self.models.remove_samples(gone)
        picked = consenting if limit is None else self.rng.sample(consenting, min(limit, len(consenting)))
        vectors = {pid: features(docs[pid], self.step_means) for pid in picked}
        await self.models.put_samples(vectors, cap=self.settings.cluster_sample_cap)

    async def refresh_sizes(self, force: bool = False) -> None:
        if self.redis is None:
            return
        if not force and time.monotonic() - self.sizes_read_at < self.settings.baseline_refresh_seconds:
            return
        self.sizes_read_at = time.monotonic()
        raw = await self.redis.hgetall(self.keys.segment_sizes())
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else str(key)
            source, _, segment = name.partition(":")
            self.metrics.segment_members.labels(source, segment).set(max(0, int(value)))

    async def _count_sizes(self, deltas: Mapping[str, int]) -> None:
        if self.redis is None or not deltas:
            return
        pipe = self.redis.pipeline(transaction=False)
        for key, delta in deltas.items():
            if delta:
                pipe.hincrby(self.keys.segment_sizes(), key, delta)
        await pipe.execute()

    async def refresh_baselines(self, force: bool = False) -> None:
        """Re-read step statistics (stall thresholds) at most every BASELINE_REFRESH_SECONDS."""
        if not force and time.monotonic() - self.baselines_read_at < self.settings.baseline_refresh_seconds:
            return
        stats = await self.step_stats.all()
        self.baselines = {(s.flow, s.step, s.group): StepBaseline(s.mean_s, s.count) for s in stats}
        self.step_means = {(s.flow, s.step): s.mean_s for s in stats if not s.group}
        self.baselines_read_at = time.monotonic()
        await self.refresh_model()

    async def _forget(self, profile_ids: list[str]) -> None:
        """Erasure: the users' deadlines and training vectors go with their profiles."""
        await self.deadlines.remove_users(profile_ids, range(self.topics["events"].partitions))
        await self.models.remove_samples(profile_ids)

    async def wait_for_store(self) -> None:
        """Block start-up until Redis answers, retrying with back-off (an outage pauses, never drops)."""
        delay = 0.2
        while True:
            try:
                await self.store.ping()
                self.ready = True
                return
            except (RedisError, OSError) as exc:
                self.metrics.store_errors.labels("redis").inc()
                log.warning("redis not reachable, retrying", extra={"error": str(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.redis_retry_max_seconds)

    async def handle_batch(self, records: list[Record]) -> BatchOutcome:
        """Process one batch until it succeeds. Outages pause here; nothing is acked meanwhile."""
        started = time.perf_counter()
        delay = 0.1
        while True:
            try:
                # A hung call (a frozen Redis can leave one waiting past its socket timeout)
                # must not stall the partition forever: cancel the attempt and run it again.
                async with self.lock:
                    outcome = await asyncio.wait_for(
                        self._process_and_publish(records), self.settings.batch_attempt_timeout_seconds
                    )
                break
            except (RedisError, OSError, RuntimeError) as exc:
                self.metrics.store_errors.labels(type(exc).__name__).inc()
                log.warning(
                    "batch failed, retrying the whole batch (idempotent)",
                    extra={"error": repr(exc)[:300], "retry_in_s": delay, "records": len(records)},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.redis_retry_max_seconds)
        self._count(records, outcome, time.perf_counter() - started)
        return outcome

    async def _process_and_publish(self, records: list[Record]) -> BatchOutcome:
        phase = self.metrics.batch_phase_seconds
        t0 = time.perf_counter()
        await self.refresh_baselines()
        outcome = await self.processor.process(records)
        t1 = time.perf_counter()
        phase.labels("process").observe(t1 - t0)
        await self.publish_dead_letters(outcome)
        await self.publish_outbox(outcome)
        t2 = time.perf_counter()
        phase.labels("publish").observe(t2 - t1)
        await self._count_sizes(outcome.size_deltas)
        await self._sample_profiles(outcome.profiles, outcome.linked, self.settings.cluster_samples_per_batch)
        t3 = time.perf_counter()
        phase.labels("segments_and_samples").observe(t3 - t2)
        wall_ms = int(time.time() * 1000)
        latest: dict[int, int] = {}
        for rec in records:  # record timestamps only: no client clock moves shared time
            ts = watermark_candidate(rec.timestamp_ms, wall_ms)
            if ts is not None:
                latest[rec.partition] = max(latest.get(rec.partition, ts), ts)
        advanced = {p: ts for p, ts in latest.items() if ts > self.marks.get(p, (-1, 0))[0]}
        await self.deadlines.record_batch(outcome.deadlines, advanced, wall_ms, outcome.members)
        for partition, ts_ms in advanced.items():
            self.marks[partition] = (ts_ms, wall_ms)
        phase.labels("deadlines").observe(time.perf_counter() - t3)
        for rec in records:
            self.next_offsets[rec.partition] = max(self.next_offsets.get(rec.partition, 0), rec.offset + 1)
        return outcome

    async def publish_outbox(self, outcome: BatchOutcome) -> None:
        """Segment changes and triggers, delivered before the batch (or timer pass) is acked."""
        futures = []
        for message in outcome.outbox:
            topic = self.out_topics.get(message["to"])
            if topic is None:
                continue
            value = message["value"]
            futures.append(await topic.send(key=value["user_id"].encode(), value=orjson.dumps(value)))
        await asyncio.gather(*futures)
        self.processor.mark_published(outcome.outbox_keys)
        m = self.metrics
        now = time.time()
        for message in outcome.outbox:
            value = message["value"]
            if message["to"] == SEGMENTS:
                m.segment_changes.labels(value["source"], value["change"]).inc()
            elif message["to"] == TRIGGERS:
                m.triggers_emitted.labels(value["type"]).inc()
            if message["to"] in (TRIGGERS, HOLDOUT) and value["type"] in (
                "stalled_step",
                "onboarding_abandoned",
            ):
                due = datetime.fromisoformat(value["due_at"]).timestamp()
                m.timer_lag.observe(max(0.0, now - due))
        for type_, reason in outcome.suppressed:
            m.triggers_suppressed.labels(type_, reason).inc()
        m.cluster_reassignments.inc(outcome.cluster_moves)

    async def watermark_ms(self, partition: int) -> int | None:
        """Watermark of a partition, in trusted time (README "Time semantics", :mod:`stream_app.clock`).

        The greatest Kafka record timestamp read from it (never past the wall clock), minus
        the allowed lateness; while the worker has read everything in the partition, plus
        the wall-clock time since that record was read, so an idle partition's deadlines
        still come due. While a backlog is being read it advances only with the records, so
        completions still unread in the backlog cannot be missed by a stall that fires too
        early. Client timestamps never move it: one fast client clock cannot fire others'
        deadlines.
        """
        mark = self.marks.get(partition)
        if mark is None:  # not read since this worker got the partition
            mark = await self.deadlines.watermark(partition)
            if mark is None:
                return None
            self.marks[partition] = mark
        event_ms, seen_wall_ms = mark
        wm = event_ms - self.trigger_config.allowed_lateness_ms
        if self.caught_up is not None and await self.caught_up(partition):
            wm += max(0, int(time.time() * 1000) - seen_wall_ms)
        return wm

    async def fire_due(self, limit: int = 500) -> int:
        """One timer pass over this worker's partitions; returns how many deadlines it looked at."""
        events_topic = self.topics["events"].name
        owned = sorted(p for t, p in self.assigned if t == events_topic)
        looked = 0
        pending = 0
        worst_lag = 0.0
        marks: dict[int, int] = {}
        for partition in owned:
            wm = await self.watermark_ms(partition)
            if wm is not None:
                marks[partition] = wm
                worst_lag = max(worst_lag, time.time() - wm / 1000)
        async with self.lock:
            # one round trip for every owned partition; the work only where something is due
            due_by_partition = await self.deadlines.due_many(marks, limit)
            for partition, due in due_by_partition.items():
                await self.refresh_baselines()
                outcome = await self.processor.fire(partition, due, marks[partition])
                await self.publish_outbox(outcome)
                await self._count_sizes(outcome.size_deltas)
                await self.deadlines.settle(partition, outcome.settled)
                await self.deadlines.remove_members(partition, outcome.departed)
                looked += len(due)
        if time.monotonic() - self.pending_read_at > self.settings.baseline_refresh_seconds:
            self.pending_read_at = time.monotonic()
            for partition in owned:
                pending += await self.deadlines.pending(partition)
            self.metrics.deadlines_pending.set(pending)
        await self.refresh_sizes()
        self.metrics.deadlines_fired.inc(looked)
        self.metrics.watermark_lag.set(worst_lag)
        return looked

    async def sweep_clusters(self) -> int:
        """One pass of the cluster sweep over this worker's partitions; returns profiles checked.

        Once a model exists, every profile with behaviour must get its cluster, and a new
        model that would move users (its ``sweep_version``) must reach those who send
        nothing more. Each partition's members are walked with a cursor kept in Redis (a
        new owner continues where the last one stopped), about CLUSTER_SWEEP_RATE profiles
        a second for the whole worker; every profile goes through the same reaction and
        compare-and-set write as the timer, so a change is published once, with its id.
        A pass that began for an older model still finishes; the partition counts as swept
        to the version the pass began with, and a newer one starts another pass.
        """
        if not self.settings.cluster_enabled:
            return 0
        await self.refresh_model()  # an idle worker must still see a new model
        snap = self.snapshot
        if snap is None:
            return 0
        events_topic = self.topics["events"].name
        owned = sorted(p for t, p in self.assigned if t == events_topic)
        if not owned:
            return 0
        per_pass = self.settings.cluster_sweep_rate * self.settings.timer_interval_seconds
        count = max(1, int(per_pass / len(owned)))
        checked = behind = 0
        for partition in owned:
            state = await self.deadlines.sweep_state(partition)
            if state.done >= snap.sweep_version:
                continue
            wm = await self.watermark_ms(partition)
            if wm is None:  # nothing read from it yet: no time to decide at
                behind += 1
                continue
            started = state.started_for if state.cursor else snap.sweep_version
            cursor, users = await self.deadlines.scan_members(partition, state.cursor, count)
            if users:
                async with self.lock:
                    await self.refresh_baselines()
                    outcome = await self.processor.recheck(partition, users, wm)
                    await self.publish_outbox(outcome)
                    await self._count_sizes(outcome.size_deltas)
                    for part, entries in outcome.earlier.items():
                        await self.deadlines.schedule_earlier(part, entries)
                    await self.deadlines.remove_members(partition, outcome.departed)
                    # the sweep sees every member's current state: the next model learns from it
                    await self._sample_profiles(outcome.profiles)
                checked += len(users)
            done = started if cursor == 0 else state.done
            await self.deadlines.save_sweep(partition, SweepState(done, started, cursor))
            behind += int(done < snap.sweep_version)
        self.metrics.cluster_sweep_checked.inc(checked)
        self.metrics.cluster_sweep_behind.set(behind)
        return checked

    async def publish_dead_letters(self, outcome: BatchOutcome) -> None:
        if not outcome.dead_letters or self.dlq_topic is None:
            return
        failed_at = datetime.now(UTC).isoformat().encode()
        futures = []
        for rec, invalid in outcome.dead_letters:
            headers = [
                ("dlq.reason", invalid.reason.value.encode()),
                ("dlq.message", invalid.message.encode()),
                ("dlq.source.topic", rec.topic.encode()),
                ("dlq.source.partition", str(rec.partition).encode()),
                ("dlq.source.offset", str(rec.offset).encode()),
                ("dlq.failed_at", failed_at),
            ]
            if rec.timestamp_ms is not None:
                headers.append(("dlq.source.timestamp", str(rec.timestamp_ms).encode()))
            futures.append(await self.dlq_topic.send(key=rec.key, value=rec.value, headers=headers))
        await asyncio.gather(*futures)  # delivered before the batch is acked
        self.metrics.dead_letters_published.inc(len(futures))

    def _count(self, records: list[Record], outcome: BatchOutcome, seconds: float) -> None:
        m = self.metrics
        m.batch_seconds.observe(seconds)
        m.batch_size.observe(len(records))
        for kind, count in Counter(ev.type for _rec, ev in outcome.events).items():
            m.events_consumed.labels(kind).inc(count)
        if outcome.dead_letters:
            m.events_consumed.labels("invalid").inc(len(outcome.dead_letters))
            for reason, count in Counter(inv.reason.value for _rec, inv in outcome.dead_letters).items():
                m.events_invalid.labels(reason).inc(count)
        m.events_duplicate.inc(outcome.duplicates)
        m.events_clock_ahead.inc(sum(1 for _rec, ev in outcome.events if ev.ahead_ms > 0))
        m.traits_dropped.inc(sum(ev.dropped_traits for _rec, ev in outcome.events))
        m.events_applied.inc(outcome.applied)
        m.last_batch_unixtime.set(time.time())

    async def read_profile(self, user_id: str) -> Profile | None:
        """The reader's view of a profile, following identity links; None when unknown or erased."""
        doc = await self.store.get(user_id)
        for _hop in range(4):
            if not is_tombstone(doc):
                break
            doc = await self.store.get(doc["merged_into"])  # type: ignore[index]
        if doc is None or is_tombstone(doc):
            return None
        now_ms = int(time.time() * 1000)
        doc = self._within_policy(doc)
        view = render_profile(doc, now_ms, self.profile_rules)
        # Rule memberships as of now: computed at read time, so time-relative rules are current.
        engine = view.pop("engine", None) or {}
        refused = doc.get("consent", {}).get("personalization") is False
        facts = profile_facts(doc, now_ms, self.profile_rules)
        view["segments"] = [] if refused else sorted(self.segments.evaluate(facts))
        cluster = engine.get("cluster")
        view["cluster"] = {"id": cluster["id"], "name": cluster["name"]} if cluster else None
        view["triggers"] = [
            {
                "trigger_id": f["trigger_id"],
                "type": f["type"],
                "subject": f["subject"],
                "group": f["group"],
                "at": iso_ms(f["at"]),
            }
            for f in engine.get("fired", [])
        ]
        return view

    def _within_policy(self, doc: Profile) -> Profile:
        """The stored traits as the current policy allows them (a document written before a
        stricter policy, or by hand, never serves what the policy forbids)."""
        rules = self.processor.contract
        doc = dict(doc)
        doc["traits"], _ = apply_policy(doc.get("traits") or {}, rules.traits_policy, rules.pii_salt)
        doc["groups"] = {
            gid: {
                **group,
                "traits": apply_policy(group.get("traits") or {}, rules.traits_policy, rules.pii_salt)[0],
            }
            for gid, group in (doc.get("groups") or {}).items()
            if isinstance(group, dict)
        }
        return doc

    async def close(self) -> None:
        await self.store.close()


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


def _set_fetch_max_wait(ms: int) -> None:
    """Faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500`` and no setting for it.

    A broker that holds a fetch until that wait expires (Tansu does) then adds up to 1.5 s
    to every event's latency. Faust looks the class up on the aiokafka module at call time,
    so a subclass installed there takes the configured wait. The worker is a process of
    its own; nothing else in it builds group consumers.
    """
    import aiokafka
    from faust.transport.drivers import aiokafka as faust_aiokafka

    base = aiokafka.AIOKafkaConsumer
    if getattr(base, "_stream_app_fetch_wait", None) is not None:
        base._stream_app_fetch_wait = ms
        return

    class _Consumer(base):  # type: ignore[misc,valid-type]
        _stream_app_fetch_wait = ms

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("group_id") is not None:
                kwargs["fetch_max_wait_ms"] = type(self)._stream_app_fetch_wait
            super().__init__(*args, **kwargs)

    faust_aiokafka.aiokafka.AIOKafkaConsumer = _Consumer


def create_app(settings: Settings, runtime: Runtime | None = None) -> tuple[faust.App, Runtime]:
    """The Faust app with its agents and views registered, and the runtime they share."""
    bootstrap, _ = settings.require_services()
    if settings.pii_hash_salt.get_secret_value() == DEV_PII_SALT:
        log.warning("PII_HASH_SALT is the development default; set your own secret in production")
    runtime = runtime or Runtime(settings)
    _set_fetch_max_wait(settings.kafka_fetch_max_wait_ms)
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
        topic_partitions=runtime.topics["events"].partitions,
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
    )

    from agents import register_all
    from stream_app import web

    register_all(app, runtime)
    web.register(app, runtime)

    @app.task
    async def _wait_for_store() -> None:
        await runtime.wait_for_store()

    async def caught_up(partition: int) -> bool:
        tp = faust.types.TP(runtime.topics["events"].name, partition)
        try:
            highwater = app.consumer.highwater(tp)
        except Exception:  # not fetched yet / not assigned: not known to be caught up
            return False
        if highwater is None:
            return False
        position = runtime.next_offsets.get(partition)
        if position is None:
            position = await app.consumer.position(tp)
        return position is not None and position >= highwater

    runtime.caught_up = caught_up

    @app.timer(interval=settings.cluster_train_interval_seconds)
    async def _train_clusters() -> None:
        if not runtime.ready or not settings.cluster_enabled:
            return
        try:
            await runtime.train_once()
        except (RedisError, OSError) as exc:
            runtime.metrics.store_errors.labels(type(exc).__name__).inc()
            log.warning(
                "cluster training pass failed; retried next interval", extra={"error": repr(exc)[:300]}
            )

    @app.timer(interval=settings.timer_interval_seconds)
    async def _fire_deadlines() -> None:
        if not runtime.ready or app.rebalancing:
            return
        try:
            await asyncio.wait_for(runtime.fire_due(), settings.batch_attempt_timeout_seconds)
            await asyncio.wait_for(runtime.sweep_clusters(), settings.batch_attempt_timeout_seconds)
        except (RedisError, OSError, RuntimeError, TimeoutError) as exc:
            runtime.metrics.store_errors.labels(type(exc).__name__).inc()
            log.warning(
                "timer pass failed; due deadlines stay and are retried", extra={"error": repr(exc)[:300]}
            )

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # mode types receivers narrowly
    async def _assigned(app: faust.App, assigned: Any, *args: Any, **kwargs: Any) -> None:
        runtime.assigned = {(tp.topic, tp.partition) for tp in assigned}
        runtime.marks.clear()  # re-read: another worker may have advanced them meanwhile
        runtime.next_offsets.clear()
        events = sorted(p for t, p in runtime.assigned if t == runtime.topics["events"].name)
        log.info("partitions assigned", extra={"events_partitions": events})

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(app: faust.App, revoked: Any, *args: Any, **kwargs: Any) -> None:
        runtime.assigned -= {(tp.topic, tp.partition) for tp in revoked}
        log.info("partitions revoked", extra={"revoked": sorted(tp.partition for tp in revoked)})

    return app, runtime
