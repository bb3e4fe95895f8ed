"""Next-feature recommendations: item-to-item statistics per cluster, from adoption orders.

The training data is one *adoption order* per consenting user (the features in the order
they were first used, :func:`adoption`) with the user's cluster name. :func:`train` counts,
per cluster and for all users (group ``""``): how many users adopted each feature, which
feature they adopted right after each one (``next``), and which they adopted at any point
after it (``after``). Counts seen for fewer than ``min_support`` users are left out, so the
model holds aggregates only: no user id, no single user's path.

:func:`recommend` scores every feature the user has not used yet:

    score = W_NEXT * P(next = c | last adopted) + W_AFTER * mean_a P(c later | a) + W_POP * P(c)

within the user's cluster, falling back to all users where the cluster has no data. An
unknown user (nothing adopted, no cluster) gets the features most adopted by everybody.
The weights were chosen with ``bench/recommend.py`` (README, bench/RESULTS.md). No I/O.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from stream_app.profile import OTHER, Profile

ALL = ""  # the group of all users
W_NEXT, W_AFTER, W_POP = 0.7, 0.2, 0.1
MAX_ITEMS_PER_USER = 50

Counts = dict[str, dict[str, int]]  # item -> item -> users


def adoption(doc: Profile) -> list[str]:
    """The features a profile used, in the order it first used them (its ``features`` keep
    insertion order; the ``(other)`` overflow bucket is not a feature)."""
    return [f for f in (doc.get("features") or {}) if f != OTHER][:MAX_ITEMS_PER_USER]


@dataclass(frozen=True)
class Recommendation:
    item: str
    score: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"item": self.item, "score": round(self.score, 4), "reason": self.reason}


@dataclass(frozen=True)
class RecoModel:
    """One shared, versioned model (JSON in Redis): aggregate counts per group."""

    version: int
    created_ms: int
    users: int
    min_support: int
    group_users: dict[str, int]  # group -> users in the training sample
    popular: dict[str, dict[str, int]]  # group -> item -> users who adopted it
    next: dict[str, Counts]  # group -> item -> the item adopted right after it -> users
    after: dict[str, Counts]  # group -> item -> an item adopted later -> users

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__)

    def same_counts(self, other: RecoModel) -> bool:
        """True when ``other`` would answer every user alike (only version and time differ)."""
        ignore = {"version", "created_ms"}
        return {k: v for k, v in self.__dict__.items() if k not in ignore} == {
            k: v for k, v in other.__dict__.items() if k not in ignore
        }

    @classmethod
    def from_json(cls, raw: bytes | str) -> RecoModel:
        return cls(**orjson.loads(raw))


def train(
    samples: Iterable[tuple[str, Sequence[str]]], *, version: int, now_ms: int, min_support: int = 5
) -> RecoModel:
    """Count adoption orders ``(cluster name or "", features in order)``; keep counts >= min_support."""
    users: Counter[str] = Counter()
    popular: dict[str, Counter[str]] = defaultdict(Counter)
    nxt: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    after: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    total = 0
    for group, items in samples:
        order = list(dict.fromkeys(items))  # first use only
        total += 1
        for g in {ALL, group or ALL}:
            users[g] += 1
            popular[g].update(order)
            for i, item in enumerate(order):
                if i + 1 < len(order):
                    nxt[g][item][order[i + 1]] += 1
                after[g][item].update(order[i + 1 :])

    def keep(counter: Mapping[str, int]) -> dict[str, int]:
        return {k: v for k, v in sorted(counter.items()) if v >= min_support}

    def keep_pairs(pairs: Mapping[str, Mapping[str, int]]) -> Counts:
        out = {item: keep(c) for item, c in sorted(pairs.items())}
        return {item: c for item, c in out.items() if c}

    groups = sorted(g for g, n in users.items() if n >= min_support)
    return RecoModel(
        version=version,
        created_ms=now_ms,
        users=total,
        min_support=min_support,
        group_users={g: users[g] for g in groups},
        popular={g: keep(popular[g]) for g in groups},
        next={g: keep_pairs(nxt[g]) for g in groups},
        after={g: keep_pairs(after[g]) for g in groups},
    )


def recommend(
    model: RecoModel | None, group: str | None, adopted: Sequence[str], k: int
) -> list[Recommendation]:
    """Up to ``k`` features the user has not adopted, best first (ties by name)."""
    if model is None or k <= 0:
        return []
    used = set(adopted)
    g = group if group and group in model.popular else ALL
    if g not in model.popular:
        return []
    who = "users like you" if g != ALL else "users"
    n_users = max(1, model.group_users.get(g, 1))
    popular = model.popular[g]
    last = adopted[-1] if adopted else None
    nexts = model.next[g].get(last, {}) if last is not None else {}
    next_total = sum(nexts.values())
    scored: list[Recommendation] = []
    for item in sorted(popular):
        if item in used:
            continue
        p_next = nexts.get(item, 0) / next_total if next_total else 0.0
        afters = [model.after[g].get(a, {}).get(item, 0) / popular[a] for a in adopted if popular.get(a)]
        p_after = sum(afters) / len(afters) if afters else 0.0
        p_pop = popular[item] / n_users
        score = W_NEXT * p_next + W_AFTER * p_after + W_POP * p_pop
        if p_next and W_NEXT * p_next >= W_AFTER * p_after:
            reason = f"{who} often adopt it right after {last}"
        elif p_after:
            reason = f"{who} who use what you use adopt it later"
        else:
            reason = f"used by {round(100 * p_pop)} % of {who}" + (f" ({g})" if g != ALL else "")
        scored.append(Recommendation(item, score, reason))
    scored.sort(key=lambda r: (-r.score, r.item))
    if len(scored) < k and g != ALL:  # the cluster knows too few features: fill from all users
        have = used | {r.item for r in scored}
        everybody = model.popular.get(ALL, {})
        n_all = max(1, model.group_users.get(ALL, 1))
        fill = [
            Recommendation(item, W_POP * n / n_all / 2, f"used by {round(100 * n / n_all)} % of users")
            for item, n in everybody.items()
            if item not in have
        ]
        fill.sort(key=lambda r: (-r.score, r.item))
        scored.extend(fill[: k - len(scored)])
    return scored[:k]


def popular_baseline(model: RecoModel | None, group: str | None, adopted: Sequence[str], k: int) -> list[str]:
    """The most adopted features the user has not used, in ``group`` (or all users): the
    baselines the recommender is measured against."""
    if model is None:
        return []
    g = group if group is not None and group in model.popular else ALL
    ranked = sorted(model.popular.get(g, {}).items(), key=lambda kv: (-kv[1], kv[0]))
    used = set(adopted)
    return [item for item, _n in ranked if item not in used][:k]
