"""The trigger configuration: ``config/triggers.toml`` (or TRIGGERS_FILE) plus STALL_* overrides.

Loading validates everything and raises :class:`TriggerConfigError` naming the table and
key at fault, so a bad file stops start-up with a message instead of misfiring later.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream_app.errors import StreamAppError

TRIGGER_TYPES = (
    "stalled_step",
    "onboarding_abandoned",
    "onboarding_completed",
    "repeated_help_views",
    "segment_entered",
)
_COMMON_KEYS = {"enabled", "cooldown", "reeligible_after", "holdout", "actions"}
_TYPE_KEYS: dict[str, set[str]] = {
    "stalled_step": {
        "multiplier",
        "min_samples",
        "default_mean",
        "default_mean_by_step",
        "min_threshold",
        "max_threshold",
    },
    "onboarding_abandoned": {"after"},
    "onboarding_completed": set(),
    "repeated_help_views": {"min_views"},
    "segment_entered": set(),
}


class TriggerConfigError(StreamAppError):
    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        super().__init__(f"triggers config [{where}]: {problem}")


@dataclass(frozen=True, slots=True)
class ActionRule:
    """``segment`` / ``cluster`` condition (None: always) and the action passed to the message."""

    action: Mapping[str, Any]
    segment: str | None = None
    cluster: str | None = None

    def matches(self, segments: frozenset[str], cluster_name: str | None) -> bool:
        if self.segment is not None and self.segment not in segments:
            return False
        return self.cluster is None or self.cluster == cluster_name


@dataclass(frozen=True, slots=True)
class TriggerType:
    name: str
    enabled: bool = True
    cooldown_ms: int = 0
    reeligible_after_ms: int | None = None  # None: once per subject
    holdout: float = 0.0
    actions: tuple[ActionRule, ...] = ()

    def action_for(self, segments: frozenset[str], cluster_name: str | None) -> ActionRule | None:
        return next((a for a in self.actions if a.matches(segments, cluster_name)), None)


@dataclass(frozen=True, slots=True)
class StallSettings:
    multiplier: float = 2.0
    min_samples: int = 20
    default_mean_s: float = 300.0
    default_mean_by_step: Mapping[str, float] = field(default_factory=dict)  # "flow/step" -> s
    min_threshold_s: float = 30.0
    max_threshold_s: float = 86_400.0


@dataclass(frozen=True, slots=True)
class TriggerConfig:
    types: Mapping[str, TriggerType]
    stall: StallSettings = StallSettings()
    abandon_after_ms: int = 86_400_000
    help_min_views: int = 3
    cap_per_day: int = 3
    max_delay_ms: int = 86_400_000
    allowed_lateness_ms: int = 5_000

    def enabled(self, name: str) -> TriggerType | None:
        t = self.types.get(name)
        return t if t is not None and t.enabled else None


def _number(where: str, key: str, value: Any, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TriggerConfigError(where, f"`{key}` must be a number, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
        raise TriggerConfigError(where, f"`{key}` must be {bound}, got {value!r}")
    return float(value)


def _actions(where: str, raw: Any) -> tuple[ActionRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise TriggerConfigError(where, "`actions` must be an array of tables ([[...actions]])")
    rules = []
    for i, entry in enumerate(raw):
        at = f"{where}.actions[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("action"), dict):
            raise TriggerConfigError(at, "needs `action = { kind = ... }`")
        unknown = set(entry) - {"action", "segment", "cluster"}
        if unknown:
            raise TriggerConfigError(at, f"unknown keys {sorted(unknown)}")
        if not isinstance(entry["action"].get("kind"), str):
            raise TriggerConfigError(at, "`action.kind` (a string) is required")
        for key in ("segment", "cluster"):
            if key in entry and not isinstance(entry[key], str):
                raise TriggerConfigError(at, f"`{key}` must be a string")
        rules.append(ActionRule(dict(entry["action"]), entry.get("segment"), entry.get("cluster")))
    return tuple(rules)


def parse_config(
    raw: Mapping[str, Any], overrides: Mapping[str, float | None] | None = None
) -> TriggerConfig:
    """Validate a parsed TOML document. ``overrides``: STALL_* settings that win when not None."""
    unknown = set(raw) - {*TRIGGER_TYPES, "limits"}
    if unknown:
        raise TriggerConfigError(
            sorted(unknown)[0], f"unknown table; trigger types are {', '.join(TRIGGER_TYPES)}"
        )
    types: dict[str, TriggerType] = {}
    for name in TRIGGER_TYPES:
        table = raw.get(name)
        if table is None:
            types[name] = TriggerType(name, enabled=False)
            continue
        if not isinstance(table, dict):
            raise TriggerConfigError(name, "must be a table")
        bad = set(table) - _COMMON_KEYS - _TYPE_KEYS[name]
        if bad:
            raise TriggerConfigError(name, f"unknown keys {sorted(bad)}")
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            raise TriggerConfigError(name, "`enabled` must be true or false")
        reeligible = table.get("reeligible_after")
        types[name] = TriggerType(
            name,
            enabled,
            int(_number(name, "cooldown", table.get("cooldown", 0)) * 1000),
            None if reeligible is None else int(_number(name, "reeligible_after", reeligible) * 1000),
            _number(name, "holdout", table.get("holdout", 0.0), 0.0, 1.0),
            _actions(name, table.get("actions")),
        )
    stall_raw = dict(raw.get("stalled_step") or {})
    for key, value in (overrides or {}).items():
        if value is not None:
            stall_raw[key] = value
    by_step = stall_raw.get("default_mean_by_step", {})
    if not isinstance(by_step, dict):
        raise TriggerConfigError("stalled_step", "`default_mean_by_step` must be a table of seconds")
    for key in by_step:
        if "/" not in key:
            raise TriggerConfigError("stalled_step.default_mean_by_step", f"{key!r} is not 'flow/step'")
    stall = StallSettings(
        multiplier=_number("stalled_step", "multiplier", stall_raw.get("multiplier", 2.0), 1.0),
        min_samples=int(_number("stalled_step", "min_samples", stall_raw.get("min_samples", 20), 1)),
        default_mean_s=_number("stalled_step", "default_mean", stall_raw.get("default_mean", 300), 0.001),
        default_mean_by_step={
            k: _number("stalled_step.default_mean_by_step", k, v, 0.001) for k, v in by_step.items()
        },
        min_threshold_s=_number("stalled_step", "min_threshold", stall_raw.get("min_threshold", 30)),
        max_threshold_s=_number("stalled_step", "max_threshold", stall_raw.get("max_threshold", 86_400)),
    )
    if stall.max_threshold_s < stall.min_threshold_s:
        raise TriggerConfigError("stalled_step", "`max_threshold` is below `min_threshold`")
    limits = raw.get("limits") or {}
    bad = set(limits) - {"cap_per_day", "max_delay", "allowed_lateness"}
    if bad:
        raise TriggerConfigError("limits", f"unknown keys {sorted(bad)}")
    return TriggerConfig(
        types=types,
        stall=stall,
        abandon_after_ms=int(
            _number(
                "onboarding_abandoned",
                "after",
                (raw.get("onboarding_abandoned") or {}).get("after", 86_400),
                1,
            )
            * 1000
        ),
        help_min_views=int(
            _number(
                "repeated_help_views",
                "min_views",
                (raw.get("repeated_help_views") or {}).get("min_views", 3),
                1,
            )
        ),
        cap_per_day=int(_number("limits", "cap_per_day", limits.get("cap_per_day", 3))),
        max_delay_ms=int(_number("limits", "max_delay", limits.get("max_delay", 86_400), 1) * 1000),
        allowed_lateness_ms=int(
            _number("limits", "allowed_lateness", limits.get("allowed_lateness", 5)) * 1000
        ),
    )


def load_triggers(path: Path, overrides: Mapping[str, float | None] | None = None) -> TriggerConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TriggerConfigError(str(path), f"cannot read: {exc}") from exc
    return parse_config(raw, overrides)
