"""Agreement of a clustering with known labels (the synthetic users' archetypes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def adjusted_rand_index(truth: Sequence[Any], found: Sequence[Any]) -> float:
    """ARI of two labelings (Hubert & Arabie), from the contingency table."""
    n = len(truth)
    pairs: dict[tuple[Any, Any], int] = {}
    for a, b in zip(truth, found, strict=True):
        pairs[(a, b)] = pairs.get((a, b), 0) + 1
    rows: dict[Any, int] = {}
    cols: dict[Any, int] = {}
    for (a, b), c in pairs.items():
        rows[a] = rows.get(a, 0) + c
        cols[b] = cols.get(b, 0) + c

    def comb2(x: int) -> float:
        return x * (x - 1) / 2

    index = sum(comb2(c) for c in pairs.values())
    sum_rows = sum(comb2(c) for c in rows.values())
    sum_cols = sum(comb2(c) for c in cols.values())
    expected = sum_rows * sum_cols / comb2(n) if n > 1 else 0.0
    maximum = (sum_rows + sum_cols) / 2
    return 1.0 if maximum == expected else (index - expected) / (maximum - expected)


def purity(truth: Sequence[Any], found: Sequence[Any]) -> float:
    by_cluster: dict[Any, dict[Any, int]] = {}
    for a, b in zip(truth, found, strict=True):
        by_cluster.setdefault(b, {}).setdefault(a, 0)
        by_cluster[b][a] += 1
    return sum(max(c.values()) for c in by_cluster.values()) / max(1, len(truth))
