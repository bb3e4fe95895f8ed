"""The shared recommender as the workers keep it: adoption orders sampled from the profiles
batches write, and a model retrained by whichever worker holds its lease.

Like the cluster model (:mod:`stream_app.worker.clusters`): one model for every worker and
every collector, versioned snapshots in Redis (:class:`~stream_app.store.models.ModelStore`
under ``{prefix}:reco-*``), no per-user data in the model. The sample set holds, per
consenting user, the cluster name and the features in the order first used; a user who
refuses personalization, is erased, or is linked into another profile leaves it.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

from stream_app.personalization.recommend import RecoModel, adoption, train
from stream_app.profile import Profile
from stream_app.settings import Settings
from stream_app.store.models import ModelStore

log = logging.getLogger("stream_app.recommender")


class RecommenderService:
    def __init__(
        self,
        settings: Settings,
        models: ModelStore[RecoModel],
        min_support: int,
        rng: random.Random | None = None,
        wall_ms: Callable[[], int] | None = None,
    ) -> None:
        self.settings, self.models, self.min_support = settings, models, min_support
        self.rng = rng or random.Random()
        self.wall_ms = wall_ms or (lambda: int(time.time() * 1000))
        self.worker_id = f"reco-{uuid.uuid4().hex[:12]}"

    @property
    def enabled(self) -> bool:
        return self.settings.reco_enabled

    async def sample(self, docs: Mapping[str, Profile], linked: Sequence[str] = ()) -> None:
        """Keep the adoption order of (a sample of) these profiles; drop refusing and linked ids."""
        limit = self.settings.reco_samples_per_batch
        if not self.enabled or not docs or limit <= 0:
            return
        gone = list(linked)
        keep: list[str] = []
        for pid, doc in docs.items():
            if (doc.get("consent") or {}).get("personalization") is False:
                gone.append(pid)
            elif adoption(doc):
                keep.append(pid)
        if gone:
            await self.models.remove_samples(gone)
        picked = keep if len(keep) <= limit else self.rng.sample(keep, limit)
        orders = {pid: [_group(docs[pid]), adoption(docs[pid])] for pid in picked}
        await self.models.put_samples(orders, cap=self.settings.reco_sample_cap)

    async def forget(self, profile_ids: Sequence[str]) -> None:
        await self.models.remove_samples(profile_ids)

    async def train_once(self) -> RecoModel | None:
        """If this worker holds the lease: train on a draw of the sample set and publish the next
        version, unless its counts equal the latest model's (a new version with the same answers
        would only invalidate every collector's cached answers)."""
        s = self.settings
        ttl_ms = int(3 * s.reco_train_interval_seconds * 1000)
        if not self.enabled or not await self.models.acquire_lease(self.worker_id, ttl_ms):
            return None
        if await self.models.sample_count() < self.min_support:
            return None
        samples = await self.models.sample(s.reco_train_samples)
        version = await self.models.version() + 1
        model = train(
            ((str(g), list(items)) for g, items in samples),
            version=version,
            now_ms=self.wall_ms(),
            min_support=self.min_support,
        )
        latest = await self.models.latest()
        if latest is not None and latest.same_counts(model):
            return None
        if not await self.models.publish(model):
            return None
        log.info(
            "recommender model published",
            extra={"version": version, "users": model.users, "groups": sorted(model.group_users)},
        )
        return model


def _group(doc: Profile) -> str:
    cluster = (doc.get("engine") or {}).get("cluster") or {}
    return str(cluster.get("name") or "")
