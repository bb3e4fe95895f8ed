"""Measuring the engine, not running it: clustering quality and replays for the benchmarks and
tests. Never imported by ``stream_app``."""
