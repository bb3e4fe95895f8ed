"""The worker's composition root: every role built once from the settings, wired by constructor.

Nothing here decides anything or runs a loop: :class:`Runtime` owns the connections and
stores and hands each role what it needs. The Faust app (:mod:`stream_app.worker.app`)
drives the roles; tests and the replay drive them directly on in-memory stores.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from stream_app.configure import (
    contract_rules,
    identity_rules,
    personalization_config,
    profile_rules,
    segment_set,
    trigger_config,
)
from stream_app.metrics import Metrics
from stream_app.personalization.recommend import RecoModel
from stream_app.pipeline import EventProcessor
from stream_app.profile import StepDuration
from stream_app.reactions import ReactionContext
from stream_app.settings import Settings
from stream_app.store.bandit import PULL, BanditStore, InMemoryBanditStore, RedisBanditStore
from stream_app.store.deadlines import DeadlineStore, InMemoryDeadlineStore, RedisDeadlineStore
from stream_app.store.epochs import EpochStore, InMemoryEpochStore, RedisEpochStore
from stream_app.store.keys import Keys
from stream_app.store.models import (
    ClusterModelStore,
    InMemoryClusterModelStore,
    InMemoryModelStore,
    ModelStore,
    RedisClusterModelStore,
    RedisModelStore,
)
from stream_app.store.profiles import AnyRedis, InMemoryProfileStore, ProfileStore, RedisProfileStore
from stream_app.store.sizes import InMemorySegmentSizeStore, RedisSegmentSizeStore, SegmentSizeStore
from stream_app.store.step_stats import InMemoryStepStatsStore, RedisStepStatsStore, StepStatsStore
from stream_app.topics import TopicSpec, load_topics
from stream_app.triggers.bandit import ArmEvent
from stream_app.worker.batches import BatchRunner
from stream_app.worker.clusters import Baselines, ClusterService
from stream_app.worker.epochs import Committed, EpochGuard, _never_committed
from stream_app.worker.publisher import Publisher, Sinks
from stream_app.worker.reader import ProfileReader
from stream_app.worker.recommender import RecommenderService
from stream_app.worker.timer import CaughtUp, DeadlineTimer, Lagging, Watermarks, _never, _not_lagging

log = logging.getLogger("stream_app")


def redis_client(settings: Settings, url: str) -> AnyRedis:
    # Timeouts turn a hung Redis into an error the batch loop retries, instead of a stall.
    timeout = settings.redis_timeout_seconds
    if settings.redis_cluster:
        return aioredis.RedisCluster.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    return aioredis.Redis.from_url(
        url, health_check_interval=30, socket_timeout=timeout, socket_connect_timeout=timeout
    )


class Stores:
    """The engine's state: Redis (REDIS_URL) or, for tests and replays, all in memory."""

    def __init__(self, settings: Settings, in_memory: bool = False) -> None:
        self.keys = Keys(settings.redis_key_prefix)
        self.topics: dict[str, TopicSpec] = load_topics(settings)
        events_topic = self.topics["events"].name
        self.redis: AnyRedis | None = None
        self.profiles: ProfileStore
        self.step_stats: StepStatsStore
        self.deadlines: DeadlineStore
        self.models: ClusterModelStore
        self.reco: ModelStore[RecoModel]
        self.sizes: SegmentSizeStore
        self.epochs: EpochStore
        self.bandit: BanditStore
        if in_memory:
            self.bandit = InMemoryBanditStore()
            self.profiles, self.step_stats = InMemoryProfileStore(), InMemoryStepStatsStore()
            self.deadlines, self.models = InMemoryDeadlineStore(), InMemoryClusterModelStore()
            self.reco = InMemoryModelStore()
            self.sizes, self.epochs = InMemorySegmentSizeStore(), InMemoryEpochStore()
            return
        if not settings.redis_url:
            from stream_app.errors import ConfigError

            raise ConfigError("REDIS_URL", "not set; point it at Redis or run `stream-app demo`")
        self.redis = client = redis_client(settings, settings.redis_url)
        self.profiles = RedisProfileStore(
            client,
            self.keys,
            settings.profile_ttl_seconds,
            settings.dedup_window_seconds,
            compress=settings.profile_compression,
        )
        self.step_stats = RedisStepStatsStore(client, self.keys)
        self.bandit = RedisBanditStore(client, self.keys, settings.dedup_window_seconds)
        self.deadlines = RedisDeadlineStore(client, self.keys, events_topic)
        self.models = RedisClusterModelStore(client, self.keys)
        self.reco = RedisModelStore(client, self.keys, "reco", RecoModel.from_json)
        self.sizes = RedisSegmentSizeStore(client, self.keys)
        self.epochs = RedisEpochStore(client, self.keys, events_topic)

    async def close(self) -> None:
        await self.profiles.close()


def reader(settings: Settings, stores: Stores) -> ProfileReader:
    """The profile read view on these stores (what `stream-app profile` needs, and nothing more)."""
    return ProfileReader(
        stores.profiles,
        profile_rules(settings),
        segment_set(settings),
        contract_rules(settings),
        stores.step_stats,
    )


