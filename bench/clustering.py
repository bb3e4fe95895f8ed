"""Issue 3 measurement: cluster quality vs known archetypes, id stability, cost per event.

Run: python bench/clustering.py [--users N]
Profiles come from the synthetic stream run through the real (in-memory) pipeline. The
model is trained on one stream (seed 11) and evaluated on a held-out stream (seed 47)
that was not used while choosing the features and weights (that was seed 23). Results
replace the "Clustering" section of bench/RESULTS.md.

It also measures the quality the running engine delivers (``quality.replay``): the
held-out stream through the pipeline with reactions, the model trained online on the
mid-journey samples the engine queues, users assigned on every write with hysteresis.
"""

from __future__ import annotations

import argparse
import math
import random
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
    _unscale,
    adjusted_rand_index,
    choose_cluster,
    features,
    purity,
)
from stream_app.segments.quality import (
    ARCHETYPE_CLUSTER_NAME,
    T0,
    Delivered,
    DeliveredUser,
    Population,
    replay,
    simulate,
)
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


def profile_row(label: str, vs: list[list[float]]) -> str:
    """Mean features of a group of profiles (counts averaged per user, not log-averaged)."""
    if not vs:
        return f"| {label} | 0 | | | | | | |"
    done, steps, rel, helps, sessions, feats = (
        statistics.fmean(v[0] for v in vs),
        statistics.fmean(math.expm1(v[1]) for v in vs),
        statistics.fmean(v[2] for v in vs),
        statistics.fmean(math.expm1(v[3]) for v in vs),
        statistics.fmean(math.expm1(v[4]) for v in vs),
        statistics.fmean(math.expm1(v[5]) for v in vs),
    )
    return (
        f"| {label} | {len(vs)} | {done:.2f} | {steps:.2f} | {rel:+.2f} | {helps:.2f} | "
        f"{sessions:.2f} | {feats:.2f} |"
    )


def centroid_row(label: str, snap: Snapshot, cid: str) -> str:
    x = _unscale(snap.centroids[cid], snap.means, snap.stds)
    return (
        f"| {label} | centroid | {x[0]:.2f} | {math.expm1(x[1]):.2f} | {x[2]:+.2f} | "
        f"{math.expm1(x[3]):.2f} | {math.expm1(x[4]):.2f} | {math.expm1(x[5]):.2f} |"
    )


