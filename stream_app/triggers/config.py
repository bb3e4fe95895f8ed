"""The trigger configuration: ``config/triggers.toml`` (or TRIGGERS_FILE) plus STALL_* overrides.

Loading validates everything and raises :class:`TriggerConfigError` naming the table and
key at fault, so a bad file stops start-up with a message instead of misfiring later.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from stream_app.errors import StreamAppError
from stream_app.tomlmodels import Strict, TomlError, validate

TRIGGER_TYPES = (
    "stalled_step",
    "onboarding_abandoned",
    "onboarding_completed",
    "repeated_help_views",
    "segment_entered",
)


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
class Variant:
    """One arm of an experiment on a trigger type: its name, share weight, and the action
    fields it sets over the matched action's (e.g. another ``template``)."""

    name: str
    weight: float = 1.0
    action: Mapping[str, Any] = field(default_factory=dict)


def pick_by_weight(point: float, variants: Sequence[Variant]) -> Variant:
    """The variant at ``point`` in [0, 1) of the variants laid end to end by weight."""
    point *= sum(v.weight for v in variants)
    for variant in variants:
        point -= variant.weight
        if point < 0:
            return variant
    return variants[-1]


@dataclass(frozen=True, slots=True)
class TriggerType:
    name: str
    enabled: bool = True
    cooldown_ms: int = 0
    reeligible_after_ms: int | None = None  # None: once per subject
    holdout: float = 0.0
    actions: tuple[ActionRule, ...] = ()
    variants: tuple[Variant, ...] = ()  # an A/B/n test among treated users (none: no test)
    #: "split": each user's variant by a hash (a fixed-horizon experiment); "bandit": chosen
    #: per trigger from the outcomes so far, per cluster (:mod:`stream_app.triggers.bandit`)
    policy: str = "split"
    exploration: float = 0.1  # bandit: share of triggers whose variant is drawn by weight
    reward: str = "clicked"  # bandit: the outcome that counts as success

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


class _Action(Strict):
    action: dict[str, Any]
    segment: str | None = None
    cluster: str | None = None

    @field_validator("action")
    @classmethod
    def _kind(cls, action: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(action.get("kind"), str):
            raise ValueError("`action.kind` (a string) is required")
        return action


class _Variant(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    weight: float = Field(1.0, gt=0)
    action: dict[str, Any] = Field(default_factory=dict)


class _Type(Strict):
    enabled: bool = True
    cooldown: float = Field(0, ge=0)
    reeligible_after: float | None = Field(None, ge=0)
    holdout: float = Field(0.0, ge=0, le=1)
    actions: list[_Action] = Field(default_factory=list)
    variants: list[_Variant] = Field(default_factory=list)
    policy: Literal["split", "bandit"] = "split"
    exploration: float = Field(0.1, ge=0, le=1)
    reward: Literal["opened", "clicked"] = "clicked"

    @model_validator(mode="after")
    def _bandit_needs_arms(self) -> _Type:
        if self.policy == "bandit" and not self.variants:
            raise ValueError("policy = 'bandit' chooses among variants: declare at least two")
        return self

    @field_validator("variants")
    @classmethod
    def _arms(cls, variants: list[_Variant]) -> list[_Variant]:
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must differ, got {names}")
        if len(variants) == 1:
            raise ValueError("an experiment needs at least two variants (or none)")
        return variants


class _Stalled(_Type):
    multiplier: float = Field(2.0, ge=1)
    min_samples: int = Field(20, ge=1)
    default_mean: float = Field(300, gt=0)
    default_mean_by_step: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    min_threshold: float = Field(30, ge=0)
    max_threshold: float = Field(86_400, ge=0)

    @field_validator("default_mean_by_step")
    @classmethod
    def _steps(cls, by_step: dict[str, float]) -> dict[str, float]:
        for key in by_step:
            if "/" not in key:
                raise ValueError(f"{key!r} is not 'flow/step'")
        return by_step

    @model_validator(mode="after")
    def _clamp(self) -> _Stalled:
        if self.max_threshold < self.min_threshold:
            raise ValueError("`max_threshold` is below `min_threshold`")
        return self


class _Abandoned(_Type):
    after: float = Field(86_400, ge=1)


class _HelpViews(_Type):
    min_views: int = Field(3, ge=1)


class _Limits(Strict):
    cap_per_day: int = Field(3, ge=0)
    max_delay: float = Field(86_400, ge=1)
    allowed_lateness: float = Field(5, ge=0)


class _File(Strict):
    limits: _Limits = Field(default_factory=_Limits)
    stalled_step: _Stalled | None = None
    onboarding_abandoned: _Abandoned | None = None
    onboarding_completed: _Type | None = None
    repeated_help_views: _HelpViews | None = None
    segment_entered: _Type | None = None


def parse_config(
    raw: Mapping[str, Any], overrides: Mapping[str, float | None] | None = None
) -> TriggerConfig:
    """Validate a parsed TOML document. ``overrides``: STALL_* settings that win when not None."""
    unknown = set(raw) - {*TRIGGER_TYPES, "limits"}
    if unknown:
        raise TriggerConfigError(
            sorted(unknown)[0], f"unknown table; trigger types are {', '.join(TRIGGER_TYPES)}"
        )
    document = dict(raw)
    stall_raw = dict(document.get("stalled_step") or {})
    set_stall = {k: v for k, v in (overrides or {}).items() if v is not None}
    if set_stall:
        document["stalled_step"] = {**stall_raw, **set_stall}
    try:
        parsed = validate(_File, document)
    except TomlError as exc:
        raise TriggerConfigError(exc.where, exc.problem) from exc
    types: dict[str, TriggerType] = {}
    for name in TRIGGER_TYPES:
        table: _Type | None = getattr(parsed, name)
        if table is None or (name == "stalled_step" and "stalled_step" not in raw):
            types[name] = TriggerType(name, enabled=False)
            continue
        types[name] = TriggerType(
            name,
            table.enabled,
            int(table.cooldown * 1000),
            None if table.reeligible_after is None else int(table.reeligible_after * 1000),
            table.holdout,
            tuple(ActionRule(dict(a.action), a.segment, a.cluster) for a in table.actions),
            tuple(Variant(v.name, v.weight, dict(v.action)) for v in table.variants),
            table.policy,
            table.exploration,
            table.reward,
        )
    st = parsed.stalled_step or _Stalled()
    stall = StallSettings(
        multiplier=st.multiplier,
        min_samples=st.min_samples,
        default_mean_s=st.default_mean,
        default_mean_by_step=dict(st.default_mean_by_step),
        min_threshold_s=st.min_threshold,
        max_threshold_s=st.max_threshold,
    )
    limits = parsed.limits
    return TriggerConfig(
        types=types,
        stall=stall,
        abandon_after_ms=int((parsed.onboarding_abandoned or _Abandoned()).after * 1000),
        help_min_views=(parsed.repeated_help_views or _HelpViews()).min_views,
        cap_per_day=limits.cap_per_day,
        max_delay_ms=int(limits.max_delay * 1000),
        allowed_lateness_ms=int(limits.allowed_lateness * 1000),
    )


def load_triggers(path: Path, overrides: Mapping[str, float | None] | None = None) -> TriggerConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TriggerConfigError(str(path), f"cannot read: {exc}") from exc
    return parse_config(raw, overrides)