class Runtime:
    """Every role of one worker process, built from the settings (and the output sinks)."""

    def __init__(
        self,
        settings: Settings,
        sinks: Sinks,
        stores: Stores | None = None,
        metrics: Metrics | None = None,
        caught_up: CaughtUp = _never,
        committed: Committed = _never_committed,
        lagging: Lagging = _not_lagging,
        rng: random.Random | None = None,
        wall_ms: Callable[[], int] | None = None,
    ) -> None:
        """``rng`` and ``wall_ms`` make the cluster service reproducible (replays)."""
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.stores = stores or Stores(settings)
        s = self.stores
        self.topics = s.topics
        self.segments = segment_set(settings)
        self.triggers = trigger_config(settings)
        self.profile_rules = profile_rules(settings)
        bandit_types = [t.name for t in self.triggers.types.values() if t.enabled and t.policy == "bandit"]
        self.baselines = Baselines(
            s.step_stats, settings.baseline_refresh_seconds, bandit=s.bandit, bandit_types=bandit_types
        )
        self.clusters = ClusterService(
            settings,
            s.models,
            self.baselines,
            self.metrics,
            rng=rng,
            wall_ms=wall_ms,
        )
        self.recommender = RecommenderService(
            settings,
            s.reco,
            personalization_config(settings).recommendations.min_support,
            rng=rng,
            wall_ms=wall_ms,
        )
        self.processor = EventProcessor(
            s.profiles,
            contract_rules(settings),
            self.profile_rules,
            self.metrics,
            cache_size=settings.profile_cache_size,
            cache_bytes=int(settings.profile_cache_mb * 1024 * 1024),
            step_stats=self._add_step_stats,
            on_erase=self._forget,
            reactions=self.reaction_context,
            identity=identity_rules(settings),
            rewards=self._count_rewards,
        )
        # a write does not store again an outbox this process published (Redis keeps none)
        s.profiles.known_published = self.processor.outbox.published
        self.publisher = Publisher(
            sinks, self.processor.outbox, self.metrics, s.profiles.mark_published, pulls=self._count_pulls
        )
        # One batch or one timer pass at a time: both write profiles and the deadline index.
        self.lock = asyncio.Lock()
        self.watermarks = Watermarks(s.deadlines, self.triggers.allowed_lateness_ms, caught_up)
        self.guard = EpochGuard(
            s.epochs, s.topics["events"].name, committed, accept=settings.accept_redis_state
        )
        self.batches = BatchRunner(
            settings, self.processor, self.publisher, s.deadlines, self.watermarks, self.baselines,
            self.clusters, s.sizes, self.metrics, self.lock, self.guard, self.recommender,
        )  # fmt: skip
        self.timer = DeadlineTimer(
            settings, self.processor, self.publisher, s.deadlines, self.watermarks, self.baselines,
            self.clusters, s.sizes, self.metrics, self.lock, s.topics["events"].partitions, lagging,
        )  # fmt: skip
        self.reader = ProfileReader(
            s.profiles, self.profile_rules, self.segments, self.processor.contract, s.step_stats
        )
        self.ready = False

    async def _add_step_stats(self, durations: list[StepDuration]) -> int:
        """Fold durations into the step statistics, within STEP_STATS_MAX_ROWS rows in total."""
        allowed, refused = self.baselines.admit(durations, self.settings.step_stats_max_rows)
        if refused:
            self.metrics.input_bounded.labels("step_stats_rows").inc(refused)
        return await self.stores.step_stats.add(allowed) if allowed else 0

    async def _count_pulls(self, pulls: list[ArmEvent]) -> None:
        self._counted(await self.stores.bandit.add(pulls, ()))

    async def _count_rewards(self, rewards: list[ArmEvent]) -> None:
        self._counted(await self.stores.bandit.add((), rewards))

    def _counted(self, new: list[tuple[str, ArmEvent]]) -> None:
        for kind, e in new:
            self.metrics.bandit_counted.labels(e.type, e.variant, "pull" if kind == PULL else "reward").inc()

    def reaction_context(self) -> ReactionContext:
        assign = self.clusters.assign if self.settings.cluster_enabled else None
        return ReactionContext(
            self.segments,
            self.triggers,
            self.profile_rules,
            self.baselines.by_step,
            assign,
            self.baselines.arms,
        )

    async def _forget(self, profile_ids: list[str]) -> None:
        """Erasure: the users' deadlines, members, training vectors and adoption orders go with
        their profiles."""
        # every partition the topic is declared with, and any beyond it this worker was given
        # (partitions raised on the broker without the topics file)
        partitions = max(self.timer.partitions, max(self.timer.owned, default=-1) + 1)
        await self.stores.deadlines.remove_users(profile_ids, range(partitions))
        await self.clusters.forget(profile_ids)
        await self.recommender.forget(profile_ids)

    async def wait_for_store(self) -> None:
        """Block start-up until Redis answers, retrying with back-off (an outage pauses, never drops)."""
        delay = 0.2
        while True:
            try:
                await self.stores.profiles.ping()
                self.ready = True
                return
            except (RedisError, OSError) as exc:
                self.metrics.store_error(exc)
                log.warning("redis not reachable, retrying", extra={"error": str(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.redis_retry_max_seconds)

    async def close(self) -> None:
        await self.stores.close()
