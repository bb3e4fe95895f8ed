"""One batch of `onboarding.events` records in, profile writes and dead letters out.

The order per batch is fixed and every step is idempotent, so the agent may run the
whole batch again after any failure (Redis outage, crash, rebalance) and the result
is as if it had run once:

1. validate + normalize every record (pure); invalid ones become dead letters;
2. link identities (identify with an anonymousId, alias) by merging profiles
   (:mod:`stream_app.linking`);
3. read the touched profiles and which of the batch's messageIds each has applied;
4. fold the new events in (pure :func:`stream_app.profile.apply_event`), fold the steps
   they complete into the per-step statistics (once per record position), then write each
   profile with compare-and-set, re-reading those whose version moved;
   and, in the same write, what the change causes (:func:`stream_app.reactions.react`:
   segment changes and triggers in the profile's outbox, the next deadline);
5. erase users who asked for it.

:meth:`EventProcessor.fire` (the timer) and :meth:`EventProcessor.recheck` (the cluster
sweep) are the counterparts of step 4 for users who send nothing. The caller publishes
the outcome's outbox and schedules its deadlines before it acks.

This module never talks to Kafka.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from stream_app.cache import DocumentCache
from stream_app.clock import note_offset, to_trusted, to_user
from stream_app.contract import ContractRules, Event, Invalid, parse_event
from stream_app.errors import ContentionError
from stream_app.identity import IdentityRules
from stream_app.linking import MAX_CAS_ATTEMPTS, IdentityLinker
from stream_app.metrics import Metrics
from stream_app.outbox import Outbox, OutboxMessage, outbox_key
from stream_app.profile import (
    Bounded,
    Effect,
    EraseRequested,
    OutcomeNoted,
    Profile,
    ProfileRules,
    StepDuration,
    StepProgress,
    apply_event,
    is_tombstone,
    new_profile,
    replayed_effects,
)
from stream_app.reactions import Reaction, ReactionContext, funnel_groups, react
from stream_app.store.profiles import Loaded, ProfileStore, Write
from stream_app.triggers.bandit import ArmEvent, rewards_of

log = logging.getLogger(__name__)

MAX_REDIRECTS = 4
PUBLISHED_MEMORY = 50_000

StepStatsSink = Callable[[list[StepDuration]], Awaitable[object]]
FunnelCount = tuple[str, str, str, tuple[str, ...], float | None]
ArmSink = Callable[[list[ArmEvent]], Awaitable[object]]  # the bandit's rewards (once per trigger id)
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
class Reactions:
    """What writes caused: messages to publish before acking, and what to count about them."""

    outbox: list[OutboxMessage] = field(default_factory=list)
    #: (profile id, outbox key) of the stored outboxes sent here: marked published once sent
    outbox_keys: list[tuple[str, str]] = field(default_factory=list)
    suppressed: list[tuple[str, str]] = field(default_factory=list)  # (trigger type, reason)
    cluster_moves: int = 0
    size_deltas: dict[str, int] = field(default_factory=dict)  # "rule:<segment>" / "cluster:<name>" -> +-n
    #: the live funnel: (flow, step, stage, the user's groups, seconds for a timed completion)
    funnel: list[FunnelCount] = field(default_factory=list)

    def queue(self, pid: str, unpublished: list[OutboxMessage], key: str | None) -> None:
        """A stored outbox not known to be published: send it again (same ids)."""
        if key is not None:
            self.outbox.extend(unpublished)
            self.outbox_keys.append((pid, key))

    def settle(self, doc: Profile, reaction: Reaction | None) -> None:
        """A written reaction: its messages go out, its changes move the counts."""
        if reaction is None:
            return
        self.outbox.extend(reaction.outbox)
        key = outbox_key(doc)
        if key is not None and reaction.outbox:
            self.outbox_keys.append((str(doc["user_id"]), key))
        self.suppressed.extend(reaction.suppressed)
        if reaction.dropped:
            groups = funnel_groups(doc)
            self.funnel.extend((flow, step, "dropped", groups, None) for flow, step in reaction.dropped)
        for message in reaction.outbox:
            if "change" in message.value:
                self.count_change(message.value)
                if message.value["source"] == "cluster" and message.value["change"] == "exited":
                    self.cluster_moves += 1

    def count_change(self, value: Mapping[str, Any]) -> None:
        """A segment change moves the segment's size (``source:segment``) by one."""
        key = f"{value['source']}:{value['segment']}"
        self.size_deltas[key] = self.size_deltas.get(key, 0) + (1 if value["change"] == "entered" else -1)


