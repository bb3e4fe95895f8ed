"""The settings turned into the rule objects of the pure layers (contract, profile, identity,
segments, triggers). Every process that decides anything (worker, collector, CLI) builds them
here, so all of them decide by the same settings. No I/O beyond reading the config files; a
bad file stops start-up with a ConfigError naming its setting.
"""

from __future__ import annotations

from stream_app.contract import ContractRules, blocked_id_set
from stream_app.errors import ConfigError
from stream_app.identity import IdentityRules
from stream_app.paths import CONFIG_DIR
from stream_app.personalization.config import (
    PersonalizationConfig,
    PersonalizationConfigError,
    load_config,
)
from stream_app.privacy import PolicyError, TraitsPolicy, load_policy, shipped_policy
from stream_app.profile import ProfileRules
from stream_app.segments.rules import RuleError, SegmentSet, load_segments
from stream_app.settings import Settings
from stream_app.triggers.config import TriggerConfig, TriggerConfigError, load_triggers

DAY_MS = 86_400_000


def traits_policy(settings: Settings) -> TraitsPolicy:
    if settings.traits_policy_file is None:
        return shipped_policy()
    try:
        return load_policy(settings.traits_policy_file)
    except PolicyError as exc:
        raise ConfigError("TRAITS_POLICY_FILE", str(exc)) from exc


def contract_rules(settings: Settings) -> ContractRules:
    return ContractRules(
        traits_policy=traits_policy(settings),
        max_event_bytes=settings.max_event_bytes,
        max_future_skew_ms=int(settings.max_future_skew_seconds * 1000),
        pii_salt=settings.pii_hash_salt.get_secret_value().encode(),
        blocked_ids=blocked_id_set(settings.identity_blocked_ids),
    )


def identity_rules(settings: Settings) -> IdentityRules:
    return IdentityRules(
        max_merged_ids=settings.identity_max_merged_ids, merge_identified=settings.identity_merge_identified
    )


def profile_rules(settings: Settings) -> ProfileRules:
    return ProfileRules(
        session_gap_ms=settings.session_gap_seconds * 1000,
        active_min_sessions=settings.lifecycle_active_min_sessions,
        dormant_after_ms=int(settings.lifecycle_dormant_after_days * DAY_MS),
        churned_after_ms=int(settings.lifecycle_churned_after_days * DAY_MS),
    )


def trigger_config(settings: Settings) -> TriggerConfig:
    overrides = {
        "multiplier": settings.stall_multiplier,
        "min_samples": settings.stall_min_samples,
        "default_mean": settings.stall_default_mean_seconds,
        "min_threshold": settings.stall_min_threshold_seconds,
        "max_threshold": settings.stall_max_threshold_seconds,
    }
    try:
        return load_triggers(settings.triggers_file or CONFIG_DIR / "triggers.toml", overrides)
    except TriggerConfigError as exc:
        raise ConfigError("TRIGGERS_FILE", str(exc)) from exc


def segment_set(settings: Settings) -> SegmentSet:
    try:
        return load_segments(settings.segments_file or CONFIG_DIR / "segments.toml", settings.segments_max)
    except RuleError as exc:
        raise ConfigError("SEGMENTS_FILE", str(exc)) from exc


def personalization_config(settings: Settings) -> PersonalizationConfig:
    """Checklists and flags, their segment names checked against the rule segments."""
    names = frozenset(segment_set(settings).definitions)
    try:
        return load_config(settings.personalization_file or CONFIG_DIR / "personalization.toml", names)
    except PersonalizationConfigError as exc:
        raise ConfigError("PERSONALIZATION_FILE", str(exc)) from exc
