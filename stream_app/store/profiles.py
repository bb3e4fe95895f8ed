"""The profile store: one interface, a Redis implementation and an in-memory twin.

A profile is one Redis hash ``{prefix}:p:{user}`` with a version ``v``, the document ``d``
(JSON, deflated against a fixed dictionary when that is smaller: under a quarter of the
bytes of a typical profile, :mod:`stream_app.store.docpack`) and, only until its
publication is recorded, the outbox of its last write ``o`` (``key\\n`` + JSON; documents
written before 2026-12-02 hold theirs inside, with its published mark ``p``). The applied
messageIds live in the string ``{prefix}:dd:{user}`` as packed 48-bit digests (6 bytes instead
of a 36-character UUID; a new id is taken for one of the n ids its user has in memory with
odds of n / 2^48, ~2e-13 for 50: about one event dropped per 5e12 applied; 8-byte digests
until 2026-12-02 (later), read as their first 6 bytes), in two generations: the first write
a window after the current
generation began drops the older one, so an id is remembered between one and two
DEDUP_WINDOW_SECONDS while the user is active, and the whole string expires a window after
the user's last write (an idle user's profile is its document alone). Same hash tag, so
one Lua script updates both, also on Redis Cluster. A string of 6-byte entries costs ~6
bytes per id where a sorted set (the layout before 2026-12-02, ``{prefix}:sd:``, moved
into the string at the user's next write) cost ~20. Sets of full messageIds written
before 2026-12-01 (``{prefix}:seen:``) are still checked while they exist (they expire
with the dedup window). Writes are
compare-and-set on the version: a write based on a stale read is refused and the
caller re-reads, so a rebalance that briefly gives a user to two workers, or a retry
after a lost reply, never applies an event twice.

This module stores and fetches; it never decides what a profile contains (that is
:mod:`stream_app.profile`).
"""

from __future__ import annotations

import abc
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from stream_app.outbox import outbox_key
from stream_app.profile import Profile
from stream_app.store.docpack import decode_doc, encode_doc
from stream_app.store.keys import USER_KEY_KINDS, Keys
from stream_app.store.scripts import AnyRedis, Eval, Scripts  # AnyRedis: app.py imports it from here


@dataclass(slots=True)
class Loaded:
    """What a read returns for one profile id."""

    doc: Profile | None
    version: int
    seen: set[str] = field(default_factory=set)  # the asked-for messageIds already applied
    #: the key of the outbox a document written before 2026-12-02 holds, if it was published
    #: (since then a published outbox is dropped: no mark needed)
    published: str | None = None
    #: the caller's copy (``known`` to :meth:`ProfileStore.load`) is the stored version: the
    #: document was not sent back (``doc`` is None)
    current: bool = False


@dataclass(slots=True)
class Write:
    """A compare-and-set write: applied only if the stored version is still ``expected_version``."""

    profile_id: str
    expected_version: int
    doc: Profile
    new_message_ids: Sequence[str] = ()
    #: Refuse the write if any of ``new_message_ids`` was already applied (event writes);
    #: identity merges copy seen ids and set this False.
    require_unseen: bool = True
    #: Drop the profile's dedup memory with this write: a linked id's final tombstone (its
    #: events are redirected to the user, whose dedup memory holds copies of its ids).
    forget_seen: bool = False


def _never_published(key: str) -> bool:
    return False