@dataclass(slots=True)
class BatchOutcome(Reactions):
    dead_letters: list[tuple[Record, Invalid]] = field(default_factory=list)
    events: list[tuple[Record, Event]] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    profiles: dict[str, Profile] = field(default_factory=dict)  # final documents written
    effects: list[Effect] = field(default_factory=list)
    rewards: list[ArmEvent] = field(default_factory=list)  # the bandit's, from outcomes first noted
    erased: list[str] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)  # ids linked into another profile by this batch
    deadlines: dict[int, dict[str, int | None]] = field(default_factory=dict)  # partition -> user -> ms
    members: dict[int, set[str]] = field(default_factory=dict)  # partition -> profiles written for it


@dataclass(slots=True)
class TimerOutcome(Reactions):
    """A timer pass or a sweep over users of one partition."""

    profiles: dict[str, Profile] = field(default_factory=dict)  # documents looked at
    settled: list[tuple[str, int, int | None]] = field(default_factory=list)  # (user, score read, next)
    earlier: dict[int, dict[str, int]] = field(default_factory=dict)  # sweep: deadlines only moved earlier
    departed: list[str] = field(default_factory=list)  # users no longer in the partition


@dataclass(slots=True)
class ProfileResult:
    """What folding one profile's events produced, before its write is known to have landed."""

    doc: Profile
    applied_ts: list[int]
    duplicates: int
    effects: list[Effect]
    reaction: Reaction | None
    old_partition: int | None
    prior: Reactions  # a stored outbox this process must (re)send


