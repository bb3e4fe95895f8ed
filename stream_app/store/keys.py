"""Redis key layout. Every key of one user carries the same Cluster hash tag ``{user}``.

So a Lua script that touches several keys of one user runs on Redis Cluster as is,
and adding Redis nodes re-shards users, never splits one. Global keys (per-step
statistics, per-partition deadlines, model snapshots) have their own tags.
"""

from __future__ import annotations

import hashlib

#: Every kind of per-user key. Erasure deletes ``user_key(kind, user)`` for each kind
#: (of the user and of every id merged into it): a feature that adds a per-user key
#: must add its kind here, and the erasure contract test then covers it.
USER_KEY_KINDS: list[str] = ["p", "dd", "sd", "seen"]


def hash_tag(ident: str) -> str:
    """The Cluster hash tag of an id. Ids with braces would end the tag early: use a digest."""
    if "{" in ident or "}" in ident or not ident:
        return "h" + hashlib.sha1(ident.encode()).hexdigest()
    return ident


def step_name(flow: str, step: str, group: str = "") -> str:
    """``flow|step`` (``|group``), with ``|`` and ``\\`` in the names escaped, so that
    ("a|b", "c") and ("a", "b|c") are two steps (names without them are unchanged)."""
    return "|".join(_escape(part) for part in ((flow, step, group) if group else (flow, step)))


def parse_step_name(name: str) -> tuple[str, str, str]:
    """(flow, step, group) of :func:`step_name` (group "" for all users)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(name)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == "|":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    flow, step, group = [*parts, "", "", ""][:3]
    return flow, step, group


def _escape(part: str) -> str:
    return part.replace("\\", "\\\\").replace("|", "\\|")


def _step_tag(flow: str, step: str, group: str) -> str:
    return hash_tag(step_name(flow, step, group))


class Keys:
    """Key names under one prefix (``REDIS_KEY_PREFIX``)."""

    def __init__(self, prefix: str = "oe") -> None:
        self.prefix = prefix

    # --- per user: all share {tag} -------------------------------------------------
    def profile(self, user: str) -> str:
        """Hash: ``v`` (version, for compare-and-set), ``d`` (the document) and, until it is
        published, ``o`` (the outbox of the last write)."""
        return self.user_key("p", user)

    def dedup(self, user: str) -> str:
        """String: applied messageIds' 48-bit digests, packed in two generations (dedup window;
        layout in :mod:`stream_app.store.profiles`)."""
        return self.user_key("dd", user)

    def seen_digests(self, user: str) -> str:
        """Sorted set of applied messageIds' digests, as written before 2026-12-02: read, and
        moved into :meth:`dedup` at the user's next write."""
        return self.user_key("sd", user)

    def seen(self, user: str) -> str:
        """Sorted set of applied messageIds, as written before the digests: read, no longer written."""
        return self.user_key("seen", user)

    def user_key(self, kind: str, user: str) -> str:
        """Any further per-user key (segments, triggers, ...): same tag, so same slot."""
        return f"{self.prefix}:{kind}:{{{hash_tag(user)}}}"

    # --- global ------------------------------------------------------------------------------
    def step_stats(self, flow: str, step: str, group: str = "") -> str:
        """Hash of one step's statistics, for all users (group "") or one group (a cluster)."""
        return f"{self.prefix}:stepstats:{{{_step_tag(flow, step, group)}}}"

    def step_stats_applied(self, flow: str, step: str, group: str = "") -> str:
        return f"{self.prefix}:stepstats-applied:{{{_step_tag(flow, step, group)}}}"

    def step_stats_index(self) -> str:
        """Set of ``flow|step`` names that have statistics (for listing)."""
        return f"{self.prefix}:stepstats-index"

    def deadlines(self, topic: str, partition: int) -> str:
        """Sorted set of user ids by their next deadline (ms), for one input partition."""
        return f"{self.prefix}:deadlines:{{{hash_tag(f'{topic}#{partition}')}}}"

    def epoch(self, topic: str, partition: int) -> str:
        """When this group first applied a batch of the partition (stream_app/store/epochs.py)."""
        return f"{self.prefix}:epoch:{{{hash_tag(f'{topic}#{partition}')}}}"

    def watermark(self, topic: str, partition: int) -> str:
        """Hash ``ts`` (max event time seen) and ``at`` (wall clock then) of one input partition."""
        return f"{self.prefix}:watermark:{{{hash_tag(f'{topic}#{partition}')}}}"

    def partition_members(self, topic: str, partition: int) -> str:
        """Set of the user ids whose profiles one input partition writes (the cluster sweep walks it)."""
        return f"{self.prefix}:members:{{{hash_tag(f'{topic}#{partition}')}}}"

    def sweep(self, topic: str, partition: int) -> str:
        """Hash ``done`` / ``started`` / ``cursor``: the cluster sweep's position in one partition."""
        return f"{self.prefix}:sweep:{{{hash_tag(f'{topic}#{partition}')}}}"

    def cluster_model(self, kind: str) -> str:
        """The shared cluster model: ``model`` (hash version/snapshot), ``history`` (list),
        ``vectors`` (hash user -> latest feature vector, the training sample set), ``lease``
        (who trains). One tag, one slot."""
        return self.model("cluster", kind)

    def model(self, name: str, kind: str) -> str:
        """A shared model's keys (``cluster``, ``reco``): one hash tag per model."""
        return f"{self.prefix}:{name}-{kind}:{{{name}-model}}"

    def bandit(self, trigger_type: str, kind: str) -> str:
        """A trigger type's bandit: ``arms`` (hash ``context|variant|p`` pulls, ``...|r``
        rewards) and ``counted`` (sorted set of ``p:``/``r:`` trigger ids, by when). One slot."""
        return f"{self.prefix}:bandit-{kind}:{{bandit-{hash_tag(trigger_type)}}}"

    def segment_sizes(self) -> str:
        """Hash ``rule:<name>`` / ``cluster:<id>`` -> members (approximate; see README)."""
        return f"{self.prefix}:segment-sizes"
