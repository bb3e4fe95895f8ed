"""The Segment HTTP API as the SDKs speak it: bodies, auth, limits, time correction. Pure."""

from __future__ import annotations

import base64
import gzip
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_app.collector.protocol import (
    ROUTES,
    ApiError,
    Limits,
    WriteKeys,
    authenticate,
    events_from_request,
    parse_json,
    read_body,
)
from stream_app.contract import ContractRules, Event, iso_ms, parse_event, parse_timestamp

NOW = parse_timestamp("2026-11-30T12:00:00Z")
LIMITS = Limits()
KEYS = WriteKeys.parse("web=abc123, srv=def456, plain")


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def test_write_keys_name_their_source() -> None:
    assert KEYS.sources == {"abc123": "web", "def456": "srv", "plain": ""}
    assert authenticate(basic("abc123"), {}, KEYS) == "web"
    assert authenticate(None, {"writeKey": "def456"}, KEYS) == "srv"
    assert authenticate(None, {"batch": [{"writeKey": "plain"}]}, KEYS) == ""
    for bad in (authenticate(basic("nope"), {}, KEYS), authenticate(None, {}, KEYS)):
        assert isinstance(bad, ApiError) and bad.status == 401 and bad.code == "invalid_write_key"
    garbled = authenticate("Basic %%%", {}, KEYS)
    assert isinstance(garbled, ApiError) and garbled.status == 401
    assert authenticate(None, {}, WriteKeys.parse("", allow_anonymous=True)) == ""


def test_short_routes_are_the_long_ones() -> None:
    for short, long in (("t", "track"), ("i", "identify"), ("p", "page"), ("s", "screen"), ("g", "group")):
        assert ROUTES[short] == ROUTES[long] == long
    assert ROUTES["a"] == "alias" and ROUTES["b"] is ROUTES["batch"] is ROUTES["import"] is None


def test_gzip_bodies_and_limits() -> None:
    body = orjson.dumps({"batch": []})
    assert read_body(gzip.compress(body), "gzip", LIMITS) == body
    assert read_body(body, None, LIMITS) == body
    broken = read_body(b"\x1f\x8b not gzip", "gzip", LIMITS)
    assert isinstance(broken, ApiError) and broken.status == 400 and broken.code == "invalid_gzip"
    truncated = read_body(gzip.compress(body)[:-6], "gzip", LIMITS)
    assert isinstance(truncated, ApiError) and truncated.code == "invalid_gzip"
    bomb = read_body(gzip.compress(b" " * (LIMITS.max_request_bytes + 10)), "gzip", LIMITS)
    assert isinstance(bomb, ApiError) and bomb.code == "request_too_large"
    big = read_body(b"x" * (LIMITS.max_request_bytes + 1), "", LIMITS)
    assert isinstance(big, ApiError) and big.status == 400
    assert isinstance(read_body(body, "br", LIMITS), ApiError)
    assert isinstance(parse_json(b"{nope"), ApiError) and isinstance(parse_json(b"[1]"), ApiError)


def batch(*events: dict[str, Any], **envelope: Any) -> dict[str, Any]:
    return {"batch": list(events), **envelope}


def test_batch_context_merges_and_the_write_key_never_travels() -> None:
    body = batch(
        {"type": "track", "event": "A", "userId": "u1", "messageId": "m1", "writeKey": "abc123"},
        {"type": "page", "userId": "u1", "messageId": "m2", "context": {"locale": "de-DE"}},
        context={"locale": "en-US", "ip": "1.2.3.4"},
        writeKey="abc123",
    )
    events = events_from_request(None, body, NOW, "web", LIMITS)
    assert isinstance(events, list) and len(events) == 2
    assert events[0].event["context"] == {"locale": "en-US", "ip": "1.2.3.4", "source": "web"}
    assert events[1].event["context"]["locale"] == "de-DE"  # the item's own keys win
    assert all("writeKey" not in e.event and b"writeKey" not in e.raw for e in events)
    assert all(e.event["receivedAt"] == iso_ms(NOW) for e in events)


def test_the_route_sets_the_type_and_a_missing_message_id_is_derived_stably() -> None:
    one = events_from_request("track", {"event": "A", "userId": "u1"}, NOW, "", LIMITS)
    again = events_from_request("track", {"event": "A", "userId": "u1"}, NOW + 5, "", LIMITS)
    assert isinstance(one, list) and isinstance(again, list)
    assert one[0].event["type"] == "track" and one[0].event["messageId"].startswith("col-")
    assert one[0].event["messageId"] == again[0].event["messageId"]  # an SDK retry is the same event
    other = events_from_request("track", {"event": "B", "userId": "u1"}, NOW, "", LIMITS)
    assert isinstance(other, list) and other[0].event["messageId"] != one[0].event["messageId"]


def test_sent_at_corrects_the_client_clock() -> None:
    # the phone's clock is 3 h fast; it stamped the event 2 s before sending
    item = {
        "type": "track",
        "userId": "u1",
        "event": "A",
        "timestamp": "2026-11-30T14:59:58Z",
        "messageId": "m",
    }
    events = events_from_request(None, batch(item, sentAt="2026-11-30T15:00:00Z"), NOW, "", LIMITS)
    assert isinstance(events, list)
    assert events[0].event["timestamp"] == iso_ms(NOW - 2000)
    assert events[0].event["originalTimestamp"] == "2026-11-30T14:59:58Z"
    parsed = parse_event(events[0].raw, ContractRules(), NOW, NOW)
    assert isinstance(parsed, Event) and parsed.ts_ms == NOW - 2000  # not corrected twice
    no_time = events_from_request("page", {"userId": "u1", "messageId": "m"}, NOW, "", LIMITS)
    assert isinstance(no_time, list) and no_time[0].event["timestamp"] == iso_ms(NOW)


def test_rudderstack_identify_traits_in_context_become_traits() -> None:
    item = {"type": "identify", "userId": "u1", "messageId": "m", "context": {"traits": {"plan": "pro"}}}
    events = events_from_request(None, batch(item), NOW, "", LIMITS)
    assert isinstance(events, list) and events[0].event["traits"] == {"plan": "pro"}


@pytest.mark.parametrize(
    ("route", "body", "code"),
    [
        (None, {"batch": "x"}, "invalid_batch"),
        (None, {"batch": [1]}, "invalid_event"),
        (None, {"batch": [{"userId": "u"}] * 2501}, "batch_too_large"),
        ("track", {"userId": "u", "event": "A", "properties": {"x": "y" * 33_000}}, "event_too_large"),
    ],
)
def test_over_the_limits_is_a_400_for_the_whole_request(route: str | None, body: Any, code: str) -> None:
    result = events_from_request(route, body, NOW, "", LIMITS)
    assert isinstance(result, ApiError) and result.status == 400 and result.code == code
    assert orjson.loads(result.body()) == {"code": code, "message": result.message}


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
        max_leaves=10,
    )
)
def test_any_json_body_is_answered_never_raises(body: Any) -> None:
    """Any body orjson can parse (its integers fit in 64 bits) gets events or an ApiError."""
    doc = body if isinstance(body, dict) else {"batch": body}
    for route in (None, "track"):
        result = events_from_request(route, doc, NOW, "web", LIMITS)
        assert isinstance(result, list | ApiError)
