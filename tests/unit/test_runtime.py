"""The runtime's read path (in-memory store): profile view with current rule segments."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from stream_app.contract import iso_ms
from stream_app.errors import ConfigError
from stream_app.pipeline import Record
from stream_app.profile import new_profile
from stream_app.settings import Settings
from stream_app.store.profiles import Write
from stream_app.triggers.bandit import ArmStats
from stream_app.worker.publisher import MemorySink, Sinks
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


BANDIT_TRIGGERS = """
[onboarding_completed]
holdout = 0.0
policy = "bandit"
[[onboarding_completed.actions]]
action = { kind = "email" }
[[onboarding_completed.variants]]
name = "plain"
[[onboarding_completed.variants]]
name = "fancy"
"""


def _record(offset: int, event: dict[str, object]) -> Record:
    body = {"type": "track", "userId": "u1", "timestamp": iso_ms(int(time.time() * 1000)), **event}
    return Record(orjson.dumps(body), b"u1", "events", 0, offset, int(time.time() * 1000))


async def test_a_bandit_counts_the_trigger_it_sent_and_the_click_reported_back_once(tmp_path: Path) -> None:
    """A trigger the bandit chose is a pull once sent; the click naming its trigger id is a
    reward; redelivering either (same message ids) counts nothing twice."""
    path = tmp_path / "triggers.toml"
    path.write_text(BANDIT_TRIGGERS)
    settings = Settings(triggers_file=path)
    triggers = MemorySink()  # what a notification service would read
    sinks = Sinks(MemorySink(), MemorySink(), triggers, MemorySink())
    stores = Stores(settings, in_memory=True)
    runtime = Runtime(settings, sinks, stores)
    done = _record(0, {"messageId": "c1", "event": "Onboarding Completed", "properties": {"flow": "signup"}})
    await runtime.batches.handle([done])
    await runtime.batches.handle([done])  # redelivered
    (trigger,) = {t["trigger_id"]: t for t in triggers.values}.values()
    assert trigger["policy"] == {"kind": "bandit", "context": "all"} and trigger["variant"] in (
        "plain",
        "fancy",
    )
    arm = ("onboarding_completed", "all", trigger["variant"])
    assert await stores.bandit.arms(["onboarding_completed"]) == {arm: ArmStats(1, 0)}
    props = {"trigger_id": trigger["trigger_id"], "variant": trigger["variant"]}
    opened = _record(1, {"messageId": "o1", "event": "Intervention Opened", "properties": props})
    clicked = _record(2, {"messageId": "k1", "event": "Intervention Clicked", "properties": props})
    again = _record(
        3, {"messageId": "k2", "event": "Intervention Clicked", "properties": props}
    )  # a 2nd click
    await runtime.batches.handle([opened, clicked])
    await runtime.batches.handle([clicked, again])
    assert await stores.bandit.arms(["onboarding_completed"]) == {arm: ArmStats(1, 1)}
    await runtime.baselines.refresh(force=True)
    assert runtime.reaction_context().arms == {arm: ArmStats(1, 1)}  # what the next decisions read
    counted = runtime.metrics.bandit_counted
    assert counted.labels("onboarding_completed", trigger["variant"], "reward")._value.get() == 1


async def test_the_live_funnel_counts_starts_completions_and_times_per_group() -> None:
    settings = Settings()
    runtime = Runtime(settings, Sinks.in_memory(), Stores(settings, in_memory=True))
    now = int(time.time() * 1000)

    def step(user: str, mid: str, name: str, at: int) -> Record:
        body = {"type": "track", "userId": user, "messageId": mid, "timestamp": iso_ms(at), "event": name,
                "properties": {"flow": "signup", "step": "profile"}}  # fmt: skip
        return Record(orjson.dumps(body), user.encode(), "events", 0, 0, now)

    started = [
        step("u1", "s1", "Onboarding Step Started", now - 90_000),
        step("u2", "s2", "Onboarding Step Started", now),
    ]
    await runtime.batches.handle(started)
    await runtime.batches.handle(started)  # redelivered: counted once
    await runtime.batches.handle([step("u1", "c1", "Onboarding Step Completed", now - 30_000)])
    funnel = runtime.metrics.funnel_steps
    assert funnel.labels("signup", "profile", "started", "all")._value.get() == 2
    assert funnel.labels("signup", "profile", "completed", "all")._value.get() == 1
    seconds = runtime.metrics.funnel_step_seconds.labels("signup", "profile", "all")
    assert seconds._sum.get() == 60.0  # one completion, 60 s after its start
    groups = {s.labels["group"] for m in runtime.metrics.registry.collect() for s in m.samples
              if s.name == "onboarding_funnel_steps_total"}  # fmt: skip
    assert "all" in groups and all(g == "all" or g.startswith(("segment:", "cluster:")) for g in groups)


async def test_erasure_clears_deadlines_in_partitions_beyond_the_topics_file() -> None:
    """Partitions raised on the broker (not in topics.toml) reach this worker too: an erased
    user's deadlines go from those as well as from the declared ones."""
    stores = Stores(Settings(), in_memory=True)
    runtime = Runtime(Settings(), Sinks.in_memory(), stores)
    declared = runtime.timer.partitions
    runtime.timer.owned = {declared + 3}  # a partition the file does not know of
    await stores.deadlines.schedule(declared + 3, {"gone": 1_000, "kept": 2_000})
    await stores.deadlines.schedule(0, {"gone": 1_500})
    await runtime._forget(["gone"])
    assert await stores.deadlines.due(declared + 3, 10_000, 10) == [("kept", 2_000)]
    assert await stores.deadlines.due(0, 10_000, 10) == []
