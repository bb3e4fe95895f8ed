"""Issue 3 measurement: cluster quality vs known archetypes, id stability, cost per event.

Run: python bench/clustering.py [--users N]
Profiles come from the synthetic stream run through the real (in-memory) pipeline. The
model is trained on one stream (seed 11) and evaluated on a held-out stream (seed 47)
that was not used while choosing the features and weights (that was seed 23). Results
replace the "Clustering" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from common import machine, write_section
from rich.console import Console
from rich.table import Table
from river import cluster

from stream_app.paths import CONFIG_DIR
from stream_app.profile import ProfileRules
from stream_app.reactions import ReactionContext, react
from stream_app.segments.cluster_model import (
    FEATURE_NAMES,
    Snapshot,
    Trainer,
    adjusted_rand_index,
    choose_cluster,
    features,
    purity,
)
from stream_app.segments.quality import Population, simulate
from stream_app.segments.rules import load_segments
from stream_app.triggers.config import load_triggers

SECTION = "## Clustering: quality, id stability, cost"
TRAIN_SEED, HELD_OUT_SEED, RETRAIN_SEED, RESEED_DATA_SEED = 11, 47, 31, 53
console = Console()


def median_us(fn: Callable[[], Any], items: int, reps: int = 5) -> float:
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) / items * 1e6)
    return statistics.median(runs)


def evaluate(snap: Snapshot, pop: Population) -> tuple[float, float]:
    found = [snap.nearest(x) for x in pop.vectors()]
    return adjusted_rand_index(pop.archetypes, found), purity(pop.archetypes, found)


def plain_river(train: Population, test: Population, halflife: float, seed: int) -> tuple[float, float]:
    """river as shipped: StandardScaler | KMeans with its random initial centres, equal weights."""
    from river import preprocessing

    model = preprocessing.StandardScaler() | cluster.KMeans(n_clusters=4, halflife=halflife, seed=seed)
    for x in train.vectors():
        model.learn_one(dict(zip(FEATURE_NAMES, x, strict=True)))
    found = [model.predict_one(dict(zip(FEATURE_NAMES, x, strict=True))) for x in test.vectors()]
    return adjusted_rand_index(test.archetypes, found), purity(test.archetypes, found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=2000, help="users per stream (default 2000)")
    args = parser.parse_args()
    n = args.users
    with console.status("simulating streams through the pipeline…"):
        train = simulate(n, TRAIN_SEED)
        held_out = simulate(n, HELD_OUT_SEED)
        retrain = simulate(n, RETRAIN_SEED)
        reseed_data = simulate(n, RESEED_DATA_SEED)
    rows: list[tuple[str, float, float]] = []
    for halflife in (0.02, 0.1, 0.5):
        t = Trainer(k=4, seed=7, halflife=halflife)
        t.learn(train.vectors())
        rows.append(
            (
                f"chosen: k-means++ (8 restarts) + river KMeans, halflife {halflife}",
                *evaluate(t.snapshot(None, 1, 0), held_out),
            )
        )
    for halflife in (0.02, 0.5):
        aris = [plain_river(train, held_out, halflife, seed) for seed in (1, 2, 3)]
        rows.append(
            (
                f"river StandardScaler|KMeans as shipped, halflife {halflife} (median of seeds 1-3)",
                statistics.median(a for a, _ in aris),
                statistics.median(p for _, p in aris),
            )
        )

    chosen = Trainer(k=4, seed=7, halflife=0.02)
    chosen.learn(train.vectors())
    v1 = chosen.snapshot(None, 1, 0)
    restarted = Trainer.from_snapshot(v1, halflife=0.02)
    restarted.learn(retrain.vectors())
    v2 = restarted.snapshot(v1, 2, 0)
    reseeded = Trainer(k=4, seed=99, halflife=0.02)
    reseeded.learn(reseed_data.vectors())
    v3 = reseeded.snapshot(v2, 3, 0)
    xs = held_out.vectors()
    before = [v1.nearest(x) for x in xs]
    kept_restart = sum(
        choose_cluster(b, v2.distances(x)) == b for b, x in zip(before, xs, strict=True)
    ) / len(xs)
    kept_reseed = sum(choose_cluster(b, v3.distances(x)) == b for b, x in zip(before, xs, strict=True)) / len(
        xs
    )
    raw_restart = sum(v2.nearest(x) == b for b, x in zip(before, xs, strict=True)) / len(xs)
    names_ok = sum(
        {"quick_adopter": "quick adopters"}.get(a, a) == v1.names[c]
        for a, c in zip(held_out.archetypes, before, strict=True)
    ) / len(xs)

    docs = held_out.docs
    means = held_out.step_means
    feat_us = median_us(lambda: [features(d, means) for d in docs], len(docs))
    assign_us = median_us(lambda: [choose_cluster(None, v1.distances(x)) for x in xs], len(xs))
    learn_us = median_us(lambda: Trainer.from_snapshot(v1).learn(xs), len(xs))
    ctx = ReactionContext(
        load_segments(CONFIG_DIR / "segments.toml"),
        load_triggers(CONFIG_DIR / "triggers.toml"),
        ProfileRules(),
        assign_cluster=lambda doc, now, cur: (
            {"id": (c := choose_cluster(None, v1.distances(features(doc, means)))), "name": v1.names[c]},
            "",
        ),
    )
    now = max(d["last_seen_ms"] for d in docs)
    import copy

    copies = [copy.deepcopy(d) for d in docs]
    react_us = median_us(
        lambda: [react(copy.deepcopy(d), d["user_id"], now, ctx) for d in copies], len(copies), 3
    )
    copy_us = median_us(lambda: [copy.deepcopy(d) for d in copies], len(copies), 3)

    table = Table(title=f"Clustering on {n} held-out synthetic users (4 archetypes)")
    table.add_column("model")
    table.add_column("ARI", justify="right")
    table.add_column("purity", justify="right")
    for name, ari, pur in rows:
        table.add_row(name, f"{ari:.3f}", f"{pur:.3f}")
    console.print(table)
    chosen_ari, chosen_purity = rows[0][1], rows[0][2]
    console.print(
        f"ids kept after restart+retrain {kept_restart:.1%} (raw nearest {raw_restart:.1%}), "
        f"after reseed {kept_reseed:.1%}; features {feat_us:.1f} µs, assign {assign_us:.1f} µs, "
        f"learn {learn_us:.1f} µs, react {react_us - copy_us:.1f} µs"
    )
    model_rows = "\n".join(f"| {name} | {ari:.3f} | {pur:.3f} |" for name, ari, pur in rows)
    text = f"""{SECTION}

