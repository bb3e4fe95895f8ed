"""Issue 3 measurement: cluster quality vs known archetypes, id stability, cost per event.

Run: python bench/clustering.py [--users N]
Profiles come from the synthetic stream run through the real (in-memory) pipeline. The
model is trained on one stream (seed 11) and evaluated on a held-out stream (seed 47)
that was not used while choosing the features and weights (that was seed 23). Results
replace the "Clustering" section of bench/RESULTS.md.

It also measures the quality the running engine delivers (``quality.replay``): the
held-out stream through the pipeline with reactions, a model trained every pass on the
latest (mid-journey) vectors of the users the engine samples, users assigned on every
write and deadline with hysteresis.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import cluster_coverage
from common import machine, write_section
from rich.console import Console
from rich.table import Table
from river import cluster

from evaluation.metrics import adjusted_rand_index, purity
from evaluation.quality import (
    ARCHETYPE_CLUSTER_NAME,
    T0,
    Delivered,
    DeliveredUser,
    Moment,
    Population,
    replay,
    simulate,
)
from stream_app.paths import CONFIG_DIR
from stream_app.profile import ProfileRules
from stream_app.reactions import ReactionContext, react
from stream_app.segments.assign import FEATURE_NAMES, Snapshot, choose_cluster, features
from stream_app.segments.cluster_model import Trainer, train_model
from stream_app.segments.rules import load_segments
from stream_app.triggers.config import load_triggers

SECTION = "## Clustering: quality, id stability, cost"
TRAIN_SEED, HELD_OUT_SEED, RETRAIN_SEED, RESEED_DATA_SEED = 11, 47, 31, 53
#: Replay: batches of 2000 records (BATCH_MAX_EVENTS), a training pass every TRAIN_EVERY
#: batches stands in for CLUSTER_TRAIN_INTERVAL_SECONDS = 10: 3 x 2000 = 6000 events is
#: ~12 s of the demo's 500 events/s. Sensitivity: 1 batch (~4 s) and 16 (~10 s of a worker
#: catching up on a backlog at ~3200 events/s, bench "Foundation").
BATCH, TRAIN_EVERY, SENSITIVITY = 2000, 3, (1, 16)
ARCHETYPES = tuple(ARCHETYPE_CLUSTER_NAME)
NAMES = tuple(ARCHETYPE_CLUSTER_NAME.values())
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


def name_share(truth: list[str], names: list[str | None]) -> float:
    return sum(ARCHETYPE_CLUSTER_NAME[a] == nm for a, nm in zip(truth, names, strict=True)) / max(
        1, len(truth)
    )


def scored(truth: list[str], ids: list[Any], names: list[str | None]) -> tuple[float, float, float, float]:
    """ARI, purity (never assigned counted as one more cluster), share never assigned, name match."""
    labels = ["(none)" if i is None else i for i in ids]
    return (
        adjusted_rand_index(truth, labels),
        purity(truth, labels),
        sum(i is None for i in ids) / max(1, len(ids)),
        name_share(truth, names),
    )


def confusion(truth: list[str], names: list[str | None]) -> str:
    head = "| archetype \\ cluster name | " + " | ".join(f'"{n}"' for n in NAMES) + " | never assigned |"
    lines = [head, "|---" * (len(NAMES) + 2) + "|"]
    for a in ARCHETYPES:
        row = [
            sum(1 for t, nm in zip(truth, names, strict=True) if t == a and nm == n) for n in (*NAMES, None)
        ]
        cells = [
            f"**{c}**" if n == ARCHETYPE_CLUSTER_NAME[a] else str(c)
            for c, n in zip(row, (*NAMES, None), strict=True)
        ]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timeline_rows(d: Delivered) -> list[str]:
    """The stored clusters while the stream runs, at a few points of event time."""
    marks_h = (5 / 60, 0.25, 1, 6, 12, 23, 27, 48, 72)
    picked: list[int] = []
    for h in marks_h:
        i = next((i for i, m in enumerate(d.timeline) if m.event_ms - T0 >= h * 3_600_000), None)
        if i is not None and i not in picked:
            picked.append(i)
    busiest = max(range(len(d.timeline) - 1), key=lambda i: d.timeline[i].fired, default=None)
    picked.extend(i for i in (busiest, len(d.timeline) - 1) if i is not None and i not in picked)
    picked.sort()
    rows = []
    for i in picked:
        m = d.timeline[i]
        total = sum(m.names.values())
        truth = [a for (a, nm), c in m.names.items() if nm is not None for _ in range(c)]
        found = [nm for (_a, nm), c in m.names.items() if nm is not None for _ in range(c)]
        right = {a: m.names.get((a, ARCHETYPE_CLUSTER_NAME[a]), 0) for a in ARCHETYPES}
        of = {a: sum(c for (aa, nm), c in m.names.items() if aa == a and nm is not None) for a in ARCHETYPES}
        rows.append(
            f"| {m.batch} | {(m.event_ms - T0) / 3_600_000:.1f} h | v{m.model_version} | {total} | "
            f"{len(found) / max(1, total):.0%} | {adjusted_rand_index(truth, found) if found else 0:.3f} | "
            f"**{sum(right.values()) / max(1, len(found)):.1%}** | "
            + " / ".join(f"{right[a]} of {of[a]}" for a in ARCHETYPES)
            + f" | {m.fired} |"
        )
    return rows


def delivered_quality(
    n: int, held_out: Population, reference: Snapshot
) -> tuple[str, list[tuple[str, float, float, float, float]], float]:
    """The section text on quality as delivered; the summary rows; seconds spent."""
    t0 = time.perf_counter()
    d = replay(n, HELD_OUT_SEED, batch_size=BATCH, train_every=TRAIN_EVERY)
    seconds = time.perf_counter() - t0
    final = d.final_snapshot()
    refused = sum(u.consent_refused for u in d.users)
    users: list[DeliveredUser] = [u for u in d.users if not u.consent_refused]
    truth = [u.archetype for u in users]
    # end-of-stream method, same users: the model trained on seed 11's final profiles
    by_id = dict(zip(held_out.user_ids, held_out.docs, strict=True))
    eos_ids = [reference.nearest(features(by_id[u.user_id], held_out.step_means)) for u in users]
    rows = [
        (
            "end of stream (method above): model trained on seed 11's final profiles, "
            "nearest centroid of the final profile",
            *scored(truth, eos_ids, [reference.names[c] for c in eos_ids]),
        ),
        (
            "**as delivered: the stored cluster (`engine.cluster`) at the end of the stream**",
            *scored(truth, [u.stored_id for u in users], [u.stored_name for u in users]),
        ),
        (
            f"as delivered, final snapshot v{final.version} without hysteresis: nearest centroid of the "
            "final profile",
            *scored(truth, [u.final_id for u in users], [u.final_name for u in users]),
        ),
    ]
    sens = []
    for every in SENSITIVITY:
        s_d = replay(n, HELD_OUT_SEED, batch_size=BATCH, train_every=every)
        s_users = [u for u in s_d.users if not u.consent_refused]
        s_truth = [u.archetype for u in s_users]
        sens.append(
            (
                every,
                len(s_d.snapshots),
                scored(s_truth, [u.stored_id for u in s_users], [u.stored_name for u in s_users]),
                scored(s_truth, [u.final_id for u in s_users], [u.final_name for u in s_users]),
            )
        )
    no_margin = replay(n, HELD_OUT_SEED, batch_size=BATCH, train_every=TRAIN_EVERY, margin=0.0)
    nm_users = [u for u in no_margin.users if not u.consent_refused]
    nm = scored(
        [u.archetype for u in nm_users], [u.stored_id for u in nm_users], [u.stored_name for u in nm_users]
    )
    swaps = sum(
        1
        for prev, cur in zip(d.snapshots, d.snapshots[1:], strict=False)
        if any(prev.names.get(c) != name for c, name in cur.names.items())
    )
    kept_ids = sum(
        set(cur.centroids) == set(prev.centroids)
        for prev, cur in zip(d.snapshots, d.snapshots[1:], strict=False)
    )
    day = [m for m in d.timeline if m.model_version > 0 and 3_600_000 <= m.event_ms - T0 < 24 * 3_600_000]

    def moment_ari(m: Moment) -> float:
        t = [a for (a, nm_), c in m.names.items() if nm_ is not None for _ in range(c)]
        f = [nm_ for (_a, nm_), c in m.names.items() if nm_ is not None for _ in range(c)]
        return adjusted_rand_index(t, f) if f else 0.0

    day_ari = [moment_ari(m) for m in day] or [0.0]
    fmt = "| {} | {:.3f} | {:.3f} | {:.1%} | {:.1%} |"
    table = "\n".join(fmt.format(name, *vals) for name, *vals in rows)
    sens_rows = "\n".join(
        f"| every {e} batch{'es' if e > 1 else ''} ({k} snapshots) | {st[0]:.3f} | {st[3]:.1%} | "
        f"{fi[0]:.3f} | {fi[3]:.1%} |"
        for e, k, st, fi in sens
    )
    timeline = "\n".join(timeline_rows(d))
    _name, stored_ari, _purity, _none, stored_names = rows[1]
    target = "met" if stored_ari >= 0.8 else "**not met**"
    text = f"""
