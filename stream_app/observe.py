"""Reading a worker from outside: scrape its Prometheus text, sum counters, estimate quantiles.

Used by the demo's live view and the benchmarks; never by the worker itself.
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str, timeout: float = 2.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``{metric name: [(labels, value), ...]}`` from a Prometheus text endpoint."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return parse_prometheus(resp.read().decode())


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name, parsed by prometheus_client's own parser (escaped label values too)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((dict(sample.labels), float(sample.value)))
    return out


def total(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(v for labels, v in metrics.get(name, []) if all(labels.get(k) == x for k, x in match.items()))


def histogram_quantile(
    metrics: dict[str, list[tuple[dict[str, str], float]]],
    name: str,
    q: float,
    baseline: dict[str, list[tuple[dict[str, str], float]]] | None = None,
) -> float | None:
    """Quantile ``q`` of a histogram (optionally of its increase since ``baseline``), by linear
    interpolation inside the bucket, as Prometheus' histogram_quantile does."""

    def buckets(m: dict[str, list[tuple[dict[str, str], float]]]) -> dict[float, float]:
        return {float(labels["le"]): v for labels, v in m.get(name + "_bucket", [])}

    now = buckets(metrics)
    before = buckets(baseline) if baseline else {}
    points = sorted((le, count - before.get(le, 0.0)) for le, count in now.items())
    if not points or points[-1][1] <= 0:
        return None
    rank = q * points[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in points:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            span = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / span if span else 0.0)
        prev_le, prev_count = le, count
    return prev_le
