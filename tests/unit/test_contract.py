"""The validator and the JSON Schema are two statements of one contract: they must agree."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from stream_app.contract import (
    ContractRules,
    Event,
    Invalid,
    Reason,
    device_from_user_agent,
    hash_pii,
    iso_ms,
    parse_event,
    parse_timestamp,
)
from stream_app.paths import SCHEMAS_DIR

RULES = ContractRules(max_event_bytes=64 * 1024, max_future_skew_ms=86_400_000, pii_salt=b"test-salt")
NOW_MS = 1_795_000_000_000  # 2026-11-18
SCHEMA = Draft202012Validator(json.loads((SCHEMAS_DIR / "onboarding.events.schema.json").read_text()))
IPHONE_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1"
)


def parse(doc: Any, broker_ts: int | None = None) -> Event | Invalid:
    return parse_event(orjson.dumps(doc), RULES, broker_ts, NOW_MS)


def base(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": "page",
        "messageId": "m-1",
        "userId": "u-1",
        "timestamp": "2026-11-18T10:00:00Z",
    }
    doc.update(extra)
    return doc


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", Reason.NOT_JSON),
        (b"\xff\xfe\x00garbage", Reason.NOT_JSON),
        (b"[1, 2]", Reason.NOT_OBJECT),
        (b'"a string"', Reason.NOT_OBJECT),
        (b"x" * (1024 * 1024), Reason.TOO_LARGE),
        (orjson.dumps({"type": "track", "event": "x", "userId": "u"}), Reason.MISSING_MESSAGE_ID),
        (orjson.dumps(base(messageId="")), Reason.MISSING_MESSAGE_ID),
        (orjson.dumps(base(messageId=7)), Reason.WRONG_TYPE),
        (orjson.dumps(base(userId=None)), Reason.MISSING_USER_ID),
        (orjson.dumps(base(userId="", anonymousId="")), Reason.MISSING_USER_ID),
        (orjson.dumps(base(type="screen")), Reason.UNKNOWN_TYPE),
        (orjson.dumps(base(type=None)), Reason.UNKNOWN_TYPE),
        (orjson.dumps(base(timestamp="yesterday")), Reason.BAD_TIMESTAMP),
        (orjson.dumps(base(timestamp=12345)), Reason.BAD_TIMESTAMP),
        (orjson.dumps(base(timestamp="2099-01-01T00:00:00Z")), Reason.BAD_TIMESTAMP),
        (orjson.dumps(base(userId=["u"])), Reason.WRONG_TYPE),
        (orjson.dumps(base(context="mobile")), Reason.WRONG_TYPE),
        (orjson.dumps(base(context={"device": "phone"})), Reason.WRONG_TYPE),
        (orjson.dumps(base(properties=[1])), Reason.WRONG_TYPE),
        (orjson.dumps(base(type="track")), Reason.MISSING_FIELD),
        (
            orjson.dumps(base(type="track", event="Onboarding Step Started", properties={"flow": "f"})),
            Reason.MISSING_FIELD,
        ),
        (
            orjson.dumps(base(type="track", event="Feature Used", properties={"feature": 3})),
            Reason.WRONG_TYPE,
        ),
        (orjson.dumps(base(type="alias")), Reason.MISSING_FIELD),
        (
            orjson.dumps(base(context={"consent": {"categoryPreferences": {"personalization": "no"}}})),
            Reason.WRONG_TYPE,
        ),
    ],
)
def test_invalid_records_get_a_reason(raw: bytes, reason: Reason) -> None:
    result = parse_event(raw, RULES, None, NOW_MS)
    assert isinstance(result, Invalid), result
    assert result.reason == reason
    assert result.message


def test_a_full_track_event_is_normalized() -> None:
    ev = parse(
        base(
            type="track",
            event="Onboarding Step Started",
            userId=None,
            anonymousId="anon-9",
            timestamp="2026-11-18T12:00:00+02:00",
            properties={"flow": "signup", "step": "profile"},
            context={
                "userAgent": IPHONE_UA,
                "ip": "203.0.113.9",
                "location": {"country": "de", "city": " Berlin "},
                "consent": {"categoryPreferences": {"personalization": False}},
            },
        )
    )
    assert isinstance(ev, Event)
    assert ev.profile_id == "anon-9"
    assert iso_ms(ev.ts_ms) == "2026-11-18T10:00:00.000Z"  # converted to UTC
    assert ev.country == "DE" and ev.city == "Berlin"
    assert ev.consent_personalization is False
    assert ev.device is not None and ev.device.type == "mobile" and ev.device.os == "iOS"
    assert "203.0.113.9" not in repr(ev)


def test_identify_hashes_email_and_drops_ip() -> None:
    ev = parse(base(type="identify", traits={"email": " Ann@Example.com", "ip": "1.2.3.4", "plan": "pro"}))
    assert isinstance(ev, Event) and ev.traits is not None
    assert ev.traits == {"email_sha256": hash_pii("ann@example.com", RULES.pii_salt), "plan": "pro"}
    assert "Example" not in repr(ev)


def test_missing_timestamp_falls_back_to_the_record_time() -> None:
    doc = base()
    del doc["timestamp"]
    ev = parse(doc, broker_ts=NOW_MS - 5)
    assert isinstance(ev, Event) and ev.ts_ms == NOW_MS - 5
    assert isinstance(parse(doc, broker_ts=None), Invalid)


def test_naive_timestamps_are_utc() -> None:
    assert parse_timestamp("2026-11-18T10:00:00") == parse_timestamp("2026-11-18T10:00:00Z")


def test_user_agent_classification() -> None:
    assert device_from_user_agent(IPHONE_UA).type == "mobile"
    desktop = device_from_user_agent(
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/120.0 Safari/537.36"
    )
    assert desktop.type == "desktop" and desktop.browser == "Chrome" and desktop.os == "Windows"


# --- property tests -----------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-10, 10) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
ids = st.one_of(st.none(), st.just(""), st.text(min_size=1, max_size=12), st.integers(0, 3))
timestamps = st.one_of(
    st.none(),
    st.just("2026-11-18T10:00:00Z"),
    st.just("2026-11-18T10:00:00.123+01:00"),
    st.just("nope"),
    st.integers(0, 5),
)
event_names = st.sampled_from(
    [
        "Onboarding Step Started",
        "Onboarding Step Completed",
        "Onboarding Completed",
        "Feature Used",
        "Help Viewed",
        "Session Started",
        "Something Else",
        "",
    ]
)
properties = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "flow": st.sampled_from(["signup", "", 5]),
            "step": st.sampled_from(["profile", "", None]),
            "feature": st.sampled_from(["export", 1]),
        },
    ),
    json_values,
)


@st.composite
def candidate_events(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    optional = {
        "type": st.sampled_from(["identify", "track", "page", "alias", "screen", 3]),
        "messageId": ids,
        "userId": ids,
        "anonymousId": ids,
        "timestamp": timestamps,
        "event": event_names | st.integers(0, 1),
        "properties": properties,
        "previousId": ids,
        "context": st.one_of(
            st.fixed_dictionaries({}, optional={"locale": st.sampled_from(["en-US", 4])}), st.integers(0, 1)
        ),
        "traits": st.one_of(st.dictionaries(st.text(max_size=4), json_scalars, max_size=2), st.just("x")),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            value = draw(strategy)
            if value is not None or key in ("userId", "anonymousId"):
                doc[key] = value
    return doc


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(candidate_events())
def test_validator_agrees_with_the_json_schema(doc: dict[str, Any]) -> None:
    if "timestamp" not in doc:
        doc["timestamp"] = "2026-11-18T10:00:00Z"  # the schema cannot see the record timestamp fallback
    result = parse(doc)
    schema_ok = SCHEMA.is_valid(doc)
    if isinstance(doc.get("timestamp"), str) and doc["timestamp"] == "nope":
        schema_ok = False  # "format" is an annotation in 2020-12; the validator enforces it
    assert isinstance(result, Event) == schema_ok, (doc, result)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    assert isinstance(parse_event(raw, RULES, None, NOW_MS), Event | Invalid)


@given(json_values)
def test_arbitrary_json_never_raises(value: Any) -> None:
    assert isinstance(parse_event(orjson.dumps(value), RULES, NOW_MS, NOW_MS), Event | Invalid)


@given(st.integers(946_684_800_000, 4_000_000_000_000))
def test_iso_rendering_round_trips(ts_ms: int) -> None:
    assert parse_timestamp(iso_ms(ts_ms)) == ts_ms


@given(st.text(alphabet="abcdefghij", min_size=2, max_size=3))
def test_country_codes_are_upper_case(country: str) -> None:
    ev = parse(base(context={"location": {"country": country}}))
    assert isinstance(ev, Event) and ev.country == country.upper()
