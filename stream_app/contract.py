"""Validation and normalization of `onboarding.events` records: pure, no I/O.

``parse_event`` turns the raw bytes of one Kafka record into a normalized
:class:`Event` or an :class:`Invalid` with a machine-readable reason. It never
raises on input. It is the executable twin of ``schemas/onboarding.events.schema.json``;
``tests/unit/test_contract.py`` checks that both accept and reject the same documents.
Raw PII never leaves this module: ``context.ip`` is dropped, email/phone traits are
replaced by salted hashes.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import Any

import orjson

EVENT_TYPES = frozenset({"identify", "track", "page", "alias"})
MAX_ID_LENGTH = 256

STEP_STARTED = "Onboarding Step Started"
STEP_COMPLETED = "Onboarding Step Completed"
ONBOARDING_COMPLETED = "Onboarding Completed"
FEATURE_USED = "Feature Used"
SESSION_STARTED = "Session Started"
HELP_VIEWED = "Help Viewed"
DELETION_REQUESTED = "Data Deletion Requested"

#: Required string properties of the track events the engine understands.
REQUIRED_PROPERTIES: dict[str, tuple[str, ...]] = {
    STEP_STARTED: ("flow", "step"),
    STEP_COMPLETED: ("flow", "step"),
    ONBOARDING_COMPLETED: ("flow",),
    FEATURE_USED: ("feature",),
    HELP_VIEWED: ("step",),
}

#: Traits stored only as a salted hash (``<name>_sha256``); never in plain text.
HASHED_TRAITS = frozenset({"email", "phone"})
#: Traits never stored at all.
DROPPED_TRAITS = frozenset({"ip", "password"})


class Reason(StrEnum):
    """Machine-readable reasons an event is dead-lettered."""

    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    TOO_LARGE = "too_large"
    MISSING_MESSAGE_ID = "missing_message_id"
    MISSING_USER_ID = "missing_user_id"
    UNKNOWN_TYPE = "unknown_type"
    BAD_TIMESTAMP = "bad_timestamp"
    WRONG_TYPE = "wrong_type"
    MISSING_FIELD = "missing_field"


@dataclass(frozen=True, slots=True)
class Invalid:
    """An event that failed validation: where it goes is the dead-letter topic."""

    reason: Reason
    message: str


@dataclass(frozen=True, slots=True)
class Device:
    type: str | None = None  # mobile | tablet | desktop | bot | other
    os: str | None = None
    os_version: str | None = None
    browser: str | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """A validated, normalized event. Timestamps are UTC."""

    message_id: str
    type: str
    user_id: str | None
    anonymous_id: str | None
    ts_ms: int
    name: str | None = None  # track: event name; page: page name
    properties: dict[str, Any] = field(default_factory=dict)
    traits: dict[str, Any] | None = None
    previous_id: str | None = None
    consent_personalization: bool | None = None
    device: Device | None = None
    country: str | None = None
    city: str | None = None
    locale: str | None = None

    @property
    def profile_id(self) -> str:
        """The id whose profile this event updates: userId, else anonymousId."""
        return self.user_id or self.anonymous_id  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class ContractRules:
    """The knobs of validation, taken from :class:`~stream_app.settings.Settings`."""

    max_event_bytes: int = 64 * 1024
    max_future_skew_ms: int = 86_400_000
    pii_salt: bytes = b"dev-only-salt-change-me"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def iso_ms(ts_ms: int) -> str:
    """Render epoch milliseconds as ISO-8601 UTC with millisecond precision and a Z."""
    dt = _EPOCH + timedelta(milliseconds=ts_ms)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


def parse_timestamp(value: str) -> int:
    """ISO-8601 to epoch milliseconds (UTC). Naive times are read as UTC. Raises ValueError."""
    text = value.strip()
    if len(text) < 10:
        raise ValueError("too short")
    dt = datetime.fromisoformat(text.replace("z", "Z"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _ONE_MS  # exact integer arithmetic, no float rounding


def hash_pii(value: str, salt: bytes) -> str:
    """Salted SHA-256 (HMAC) of a normalized PII value: the only form in which it is kept."""
    return hmac.new(salt, value.strip().lower().encode(), hashlib.sha256).hexdigest()


def _sanitize_traits(traits: dict[str, Any], salt: bytes) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in traits.items():
        if key in DROPPED_TRAITS:
            continue
        if key in HASHED_TRAITS:
            if isinstance(value, str) and value.strip():
                clean[f"{key}_sha256"] = hash_pii(value, salt)
            continue
        if isinstance(value, dict) and "email" in value:
            value = {k: v for k, v in value.items() if k not in HASHED_TRAITS | DROPPED_TRAITS}
        clean[key] = value
    return clean


_MOBILE_OS = ("iOS", "Android")


@lru_cache(maxsize=8192)
def device_from_user_agent(user_agent: str) -> Device:
    """Device type, OS and browser from a User-Agent string (cached: UAs repeat a lot)."""
    import ua_parser  # lazy: its regex table takes ~0.2 s to load

    result = ua_parser.parse(user_agent)
    os_family = result.os.family if result.os else None
    browser = result.user_agent.family if result.user_agent else None
    model = result.device.model if result.device else None
    family = (result.device.family if result.device else "") or ""
    ua_lower = user_agent.lower()
    if family == "Spider" or "bot" in ua_lower:
        kind = "bot"
    elif "ipad" in ua_lower or "tablet" in ua_lower or ("android" in ua_lower and "mobile" not in ua_lower):
        kind = "tablet"
    elif os_family in _MOBILE_OS or "mobile" in ua_lower:
        kind = "mobile"
    elif os_family in ("Windows", "Mac OS X", "Linux", "Ubuntu", "Chrome OS", "Fedora"):
        kind = "desktop"
    else:
        kind = "other"
    os_version = None
    if result.os and result.os.major:
        os_version = ".".join(p for p in (result.os.major, result.os.minor) if p)
    return Device(
        type=kind,
        os=None if os_family in (None, "Other") else os_family,
        os_version=os_version,
        browser=None if browser in (None, "Other") else browser,
        model=None if model in (None, "Other") else model,
    )


_DEVICE_TYPES = {
    "ios": "mobile",
    "android": "mobile",
    "phone": "mobile",
    "web": "desktop",
    "pc": "desktop",
}


def _normalize_device(context: dict[str, Any]) -> Device | None:
    device: dict[str, Any] = context.get("device") or {}
    os_info: dict[str, Any] = context.get("os") or {}
    fields = (
        context.get("userAgent"),
        device.get("type"),
        os_info.get("name"),
        os_info.get("version"),
        device.get("model"),
    )
    try:
        return _device_for(*fields)
    except TypeError:  # an unhashable value where a string belongs: ignore those fields
        return _device_for(*(f if isinstance(f, str) else None for f in fields))


@lru_cache(maxsize=8192)
def _device_for(ua: Any, dtype: Any, os_name: Any, os_version: Any, model: Any) -> Device | None:
    """Device from the context fields (cached: a stream repeats a few thousand combinations)."""
    parsed = device_from_user_agent(ua[:1024]) if isinstance(ua, str) and ua else Device()
    kind = dtype.strip().lower() if isinstance(dtype, str) and dtype.strip() else None
    if kind:
        kind = _DEVICE_TYPES.get(kind, kind)
    merged = Device(
        type=kind or parsed.type,
        os=(os_name if isinstance(os_name, str) and os_name else None) or parsed.os,
        os_version=(os_version if isinstance(os_version, str) and os_version else None) or parsed.os_version,
        browser=parsed.browser,
        model=(model if isinstance(model, str) and model else None) or parsed.model,
    )
    return None if merged == Device() else merged


def _wrong(path: str, expected: str) -> Invalid:
    return Invalid(Reason.WRONG_TYPE, f"{path} must be {expected}")


def _required_str(doc: dict[str, Any], key: str, missing: Reason, what: str) -> str | Invalid:
    """A non-empty string of at most MAX_ID_LENGTH characters, or why not."""
    value = doc.get(key)
    if value is None or value == "":
        return Invalid(missing, f"{what} (non-empty)")
    if not isinstance(value, str):
        return _wrong(key, "a string")
    if len(value) > MAX_ID_LENGTH:
        return _wrong(key, f"at most {MAX_ID_LENGTH} characters")
    return value


def _opt_str(doc: dict[str, Any], key: str) -> str | Invalid | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        return _wrong(key, "a string")
    if len(value) > MAX_ID_LENGTH:
        return _wrong(key, f"at most {MAX_ID_LENGTH} characters")
    return value or None


def _opt_obj(doc: dict[str, Any], key: str, path: str) -> dict[str, Any] | Invalid:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        return _wrong(path, "an object")
    return value


def parse_event(raw: bytes, rules: ContractRules, broker_ts_ms: int | None, now_ms: int) -> Event | Invalid:
    """Validate and normalize one record value. Never raises on any input bytes."""
    if len(raw) > rules.max_event_bytes:
        return Invalid(Reason.TOO_LARGE, f"{len(raw)} bytes exceeds the limit of {rules.max_event_bytes}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Invalid(Reason.NOT_JSON, f"not valid UTF-8 JSON: {exc}")
    if not isinstance(doc, dict):
        return Invalid(Reason.NOT_OBJECT, f"top level is a JSON {type(doc).__name__}, not an object")
    try:
        return _parse_object(doc, rules, broker_ts_ms, now_ms)
    except Exception as exc:  # a last guard: bad input must never kill the agent
        return Invalid(Reason.WRONG_TYPE, f"unprocessable event: {exc!r}"[:500])


def _parse_object(
    doc: dict[str, Any], rules: ContractRules, broker_ts_ms: int | None, now_ms: int
) -> Event | Invalid:
    message_id = _required_str(doc, "messageId", Reason.MISSING_MESSAGE_ID, "messageId is required")
    if isinstance(message_id, Invalid):
        return message_id

    etype = doc.get("type")
    if not isinstance(etype, str) or etype not in EVENT_TYPES:
        return Invalid(Reason.UNKNOWN_TYPE, f"type {etype!r} is not one of identify, track, page, alias")

    user_id = _opt_str(doc, "userId")
    if isinstance(user_id, Invalid):
        return user_id
    anonymous_id = _opt_str(doc, "anonymousId")
    if isinstance(anonymous_id, Invalid):
        return anonymous_id
    if not user_id and not anonymous_id:
        return Invalid(Reason.MISSING_USER_ID, "userId or anonymousId is required")

    ts_raw = doc.get("timestamp")
    if ts_raw is None:
        if broker_ts_ms is None:
            return Invalid(Reason.BAD_TIMESTAMP, "no timestamp and no record timestamp")
        ts_ms = broker_ts_ms
    elif not isinstance(ts_raw, str):
        return Invalid(Reason.BAD_TIMESTAMP, "timestamp must be an ISO-8601 string")
    else:
        try:
            ts_ms = parse_timestamp(ts_raw)
        except (ValueError, OverflowError, OSError):
            return Invalid(Reason.BAD_TIMESTAMP, f"timestamp {ts_raw[:64]!r} is not ISO-8601")
    if ts_ms < 946_684_800_000:  # 2000-01-01
        return Invalid(Reason.BAD_TIMESTAMP, "timestamp is before 2000-01-01")
    if ts_ms > now_ms + rules.max_future_skew_ms:
        return Invalid(Reason.BAD_TIMESTAMP, "timestamp is too far in the future")

    context = _opt_obj(doc, "context", "context")
    if isinstance(context, Invalid):
        return context
    properties = _opt_obj(doc, "properties", "properties")
    if isinstance(properties, Invalid):
        return properties
    traits_doc = _opt_obj(doc, "traits", "traits")
    if isinstance(traits_doc, Invalid):
        return traits_doc
    for sub in ("device", "os", "app", "location", "consent"):
        if isinstance(checked := _opt_obj(context, sub, f"context.{sub}"), Invalid):
            return checked
    for sub in ("locale", "userAgent", "ip", "timezone"):
        if sub in context and not isinstance(context[sub], str):
            return _wrong(f"context.{sub}", "a string")

    name: str | None = None
    if etype == "track":
        event_name = _required_str(doc, "event", Reason.MISSING_FIELD, "track events need an event name")
        if isinstance(event_name, Invalid):
            return event_name
        name = event_name
        for prop in REQUIRED_PROPERTIES.get(event_name, ()):
            value = properties.get(prop)
            if value is None or value == "":
                return Invalid(Reason.MISSING_FIELD, f"{event_name!r} needs properties.{prop}")
            if not isinstance(value, str):
                return _wrong(f"properties.{prop}", "a string")
    elif "event" in doc:  # the schema types `event` on every event, even where the engine ignores it
        checked_event = _required_str(doc, "event", Reason.WRONG_TYPE, "event must be a string")
        if isinstance(checked_event, Invalid):
            return checked_event
    page_name = _opt_str(doc, "name")
    if isinstance(page_name, Invalid):
        return page_name
    if etype == "page":
        name = page_name

    previous_id: str | None = None
    prev = _opt_str(doc, "previousId")
    if isinstance(prev, Invalid):
        return prev
    if etype == "alias":
        if not prev:
            return Invalid(Reason.MISSING_FIELD, "alias events need previousId")
        if not user_id:
            return Invalid(Reason.MISSING_FIELD, "alias events need userId")
        previous_id = prev

    consent: bool | None = None
    consent_doc = context.get("consent")
    if isinstance(consent_doc, dict):
        prefs = consent_doc.get("categoryPreferences")
        if prefs is not None and not isinstance(prefs, dict):
            return _wrong("context.consent.categoryPreferences", "an object")
        if isinstance(prefs, dict) and "personalization" in prefs:
            if not isinstance(prefs["personalization"], bool):
                return _wrong("context.consent.categoryPreferences.personalization", "a boolean")
            consent = prefs["personalization"]

    location = context.get("location") or {}
    country = location.get("country")
    city = location.get("city")
    locale = context.get("locale")
    return Event(
        message_id=message_id,
        type=etype,
        user_id=user_id,
        anonymous_id=anonymous_id,
        ts_ms=ts_ms,
        name=name,
        properties=properties,
        traits=_sanitize_traits(traits_doc, rules.pii_salt) if etype == "identify" else None,
        previous_id=previous_id,
        consent_personalization=consent,
        device=_normalize_device(context),
        country=country.strip().upper() if isinstance(country, str) and country.strip() else None,
        city=city.strip() if isinstance(city, str) and city.strip() else None,
        locale=locale.strip() if isinstance(locale, str) and locale.strip() else None,
    )