class ProfileStore(abc.ABC):
    """Profiles with dedup memory. Every method is safe to retry."""

    #: Outbox keys this process knows were published (the processor's memory, set by the
    #: runtime): a write whose document still holds such an outbox does not store it again.
    known_published: Callable[[str], bool] = staticmethod(_never_published)

    @abc.abstractmethod
    async def load(
        self, requests: Mapping[str, Sequence[str]], known: Mapping[str, int] | None = None
    ) -> dict[str, Loaded]:
        """For each profile id: its document, version, and which of the given messageIds it has seen.

        ``known``: ids whose document the caller holds at that version (a cache). Where the
        stored version is still that one, the document is not sent back (``Loaded.current``).
        """

    @abc.abstractmethod
    async def save(self, writes: Sequence[Write]) -> set[str]:
        """Apply the writes; return the ids refused (nothing written for them).

        A write is refused when the stored version is not ``expected_version`` or, with
        ``require_unseen``, when one of its messageIds was already applied: the caller
        re-reads and folds again, so a stale cache or a lost reply never double-applies.
        """

    @abc.abstractmethod
    async def mark_published(self, marks: Mapping[str, str]) -> None:
        """Record, per profile id, the key of its outbox that was just published, so that the
        next process to load the profile (after a restart or a rebalance) does not send it
        again. Never creates a profile (an erased one stays erased)."""

    @abc.abstractmethod
    async def seen_ids(self, profile_id: str) -> list[str]:
        """Every remembered messageId of a profile (used when merging identities)."""

    @abc.abstractmethod
    async def get(self, profile_id: str) -> Profile | None:
        """The stored document, or None."""

    @abc.abstractmethod
    async def version(self, profile_id: str) -> int:
        """The stored document's version (0: none): it changes with every write."""

    @abc.abstractmethod
    async def erase(self, profile_ids: Sequence[str]) -> int:
        """Delete every per-user key of these ids (all kinds in USER_KEY_KINDS); return keys removed."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise if the store cannot be reached."""

    @abc.abstractmethod
    def documents(self, batch: int = 500) -> AsyncIterator[Profile]:
        """Every stored document, tombstones included, in no particular order (reports)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


# The dedup memory's layout (a string): a byte giving the entries' width (6), 8 bytes of
# header `>I4I4` = the second the current generation began and the byte length of the older
# generation's entries, then the entries, 48-bit digests, the older generation's first.
# Strings written before 2026-12-02 (later) have no width byte and 8-byte entries (the same
# digests, longer): they read as their entries' first 6 bytes and are stored so at the
# user's next write. Lua helpers shared by both scripts.
_DIGESTS_LUA = """
local W = 6
local function digest_set(body)
  local set = {}
  for i = 1, #body, W do set[string.sub(body, i, i + W - 1)] = true end
  return set
end
-- is `d` one of the entries of `body`? (a scan for one or a few ids, a table for more)
local function digest_lookup(body, wanted)
  if wanted > 8 then
    local set = digest_set(body)
    return function(d) return set[d] == true end
  end
  return function(d)
    local init = 1
    while true do
      local at = string.find(body, d, init, true)
      if not at then return false end
      if (at - 1) % W == 0 then return true end
      init = at + 1
    end
  end
end
local function digest_body(packed)
  if not packed then return '', 0, 0 end
  if string.byte(packed, 1) == W then
    local started, older = struct.unpack('>I4I4', string.sub(packed, 2, 9))
    return string.sub(packed, 10), started, older
  end
  local started, older = struct.unpack('>I4I4', packed)  -- 8-byte entries, no width byte
  local entries = {}
  for i = 9, #packed, 8 do entries[#entries + 1] = string.sub(packed, i, i + W - 1) end
  return table.concat(entries), started, older / 8 * W
end
-- the digests of a sorted set written before the string (8-byte members), or nil if none
local function zset_digests(key)
  if redis.call('EXISTS', key) == 0 then return nil end
  local set = {}
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do set[string.sub(m, 1, W)] = true end
  return set
end
"""

# KEYS: profile hash, dedup digests (string), legacy zset of digests, legacy zset of full ids.
# ARGV: the version the caller holds ("" for none), n, n digests, the n ids.
# Returns {version, doc, {1|0 per id}, published, outbox, 1|0: the caller's version is current
# (then no doc, no outbox)}.
_LOAD_LUA = (
    _DIGESTS_LUA
    + """
local r = redis.call('HMGET', KEYS[1], 'v', 'd', 'p', 'o')
local current = ARGV[1] ~= '' and r[1] ~= false and r[1] == ARGV[1]
table.remove(ARGV, 1)
local n = tonumber(ARGV[1])
local flags = {}
if n > 0 then
  local has = digest_lookup((digest_body(redis.call('GET', KEYS[2]))), n)
  for i = 1, n do flags[i] = has(ARGV[1 + i]) and 1 or 0 end
  local before = zset_digests(KEYS[3])
  if before then
    for i = 1, n do
      if flags[i] == 0 and before[ARGV[1 + i]] then flags[i] = 1 end
    end
  end
  if redis.call('EXISTS', KEYS[4]) == 1 then
    for i = 1, n do
      if flags[i] == 0 and redis.call('ZSCORE', KEYS[4], ARGV[n + 1 + i]) then flags[i] = 1 end
    end
  end
