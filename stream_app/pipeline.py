"""One batch of `onboarding.events` records in, profile writes and dead letters out.

The order per batch is fixed and every step is idempotent, so the agent may run the
whole batch again after any failure (Redis outage, crash, rebalance) and the result
is as if it had run once:

1. validate + normalize every record (pure); invalid ones become dead letters;
2. link identities (identify with an anonymousId, alias) by merging profiles;
3. read the touched profiles and which of the batch's messageIds each has applied;
4. fold the new events in (pure :func:`stream_app.profile.apply_event`), write each
   profile with compare-and-set, re-reading those whose version moved;
   and, in the same write, what the change causes (:func:`stream_app.reactions.react`:
   segment changes and triggers in the profile's outbox, the next deadline);
5. fold step durations into the per-step statistics (deduplicated by messageId);
6. erase users who asked for it.

:meth:`EventProcessor.fire` is the timer's counterpart of step 4 for users whose
deadline came due. The caller publishes ``outcome.outbox`` and schedules
``outcome.deadlines`` before it acks.

The agent acks the batch only after this returns and the dead letters are published.
This module never talks to Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from stream_app.clock import note_offset, to_trusted, to_user
from stream_app.contract import ContractRules, Event, Invalid, parse_event
from stream_app.identity import IdentityRules, refuse_link
from stream_app.metrics import Metrics
from stream_app.profile import (
    Effect,
    EraseRequested,
    Profile,
    ProfileRules,
    StepDuration,
    apply_event,
    is_tombstone,
    merge_profiles,
    new_profile,
    replayed_effects,
)
from stream_app.reactions import SEGMENTS, Reaction, ReactionContext, message_id, outbox_key, react
from stream_app.segments.changes import linked_exits
from stream_app.store.profiles import Loaded, ProfileStore, Write
from stream_app.triggers.decide import engine_state

log = logging.getLogger(__name__)

MAX_CAS_ATTEMPTS = 8
MAX_REDIRECTS = 4
LINK_CONCURRENCY = 32
PUBLISHED_MEMORY = 50_000

StepStatsSink = Callable[[list[StepDuration]], Awaitable[None]]
EraseHook = Callable[[list[str]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record as the pipeline sees it."""

    value: bytes
    key: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None


@dataclass(slots=True)
class BatchOutcome:
    dead_letters: list[tuple[Record, Invalid]] = field(default_factory=list)
    events: list[tuple[Record, Event]] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    #: final documents written (a batch), or looked at (timer, sweep)
    profiles: dict[str, Profile] = field(default_factory=dict)
    effects: list[Effect] = field(default_factory=list)
    erased: list[str] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)  # ids linked into another profile by this batch
    outbox: list[dict[str, Any]] = field(default_factory=list)  # to publish before acking
    outbox_keys: list[str] = field(default_factory=list)  # mark published once published
    deadlines: dict[int, dict[str, int | None]] = field(default_factory=dict)  # partition -> user -> ms
    earlier: dict[int, dict[str, int]] = field(default_factory=dict)  # sweep: deadlines only moved earlier
    members: dict[int, set[str]] = field(default_factory=dict)  # partition -> profiles written for it
    departed: list[str] = field(default_factory=list)  # timer/sweep: users no longer in the partition
    settled: list[tuple[str, int, int | None]] = field(default_factory=list)  # timer: (user, read, next)
    suppressed: list[tuple[str, str]] = field(default_factory=list)
    cluster_moves: int = 0
    size_deltas: dict[str, int] = field(default_factory=dict)  # "rule:<segment>" / "cluster:<name>" -> +-n