### Quality as delivered by the running engine

The numbers above score a model trained on, and applied to, users' *final* profiles. The
engine does not work that way: after each batch it puts the latest features of (a sample of)
the profiles the batch wrote into the shared sample set (one vector per user, replaced by
newer ones; an anonymous id's vector is dropped when it is linked to a user), i.e. users in
the middle of their journey; the lease holder trains a fresh model
on a random draw of that set every `CLUSTER_TRAIN_INTERVAL_SECONDS` (`train_model`: shuffle,
k-means++ seeding on the first 1000, river KMeans on the rest, ids matched to the previous
snapshot) and publishes it; every profile write assigns the user with the latest snapshot and
hysteresis against the stored cluster.
`evaluation.quality.replay` replays the held-out stream (seed {HELD_OUT_SEED}, {d.records} records)
that way, in memory and deterministically: the pipeline with reactions wired, batches of {BATCH}
records, up to 100 random profiles a batch wrote sampled (consent refused dropped), a training pass
every {TRAIN_EVERY} batches ({TRAIN_EVERY} x {BATCH} events ≈ 12 s at the demo's 500 events/s, standing in
for the 10 s timer; {len(d.snapshots)} snapshots, the first once 200 users are in the set) exactly as
`Runtime.train_once`, assignment as `Runtime.assign_cluster` (margin 0.2, step means from the durations
folded so far), and the deadline timer ({d.timer_fires} deadline reactions, which re-assign too). The
clock is event time. Scored on the {len(users)} users who did not refuse personalization ({refused}
who did are never clustered, by design). Took {seconds:.1f} s.

| assignment ({len(users)} held-out users) | ARI vs archetype | purity | never assigned | name = archetype |
|---|---|---|---|---|
{table}

Target ARI ≥ 0.8 as delivered at the end of the stream: {target} (ARI {stored_ari:.3f}, names right for
{stored_names:.1%}). Hysteresis (margin 0.2) costs {nm[0] - stored_ari:.3f} ARI against no margin at all
(ARI {nm[0]:.3f}): users keep a cluster given by an earlier model until another centroid is clearly
closer. Ids: {kept_ids} of {len(d.snapshots) - 1} consecutive snapshots kept the same ids; the name
of an id changed between consecutive snapshots {swaps} time(s).

Stored cluster name by archetype at the end of the stream (bold: the right name):

{confusion(truth, [u.stored_name for u in users])}

While the stream runs it is worse, and that is when onboarding personalization acts on the cluster
(e.g. the `cluster = "struggling"` live-chat action of `stalled_step`). Stored clusters after a batch
(users with a profile so far, consent refused left out):

| batch | event time since start | model | users | assigned | ARI (assigned) \
| name = archetype (of assigned) | right name: quick_adopter / steady / passive / struggling \
| timer reactions |
|---|---|---|---|---|---|---|---|---|
{timeline}

Between hours 1 and 24 the stored clusters score ARI {min(day_ari):.2f}-{max(day_ari):.2f}. This replay is
a cold start: every synthetic user signs up within the first minutes, so the first models are
trained on users who have only just arrived, and users they assigned who then go idle keep that
cluster until their next event or until one of their deadlines fires (the jump after ~24 h comes
with the timer's pass over the 24 h onboarding-abandoned deadlines, which re-assign). A gate that
assigns no cluster before a user shows some behaviour (a completed step, a help view, a feature)
was tried on this replay on 2026-11-26 (a throwaway experiment, not kept) and did not help
(end-of-stream ARI 0.81-0.87 against 0.89 without the gate, hours 1-24 no better; measured
before linked anonymous ids were dropped from the sample set): the early error is the early
models', not the users' lack of evidence. Re-checking idle users' clusters against the latest model
(timer deadlines 1 h, 6 h, 24 h and 72 h after a user's last event) was tried the same way and
rejected (2026-11-26, throwaway experiment): hours 1-24 no better (ARI 0.44 at 1.2 h, 0.47 at
16.7 h), end of stream worse (ARI 0.885 against 0.932),
because during a cold start the models of the first day are themselves wrong and re-checks move
users by them. What would help is a better first-day model, e.g. seeding from a model trained on
an earlier period (not built).

Training-interval sensitivity (same replay, training pass every N batches of {BATCH}):

| training pass | stored: ARI | stored: name = archetype \
| final snapshot, no hysteresis: ARI | name = archetype |
|---|---|---|---|---|
{sens_rows}

History. The first design continued one online model from snapshot to snapshot
(`Trainer.from_snapshot` + learn the samples queued since, in the order the stream touched the
users) and scored ARI 0.622, names right 81.4%, as delivered on this same replay (commit 2549140,
2026-11-24): its first centroids were seeded on minutes-old users; users who kept producing
events were over-represented in the queue; centroids that stopped winning samples kept their
standardized coordinates under a scaler that kept learning and drifted to where no user was
(a "passive" centroid at 6.4 completed steps out of 5). The same queued samples shuffled scored
ARI 0.909 offline, which led to the present design: one latest vector per user, shuffled, and a
fresh model per pass with ids carried over by matching (ARI 0.892 as delivered, commit 489aad1;
then dropping the vectors of anonymous ids once linked to a user, which counted those users a
second time in their first minutes, gave the figures above).
"""
    return text, rows, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=2000, help="users per stream (default 2000)")
    parser.add_argument(
        "--skip-delivered", action="store_true", help="skip the coverage runs with real workers (minutes)"
    )
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
    # the next training pass: a fresh model on another sample set, ids matched to v1's
    v2 = train_model(retrain.vectors(), v1, version=2, now_ms=0)
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
    learn_us = median_us(lambda: chosen.learn(xs), len(xs))  # v1 is already exported
    pass_xs = (retrain.vectors() + xs + train.vectors())[:5000]
    pass_s = median_us(lambda: train_model(pass_xs, v1, version=2, now_ms=0), 1, 3) / 1e6
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
        f"ids kept after a training pass {kept_restart:.1%} (raw nearest {raw_restart:.1%}), "
        f"after reseed {kept_reseed:.1%}; features {feat_us:.1f} µs, assign {assign_us:.1f} µs, "
        f"learn {learn_us:.1f} µs, pass of {len(pass_xs)} {pass_s:.2f} s, react {react_us - copy_us:.1f} µs"
    )
    with console.status("replaying the held-out stream the way the running engine sees it…"):
        delivered_text, delivered_rows, delivered_s = delivered_quality(n, held_out, v1)
    dtable = Table(title="quality as delivered by the running engine (held-out users, consent given)")
    for col in ("assignment", "ARI", "purity", "never assigned", "name = archetype"):
        dtable.add_column(col, justify="left" if col == "assignment" else "right")
    for name, ari, pur, none, names in delivered_rows:
        dtable.add_row(name.replace("**", ""), f"{ari:.3f}", f"{pur:.3f}", f"{none:.1%}", f"{names:.1%}")
    console.print(dtable)
    console.print(f"replays took {delivered_s:.1f} s (main) ")
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
| a worker restart (the model lives in Redis; the restarted worker assigns with the same snapshot) \
| 100% by construction (tested) |
| next training pass: `train_model` on {len(retrain.docs)} other users' vectors → v2 matched to v1, \
hysteresis 0.2 | **{kept_restart:.1%}** |
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

One training pass (`train_model` on {len(pass_xs)} users: shuffle, k-means++ with 8 restarts on
1000, river on the rest, id matching) takes {pass_s * 1000:.0f} ms; only the lease holder runs it,
in a thread, every `CLUSTER_TRAIN_INTERVAL_SECONDS`.
| whole reaction per profile write (rule segments, cluster, triggers, deadline) | {react_us - copy_us:.1f} |
{delivered_text}"""
    write_section(SECTION, text)
    console.print(f"wrote {SECTION!r} to bench/RESULTS.md")
    if not args.skip_delivered:  # coverage and ARI next to each other, from real workers
        cluster_coverage.main_with(users=1000, interval=10.0, cold_seconds=90.0)


if __name__ == "__main__":
    main()