class EventProcessor:
    """Turns record batches into profile state. Holds no state between batches but caches."""

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
        cache_bytes: int = 32 * 1024 * 1024,
        reactions: Callable[[], ReactionContext] | None = None,
        identity: IdentityRules | None = None,
        rewards: ArmSink | None = None,
    ) -> None:
        self.store = store
        self.rewards = rewards
        self.contract = contract
        self.rules = rules
        self.metrics = metrics
        self.step_stats = step_stats
        self.on_erase = on_erase
        self.clock = clock
        # Documents this worker wrote last, by id: a batch skips reading them. Never trusted
        # blindly: the write is a CAS on the version that also refuses already-applied ids.
        self.cache = DocumentCache(cache_size, cache_bytes)
        self.reactions = reactions
        self.outbox = Outbox(PUBLISHED_MEMORY)
        self.linker = IdentityLinker(store, metrics, identity or IdentityRules(), self.outbox, self._forget)

    @property
    def identity(self) -> IdentityRules:
        return self.linker.rules

    @identity.setter
    def identity(self, rules: IdentityRules) -> None:
        self.linker.rules = rules

    def _forget(self, pid: str) -> None:
        self.cache.pop(pid)

    def mark_published(self, keys: Sequence[tuple[str, str]]) -> None:
        """Note (profile id, outbox key) pairs as published in this process (the Publisher
        also records them in the store)."""
        self.outbox.mark_published([key for _pid, key in keys])

    async def process(self, records: Sequence[Record]) -> BatchOutcome:
        outcome = BatchOutcome()
        now_ms = int(self.clock() * 1000)
        for rec in records:
            parsed = parse_event(
                rec.value, self.contract, rec.timestamp_ms, now_ms, (rec.partition, rec.offset)
            )
            if isinstance(parsed, Invalid):
                outcome.dead_letters.append((rec, parsed))
            else:
                outcome.events.append((rec, parsed))

        link_at: dict[tuple[str, str], int] = {}
        for _rec, ev in outcome.events:
            if (src := _merge_source(ev)) is not None:
                link_at.setdefault((src, ev.profile_id), ev.ts_ms)
        for message in await self.linker.link_all(link_at):
            outcome.count_change(message.value)  # sizes lose the memberships linking ended
        outcome.linked = list(dict.fromkeys(src for src, _target in link_at))

        by_target: dict[str, list[Event]] = {}
        partitions: dict[str, int] = {}
        for rec, ev in outcome.events:
            by_target.setdefault(ev.profile_id, []).append(ev)
            partitions[ev.profile_id] = rec.partition
        await self._apply(by_target, outcome, partitions)

        for effect in outcome.effects:
            if isinstance(effect, Bounded):
                self.metrics.input_bounded.labels(effect.what).inc()
        if outcome.rewards and self.rewards is not None:
            await self.rewards(outcome.rewards)
        to_erase = list(dict.fromkeys(e.profile_id for e in outcome.effects if isinstance(e, EraseRequested)))
        if to_erase:
            await self._erase(to_erase, outcome)
        return outcome

    def _react(self, doc: Profile, pid: str, now_ms: int) -> Reaction | None:
        if self.reactions is None:
            return None
        return react(doc, pid, now_ms, self.reactions())

    async def fire(self, partition: int, due: Sequence[tuple[str, int]], now_ms: int) -> TimerOutcome:
        """The timer: react to the passage of time for users whose deadline (score) is due.

        Users without a profile (erased), linked into another id, or now indexed under
        another partition are dropped from this partition's index. A write conflict leaves
        the deadline in place, so the next tick looks again.
        """
        outcome = TimerOutcome()
        scores = dict(due)
        for user, nxt in (await self._react_stored(partition, list(scores), now_ms, outcome)).items():
            outcome.settled.append((user, scores[user], nxt))
        return outcome

    async def recheck(self, partition: int, users: Sequence[str], now_ms: int) -> TimerOutcome:
        """The cluster sweep: react at ``now_ms`` (trusted) for users who may send nothing more,
        so a new model's cluster reaches them. Their next deadlines go to ``outcome.earlier``
        (they may only move a deadline earlier: a sweep never delays or drops one that a
        batch just scheduled); users who no longer belong here go to ``outcome.departed``."""
        outcome = TimerOutcome()
        for user, nxt in (await self._react_stored(partition, users, now_ms, outcome)).items():
            if nxt is not None:
                outcome.earlier.setdefault(partition, {})[user] = nxt
        return outcome

    async def _react_stored(
        self, partition: int, users: Sequence[str], now_ms: int, outcome: TimerOutcome
    ) -> dict[str, int | None]:
        """React at ``now_ms`` for stored profiles of ``partition``; write what changed (CAS).

        Returns each settled user's next deadline (trusted time; None: none, or the user is
        gone from this partition and listed in ``outcome.departed``). Users whose write
        conflicted are left out: the next pass looks again.
        """
        loaded = self.outbox.learn(await self.store.load({user: [] for user in users}))
        writes: list[Write] = []
        reactions: dict[str, Reaction | None] = {}
        settled: dict[str, int | None] = {}
        for user in users:
            doc = loaded[user].doc
            if (
                doc is None
                or is_tombstone(doc)
                or (doc.get("engine") or {}).get("partition", partition) != partition
            ):
                outcome.departed.append(user)
                settled[user] = None
                continue
            unpublished, key = self.outbox.unpublished(doc)
            outcome.queue(user, unpublished, key)
            reaction = self._react(doc, user, to_user(doc, now_ms))
            Outbox.carry(doc, unpublished)
            reactions[user] = reaction
            outcome.profiles[user] = doc
            if reaction is not None and reaction.changed:
                writes.append(Write(user, loaded[user].version, doc, (), require_unseen=False))
        conflicts = await self.store.save(writes) if writes else set()
        written = {w.profile_id: w for w in writes}
        for user, reaction in reactions.items():
            if user in conflicts:
                self.cache.pop(user)
                continue
            doc = outcome.profiles[user]
            if user in written:
                self._remember(user, written[user].expected_version + 1, doc)
                outcome.settle(doc, reaction)
            settled[user] = to_trusted(doc, reaction.deadline_ms) if reaction else None
        return settled

    async def _apply(
        self, by_target: dict[str, list[Event]], outcome: BatchOutcome, partitions: dict[str, int]
    ) -> None:
        pending = dict(by_target)
        for _attempt in range(MAX_CAS_ATTEMPTS):
            if not pending:
                return
            loaded = await self._load_following_links(pending, outcome, partitions)
            writes: list[Write] = []
            results: dict[str, ProfileResult] = {}
            for pid, events in pending.items():
                entry = loaded[pid]
                result = self._fold(pid, entry, events, partitions.get(pid))
                if result.applied_ts or (result.reaction is not None and result.reaction.changed):
                    writes.append(Write(pid, entry.version, result.doc, _applied_ids(entry, events)))
                results[pid] = result
            await self._add_step_stats(results.values())
            t0 = time.perf_counter()
            conflicts = await self.store.save(writes)
            self.metrics.redis_seconds.labels("save").observe(time.perf_counter() - t0)
            if conflicts:
                self.metrics.write_conflicts.inc(len(conflicts))
                for pid in conflicts:
                    self.cache.pop(pid)
            for w in writes:
                if w.profile_id not in conflicts:
                    self._remember(w.profile_id, w.expected_version + 1, w.doc)
            written = {w.profile_id for w in writes}
            for pid in results:
                if pid not in conflicts:
                    self._record(pid, results[pid], outcome, partitions, written=pid in written)
            pending = {pid: events for pid, events in pending.items() if pid in conflicts}
        if pending:
            raise ContentionError(f"{len(pending)} profiles kept changing under the batch; it is retried")

    async def _load_following_links(
        self, pending: dict[str, list[Event]], outcome: BatchOutcome, partitions: dict[str, int]
    ) -> dict[str, Loaded]:
        """The profiles of ``pending``, links followed first: a linked id's events move to its
        user (in ``pending``) before anything is folded. So each round folds its step durations
        in one call, in record order per partition. (Redirected in a later round, a linked id's
        completion fell below its partition's mark when the first round had folded a later
        record of the same step, and was never counted: the rolling-restart e2e saw it.)"""
        loaded: dict[str, Loaded] = {}
        to_read = dict(pending)
        for _hop in range(MAX_REDIRECTS + 1):
            moved: dict[str, list[Event]] = {}
            for pid, entry in (await self._load(to_read)).items():
                if not is_tombstone(entry.doc):
                    loaded[pid] = entry
                    continue
                target = entry.doc["merged_into"]
                if entry.doc.get("snapshot") is not None:
                    # A link interrupted by a crash (tombstoned, not yet merged): finish it
                    # first, or these events would be applied to the user and merged again.
                    for message in await self.linker.link(pid, target):
                        outcome.count_change(message.value)
                    self.cache.pop(target)
                if pid in partitions:
                    partitions.setdefault(target, partitions[pid])
                moved.setdefault(target, []).extend(pending.pop(pid))
            if not moved:
                return loaded
            for target, events in moved.items():
                pending[target] = pending.get(target, []) + events
                loaded.pop(target, None)  # read again, asking about the redirected events' ids too
            to_read = {target: pending[target] for target in moved}
        raise ContentionError(f"links longer than {MAX_REDIRECTS} hops from {len(to_read)} ids; retried")

    async def _add_step_stats(self, results: Iterable[ProfileResult]) -> None:
        """Fold the durations of the steps these folds complete into the step statistics,
        before the profiles are written: a completion the stored profile holds is then always
        counted (a crash in between replays the record, which the store counts once by its
        position), and a duplicate resent by a client needs nothing from the statistics. A
        fold whose write conflicts is folded again; its durations carry the same positions."""
        if self.step_stats is None:
            return
        durations = [
            e for r in results for e in _with_groups(r.effects, r.doc) if isinstance(e, StepDuration)
        ]
        if durations:
            await self.step_stats(durations)
            self.metrics.step_stats_updates.inc(len(durations))

    async def _load(self, pending: dict[str, list[Event]]) -> dict[str, Loaded]:
        """The profiles of ``pending``. A cached document is used only once the store confirms
        its version (the reply then carries no document): a stale one, left by a write from
        another worker (a handover, a linked id's events), would make this round fold
        differently from the retry after its write conflicts, and a step duration first found
        in the retry would fall below its partition's mark in the statistics (the rolling-
        restart e2e saw this). The confirmation also tells which messageIds were applied."""
        t0 = time.perf_counter()
        held: dict[str, tuple[int, Profile]] = {}
        for pid in pending:
            hit = self.cache.get(pid)
            if hit is None:
                continue
            doc = orjson.loads(hit[1])
            key = outbox_key(doc)
            if key is not None and not self.outbox.published(key):
                # Not known here as published (never, or forgotten by the bounded memory while
                # the document stayed cached): only the store's mark can tell. Read it there.
                continue
            held[pid] = (hit[0], doc)
        requests = {pid: [e.message_id for e in evs] for pid, evs in pending.items()}
        known = {pid: version for pid, (version, _doc) in held.items()}
        loaded = dict(self.outbox.learn(await self.store.load(requests, known)))
        for pid, entry in loaded.items():
            if entry.current:
                entry.doc = held[pid][1]
            elif pid in held:
                self.cache.pop(pid)
        self.metrics.redis_seconds.labels("load").observe(time.perf_counter() - t0)
        return loaded

    def _fold(self, pid: str, entry: Loaded, events: list[Event], partition: int | None) -> ProfileResult:
        """Fold the events not yet applied into the profile and react (pure, in memory)."""
        doc = entry.doc if entry.doc is not None else new_profile(pid)
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
            applied.append(ev)
            effects.extend(apply_event(doc, ev, self.rules))
        note_offset(doc, applied)
        prior = Reactions()
        unpublished, key = self.outbox.unpublished(doc)
        prior.queue(pid, unpublished, key)
        old_partition = (doc.get("engine") or {}).get("partition")
        applied_ts = [ev.ts_ms for ev in applied]
        now_ms = max(applied_ts) if applied_ts else (doc.get("last_seen_ms") or int(self.clock() * 1000))
        reaction = self._react(doc, pid, now_ms) if entry.doc is not None or applied else None
        if reaction is not None:
            Outbox.carry(doc, unpublished)
            if partition is not None:
                doc["engine"]["partition"] = partition
        return ProfileResult(doc, applied_ts, duplicates, effects, reaction, old_partition, prior)

    def _record(
        self,
        pid: str,
        result: ProfileResult,
        outcome: BatchOutcome,
        partitions: dict[str, int],
        written: bool,
    ) -> None:
        """A profile whose write landed (or had nothing to write): into the batch's outcome."""
        doc = result.doc
        outcome.applied += len(result.applied_ts)
        outcome.duplicates += result.duplicates
        outcome.effects.extend(result.effects)  # durations went to the statistics before the write
        outcome.funnel.extend(_funnel(result.effects, doc))
        noted = [(e.trigger_id, e.outcome) for e in result.effects if isinstance(e, OutcomeNoted)]
        if noted and self.reactions is not None:
            fired = (doc.get("engine") or {}).get("fired", [])
            outcome.rewards.extend(rewards_of(fired, noted, self.reactions().triggers))
        outcome.outbox.extend(result.prior.outbox)
        outcome.outbox_keys.extend(result.prior.outbox_keys)
        if written:
            outcome.settle(doc, result.reaction)
        if pid in partitions:
            part = partitions[pid]
            outcome.members.setdefault(part, set()).add(pid)
            if result.reaction is not None:
                outcome.deadlines.setdefault(part, {})[pid] = to_trusted(doc, result.reaction.deadline_ms)
                if result.old_partition is not None and result.old_partition != part:
                    outcome.deadlines.setdefault(result.old_partition, {})[pid] = None
        if result.applied_ts:
            outcome.profiles[pid] = doc
            self.metrics.profiles_written.inc()
            now = self.clock()
            for ts_ms in result.applied_ts:
                self.metrics.event_latency.observe(max(0.0, now - ts_ms / 1000))

    def _remember(self, pid: str, version: int, doc: Profile) -> None:
        if self.cache.enabled:
            self.cache.put(pid, version, orjson.dumps(doc))

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
            self.cache.pop(pid)
        gone = set(all_ids)
        outcome.outbox = [m for m in outcome.outbox if m.key not in gone]
        for entries in outcome.deadlines.values():
            for pid in gone & set(entries):
                del entries[pid]
        if self.on_erase is not None:
            await self.on_erase(all_ids)
        await self.store.erase(all_ids)
        outcome.erased.extend(profile_ids)
        self.metrics.profiles_erased.inc(len(profile_ids))


