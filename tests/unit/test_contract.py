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
    DEFAULT_BLOCKED_IDS,
    ContractRules,
    Event,
    Invalid,
    Reason,
    blocked_id_pattern,
    blocked_id_set,
    device_from_user_agent,
    iso_ms,
    parse_event,
    parse_timestamp,
)
from stream_app.paths import SCHEMAS_DIR
from stream_app.privacy import hash_pii

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
        (orjson.dumps(base(type="screenview")), Reason.UNKNOWN_TYPE),
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
            orjson.dumps(
                base(
                    type="track",
                    event="Onboarding Step Started",
                    properties={"flow": "f", "step": "s" * 5000},
                )
            ),
            Reason.TOO_LONG,
        ),
        (
            orjson.dumps(base(type="track", event="Feature Used", properties={"feature": "x" * 129})),
            Reason.TOO_LONG,
        ),
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
ids = st.one_of(
    st.none(),
    st.just(""),
    st.text(min_size=1, max_size=12),
    st.integers(0, 3),
    st.sampled_from(["undefined", " NULL ", "[object Object]", "0", "user-1", "   "]),
)
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
        "Intervention Opened",
        "Intervention Dismissed",
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
            "flow": st.sampled_from(["signup", "", 5, "f" * 128, "f" * 129]),
            "step": st.sampled_from(["profile", "", None, "s" * 5000]),
            "feature": st.sampled_from(["export", 1, "x" * 129]),
            "trigger_id": st.sampled_from(["0" * 32, "", 7, "t" * 129]),
            "variant": st.sampled_from(["b", None, 2, "v" * 129]),
        },
    ),
    json_values,
)


@st.composite
def candidate_events(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    optional = {
        "type": st.sampled_from(["identify", "track", "page", "alias", "screen", "group", "screenview", 3]),
        "messageId": ids,
        "userId": ids,
        "anonymousId": ids,
        "timestamp": timestamps,
        "event": event_names | st.integers(0, 1),
        "properties": properties,
        "previousId": ids,
        "groupId": st.one_of(ids, st.just("acme")),
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


# --- event time: the client's clock, corrected and capped ---------------------------------------


def test_a_fast_client_clock_is_capped_at_the_record_time() -> None:
    record = parse_timestamp("2026-11-18T10:00:00Z")
    result = parse(base(timestamp="2026-11-18T11:00:00Z"), broker_ts=record)  # clock one hour fast
    assert isinstance(result, Event)
    assert result.ts_ms == record and result.ahead_ms == 3_600_000 and result.received_ms == record


def test_a_late_but_honest_event_keeps_its_own_time() -> None:
    record = parse_timestamp("2026-11-18T13:00:00Z")  # delivered three hours later (offline queue)
    result = parse(base(timestamp="2026-11-18T10:00:00Z"), broker_ts=record)
    assert isinstance(result, Event) and result.ts_ms == parse_timestamp("2026-11-18T10:00:00Z")
    assert result.ahead_ms == 0


def test_sent_at_corrects_the_client_clock_as_segment_does() -> None:
    # the client's clock is 2 h slow: it stamped the event 5 s before sending the batch
    doc = base(timestamp="2026-11-18T08:00:00Z", sentAt="2026-11-18T08:00:05Z")
    received = parse_timestamp("2026-11-18T10:00:06Z")
    by_record = parse(doc, broker_ts=received)
    assert isinstance(by_record, Event) and by_record.ts_ms == received - 5000
    by_collector = parse({**doc, "receivedAt": "2026-11-18T10:00:06Z"}, broker_ts=received + 40)
    assert isinstance(by_collector, Event) and by_collector.ts_ms == received - 5000
    # the collector corrected it already (originalTimestamp kept): not corrected twice
    done = parse(
        base(timestamp="2026-11-18T10:00:01Z", originalTimestamp="2026-11-18T08:00:00Z", sentAt="x"),
        broker_ts=received,
    )
    assert isinstance(done, Event) and done.ts_ms == parse_timestamp("2026-11-18T10:00:01Z")
    bad = parse(base(sentAt="yesterday"), broker_ts=received)
    assert isinstance(bad, Invalid) and bad.reason is Reason.BAD_TIMESTAMP and "sentAt" in bad.message


def test_screen_and_group_are_part_of_the_contract() -> None:
    screen = parse(base(type="screen", name="Home"))
    assert isinstance(screen, Event) and screen.type == "screen" and screen.name == "Home"
    group = parse(base(type="group", groupId=42, traits={"plan": "team", "email": "ops@acme.io"}))
    assert isinstance(group, Event) and group.group_id == "42"
    assert group.traits is not None and "email" not in group.traits and group.traits["plan"] == "team"
    missing = parse(base(type="group"))
    assert isinstance(missing, Invalid) and missing.reason is Reason.MISSING_FIELD


@pytest.mark.parametrize("junk", ["null", "undefined", "0", "anonymous", "[object Object]", " ", "NuLL "])
def test_placeholder_ids_are_treated_as_absent(junk: str) -> None:
    anonymous = parse(base(userId=junk, anonymousId="a-1"))
    assert isinstance(anonymous, Event) and anonymous.user_id is None and anonymous.profile_id == "a-1"
    alone = parse(base(userId=junk))
    assert isinstance(alone, Invalid) and alone.reason in (Reason.BLOCKED_ID, Reason.MISSING_USER_ID)
    custom = ContractRules(pii_salt=b"s", blocked_ids=blocked_id_set("nobody, n/a"))
    kept = parse_event(orjson.dumps(base(userId="undefined")), custom, None, NOW_MS)
    assert isinstance(kept, Event) and kept.user_id == "undefined"  # the list is configurable
    refused = parse_event(orjson.dumps(base(userId="N/A")), custom, None, NOW_MS)
    assert isinstance(refused, Invalid) and refused.reason is Reason.BLOCKED_ID


def test_the_schema_blocks_exactly_the_default_placeholder_ids() -> None:
    schema = json.loads((SCHEMAS_DIR / "onboarding.events.schema.json").read_text())
    assert schema["$defs"]["usableId"]["not"]["pattern"] == blocked_id_pattern(DEFAULT_BLOCKED_IDS)


def test_every_dead_letter_reason_is_in_the_dlq_schema() -> None:
    dlq = json.loads((SCHEMAS_DIR / "onboarding.events.dlq.schema.json").read_text())
    assert set(dlq["properties"]["dlq.reason"]["enum"]) == {r.value for r in Reason}
