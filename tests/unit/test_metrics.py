"""GcPauses: every garbage collection's pause reaches the histogram, by generation."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry

from stream_app.metrics import GcPauses, Metrics


def test_collections_are_timed_by_generation_and_drained_into_the_histogram() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    pauses = GcPauses(metrics.gc_pause_seconds)
    pauses.install()
    pauses.install()  # once only
    try:
        gc.collect(2)
        gc.collect(0)
    finally:
        pauses.uninstall()
    assert pauses.drain() >= 2
    full = registry.get_sample_value("onboarding_gc_pause_seconds_count", {"generation": "2"})
    young = registry.get_sample_value("onboarding_gc_pause_seconds_count", {"generation": "0"})
    assert full is not None and full >= 1 and young is not None and young >= 1
    assert pauses.drain() == 0
    gc.collect()  # uninstalled: nothing recorded any more
    assert not pauses.pending
