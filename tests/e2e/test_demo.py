"""`stream-app demo` as a newcomer runs it: nothing configured, no TTY, stops by itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _summary(stdout: str) -> dict[str, str]:
    """The machine-readable last line: ``summary: sent=.. applied=.. dead_lettered=.. profiles=..``."""
    line = next(line for line in reversed(stdout.splitlines()) if line.startswith("summary: "))
    return dict(part.split("=", 1) for part in line.removeprefix("summary: ").split())


@pytest.mark.timeout(300)
def test_demo_runs_the_whole_engine_and_reports(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "REDIS_"))}
    result = subprocess.run(
        [sys.executable, "-m", "stream_app", "demo", "--duration", "25", "--users", "200", "--rate", "300"],
        cwd=tmp_path,  # the demo writes .stream-app/ here; the package finds its own files
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=280,
    )
    output = result.stdout[-4000:] + "\n--- stderr ---\n" + result.stderr[-4000:]
    assert result.returncode == 0, output
    fields = _summary(result.stdout)
    assert int(fields["sent"]) > 0, output
    assert int(fields["applied"]) > 0, output
    assert int(fields["profiles"]) > 0, output
    assert int(fields["broken"]) > 0 and int(fields["dead_lettered"]) == int(fields["broken"]), output
    assert int(fields["resent"]) > 0 and int(fields["duplicates"]) == int(fields["resent"]), output
    assert int(fields["segment_changes"]) > 0, output  # segments are published as users act
    assert int(fields["triggers"]) > 0, output  # e.g. onboarding_completed as users finish
    assert "front door" in result.stdout and "/v1/batch" in result.stdout, output  # via the collector
    assert not (tmp_path / ".stream-app" / "demo.json").exists()  # removed on exit
    assert (tmp_path / ".stream-app" / "worker.log").stat().st_size > 0  # the worker's log stays
    assert (tmp_path / ".stream-app" / "collector.log").stat().st_size > 0
