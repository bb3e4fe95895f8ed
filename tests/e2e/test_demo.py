"""`stream-app demo` as a newcomer runs it: nothing configured, no TTY, stops by itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_runs_the_whole_engine_and_reports(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "REDIS_"))}
    result = subprocess.run(
        [sys.executable, "-m", "stream_app", "demo", "--duration", "15", "--users", "150", "--rate", "300"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = next(line for line in result.stdout.splitlines() if line.startswith("summary:"))
    fields = dict(part.split("=", 1) for part in summary.removeprefix("summary: ").split())
    assert int(fields["sent"]) > 0
    assert int(fields["applied"]) > 0
    assert int(fields["profiles"]) > 0
    assert int(fields["dead_lettered"]) >= 0
    assert not (tmp_path / ".stream-app" / "demo.json").exists()  # cleaned up
