"""``GET /v1/personalization``: the decision for one user, read from the profile store.

The answer itself is decided by :mod:`stream_app.personalization.decide` (pure); this module
reads the profile (one round trip for its version; a second one only when the profile
changed since the cached answer), follows a tombstone to the profile an id was linked into,
keeps the latest recommender model, and falls back to the default answer when Redis does
not answer in time: a page asking what to show must always get something to show.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from typing import Any

import orjson
from redis.exceptions import RedisError

from stream_app.contract import is_blocked_id
from stream_app.metrics import CollectorMetrics
from stream_app.personalization.config import PersonalizationConfig
from stream_app.personalization.decide import answer, default_answer
from stream_app.personalization.recommend import RecoModel
from stream_app.profile import is_tombstone
from stream_app.store.models import ModelStore
from stream_app.store.profiles import ProfileStore

log = logging.getLogger("stream_app.collector.decisions")

MAX_ID_LENGTH = 512  # longer ids are not ours (the contract's own limit is lower)


def user_hash(secret: bytes, user: str) -> str:
    """What a backend computes for a user when PERSONALIZATION_USER_HASH_SECRET is set."""
    return hmac.new(secret, user.encode(), hashlib.sha256).hexdigest()


class Decisions:
    def __init__(
        self,
        store: ProfileStore,
        models: ModelStore[RecoModel],
        config: PersonalizationConfig,
        config_version: str,
        metrics: CollectorMetrics,
        blocked_ids: frozenset[str],
        *,
        cache_size: int = 10_000,
        refresh_seconds: float = 2.0,
        timeout_seconds: float = 0.5,
    ) -> None:
        self.store, self.models, self.config, self.metrics = store, models, config, metrics
        self.config_version, self.blocked_ids = config_version, blocked_ids
        self.cache_size, self.refresh_seconds, self.timeout_seconds = (
            cache_size,
            refresh_seconds,
            timeout_seconds,
        )
        self.model: RecoModel | None = None
        self._checked_at = float("-inf")
        #: profile id -> (profile version, model version, answer bytes)
        self._cache: OrderedDict[str, tuple[int, int, bytes]] = OrderedDict()
        self._default: tuple[int, bytes] | None = None

    @property
    def model_version(self) -> int:
        return self.model.version if self.model else 0

    async def refresh(self) -> None:
        """Pick up a newer recommender model (checked at most every ``refresh_seconds``)."""
        if time.monotonic() - self._checked_at < self.refresh_seconds:
            return
        self._checked_at = time.monotonic()
        version = await self.models.version()
        if version and version != self.model_version:
            self.model = await self.models.latest()
            self.metrics.recommender_version.set(self.model_version)

    def default(self) -> bytes:
        if self._default is None or self._default[0] != self.model_version:
            body = orjson.dumps(default_answer(self.config, self.model, self.config_version))
            self._default = (self.model_version, body)
        return self._default[1]

    async def decide(self, profile_id: str) -> bytes:
        """The answer's JSON for a userId or anonymousId (the default one for anything unknown)."""
        if not profile_id or len(profile_id) > MAX_ID_LENGTH or is_blocked_id(profile_id, self.blocked_ids):
            self.metrics.decisions.labels("default").inc()
            return self.default()
        try:
            return await asyncio.wait_for(self._decide(profile_id), self.timeout_seconds)
        except (TimeoutError, OSError, RedisError) as exc:
            self.metrics.decisions.labels("fallback").inc()
            log.warning(
                "profile store did not answer; default decision served", extra={"error": repr(exc)[:200]}
            )
            return self.default()

    async def _decide(self, pid: str) -> bytes:
        await self.refresh()
        version = await self.store.version(pid)
        if version == 0:
            self.metrics.decisions.labels("default").inc()
            return self.default()
        hit = self._cache.get(pid)
        if hit is not None and hit[0] == version and hit[1] == self.model_version:
            self._cache.move_to_end(pid)
            self.metrics.decisions.labels("cached").inc()
            return hit[2]
        doc = await self.store.get(pid)
        cacheable = True
        if is_tombstone(doc):  # an id linked into another profile answers for that profile
            doc = await self.store.get(str(doc["merged_into"]))
            cacheable = False  # the target changes without this id's version changing
        result: dict[str, Any] = answer(doc, self.config, self.model, self.config_version)
        body = orjson.dumps(result)
        self.metrics.decisions.labels("computed" if result["personalized"] else "default").inc()
        if cacheable and self.cache_size > 0:
            self._cache[pid] = (version, self.model_version, body)
            self._cache.move_to_end(pid)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return body