Run: `python bench/clustering.py --users {n}` on {time.strftime("%Y-%m-%d")}.
Machine: {machine()}.

Train stream seed {TRAIN_SEED}, held-out stream seed {HELD_OUT_SEED} ({len(xs)} users with a profile);
features and weights were chosen looking at seed 23 only. Features: {", ".join(FEATURE_NAMES)}.

| model (k = 4) | ARI vs archetype | purity |
|---|---|---|
{model_rows}

Chosen: river `StandardScaler` + river `KMeans` (halflife 0.02) whose centres are seeded by
k-means++ with 8 restarts on the first {chosen.min_seed} samples, features weighted (progress and
device down-weighted: they split clusters by completion and by phone vs desktop rather than
by behaviour). river's KMeans as shipped starts from random centres and lands in a poor local
optimum on these features; the seeded one reaches **ARI {chosen_ari:.3f}, purity {chosen_purity:.3f}**
(target ARI ≥ 0.8). Cluster names from centroids match the archetype for {names_ok:.1%} of
held-out users.

| id stability (held-out users) | share keeping their id |
|---|---|
| restart: v1 → `Trainer.from_snapshot` → learn {len(retrain.docs)} new users → v2, hysteresis 0.2 \
| **{kept_restart:.1%}** |
| same, nearest centroid without hysteresis | {raw_restart:.1%} |
| reseed: a model trained from scratch (seed 99, other data) matched to v2's ids | **{kept_reseed:.1%}** |

Target ≥ 95%. Caveat: the retraining data comes from the same archetype mix, so this is the
no-drift case; when behaviour drifts, centroids move and users near a boundary change
cluster (FIELD_NOTES measured ~3% churn per checkpoint for halflife 0.02); hysteresis and id
matching keep the *ids* stable, not the memberships. Two workers cannot disagree: both
assign with the same stored snapshot (tested in `tests/integration/test_clustering_runtime.py`).

| cost per event (median of 5 runs) | µs |
|---|---|
| feature extraction | {feat_us:.1f} |
| assignment (scale, distances, hysteresis) | {assign_us:.1f} |
| learning one sample (trainer only, one worker) | {learn_us:.1f} |
| whole reaction per profile write (rule segments, cluster, triggers, deadline) | {react_us - copy_us:.1f} |
"""
    write_section(SECTION, text)
    console.print(f"wrote {SECTION!r} to bench/RESULTS.md")


if __name__ == "__main__":
    main()