def timeline_rows(d: Delivered) -> list[str]:
    """The stored names while the stream runs, at a few points of event time."""
    marks_h = (5 / 60, 0.25, 1, 6, 23, 27, 72)
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
        assigned = sum(c for (_a, nm), c in m.names.items() if nm is not None)
        right = {a: m.names.get((a, ARCHETYPE_CLUSTER_NAME[a]), 0) for a in ARCHETYPES}
        of = {a: sum(c for (aa, nm), c in m.names.items() if aa == a and nm is not None) for a in ARCHETYPES}
        rows.append(
            f"| {m.batch} | {(m.event_ms - T0) / 3_600_000:.1f} h | v{m.model_version} | {total} | "
            f"{assigned / max(1, total):.0%} | **{sum(right.values()) / max(1, assigned):.1%}** | "
            + " / ".join(f"{right[a]} of {of[a]}" for a in ARCHETYPES)
            + f" | {m.names.get(('steady', 'quick adopters'), 0)} "
            f"| {m.names.get(('passive', 'steady'), 0)} "
            f"| {m.names.get(('struggling', 'passive'), 0)} | {m.fired} |"
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
    pairs = [(u, doc) for u, doc in zip(d.users, d.docs, strict=True) if not u.consent_refused]
    users: list[DeliveredUser] = [u for u, _ in pairs]
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
    # Where the gap comes from: the same queued samples, trained in one go.
    xs = [x for _a, _b, x in d.samples]
    final_x = [features(doc, d.step_means) for _u, doc in pairs]

    def offline(vectors: list[list[float]]) -> tuple[float, float, float, float]:
        t = Trainer(k=4, seed=7, halflife=0.02)
        t.learn(vectors)
        s = t.snapshot(None, 1, 0)
        found = [s.nearest(x) for x in final_x]
        return scored(truth, found, [s.names[c] for c in found])

    shuffled = xs[:]
    random.Random(1).shuffle(shuffled)
    diag = [
        (
            "the engine's queued samples in the order queued, one trainer (close to the online model)",
            offline(xs),
        ),
        ("the same samples shuffled (seeding sees every stage and archetype)", offline(shuffled)),
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
    by_arch_first = {
        a: [u.first_features for u in users if u.archetype == a and u.first_features is not None]
        for a in ARCHETYPES
    }
    samples_by_arch = {a: [x for aa, _b, x in d.samples if aa == a] for a in ARCHETYPES}
    final_by_arch = {
        a: [x for u, x in zip(users, final_x, strict=True) if u.archetype == a] for a in ARCHETYPES
    }
    share = {a: len(samples_by_arch[a]) / max(1, len(d.samples)) for a in ARCHETYPES}
    user_share = {a: truth.count(a) / max(1, len(truth)) for a in ARCHETYPES}
    passive_id = next(c for c, nm in final.names.items() if nm == "passive")
    ref_passive = next(c for c, nm in reference.names.items() if nm == "passive")
    first_names = {
        a: sum(1 for u in users if u.archetype == a and u.first_name == ARCHETYPE_CLUSTER_NAME[a])
        / max(1, truth.count(a))
        for a in ARCHETYPES
    }
    swaps = sum(
        1
        for prev, cur in zip(d.snapshots, d.snapshots[1:], strict=False)
        if any(prev.names.get(c) != nm for c, nm in cur.names.items())
    )
    fmt = "| {} | {:.3f} | {:.3f} | {:.1%} | {:.1%} |"
    table = "\n".join(fmt.format(name, *vals) for name, *vals in rows)
    diag_rows = "\n".join(fmt.format(name, *vals) for name, vals in diag)
    sens_rows = "\n".join(
        f"| every {e} batch{'es' if e > 1 else ''} ({k} snapshots) | {st[0]:.3f} | {st[3]:.1%} | "
        f"{fi[0]:.3f} | {fi[3]:.1%} |"
        for e, k, st, fi in sens
    )
    timeline = "\n".join(timeline_rows(d))
    first_day = [
        sum(c for (a, nm), c in m.names.items() if nm == ARCHETYPE_CLUSTER_NAME[a])
        / max(1, sum(c for (_a, nm), c in m.names.items() if nm is not None))
        for m in d.timeline
        if m.model_version > 0 and m.event_ms - T0 < 24 * 3_600_000
    ]
    seed_x = xs[:300]
    seed_steps = statistics.fmean(math.expm1(x[1]) for x in seed_x)
    seed_zero = sum(x[1] == 0 for x in seed_x) / max(1, len(seed_x))
    first = d.snapshots[0]
    feats = "\n".join(
        [
            profile_row("struggling: when first given a cluster", by_arch_first["struggling"]),
            profile_row("struggling: in the training samples", samples_by_arch["struggling"]),
            profile_row("struggling: final profile", final_by_arch["struggling"]),
            profile_row("passive: when first given a cluster", by_arch_first["passive"]),
            profile_row("passive: in the training samples", samples_by_arch["passive"]),
            profile_row("passive: final profile", final_by_arch["passive"]),
            *(
                centroid_row(f'first snapshot v1: "{first.names[c]}" ({c})', first, c)
                for c in sorted(first.centroids)
            ),
            centroid_row(f'final snapshot v{final.version}: "passive" ({passive_id})', final, passive_id),
            centroid_row('end-of-stream model: "passive"', reference, ref_passive),
        ]
    )
    mix = ", ".join(f"{a} {share[a]:.0%} (of users {user_share[a]:.0%})" for a in ARCHETYPES)
    mix_rows_list = []
    for lo in range(0, d.batches, 6):
        hi = min(d.batches, lo + 6)
        got = [a for a, b, _x in d.samples if lo <= b < hi]
        t_lo = (d.timeline[lo].event_ms - T0) / 3_600_000
        t_hi = (d.timeline[hi - 1].event_ms - T0) / 3_600_000
        mix_rows_list.append(
            f"| {lo + 1}-{hi} | {t_lo:.1f}-{t_hi:.1f} h | "
            + " / ".join(str(got.count(a)) for a in ARCHETYPES)
            + " |"
        )
    mix_rows = "\n".join(mix_rows_list)
    eos, stored, nohyst = rows
    text = f"""
### Quality as delivered by the running engine (online training on mid-journey samples, hysteresis)

The numbers above score a model trained on, and applied to, users' *final* profiles. The
engine does not work that way: after each batch it queues the features of (a sample of) the
profiles the batch touched, i.e. users in the middle of their journey; the lease holder trains
from those every `CLUSTER_TRAIN_INTERVAL_SECONDS` and publishes a snapshot; every profile write
assigns the user with the latest snapshot and hysteresis against the stored cluster.
`stream_app.segments.quality.replay` replays the held-out stream (seed {HELD_OUT_SEED}, {d.records} records)
that way, in memory and deterministically: the pipeline with reactions wired, batches of {BATCH}
records, up to 100 random profiles a batch wrote queued (consent refused skipped), a training pass
every {TRAIN_EVERY} batches ({TRAIN_EVERY} x {BATCH} events ≈ 12 s at the demo's 500 events/s, standing in
for the 10 s timer; {len(d.snapshots)} snapshots, first after 300 samples) exactly as `Runtime.train_once`
(`Trainer(k=4, halflife=0.02, min_seed=200)`, then `Trainer.from_snapshot` + learn the queued
samples), assignment as `Runtime.assign_cluster` (margin 0.2, step means from the durations folded so
far), and the deadline timer ({d.timer_fires} deadline reactions, which re-assign too). The
clock is event time. Scored on the {len(users)} users who did not refuse personalization ({refused}
who did are never clustered, by design). Took {seconds:.1f} s.

| assignment ({len(users)} held-out users) | ARI vs archetype | purity | never assigned | name = archetype |
|---|---|---|---|---|
{table}

Stored cluster name by archetype at the end of the stream (bold: the right name):

{confusion(truth, [u.stored_name for u in users])}

The same for the final snapshot without hysteresis:

{confusion(truth, [u.final_name for u in users])}

While the stream runs — which is when onboarding personalization acts on the cluster (e.g. the
`cluster = "struggling"` live-chat action of `stalled_step`) — it is worse. Stored names after a batch
(users with a profile so far, consent refused left out):

| batch | event time since start | model | users | assigned | name = archetype (of assigned) \
| right name: quick_adopter / steady / passive / struggling (of assigned) | steady named "quick adopters" \
| passive named "steady" | struggling named "passive" | timer reactions |
|---|---|---|---|---|---|---|---|---|---|---|
{timeline}

**Gap.** End of stream ARI {eos[1]:.3f} (names right for {eos[4]:.1%}); as delivered ARI {stored[1]:.3f},
purity {stored[2]:.3f}, names right for {stored[4]:.1%} at the end of the stream, and for only
{min(first_day):.0%}-{max(first_day):.0%} of the assigned users during the first 24 h (after the first
model), when onboarding is happening (read the columns above: which archetypes get a wrong name,
and as what). The target ARI ≥ 0.8 is met by the offline measurement,
**not** by what the engine delivers. Without hysteresis the final snapshot reaches ARI
{nohyst[1]:.3f}: hysteresis costs a little (users keep an early cluster); most of the gap is the model.

Why (evidence from this replay):

1. *The model is seeded on the first minutes of the stream.* The first snapshot is trained on the
   300 samples of the first {TRAIN_EVERY} batches, when every user has just arrived ({seed_zero:.0%} of them
   with no completed step, {seed_steps:.2f} on average): its centroids separate moments of the first
   steps, not behaviours. In v1 the centroid named "passive" is the *slow first step, no help yet*
   one (see the table under 3.), which is also what a struggling user looks like early in a step:
   a source of help-viewing users named "passive" in a live stream where users keep arriving.
   Online updates (halflife 0.02) then chase whatever the current batches touch.
2. *The sample mix is not the user mix and drifts.* Samples are profiles touched by a batch, so users
   who keep producing events are over-represented and users who stop are not: over the stream the
   queued samples were {mix}. By stretch of the stream (the first batches are everybody's
   onboarding, the middle ones the struggling users' long onboarding, the later ones the later
   sessions of quick adopters and steady users; passive users stop producing events early):

| batches | event time | samples: quick_adopter / steady / passive / struggling |
|---|---|---|
{mix_rows}

3. *A centroid that stops winning samples becomes a ghost.* Centroids live in the standardized
   space of a scaler that keeps learning (`from_snapshot` restores it and continues its running
   mean/variance). A centroid that (almost) no sample is nearest to keeps its standardized coordinates
   while the mean and std under it move, so its meaning in real units drifts. Mean features of
   struggling and passive users at three moments, and centroids mapped back to real units (the first
   snapshot's, the final snapshot's "passive", the end-of-stream model's "passive"):

| profiles | n | onboarding done | steps completed | relative step time (log2) \
| help views | sessions | features used |
|---|---|---|---|---|---|---|---|
{feats}

   The final "passive" centroid sits where no user is ({math.expm1(_unscale_at(final, passive_id, 1)):.1f}
   completed steps out of 5); real passive users are nearest to "steady", hence the
   passive → "steady" column above.
4. *Users are assigned before there is any evidence.* The first cluster is given at the first write
   after a model exists, usually the identify or the first step (see "when first given a cluster":
   no completed step, hardly any help view yet). Only {first_names["struggling"]:.0%} of struggling and
   {first_names["passive"]:.0%} of passive users got the right name first; the margin of 0.2 then keeps
   that early choice until another centroid is clearly closer, and users who stop producing events
   are only re-assigned when one of their deadlines fires (see the timer reactions column: the jump
   around 24 h comes with the timer's pass over the users' 24 h deadlines).
5. *Names are recomputed per snapshot.* The name of an id changed between consecutive snapshots
   {swaps} time(s) in this replay (e.g. "passive" ⇄ "steady"), and a user's stored name is the one of
   the snapshot at their last write.

Order, not the mid-journey content of the samples, is most of it: the same queued samples trained in
one go score

| the engine's {len(xs)} queued samples, scored on the final profiles \
| ARI | purity | never assigned | name = archetype |
|---|---|---|---|---|
{diag_rows}

Training-interval sensitivity (same replay, training pass every N batches of {BATCH}):

| training pass | stored: ARI | stored: name = archetype \
| final snapshot, no hysteresis: ARI | name = archetype |
|---|---|---|---|---|
{sens_rows}

Ideas to close the gap (not done here; this only measures): seed the first model only once the
samples cover users past onboarding (or from a reservoir with one latest vector per user, so each
user counts once with their most informative state, instead of per-batch touches); keep centroids in
raw feature units (re-standardize them with the current scaler when exporting) or freeze the scaler
after seeding, and re-seed a centroid that has not won samples for a while; do not assign (or mark
the cluster provisional, and keep hysteresis off) until a user has completed or abandoned a step or
two; pin names to ids (rename only when a centroid moved by a lot); and track this replay's
as-delivered ARI as the quality target rather than the end-of-stream one.
"""
    return text, rows, seconds


def _unscale_at(snap: Snapshot, cid: str, feature: int) -> float:
    return _unscale(snap.centroids[cid], snap.means, snap.stds)[feature]


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
{delivered_text}"""
    write_section(SECTION, text)
    console.print(f"wrote {SECTION!r} to bench/RESULTS.md")


if __name__ == "__main__":
    main()
