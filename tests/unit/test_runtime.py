"""The runtime's read path (in-memory store): profile view with current rule segments."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stream_app.errors import ConfigError
from stream_app.profile import new_profile
from stream_app.settings import Settings
from stream_app.store.profiles import Write
from stream_app.worker.publisher import Sinks
from stream_app.worker.runtime import Runtime, Stores


async def test_profile_view_carries_the_rule_segments_of_now() -> None:
    stores = Stores(Settings(), in_memory=True)
    store = stores.profiles
    runtime = Runtime(Settings(), Sinks.in_memory(), stores)
    now = int(time.time() * 1000)
    doc = new_profile("u1")
    doc.update(first_seen_ms=now - 3_600_000, last_seen_ms=now - 60_000, help_views={"profile": 5})
    await store.save([Write("u1", 0, doc)])
    view = await runtime.reader.read("u1")
    assert view is not None
    assert "struggling" in view["segments"] and "passive" not in view["segments"]
    old = new_profile("u2")
    old.update(first_seen_ms=now - 90 * 86_400_000, last_seen_ms=now - 40 * 86_400_000)
    await store.save([Write("u2", 0, old)])
    view = await runtime.reader.read("u2")
    assert view is not None and "dormant" in view["segments"] and view["lifecycle"] == "dormant"


def test_a_broken_segments_file_stops_start_up_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "segments.toml"
    bad.write_text('[segments.x]\nwhen = "sessions >"\n')
    with pytest.raises(ConfigError) as info:
        Runtime(Settings(segments_file=bad), Sinks.in_memory(), Stores(Settings(), in_memory=True))
    assert info.value.setting == "SEGMENTS_FILE" and "segment 'x'" in str(info.value)
