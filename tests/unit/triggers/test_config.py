"""Trigger configuration: the shipped file loads, mistakes name where they are, STALL_* wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_app.configure import trigger_config
from stream_app.errors import ConfigError
from stream_app.paths import CONFIG_DIR
from stream_app.settings import Settings
from stream_app.triggers.config import TRIGGER_TYPES, TriggerConfigError, load_triggers, parse_config


def test_the_shipped_file_enables_every_type() -> None:
    config = load_triggers(CONFIG_DIR / "triggers.toml")
    assert all(config.enabled(t) for t in TRIGGER_TYPES)
    assert config.stall.multiplier == 2.0
    assert config.stall.default_mean_by_step["signup/connect_data"] == 600
    assert config.types["stalled_step"].holdout == 0.1


def test_environment_overrides_win_over_the_file() -> None:
    config = load_triggers(CONFIG_DIR / "triggers.toml", {"multiplier": 3.0, "min_samples": None})
    assert config.stall.multiplier == 3.0
    assert config.stall.min_samples == 20  # None: the file's value stays


@pytest.mark.parametrize(
    ("raw", "where", "fragment"),
    [
        ({"stalled_steps": {}}, "stalled_steps", "unknown table"),
        ({"stalled_step": {"multiplier": 0.5}}, "stalled_step", "`multiplier` must be >= 1"),
        ({"stalled_step": {"holdout": 1.5}}, "stalled_step", "between 0 and 1"),
        ({"stalled_step": {"cooldown": "1h"}}, "stalled_step", "must be a number"),
        ({"stalled_step": {"colour": 1}}, "stalled_step", "unknown keys ['colour']"),
        ({"stalled_step": {"actions": [{"segment": "x"}]}}, "stalled_step.actions[0]", "needs `action"),
        (
            {"stalled_step": {"default_mean_by_step": {"nostep": 3}}},
            "stalled_step.default_mean_by_step",
            "flow/step",
        ),
        ({"stalled_step": {"min_threshold": 100, "max_threshold": 10}}, "stalled_step", "below"),
        ({"limits": {"cap": 3}}, "limits", "unknown keys"),
    ],
)
def test_mistakes_name_the_table_and_key(raw: dict[str, object], where: str, fragment: str) -> None:
    with pytest.raises(TriggerConfigError) as err:
        parse_config(raw)
    assert err.value.where == where
    assert fragment in str(err.value)


def test_a_bad_file_stops_start_up_naming_the_setting(tmp_path: Path) -> None:
    bad = tmp_path / "t.toml"
    bad.write_text("[stalled_step]\nmultiplier = 0\n")
    with pytest.raises(ConfigError) as err:
        trigger_config(Settings.load(triggers_file=bad))
    assert err.value.setting == "TRIGGERS_FILE" and "multiplier" in str(err.value)


def test_a_bad_stall_setting_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.load(stall_multiplier=0.5)
    assert err.value.setting == "STALL_MULTIPLIER"
