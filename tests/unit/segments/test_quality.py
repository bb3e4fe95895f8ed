"""The as-delivered replay (quality.replay): deterministic, and faithful to how the engine assigns."""

from __future__ import annotations

from functools import cache

from evaluation.quality import Delivered, replay
from stream_app.segments.assign import features


@cache
def small(seed: int = 5) -> Delivered:
    return replay(300, seed, batch_size=500, samples_per_batch=40, train_every=2)


def test_the_replay_is_deterministic() -> None:
    a = small()
    b = replay(300, 5, batch_size=500, samples_per_batch=40, train_every=2)
    assert a.users == b.users
    assert [s.to_json() for s in a.snapshots] == [s.to_json() for s in b.snapshots]


def test_models_are_published_in_order_and_retrained_during_the_stream() -> None:
    d = small()
    assert [s.version for s in d.snapshots] == list(range(1, len(d.snapshots) + 1))
    assert len(d.snapshots) >= 3
    assert d.snapshots[0].samples >= 200  # the first model waits for CLUSTER_MIN_SAMPLES
    # the sample set only grows (users arrive; the sweep refreshes every member's vector)
    assert all(b.samples >= a.samples for a, b in zip(d.snapshots, d.snapshots[1:], strict=False))
    assert d.snapshots[-1].samples > d.snapshots[0].samples
    per_batch: dict[int, int] = {}
    for _archetype, batch, _x in d.samples:  # the batch path's share: CLUSTER_SAMPLES_PER_BATCH
        per_batch[batch] = per_batch.get(batch, 0) + 1
    assert 0 < max(per_batch.values()) <= 40
    assert len(d.timeline) == d.batches


def test_stored_clusters_come_from_the_snapshot_that_assigned_them() -> None:
    d = small()
    by_version = {s.version: s for s in d.snapshots}
    assigned = [u for u in d.users if u.stored_id is not None]
    assert assigned
    for u in assigned:
        assert u.stored_version is not None
        assert by_version[u.stored_version].names[u.stored_id] == u.stored_name
        assert u.assignments >= 1 and u.first_name is not None


def test_consent_refused_users_are_never_clustered() -> None:
    d = small()
    refused = [u for u in d.users if u.consent_refused]
    assert refused
    assert all(u.stored_id is None and u.stored_name is None for u in refused)


def test_final_assignment_is_the_nearest_centroid_of_the_final_snapshot() -> None:
    d = small()
    final = d.final_snapshot()
    for u, doc in zip(d.users, d.docs, strict=True):
        assert u.final_id == final.nearest(features(doc, d.step_means))
        assert u.final_name == final.names[u.final_id]
