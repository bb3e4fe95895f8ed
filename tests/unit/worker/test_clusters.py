"""Baselines.admit: the total number of step statistics rows is bounded. The cluster sample set
keeps rounded vectors."""

from __future__ import annotations

import random

from stream_app.metrics import Metrics
from stream_app.profile import StepDuration, new_profile
from stream_app.segments.assign import Snapshot, features
from stream_app.settings import Settings
from stream_app.store.models import InMemoryModelStore
from stream_app.store.step_stats import InMemoryStepStatsStore
from stream_app.worker.clusters import SAMPLE_DECIMALS, Baselines, ClusterService


async def test_new_rows_beyond_the_bound_are_refused_and_known_rows_still_fold() -> None:
    store = InMemoryStepStatsStore()
    await store.add([StepDuration("f", "known", 1.0, "m0", source=(0, 0))])
    baselines = Baselines(store, refresh_seconds=60)
    await baselines.refresh(force=True)
    durations = [StepDuration("f", f"new-{i}", 1.0, f"m{i}", source=(0, i + 1)) for i in range(5)]
    durations.append(StepDuration("f", "known", 2.0, "m9", source=(0, 9)))
    durations.append(
        StepDuration("f", "new-0", 3.0, "m10", source=(0, 10))
    )  # a row admitted earlier in this call
    allowed, refused = baselines.admit(durations, max_rows=3)
    assert [(d.step, d.message_id) for d in allowed] == [
        ("new-0", "m0"),
        ("new-1", "m1"),
        ("known", "m9"),
        ("new-0", "m10"),
    ]
    assert refused == 3
    await store.add(allowed)
    await baselines.refresh(force=True)  # the admitted rows are now read back as known
    assert baselines.admit([StepDuration("f", "new-4", 1.0, "m11")], max_rows=3) == ([], 1)


async def test_the_sample_set_keeps_each_vector_rounded_to_its_decimals() -> None:
    models: InMemoryModelStore[Snapshot] = InMemoryModelStore()
    baselines = Baselines(InMemoryStepStatsStore(), refresh_seconds=60)
    service = ClusterService(Settings(), models, baselines, Metrics(), rng=random.Random(1), in_thread=False)
    doc = new_profile("u1")
    doc.update(event_count=7, sessions={"count": 3, "recent_ms": []}, features={"a": 1, "b": 2, "c": 1})
    await service.sample({"u1": doc})
    exact = features(doc)
    assert models.samples["u1"] == [round(x, SAMPLE_DECIMALS) for x in exact]
    assert models.samples["u1"] != exact  # log1p(3) and others have more decimals than kept
    assert max(abs(a - b) for a, b in zip(models.samples["u1"], exact, strict=True)) <= 0.5e-4
