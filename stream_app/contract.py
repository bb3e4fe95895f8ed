"""Validation and normalization of `onboarding.events` records: pure, no I/O.

``parse_event`` turns the raw bytes of one Kafka record into a normalized
:class:`Event` or an :class:`Invalid` with a machine-readable reason. It never
raises on input. It is the executable twin of ``schemas/onboarding.events.schema.json``;
``tests/unit/test_contract.py`` checks that both accept and reject the same documents.

Time: ``Event.ts_ms`` is the client's ``timestamp``, corrected for the client's clock
when the event carries ``sentAt`` (Segment's rule, ``receivedAt - (sentAt - timestamp)``;
an event with ``originalTimestamp`` was corrected by the collector already), and never
later than the Kafka record timestamp, which a producer or broker clock set after the
event happened: a client clock that runs ahead cannot put an event in the future.

Identity: ids that SDK bugs send (``"undefined"``, ``"null"``, ``"0"``...) are listed in
``ContractRules.blocked_ids``; such a ``userId``/``anonymousId`` is treated as absent, so
it can never become a profile that collects strangers' events.

Raw PII never leaves this module: ``context.ip`` is dropped, traits pass the traits
policy (:mod:`stream_app.privacy`: kept, hashed or dropped by name, at any depth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import Any

import orjson

from stream_app.privacy import TraitsPolicy, apply_policy, shipped_policy

EVENT_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
MAX_ID_LENGTH = 256
#: flow, step and feature names become keys and statistics rows: longer ones are dead-lettered
MAX_NAME_LENGTH = 128

STEP_STARTED = "Onboarding Step Started"
STEP_COMPLETED = "Onboarding Step Completed"
ONBOARDING_COMPLETED = "Onboarding Completed"
FEATURE_USED = "Feature Used"
SESSION_STARTED = "Session Started"
HELP_VIEWED = "Help Viewed"
DELETION_REQUESTED = "Data Deletion Requested"
#: What happened to an intervention, sent back by notification services or the app
#: (properties.trigger_id names the trigger): event name -> outcome
OUTCOME_EVENTS: dict[str, str] = {
    "Intervention Delivered": "delivered",
    "Intervention Opened": "opened",
    "Intervention Clicked": "clicked",
    "Intervention Dismissed": "dismissed",
}

#: Required string properties of the track events the engine understands.
REQUIRED_PROPERTIES: dict[str, tuple[str, ...]] = {
    STEP_STARTED: ("flow", "step"),
    STEP_COMPLETED: ("flow", "step"),
    ONBOARDING_COMPLETED: ("flow",),
    FEATURE_USED: ("feature",),
    HELP_VIEWED: ("step",),
    **dict.fromkeys(OUTCOME_EVENTS, ("trigger_id",)),
}


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
    BLOCKED_ID = "blocked_id"
    TOO_LONG = "too_long"
    #: a valid record whose processing fails for good (parked by the worker; not a contract breach)
    PROCESSING_FAILED = "processing_failed"


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
    #: Kafka record timestamp (producer or broker clock): the trusted time the event was received
    received_ms: int | None = None
    #: how far the client's (corrected) time was ahead of ``received_ms`` before it was capped
    ahead_ms: int = 0
    group_id: str | None = None  # group: the account/company id
    dropped_traits: int = 0  # traits the policy did not let in (counted by the worker)
    #: (partition, offset) of the Kafka record it came in: orders what it changes (step statistics)
    source: tuple[int, int] | None = None

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
    #: ids treated as absent, compared after trimming and lower-casing (:func:`blocked_id_set`)
    blocked_ids: frozenset[str] = field(default_factory=lambda: DEFAULT_BLOCKED_IDS)
    #: which traits are kept, hashed or dropped (:mod:`stream_app.privacy`; default: config/traits.toml)
    traits_policy: TraitsPolicy = field(default_factory=shipped_policy)


#: Values SDKs and bugs send where an id belongs (Segment and RudderStack block such lists).
#: Compared after trimming and lower-casing; an empty or blank id is always absent.
DEFAULT_BLOCKED_IDS: frozenset[str] = frozenset(
    {
        "null",
        "undefined",
        "none",
        "nil",
        "nan",
        "0",
        "-1",
        "anonymous",
        "unknown",
        "[object object]",
        "{}",
        "[]",
        '""',
        "''",
        "00000000-0000-0000-0000-000000000000",
    }
)


def blocked_id_set(values: str | None) -> frozenset[str]:
    """The blocked-id list from a comma-separated setting (None: the defaults)."""
    if values is None:
        return DEFAULT_BLOCKED_IDS
    return frozenset(v.strip().lower() for v in values.split(",") if v.strip())


def is_blocked_id(value: str, blocked: frozenset[str]) -> bool:
    text = value.strip()
    return not text or text.lower() in blocked


_REGEX_SPECIALS = set("\\^$.|?*+()[]{}")


def blocked_id_pattern(blocked: frozenset[str] = DEFAULT_BLOCKED_IDS) -> str:
    """The blocked ids as a case-insensitive regex without flags (JSON Schema has none):
    ``schemas/onboarding.events.schema.json`` carries it, a test keeps the two in step."""

    def one(value: str) -> str:
        return "".join(
            f"[{c.upper()}{c.lower()}]"
            if c.upper() != c.lower()
            else ("\\" + c if c in _REGEX_SPECIALS else c)
            for c in value
        )

    return "^\\s*(?:" + "|".join(one(v) for v in sorted(blocked)) + ")?\\s*$"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def iso_ms(ts_ms: int) -> str:
    """Render epoch milliseconds as ISO-8601 UTC with millisecond precision and a Z."""
    return f"{_iso_seconds(ts_ms // 1000)}.{ts_ms % 1000:03d}Z"


@lru_cache(maxsize=4096)
def _iso_seconds(seconds: int) -> str:
    # cached: a batch renders many times within the same few seconds (strftime is the cost)
    return (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")


def parse_timestamp(value: str) -> int:
    """ISO-8601 to epoch milliseconds (UTC). Naive times are read as UTC. Raises ValueError."""
    text = value.strip()
    if len(text) < 10:
        raise ValueError("too short")
    dt = datetime.fromisoformat(text.replace("z", "Z"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _ONE_MS  # exact integer arithmetic, no float rounding


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


def parse_event(
    raw: bytes,
    rules: ContractRules,
    broker_ts_ms: int | None,
    now_ms: int,
    source: tuple[int, int] | None = None,
) -> Event | Invalid:
    """Validate and normalize one record value (``source``: its record's (partition, offset),
    when it came from Kafka). Never raises on any input bytes."""
    if len(raw) > rules.max_event_bytes:
        return Invalid(Reason.TOO_LARGE, f"{len(raw)} bytes exceeds the limit of {rules.max_event_bytes}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Invalid(Reason.NOT_JSON, f"not valid UTF-8 JSON: {exc}")
    if not isinstance(doc, dict):
        return Invalid(Reason.NOT_OBJECT, f"top level is a JSON {type(doc).__name__}, not an object")
    try:
        return _parse_object(doc, rules, broker_ts_ms, now_ms, source)
    except Exception as exc:  # a last guard: bad input must never kill the agent
        return Invalid(Reason.WRONG_TYPE, f"unprocessable event: {exc!r}"[:500])


def _parse_object(
    doc: dict[str, Any],
    rules: ContractRules,
    broker_ts_ms: int | None,
    now_ms: int,
    source: tuple[int, int] | None,
) -> Event | Invalid:
    message_id = _required_str(doc, "messageId", Reason.MISSING_MESSAGE_ID, "messageId is required")
    if isinstance(message_id, Invalid):
        return message_id

    etype = doc.get("type")
    if not isinstance(etype, str) or etype not in EVENT_TYPES:
        return Invalid(Reason.UNKNOWN_TYPE, f"type {etype!r} is not one of {', '.join(sorted(EVENT_TYPES))}")

    user_id = _opt_str(doc, "userId")
    if isinstance(user_id, Invalid):
        return user_id
    anonymous_id = _opt_str(doc, "anonymousId")
    if isinstance(anonymous_id, Invalid):
        return anonymous_id
    blocked = rules.blocked_ids
    if user_id is not None and is_blocked_id(user_id, blocked):
        user_id = None  # an SDK's placeholder, not a person: the event stays anonymous
    if anonymous_id is not None and is_blocked_id(anonymous_id, blocked):
        anonymous_id = None
    if not user_id and not anonymous_id:
        if doc.get("userId") or doc.get("anonymousId"):
            return Invalid(
                Reason.BLOCKED_ID,
                f"userId/anonymousId {str(doc.get('userId') or doc.get('anonymousId'))[:40]!r} "
                "is a blocked placeholder value and there is no other id",
            )
        return Invalid(Reason.MISSING_USER_ID, "userId or anonymousId is required")

    times = _event_time(doc, broker_ts_ms)
    if isinstance(times, Invalid):
        return times
    ts_ms, ahead_ms = times
    if ts_ms < 946_684_800_000:  # 2000-01-01
        return Invalid(Reason.BAD_TIMESTAMP, "timestamp is before 2000-01-01")
    if ts_ms + ahead_ms > now_ms + rules.max_future_skew_ms:
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
            if len(value) > MAX_NAME_LENGTH:
                return Invalid(
                    Reason.TOO_LONG,
                    f"properties.{prop} is {len(value)} characters; at most {MAX_NAME_LENGTH}",
                )
        variant = properties.get("variant")
        if event_name in OUTCOME_EVENTS and "variant" in properties:
            if not isinstance(variant, str):
                return _wrong("properties.variant", "a string")
            if len(variant) > MAX_NAME_LENGTH:
                return Invalid(Reason.TOO_LONG, f"properties.variant is longer than {MAX_NAME_LENGTH}")
    elif "event" in doc:  # the schema types `event` on every event, even where the engine ignores it
        checked_event = _required_str(doc, "event", Reason.WRONG_TYPE, "event must be a string")
        if isinstance(checked_event, Invalid):
            return checked_event
    page_name = _opt_str(doc, "name")
    if isinstance(page_name, Invalid):
        return page_name
    if etype in ("page", "screen"):
        name = page_name

    previous_id: str | None = None
    prev = _opt_str(doc, "previousId")
    if isinstance(prev, Invalid):
        return prev
    if etype == "alias":
        if not prev:
            return Invalid(Reason.MISSING_FIELD, "alias events need previousId")
        if is_blocked_id(prev, blocked):
            return Invalid(Reason.BLOCKED_ID, f"previousId {prev[:40]!r} is a blocked placeholder value")
        if not user_id:
            if doc.get("userId"):
                return Invalid(Reason.BLOCKED_ID, "alias userId is a blocked placeholder value")
            return Invalid(Reason.MISSING_FIELD, "alias events need userId")
        previous_id = prev

    group_id: str | None = None
    if etype == "group":
        gid = doc.get("groupId")
        if isinstance(gid, int) and not isinstance(gid, bool):
            gid = str(gid)  # analytics SDKs pass numeric account ids through
        if gid is None or gid == "":
            return Invalid(Reason.MISSING_FIELD, "group events need groupId")
        if not isinstance(gid, str) or len(gid) > MAX_ID_LENGTH:
            return _wrong("groupId", f"a string of at most {MAX_ID_LENGTH} characters")
        group_id = gid

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

    traits: dict[str, Any] | None = None
    dropped_traits = 0
    if etype in ("identify", "group"):
        traits, dropped_traits = apply_policy(traits_doc, rules.traits_policy, rules.pii_salt)

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
        traits=traits,
        previous_id=previous_id,
        consent_personalization=consent,
        device=_normalize_device(context),
        country=country.strip().upper() if isinstance(country, str) and country.strip() else None,
        city=city.strip() if isinstance(city, str) and city.strip() else None,
        locale=locale.strip() if isinstance(locale, str) and locale.strip() else None,
        received_ms=broker_ts_ms,
        ahead_ms=ahead_ms,
        group_id=group_id,
        dropped_traits=dropped_traits,
        source=source,
    )


def _iso_field(doc: dict[str, Any], key: str) -> int | Invalid | None:
    raw = doc.get(key)
    if raw is None:
        return None
    if not isinstance(raw, str):
        return Invalid(Reason.BAD_TIMESTAMP, f"{key} must be an ISO-8601 string")
    try:
        return parse_timestamp(raw)
    except (ValueError, OverflowError, OSError):
        return Invalid(Reason.BAD_TIMESTAMP, f"{key} {raw[:64]!r} is not ISO-8601")


def _event_time(doc: dict[str, Any], record_ms: int | None) -> tuple[int, int] | Invalid:
    """(event time, how far it was ahead of the record timestamp before being capped).

    The client's ``timestamp`` (the record time when absent); corrected by ``sentAt`` as
    Segment does unless ``originalTimestamp`` says the collector did it already; capped at
    the record timestamp (see the module docstring).
    """
    stamped = _iso_field(doc, "timestamp")
    if isinstance(stamped, Invalid):
        return stamped
    if stamped is None:
        if record_ms is None:
            return Invalid(Reason.BAD_TIMESTAMP, "no timestamp and no record timestamp")
        return record_ms, 0
    ts_ms = stamped
    if "originalTimestamp" not in doc:
        sent = _iso_field(doc, "sentAt")
        received = _iso_field(doc, "receivedAt")
        if isinstance(sent, Invalid):
            return sent
        if isinstance(received, Invalid):
            return received
        received = received if received is not None else record_ms
        if sent is not None and received is not None:
            ts_ms = received - (sent - ts_ms)
    if record_ms is not None and ts_ms > record_ms:
        return record_ms, ts_ms - record_ms
    return ts_ms, 0
