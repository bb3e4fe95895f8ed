"""The short chaos run: a minute of live load with every fault of bench/chaos.py injected once
(SIGKILL and SIGTERM of a worker, Redis frozen, crashed and restarted from its AOF, filled to
maxmemory, the broker frozen, a worker added and removed), then the independent oracle.
The five-minute runs on both brokers are benchmarks (``make chaos``, bench/RESULTS.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

CHAOS = Path(__file__).parents[2] / "bench" / "chaos.py"


@pytest.mark.timeout(600)
@pytest.mark.brokers("embedded")
def test_a_short_chaos_run_holds_every_invariant(services: object, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(CHAOS), "--short", "--no-results", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=540,
        env=dict(os.environ, TMPDIR=str(tmp_path), COLUMNS="160"),
    )
    report = out.stdout[-6000:] + out.stderr[-3000:]
    assert out.returncode == 0, report
    assert "violations: 0" in out.stdout, report
    assert "malformed" in out.stdout and "checked profiles" in out.stdout, report
