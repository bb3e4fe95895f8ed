"""The synthetic stream speaks the contract and behaves like its archetypes."""

from __future__ import annotations

import json
import statistics

import orjson
from jsonschema import Draft202012Validator

from stream_app.contract import ContractRules, Event, parse_event
from stream_app.paths import SCHEMAS_DIR
from stream_app.synthetic import ARCHETYPES, generate_users, interleaved_stream, record_key, user_events

START = 1_795_000_000_000


def test_every_event_validates_against_schema_and_validator() -> None:
    schema = Draft202012Validator(json.loads((SCHEMAS_DIR / "onboarding.events.schema.json").read_text()))
    users = generate_users(40, seed=11)
    events = list(interleaved_stream(users, START, seed=11))
    assert len(events) > 40 * 10
    for event in events:
        assert schema.is_valid(event), event
        parsed = parse_event(orjson.dumps(event), ContractRules(), None, START + 10**12)
        assert isinstance(parsed, Event), parsed
        assert record_key(event).decode() in (event.get("userId"), event.get("anonymousId"))
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)
    assert len({e["messageId"] for e in events}) == len(events)


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    a = list(interleaved_stream(generate_users(10, 3), START, 3))
    b = list(interleaved_stream(generate_users(10, 3), START, 3))
    c = list(interleaved_stream(generate_users(10, 4), START, 4))
    assert a == b
    assert a != c


def test_archetypes_differ_as_described() -> None:
    users = generate_users(400, seed=5)
    help_views: dict[str, list[int]] = {a: [] for a in ARCHETYPES}
    features: dict[str, list[int]] = {a: [] for a in ARCHETYPES}
    for user in users:
        events = user_events(user, START)
        help_views[user.archetype].append(sum(e.get("event") == "Help Viewed" for e in events))
        features[user.archetype].append(
            len({e["properties"]["feature"] for e in events if e.get("event") == "Feature Used"})
        )
    assert statistics.mean(help_views["struggling"]) > 3 * statistics.mean(help_views["quick_adopter"])
    assert statistics.mean(features["quick_adopter"]) > 2 * statistics.mean(features["passive"])
