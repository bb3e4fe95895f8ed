"""Consumer lag in records and seconds, as kafka-lag-exporter estimates it."""

from __future__ import annotations

from stream_app.lag import LagTracker


def test_caught_up_is_zero_whatever_the_history() -> None:
    lag = LagTracker()
    lag.observe(0, 100, now=10.0)
    assert lag.lag(0, 100, now=500.0) == (0, 0.0)
    assert lag.lag(7, 0, now=500.0) == (0, 0.0)  # never observed


def test_seconds_are_the_age_of_the_oldest_unprocessed_record() -> None:
    lag = LagTracker()
    lag.observe(0, 100, now=0.0)
    lag.observe(0, 200, now=10.0)  # records 100..199 appended between t=0 and t=10
    lag.observe(0, 300, now=20.0)
    records, seconds = lag.lag(0, 150, now=30.0)
    assert records == 150
    assert abs(seconds - (30.0 - 5.1)) < 1e-9  # record 150 appended about half-way, t≈5.1
    assert lag.lag(0, 250, now=30.0)[1] < lag.lag(0, 150, now=30.0)[1]  # newer records waited less


def test_steady_load_a_few_records_behind_is_a_few_seconds() -> None:
    """Always slightly behind under load: lag seconds stay small, they do not grow forever."""
    lag = LagTracker()
    for t in range(100):
        lag.observe(0, 100 * t, now=float(t))
    records, seconds = lag.lag(0, 100 * 99 - 50, now=99.0)
    assert records == 50 and seconds < 1.0


def test_older_than_the_history_and_forgetting_partitions() -> None:
    lag = LagTracker()
    lag.observe(0, 500, now=100.0)
    assert lag.lag(0, 10, now=130.0) == (490, 30.0)  # before the first sample: at least that old
    lag.observe(1, 5, now=0.0)
    lag.forget({0})
    assert 1 not in lag.samples and 0 in lag.samples