end
if current then return {r[1], false, flags, r[3], false, 1} end
return {r[1], r[2], flags, r[3], r[4], 0}
"""
)

# KEYS: profile hash. ARGV: outbox key. The outbox goes once published (a newer one, another
# key, stays); nothing else is written, so an erased profile stays erased.
_MARK_LUA = """
local o = redis.call('HGET', KEYS[1], 'o')
if o and string.sub(o, 1, #ARGV[1] + 1) == ARGV[1] .. '\\n' then redis.call('HDEL', KEYS[1], 'o') end
return 0
"""

# KEYS: profile hash, dedup digests (string), legacy zset of digests, legacy zset of full ids.
# ARGV: expected version, doc (without its outbox), ttl s, now ms, dedup window ms,
# require-unseen flag, forget-seen flag, outbox ("" for none), n, n digests, the n ids
# ("" for an entry copied as a digest).
# Returns the new version, -1 if the version moved, -2 if an id was already applied.
_CAS_LUA = (
    _DIGESTS_LUA
    + """
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return -1 end
local n = tonumber(ARGV[9])
local packed = false
if n > 0 then packed = redis.call('GET', KEYS[2]) end
local body, started, older = digest_body(packed)
if ARGV[6] == '1' and n > 0 then
  local has = digest_lookup(body, n)
  local before = zset_digests(KEYS[3])
  local legacy = redis.call('EXISTS', KEYS[4]) == 1
  for i = 1, n do
    if has(ARGV[9 + i]) then return -2 end
    if before and before[ARGV[9 + i]] then return -2 end
    if legacy and redis.call('ZSCORE', KEYS[4], ARGV[9 + n + i]) then return -2 end
  end
end
redis.call('HSET', KEYS[1], 'v', v + 1, 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
-- the outbox ("key\\n" .. messages) is kept apart, and only while not known published; `p`
-- (an outbox published inside the document, before 2026-12-02) no longer applies
if ARGV[8] == '' then redis.call('HDEL', KEYS[1], 'o', 'p') else
  redis.call('HSET', KEYS[1], 'o', ARGV[8])
  redis.call('HDEL', KEYS[1], 'p')
end
if ARGV[7] == '1' then redis.call('DEL', KEYS[2], KEYS[3], KEYS[4]) end
if n > 0 then
  local now = math.floor(tonumber(ARGV[4]) / 1000)
  local window = math.ceil(tonumber(ARGV[5]) / 1000)
  -- two generations: at the first write a window after the current one began, the older
  -- one (all written more than a window ago) goes and the current one becomes the older
  if not packed or now - started >= 2 * window then
    body, started, older = '', now, 0
  elseif now - started >= window then
    body, started, older = string.sub(body, older + 1), now, #body - older
  end
  local added = {body}
  for i = 10, 9 + n do added[#added + 1] = ARGV[i] end
  if redis.call('EXISTS', KEYS[3]) == 1 then  -- digests kept in a sorted set before: moved here
    local before = redis.call('ZRANGE', KEYS[3], 0, -1)
    for i = 1, #before do added[#added + 1] = string.sub(before[i], 1, W) end
    redis.call('DEL', KEYS[3])
  end
  -- the memory outlives the last write by the dedup window, not by the profile's TTL:
  -- an idle user keeps the document only
  local header = string.char(W) .. struct.pack('>I4I4', started, older)
  redis.call('SET', KEYS[2], header .. table.concat(added), 'EX', window)
end
return v + 1
"""
)


def _joined(raw: bytes | None, outbox: bytes | None) -> Profile | None:
    """A stored document with its outbox back in place (none once published). A document
    written before the outbox was kept apart (2026-12-02) still holds it."""
    if raw is None:
        return None
    doc = decode_doc(raw)
    engine = doc.get("engine")
    if outbox:
        doc.setdefault("engine", {})["outbox"] = orjson.loads(outbox[outbox.index(b"\n") + 1 :])
    elif isinstance(engine, dict) and "outbox" not in engine:
        engine["outbox"] = []
    return doc


#: bytes of a dedup entry (a messageId's 48-bit digest), and before the first one in the
#: dedup string (see ``_DIGESTS_LUA``); strings written before 2026-12-02 (later) had 8 and 8
DIGEST_BYTES = 6
DEDUP_HEADER = 9

#: a dedup entry handed out by ``seen_ids`` (identity merges copy them): already a digest
DIGEST_ENTRY = "\x1fsd:"


def digest(message_id: str) -> bytes:
    """The dedup entry of a messageId (or of an entry ``seen_ids`` returned)."""
    if message_id.startswith(DIGEST_ENTRY):
        return bytes.fromhex(message_id[len(DIGEST_ENTRY) :])[:DIGEST_BYTES]
    return hashlib.blake2b(message_id.encode(), digest_size=8).digest()[:DIGEST_BYTES]


class RedisProfileStore(ProfileStore):
    """Profiles in Redis (standalone or Cluster): one pipeline to read a batch, one to write it."""

    def __init__(
        self,
        client: AnyRedis,
        keys: Keys,
        ttl_seconds: int,
        dedup_window_seconds: int,
        compress: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.compress, self.clock = compress, clock
        self.client = client
        self.keys = keys
        self.ttl_seconds = ttl_seconds
        self.dedup_window_ms = dedup_window_seconds * 1000
        self.scripts = Scripts(client, {"load": _LOAD_LUA, "cas": _CAS_LUA, "mark": _MARK_LUA})

    def _user_keys(self, pid: str) -> list[str]:
        k = self.keys
        return [k.profile(pid), k.dedup(pid), k.seen_digests(pid), k.seen(pid)]

    def _split(self, doc: Profile) -> tuple[bytes, bytes]:
        """The stored document without its outbox, and the outbox as ``key\\n`` + JSON (b"" if
        empty or known published): kept apart, so that recording its publication drops it."""
        engine = doc.get("engine")
        if not isinstance(engine, dict) or "outbox" not in engine:
            return self._encode(doc), b""
        key = outbox_key(doc)
        messages = engine.pop("outbox")
        try:
            raw = self._encode(doc)
        finally:
            engine["outbox"] = messages
        if key is None or self.known_published(key):  # a published outbox is kept nowhere
            return raw, b""
        return raw, key.encode() + b"\n" + orjson.dumps(messages)

    def _encode(self, doc: Profile) -> bytes:
        return encode_doc(doc) if self.compress else orjson.dumps(doc)

    @staticmethod
    def _ids(message_ids: Sequence[str]) -> list[Any]:
        """n, the n digests, the n ids (for a legacy set; "" for an entry copied as a digest)."""
        raws = ["" if m.startswith(DIGEST_ENTRY) else m for m in message_ids]
        return [len(message_ids), *(digest(m) for m in message_ids), *raws]

    async def load(
        self, requests: Mapping[str, Sequence[str]], known: Mapping[str, int] | None = None
    ) -> dict[str, Loaded]:
        ids = list(requests)
        held = known or {}
        replies = await self.scripts.pipeline(
            [
                Eval("load", self._user_keys(pid), [held.get(pid, ""), *self._ids(requests[pid])])
                for pid in ids
            ]
        )
        out: dict[str, Loaded] = {}
        for pid, (version, raw, flags, mark, outbox, current) in zip(ids, replies, strict=True):
            seen = {m for m, flag in zip(requests[pid], flags, strict=True) if flag}
            out[pid] = Loaded(
                None if current else _joined(raw, outbox),
                int(version) if version is not None else 0,
                seen,
                mark.decode() if isinstance(mark, bytes) else mark,
                current=bool(current),
            )
        return out

    async def mark_published(self, marks: Mapping[str, str]) -> None:
        if marks:
            await self.scripts.pipeline([Eval("mark", [self.keys.profile(p)], [k]) for p, k in marks.items()])

    async def save(self, writes: Sequence[Write]) -> set[str]:
        if not writes:
            return set()
        now_ms = int(self.clock() * 1000)
        calls = []
        for w in writes:
            doc, outbox = self._split(w.doc)
            flags = ("1" if w.require_unseen else "0", "1" if w.forget_seen else "0")
            args = [w.expected_version, doc, self.ttl_seconds, now_ms, self.dedup_window_ms, *flags, outbox]
            calls.append(Eval("cas", self._user_keys(w.profile_id), [*args, *self._ids(w.new_message_ids)]))
        replies = await self.scripts.pipeline(calls)
        return {w.profile_id for w, r in zip(writes, replies, strict=True) if int(r) < 0}

    async def seen_ids(self, profile_id: str) -> list[str]:
        """Entries to copy into another profile's dedup memory (digests, opaque to callers)."""
        pipe = self.client.pipeline(transaction=False)  # one round trip (the keys share a slot)
        pipe.get(self.keys.dedup(profile_id))
        pipe.zrange(self.keys.seen_digests(profile_id), 0, -1)
        pipe.zrange(self.keys.seen(profile_id), 0, -1)
        raw, digests, legacy = await pipe.execute()
        packed = bytes(raw or b"")
        width, start = (DIGEST_BYTES, DEDUP_HEADER) if packed[:1] == bytes([DIGEST_BYTES]) else (8, 8)
        entries = {packed[i : i + DIGEST_BYTES] for i in range(start, len(packed), width)}
        entries |= {bytes(d)[:DIGEST_BYTES] for d in digests} | {digest(bytes(m).decode()) for m in legacy}
        return sorted(DIGEST_ENTRY + d.hex() for d in entries)

    async def get(self, profile_id: str) -> Profile | None:
        fields: list[Any] = await self.client.hmget(self.keys.profile(profile_id), ["d", "o"])
        return _joined(*fields)

    async def version(self, profile_id: str) -> int:
        raw = await self.client.hget(self.keys.profile(profile_id), "v")
        return int(raw) if raw is not None else 0

    async def erase(self, profile_ids: Sequence[str]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for pid in profile_ids:
            for kind in USER_KEY_KINDS:
                pipe.delete(self.keys.user_key(kind, pid))
        return sum(int(n) for n in await pipe.execute())

    async def ping(self) -> None:
        await self.client.ping()

    async def documents(self, batch: int = 500) -> AsyncIterator[Profile]:
        # scan_iter visits every node of a Redis Cluster; MATCH keeps to this prefix's profiles
        pattern = self.keys.user_key("p", "*").replace("{*}", "*")
        names: list[Any] = []
        async for name in self.client.scan_iter(match=pattern, count=batch):
            names.append(name)
            if len(names) >= batch:
                for doc in await self._fetch(names):
                    yield doc
                names = []
        for doc in await self._fetch(names):
            yield doc

    async def _fetch(self, names: list[Any]) -> list[Profile]:
        if not names:
            return []
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(name, ["d", "o"])
        return [doc for raw, outbox in await pipe.execute() if (doc := _joined(raw, outbox)) is not None]

    async def close(self) -> None:
        await self.client.aclose()


class InMemoryProfileStore(ProfileStore):
    """The same contract in a dict: for unit tests and the pure pipeline tests. Not for production."""

    def __init__(self) -> None:
        self.profiles: dict[str, tuple[int, bytes]] = {}
        self.seen: dict[str, dict[str, int]] = {}
        self.published: dict[str, str] = {}

    async def load(
        self, requests: Mapping[str, Sequence[str]], known: Mapping[str, int] | None = None
    ) -> dict[str, Loaded]:
        out: dict[str, Loaded] = {}
        for pid, msg_ids in requests.items():
            version, raw = self.profiles.get(pid, (0, b""))
            remembered = self.seen.get(pid, {})
            current = bool(raw) and (known or {}).get(pid) == version
            out[pid] = Loaded(
                None if current or not raw else orjson.loads(raw),
                version,
                {m for m in msg_ids if m in remembered},
                self.published.get(pid),
                current=current,
            )
        return out

    async def mark_published(self, marks: Mapping[str, str]) -> None:
        self.published.update({pid: key for pid, key in marks.items() if pid in self.profiles})

    async def save(self, writes: Sequence[Write]) -> set[str]:
        conflicts: set[str] = set()
        now_ms = int(time.time() * 1000)
        for w in writes:
            version = self.profiles.get(w.profile_id, (0, b""))[0]
            remembered = self.seen.get(w.profile_id, {})
            if version != w.expected_version or (
                w.require_unseen and any(m in remembered for m in w.new_message_ids)
            ):
                conflicts.add(w.profile_id)
                continue
            self.profiles[w.profile_id] = (version + 1, orjson.dumps(w.doc))
            if w.forget_seen:
                self.seen.pop(w.profile_id, None)
            if w.new_message_ids:
                self.seen.setdefault(w.profile_id, {}).update(dict.fromkeys(w.new_message_ids, now_ms))
        return conflicts

    async def seen_ids(self, profile_id: str) -> list[str]:
        return list(self.seen.get(profile_id, {}))

    async def get(self, profile_id: str) -> Profile | None:
        entry = self.profiles.get(profile_id)
        return orjson.loads(entry[1]) if entry else None

    async def version(self, profile_id: str) -> int:
        entry = self.profiles.get(profile_id)
        return entry[0] if entry else 0

    async def erase(self, profile_ids: Sequence[str]) -> int:
        removed = 0
        for pid in profile_ids:
            removed += int(self.profiles.pop(pid, None) is not None)
            removed += int(self.seen.pop(pid, None) is not None)
            self.published.pop(pid, None)
        return removed

    async def ping(self) -> None:
        return None

    async def documents(self, batch: int = 500) -> AsyncIterator[Profile]:
        for _version, raw in list(self.profiles.values()):
            yield orjson.loads(raw)
