"""Identity links: folding one id's profile into another, idempotently, on the profile store.

``identify`` with an ``anonymousId`` and ``alias`` link an old id to a user. Which links are
allowed is decided by :mod:`stream_app.identity` (pure); this module carries them out with
compare-and-set writes, so a crash at any point, a redelivery or two workers racing give the
result of one link. It never talks to Kafka.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping

from stream_app.errors import ContentionError
from stream_app.identity import IdentityRules, refuse_link
from stream_app.metrics import Metrics
from stream_app.outbox import (
    Outbox,
    OutboxMessage,
    outbox_key,
    segment_change,
    store_outbox,
    stored_outbox,
)
from stream_app.profile import Profile, is_tombstone, merge_profiles, new_profile
from stream_app.segments.changes import linked_exits
from stream_app.store.profiles import Loaded, ProfileStore, Write
from stream_app.triggers.decide import engine_state

log = logging.getLogger(__name__)

MAX_CAS_ATTEMPTS = 8
LINK_CONCURRENCY = 32


class IdentityLinker:
    def __init__(
        self,
        store: ProfileStore,
        metrics: Metrics,
        rules: IdentityRules,
        outbox: Outbox,
        forget: Callable[[str], None],
    ) -> None:
        self.store, self.metrics, self.rules, self.outbox = store, metrics, rules, outbox
        self.forget = forget  # drop a cached document (the processor's cache)

    async def link_all(self, link_at: Mapping[tuple[str, str], int]) -> list[OutboxMessage]:
        """Run a batch's links ((source, target) -> event time); repeated identifies of linked
        ids cost one read. Returns the membership exits of the ids linked now.

        Round trips: one read of every source and target, then per link its tombstone and its
        target's write (and one read of the source's dedup memory when it had a profile), and one
        write of all the completed tombstones (a burst of signups made 5-7 per link before)."""
        unique = list(link_at)
        if not unique:
            return []
        for source, target in unique:
            self.forget(source)
            self.forget(target)
        ids: dict[str, list[str]] = {i: [] for pair in unique for i in pair}
        loaded = self.outbox.learn(await self.store.load(ids))
        todo = [
            (s, t)
            for s, t in unique
            if loaded[t].doc is None or s not in loaded[t].doc.get("merged_from", ())  # type: ignore[union-attr]
        ]
        if not todo:
            return []
        limit = asyncio.Semaphore(LINK_CONCURRENCY)
        completed: list[Write] = []
        # a document read here is changed in place by its link: one that two links of the batch
        # share (two anonymous ids of one user) is read again by each of them
        uses = Counter(i for pair in todo for i in pair)

        async def run(source: str, target: str) -> list[OutboxMessage]:
            async with limit:
                first = (loaded[source], loaded[target]) if uses[source] == uses[target] == 1 else None
                return await self._link(source, target, link_at[(source, target)], first, completed.append)

        # Links of different users are independent; CAS makes overlapping ones safe to race.
        done = await asyncio.gather(*(run(s, t) for s, t in todo))
        if completed:
            await self.store.save(completed)  # a write that conflicts was superseded: nothing to do
        return [m for exits in done for m in exits]

    async def link(self, source: str, target: str, at_ms: int | None = None) -> list[OutboxMessage]:
        """Link ``source`` (anonymous or previous id) to ``target``, idempotently, in three CAS steps.

        1. tombstone the source (``merged_into``), keeping a snapshot of its document and
           seen ids if it had a profile; later events of the source are redirected;
        2. fold the snapshot into the target and record the source in ``merged_from``
           (skipped if already recorded), so erasure of the target finds the source;
        3. drop the snapshot from the tombstone.
        A crash between steps is repaired by the redelivered identify/alias. The link may
        arrive before the source's own events (they are keyed to another partition): the
        tombstone then redirects them when they come.
        """
        completed: list[Write] = []
        exits = await self._link(source, target, at_ms, None, completed.append)
        if completed:
            await self.store.save(completed)
        return exits

    async def _link(
        self,
        source: str,
        target: str,
        at_ms: int | None,
        first: tuple[Loaded, Loaded] | None,
        complete: Callable[[Write], None],
    ) -> list[OutboxMessage]:
        """:meth:`link`, its first attempt on ``first`` (source and target as read, if they
        were), its last step (the tombstone without the snapshot) handed to ``complete``."""
        for _attempt in range(MAX_CAS_ATTEMPTS):
            if first is not None:
                (src, tgt), first = first, None
            else:
                loaded = self.outbox.learn(await self.store.load({source: [], target: []}))
                src, tgt = loaded[source], loaded[target]
            if is_tombstone(tgt.doc):
                target = tgt.doc["merged_into"]
                continue
            snapshot: Profile | None = None
            seen: list[str] = []
            if is_tombstone(src.doc):
                if src.doc["merged_into"] != target:
                    # first link wins: a second user cannot absorb the same anonymous history
                    self.metrics.identity_merges.labels("conflict").inc()
                    log.warning("identity link refused: the source id is already linked to another user")
                    return []
                snapshot, seen = src.doc.get("snapshot"), src.doc.get("snapshot_seen", [])
                tomb_version = src.version
            else:
                if source not in (tgt.doc or {}).get("merged_from", ()) and (
                    refused := refuse_link(src.doc, tgt.doc, self.rules)
                ):
                    self.metrics.identity_merges.labels(refused).inc()
                    log.warning(
                        "identity link refused",
                        extra={"reason": refused, "merged_ids": len((tgt.doc or {}).get("merged_from", ()))},
                    )
                    return []
                if src.doc is not None:
                    snapshot, seen = src.doc, await self.store.seen_ids(source)
                tomb: Profile = {"merged_into": target}
                if snapshot is not None:
                    tomb.update(snapshot=snapshot, snapshot_seen=seen)
                if await self.store.save([Write(source, src.version, tomb)]):
                    continue
                tomb_version = src.version + 1
            doc = tgt.doc if tgt.doc is not None else new_profile(target)
            outcome = "already_merged"
            exits: list[OutboxMessage] = []
            if source not in doc["merged_from"]:
                if snapshot is not None:
                    merge_profiles(doc, snapshot, source)
                    outcome = "merged"
                    exits = self._end_memberships(doc, source, snapshot, at_ms)
                else:
                    doc["merged_from"] = [*doc["merged_from"], source]
                    outcome = "linked"
                if await self.store.save([Write(target, tgt.version, doc, seen, require_unseen=False)]):
                    continue
            if snapshot is not None:  # the link is complete: the tombstone keeps only the redirect
                complete(Write(source, tomb_version, {"merged_into": target}, forget_seen=True))
            self.metrics.identity_merges.labels(outcome).inc()
            return exits
        raise ContentionError("identity link kept conflicting; the batch is retried")

    def _end_memberships(
        self, doc: Profile, source: str, snapshot: Profile, at_ms: int | None
    ) -> list[OutboxMessage]:
        """The source's memberships end with the link; the target's outbox carries the exits,
        so they are published (and re-published after a crash) like its own changes.

        The source's own outbox may not be known as published (its worker died between the
        write and the publish, or is publishing right now): a tombstone publishes nothing, so
        those messages travel ahead of the exits (same ids; a copy is deduplicated), or an
        "entered" could be lost while its "exited" goes out."""
        when = at_ms if at_ms is not None else (snapshot.get("last_seen_ms") or 0)
        exits = [segment_change(m) for m in linked_exits(source, snapshot.get("engine"), when)]
        pending, _key = self.outbox.unpublished(snapshot)
        if exits or pending:
            engine_state(doc)
            # an outbox already published here is replaced, not re-sent
            kept = [] if self.outbox.published(outbox_key(doc)) else stored_outbox(doc)
            ids = {m.id for m in kept}
            store_outbox(doc, [*kept, *(m for m in pending if m.id not in ids), *exits])
        return exits  # the memberships ended now (the carried messages were counted when decided)