class EventProcessor:
    """Turns record batches into profile state. Holds no state between batches."""

    def __init__(
        self,
        store: ProfileStore,
        contract: ContractRules,
        rules: ProfileRules,
        metrics: Metrics,
        step_stats: StepStatsSink | None = None,
        on_erase: EraseHook | None = None,
        clock: Callable[[], float] = time.time,
        cache_size: int = 0,
        reactions: Callable[[], ReactionContext] | None = None,
        identity: IdentityRules | None = None,
    ) -> None:
        self.store = store
        self.identity = identity or IdentityRules()
        self.contract = contract
        self.rules = rules
        self.metrics = metrics
        self.step_stats = step_stats
        self.on_erase = on_erase
        self.clock = clock
        # Documents this worker wrote last, by id: a batch skips reading them. Never trusted
        # blindly: the write is a CAS on the version that also refuses already-applied ids.
        self.cache: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self.cache_size = cache_size
        self.reactions = reactions
        # Outboxes this process has published (by outbox_key): a loaded document whose outbox
        # is not known here (a restart, another worker) is re-published before it is replaced.
        self.published: OrderedDict[str, None] = OrderedDict()

    async def process(self, records: Sequence[Record]) -> BatchOutcome:
        outcome = BatchOutcome()
        now_ms = int(self.clock() * 1000)
        for rec in records:
            parsed = parse_event(rec.value, self.contract, rec.timestamp_ms, now_ms)
            if isinstance(parsed, Invalid):
                outcome.dead_letters.append((rec, parsed))
            else:
                outcome.events.append((rec, parsed))

        link_at: dict[tuple[str, str], int] = {}
        for _rec, ev in outcome.events:
            if (src := _merge_source(ev)) is not None:
                link_at.setdefault((src, ev.profile_id), ev.ts_ms)
        _count_exits(await self._link_all(link_at), outcome)
        outcome.linked = list(dict.fromkeys(src for src, _target in link_at))

        by_target: dict[str, list[Event]] = {}
        partitions: dict[str, int] = {}
        for rec, ev in outcome.events:
            by_target.setdefault(ev.profile_id, []).append(ev)
            partitions[ev.profile_id] = rec.partition
        await self._apply(by_target, outcome, partitions)

        durations = [e for e in outcome.effects if isinstance(e, StepDuration)]
        if durations and self.step_stats is not None:
            await self.step_stats(durations)
            self.metrics.step_stats_updates.inc(len(durations))
        to_erase = list(dict.fromkeys(e.profile_id for e in outcome.effects if isinstance(e, EraseRequested)))
        if to_erase:
            await self._erase(to_erase, outcome)
        return outcome

    def mark_published(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.published[key] = None
            self.published.move_to_end(key)
        while len(self.published) > PUBLISHED_MEMORY:
            self.published.popitem(last=False)

    def _prior_outbox(self, doc: Profile, outcome: BatchOutcome) -> list[dict[str, Any]]:
        """Queue a stored outbox this process has not published (a crash may have cut it off);
        return its messages, which the next outbox written must carry (:func:`_carry`)."""
        key = outbox_key(doc)
        if key is None or key in self.published:
            return []
        prior = list(doc["engine"]["outbox"])
        outcome.outbox.extend(prior)
        outcome.outbox_keys.append(key)
        return prior

    def _react(self, doc: Profile, pid: str, now_ms: int) -> Reaction | None:
        if self.reactions is None:
            return None
        return react(doc, pid, now_ms, self.reactions())

    def _settle_reaction(
        self, pid: str, doc: Profile, reaction: Reaction | None, outcome: BatchOutcome
    ) -> None:
        if reaction is None:
            return
        outcome.outbox.extend(reaction.outbox)
        key = outbox_key(doc)
        if key is not None and reaction.outbox:
            outcome.outbox_keys.append(key)
        outcome.suppressed.extend(reaction.suppressed)
        for m in reaction.outbox:
            value = m["value"]
            if "change" not in value:
                continue
            if value["source"] == "cluster" and value["change"] == "exited":
                outcome.cluster_moves += 1
            _count_change(value, outcome)

    async def fire(self, partition: int, due: Sequence[tuple[str, int]], now_ms: int) -> BatchOutcome:
        """The timer: react to the passage of time for users whose deadline (score) is due.

        Users without a profile (erased), linked into another id, or now indexed under
        another partition are dropped from this partition's index. A write conflict leaves
        the deadline in place, so the next tick looks again.
        """
        outcome = BatchOutcome()
        scores = dict(due)
        for user, nxt in (await self._react_stored(partition, list(scores), now_ms, outcome)).items():
            outcome.settled.append((user, scores[user], nxt))
        return outcome

    async def recheck(self, partition: int, users: Sequence[str], now_ms: int) -> BatchOutcome:
        """The cluster sweep: react at ``now_ms`` (trusted) for users who may send nothing more,
        so a new model's cluster reaches them. Their next deadlines go to ``outcome.earlier``
        (they may only move a deadline earlier: a sweep never delays or drops one that a
        batch just scheduled); users who no longer belong here go to ``outcome.departed``."""
        outcome = BatchOutcome()
        for user, nxt in (await self._react_stored(partition, users, now_ms, outcome)).items():
            if nxt is not None:
                outcome.earlier.setdefault(partition, {})[user] = nxt
        return outcome

    async def _react_stored(
        self, partition: int, users: Sequence[str], now_ms: int, outcome: BatchOutcome
    ) -> dict[str, int | None]:
        """React at ``now_ms`` for stored profiles of ``partition``; write what changed (CAS).

        Returns each settled user's next deadline (trusted time; None: none, or the user is
        gone from this partition and listed in ``outcome.departed``). Users whose write
        conflicted are left out: the next pass looks again.
        """
        loaded = await self.store.load({user: [] for user in users})
        writes: list[Write] = []
        reactions: dict[str, Reaction | None] = {}
        settled: dict[str, int | None] = {}
        for user in users:
            entry = loaded[user]
            doc = entry.doc
            if (
                doc is None
                or is_tombstone(doc)
                or (doc.get("engine") or {}).get("partition", partition) != partition
            ):
                outcome.departed.append(user)
                settled[user] = None
                continue
            unpublished = self._prior_outbox(doc, outcome)
            reaction = self._react(doc, user, to_user(doc, now_ms))
            _carry(doc, unpublished)
            reactions[user] = reaction
            outcome.profiles[user] = doc
            if reaction is not None and reaction.changed:
                writes.append(Write(user, entry.version, doc, (), require_unseen=False))
        conflicts = await self.store.save(writes) if writes else set()
        written = {w.profile_id: w for w in writes}
        for user, reaction in reactions.items():
            if user in conflicts:
                self.cache.pop(user, None)
                continue
            doc = loaded[user].doc
            assert doc is not None
            if user in written:
                self._remember(user, written[user].expected_version + 1, doc)
                self._settle_reaction(user, doc, reaction, outcome)
            settled[user] = to_trusted(doc, reaction.deadline_ms) if reaction else None
        return settled

    async def _apply(
        self, by_target: dict[str, list[Event]], outcome: BatchOutcome, partitions: dict[str, int]
    ) -> None:
        pending = dict(by_target)
        for _attempt in range(MAX_CAS_ATTEMPTS + MAX_REDIRECTS):
            if not pending:
                return
            t0 = time.perf_counter()
            loaded = {
                pid: Loaded(orjson.loads(self.cache[pid][1]), self.cache[pid][0])
                for pid in pending
                if pid in self.cache
            }
            to_read = {pid: [e.message_id for e in evs] for pid, evs in pending.items() if pid not in loaded}
            if to_read:
                loaded.update(await self.store.load(to_read))
            self.metrics.redis_seconds.labels("load").observe(time.perf_counter() - t0)
            writes: list[Write] = []
            results: dict[str, tuple[Profile, list[int], int, list[Effect], Reaction | None, int | None]] = {}
            priors: dict[str, BatchOutcome] = {}
            redirects: dict[str, str] = {}
            for pid, events in pending.items():
                entry = loaded[pid]
                if is_tombstone(entry.doc):  # linked to a user: its events go there
                    target = entry.doc["merged_into"]  # type: ignore[index]
                    if entry.doc.get("snapshot") is not None:  # type: ignore[union-attr]
                        # A link interrupted by a crash (tombstoned, not yet merged): finish it
                        # first, or these events would be applied to the user and merged again.
                        _count_exits(await self._link(pid, target), outcome)
                        self.cache.pop(target, None)
                    redirects[pid] = target
                    if pid in partitions:
                        partitions.setdefault(target, partitions[pid])
                    continue
                doc = entry.doc if entry.doc is not None else new_profile(pid)
                applied_ids: list[str] = []
                applied_ts: list[int] = []
                applied: list[Event] = []
                effects: list[Effect] = []
                duplicates = 0
                seen_in_batch: set[str] = set()
                for ev in events:
                    if ev.message_id in entry.seen or ev.message_id in seen_in_batch:
                        duplicates += 1
                        if ev.message_id in entry.seen:
                            effects.extend(replayed_effects(doc, ev))
                        continue
                    seen_in_batch.add(ev.message_id)
                    applied_ids.append(ev.message_id)
                    applied_ts.append(ev.ts_ms)
                    applied.append(ev)
                    effects.extend(apply_event(doc, ev, self.rules))
                note_offset(doc, applied)
                prior = priors[pid] = BatchOutcome()
                unpublished = self._prior_outbox(doc, prior)
                old_partition = (doc.get("engine") or {}).get("partition")
                now_ms = (
                    max(applied_ts) if applied_ts else (doc.get("last_seen_ms") or int(self.clock() * 1000))
                )
                reaction = self._react(doc, pid, now_ms) if entry.doc is not None or applied_ids else None
                if reaction is not None:
                    _carry(doc, unpublished)
                if reaction is not None and pid in partitions:
                    doc["engine"]["partition"] = partitions[pid]
                if applied_ids or (reaction is not None and reaction.changed):
                    writes.append(Write(pid, entry.version, doc, applied_ids))
                results[pid] = (doc, applied_ts, duplicates, effects, reaction, old_partition)
            t0 = time.perf_counter()
            conflicts = await self.store.save(writes)
            self.metrics.redis_seconds.labels("save").observe(time.perf_counter() - t0)
            if conflicts:
                self.metrics.write_conflicts.inc(len(conflicts))
                for pid in conflicts:
                    self.cache.pop(pid, None)
            for w in writes:
                if w.profile_id not in conflicts:
                    self._remember(w.profile_id, w.expected_version + 1, w.doc)
            now = self.clock()
            written_ids = {w.profile_id for w in writes}
            retry: dict[str, list[Event]] = {}
            for pid, events in pending.items():
                if pid in conflicts or pid not in results:
                    retry.setdefault(redirects.get(pid, pid), []).extend(events)
                    continue
                doc, applied_ts, duplicates, effects, reaction, old_partition = results[pid]
                outcome.applied += len(applied_ts)
                outcome.duplicates += duplicates
                outcome.effects.extend(_with_groups(effects, doc))
                outcome.outbox.extend(priors[pid].outbox)
                outcome.outbox_keys.extend(priors[pid].outbox_keys)
                if pid in written_ids:
                    self._settle_reaction(pid, doc, reaction, outcome)
                if pid in partitions:
                    outcome.members.setdefault(partitions[pid], set()).add(pid)
                if reaction is not None and pid in partitions:
                    part = partitions[pid]
                    outcome.deadlines.setdefault(part, {})[pid] = to_trusted(doc, reaction.deadline_ms)
                    if old_partition is not None and old_partition != part:
                        outcome.deadlines.setdefault(old_partition, {})[pid] = None
                if applied_ts:
                    outcome.profiles[pid] = doc
                    self.metrics.profiles_written.inc()
                    for ts_ms in applied_ts:
                        self.metrics.event_latency.observe(max(0.0, now - ts_ms / 1000))
            pending = retry
        if pending:
            raise RuntimeError(f"{len(pending)} profiles kept changing under us; will retry the batch")

    def _remember(self, pid: str, version: int, doc: Profile) -> None:
        if self.cache_size <= 0:
            return
        self.cache[pid] = (version, orjson.dumps(doc))
        self.cache.move_to_end(pid)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    async def _link_all(self, link_at: Mapping[tuple[str, str], int]) -> list[dict[str, Any]]:
        """Run the batch's identity links (pair -> event time); repeated identifies of linked
        ids cost one read. Returns the membership exits of the ids linked now."""
        unique = list(link_at)
        if not unique:
            return []
        for source, target in unique:
            self.cache.pop(source, None)
            self.cache.pop(target, None)
        targets = await self.store.load({t: [] for _s, t in unique})
        todo = [
            (s, t)
            for s, t in unique
            if targets[t].doc is None or s not in targets[t].doc.get("merged_from", ())  # type: ignore[union-attr]
        ]
        if not todo:
            return []
        limit = asyncio.Semaphore(LINK_CONCURRENCY)

        async def run(source: str, target: str) -> list[dict[str, Any]]:
            async with limit:
                return await self._link(source, target, link_at[(source, target)])

        # Links of different users are independent; CAS makes overlapping ones safe to race.
        done = await asyncio.gather(*(run(s, t) for s, t in todo))
        return [m for exits in done for m in exits]

    async def _link(self, source: str, target: str, at_ms: int | None = None) -> list[dict[str, Any]]:
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
        for _attempt in range(MAX_CAS_ATTEMPTS):
            loaded = await self.store.load({source: [], target: []})
            src, tgt = loaded[source], loaded[target]
            if is_tombstone(tgt.doc):
                target = tgt.doc["merged_into"]  # type: ignore[index]
                continue
            snapshot: Profile | None = None
            seen: list[str] = []
            if is_tombstone(src.doc):
                if src.doc["merged_into"] != target:  # type: ignore[index]
                    # first link wins: a second user cannot absorb the same anonymous history
                    self.metrics.identity_merges.labels("conflict").inc()
                    log.warning("identity link refused: the source id is already linked to another user")
                    return []
                snapshot, seen = src.doc.get("snapshot"), src.doc.get("snapshot_seen", [])  # type: ignore[union-attr]
                tomb_version = src.version
            else:
                if source not in (tgt.doc or {}).get("merged_from", ()) and (
                    refused := refuse_link(src.doc, tgt.doc, self.identity)
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
            exits: list[dict[str, Any]] = []
            if source not in doc["merged_from"]:
                if snapshot is not None:
                    merge_profiles(doc, snapshot, source)
                    outcome = "merged"
                    # the source's memberships end; the target's outbox carries the exits, so
                    # they are published (and re-published after a crash) like its own changes
                    when = at_ms if at_ms is not None else (snapshot.get("last_seen_ms") or 0)
                    exits = linked_exits(source, snapshot.get("engine"), when)
                    if exits:
                        state = engine_state(doc)  # an outbox published here is replaced, not re-sent
                        kept = [] if outbox_key(doc) in self.published else state.get("outbox", [])
                        state["outbox"] = [*kept, *(_segment_msg(m) for m in exits)]
                else:
                    doc["merged_from"] = [*doc["merged_from"], source]
                    outcome = "linked"
                if await self.store.save([Write(target, tgt.version, doc, seen, require_unseen=False)]):
                    continue
            if snapshot is not None:
                await self.store.save([Write(source, tomb_version, {"merged_into": target})])
            self.metrics.identity_merges.labels(outcome).inc()
            return exits
        raise RuntimeError("identity link kept conflicting; will retry the batch")

    async def _erase(self, profile_ids: list[str], outcome: BatchOutcome) -> None:
        all_ids: list[str] = []
        for pid in profile_ids:
            doc = outcome.profiles.pop(pid, None) or await self.store.get(pid)
            all_ids.append(pid)
            if doc is not None and not is_tombstone(doc):
                all_ids.extend(doc.get("merged_from", []))
                engine = doc.get("engine") or {}
                left = [f"rule:{s}" for s in engine.get("segments", [])]
                if engine.get("cluster"):
                    left.append(f"cluster:{engine['cluster']['name']}")
                for key in left:  # memberships end with the user
                    outcome.size_deltas[key] = outcome.size_deltas.get(key, 0) - 1
        for pid in all_ids:
            self.cache.pop(pid, None)
        gone = set(all_ids)
        outcome.outbox = [m for m in outcome.outbox if m["value"].get("user_id") not in gone]
        for entries in outcome.deadlines.values():
            for pid in gone & set(entries):
                del entries[pid]
        if self.on_erase is not None:
            await self.on_erase(all_ids)
        await self.store.erase(all_ids)
        outcome.erased.extend(profile_ids)
        self.metrics.profiles_erased.inc(len(profile_ids))


def _carry(doc: Profile, unpublished: list[dict[str, Any]]) -> None:
    """Keep messages not yet known to be published in the outbox a reaction just replaced,
    so a crash before this batch publishes cannot lose them (they go out again, same ids)."""
    state = doc.get("engine")
    if not unpublished or state is None:
        return
    fresh = state.get("outbox") or []
    ids = {message_id(m) for m in fresh}
    state["outbox"] = [*(m for m in unpublished if message_id(m) not in ids), *fresh]


def _segment_msg(value: dict[str, Any]) -> dict[str, Any]:
    return {"to": SEGMENTS, "value": value}


def _count_change(value: dict[str, Any], outcome: BatchOutcome) -> None:
    """A segment change moves the segment's size (``source:segment``) by one."""
    key = f"{value['source']}:{value['segment']}"
    outcome.size_deltas[key] = outcome.size_deltas.get(key, 0) + (1 if value["change"] == "entered" else -1)


def _count_exits(exits: list[dict[str, Any]], outcome: BatchOutcome) -> None:
    """Segment sizes lose the memberships that ended with a link (counted once, when linked)."""
    for value in exits:
        _count_change(value, outcome)


def _merge_source(ev: Event) -> str | None:
    """The id whose history an identify/alias folds into ``ev.profile_id``, if any."""
    if ev.type == "alias" and ev.previous_id and ev.previous_id != ev.profile_id:
        return ev.previous_id
    if ev.type == "identify" and ev.user_id and ev.anonymous_id and ev.anonymous_id != ev.user_id:
        return ev.anonymous_id
    return None


def _with_groups(effects: list[Effect], doc: Profile) -> list[Effect]:
    """Step durations also count for the user's cluster, so stalls can use its own baseline."""
    cluster = (doc.get("engine") or {}).get("cluster")
    if not cluster:
        return effects
    extra = [
        StepDuration(e.flow, e.step, e.duration_s, e.message_id, f"cluster:{cluster['id']}")
        for e in effects
        if isinstance(e, StepDuration) and not e.group
    ]
    return [*effects, *extra]