def _applied_ids(entry: Loaded, events: list[Event]) -> list[str]:
    """The message ids a profile write records: the batch's events not applied before."""
    return list(dict.fromkeys(e.message_id for e in events if e.message_id not in entry.seen))


def _merge_source(ev: Event) -> str | None:
    """The id whose history an identify/alias folds into ``ev.profile_id``, if any."""
    if ev.type == "alias" and ev.previous_id and ev.previous_id != ev.profile_id:
        return ev.previous_id
    if ev.type == "identify" and ev.user_id and ev.anonymous_id and ev.anonymous_id != ev.user_id:
        return ev.anonymous_id
    return None


def _funnel(effects: list[Effect], doc: Profile) -> list[FunnelCount]:
    """Steps started and completed by this write, with their groups (and a timed completion's
    duration): the live funnel's counts."""
    progress = [e for e in effects if isinstance(e, StepProgress)]
    if not progress:
        return []
    groups = funnel_groups(doc)
    took = {(e.flow, e.step): e.duration_s for e in effects if isinstance(e, StepDuration) and not e.group}
    return [(e.flow, e.step, e.stage, groups, took.get((e.flow, e.step))) for e in progress]


def _with_groups(effects: list[Effect], doc: Profile) -> list[Effect]:
    """Step durations also count for the user's cluster, so stalls can use its own baseline."""
    cluster = (doc.get("engine") or {}).get("cluster")
    if not cluster:
        return effects
    extra = [
        StepDuration(e.flow, e.step, e.duration_s, e.message_id, f"cluster:{cluster['id']}", e.source)
        for e in effects
        if isinstance(e, StepDuration) and not e.group
    ]
    return [*effects, *extra]
