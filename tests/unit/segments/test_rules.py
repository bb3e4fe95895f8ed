"""Rule language: parser, evaluator, errors, shipped segments, time flips."""

from __future__ import annotations

import contextlib
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.paths import CONFIG_DIR
from stream_app.profile import new_profile
from stream_app.segments.facts import DAY_MS, profile_facts
from stream_app.segments.rules import (
    BoolOp,
    Compare,
    Lit,
    Name,
    Node,
    Not,
    RuleError,
    compile_rule,
    load_segments,
    parse_rule,
    unparse,
)

from .rule_oracle import evaluate

NOW = 1_795_000_000_000


def doc(**over: Any) -> dict[str, Any]:
    d = new_profile("u")
    d.update(first_seen_ms=NOW - 3 * DAY_MS, last_seen_ms=NOW - DAY_MS)
    d.update(over)
    return d


def holds(rule: str, profile: dict[str, Any], now: int = NOW) -> bool:
    """What the engine decides: the compiled rule (checked against the oracle below)."""
    return compile_rule(parse_rule("t", rule))(profile_facts(profile, now), frozenset())


def test_the_language_features() -> None:
    p = doc(
        sessions={"count": 6, "recent_ms": [NOW - DAY_MS]},
        features={"export": 3},
        help_views={"profile": 2},
        device={"type": "mobile"},
        country="DE",
        onboarding={"signup": {"status": "in_progress", "completed_steps": {"account": {}}}},
    )
    assert holds("sessions > 5 and signed_up_within(7d)", p)
    assert not holds("sessions > 5 and signed_up_within(2d)", p)
    assert holds("last_seen_more_than(12h)", p) and not holds("last_seen_more_than(2d)", p)
    assert holds("sessions between 5 and 10", p) and not holds("sessions between 7 and 10", p)
    assert holds('device_type in ["mobile", "tablet"]', p)
    assert holds('country == "DE" or country == "FR"', p)
    assert holds('completed_step("signup", "account") and not completed_onboarding("signup")', p)
    assert holds('used_feature("export") and help_views_on("profile") >= 2', p)
    assert holds('lifecycle == "new"', p)
    assert not holds("days_since_last_seen > 30", p)


def test_missing_facts_and_type_mismatches_are_false_not_errors() -> None:
    p = new_profile("u")
    assert not holds("days_since_signup < 7", p)
    assert not holds('sessions > "five"', p)
    assert holds("country == null", p)


@pytest.mark.parametrize(
    ("rule", "problem", "column"),
    [
        ("sessions > ", "ends too early", 12),
        ("sesions > 5", "unknown fact 'sesions'", 1),
        ("sessions > 5 and", "ends too early", 17),
        ("sessions >> 5", "unexpected '>'", 11),
        ("signed_up_within(7)", "needs a duration", 1),
        ("frobnicate(1)", "unknown function", 1),
        ("sessions > 5 5", "unexpected '5'", 14),
        ("sessions $ 5", "unexpected character '$'", 10),
        ("(sessions > 5", "expected )", 14),
        ("", "empty", 1),
    ],
)
def test_malformed_rules_name_the_segment_and_the_position(rule: str, problem: str, column: int) -> None:
    with pytest.raises(RuleError) as info:
        parse_rule("my_segment", rule)
    message = str(info.value)
    assert "segment 'my_segment'" in message
    assert problem in message
    assert f"column {column})" in message


def test_the_shipped_segments_load_and_classify(tmp_path: Path) -> None:
    segments = load_segments(CONFIG_DIR / "segments.toml")
    assert {"highly_engaged_new", "dormant", "active_engaged", "power_user", "passive", "struggling"} <= set(
        segments.definitions
    )
    engaged_new = doc(
        sessions={"count": 7, "recent_ms": [NOW - i * DAY_MS // 4 for i in range(7)]},
        features={f"f{i}": 3 for i in range(6)},
    )
    assert {"highly_engaged_new", "active_engaged", "power_user"} <= segments.evaluate(
        profile_facts(engaged_new, NOW)
    )
    gone = doc(first_seen_ms=NOW - 90 * DAY_MS, last_seen_ms=NOW - 40 * DAY_MS)
    assert "dormant" in segments.evaluate(profile_facts(gone, NOW))
    stuck = doc(help_views={"profile": 5})
    member = segments.evaluate(profile_facts(stuck, NOW))
    assert "struggling" in member and "passive" not in member


def test_time_relative_segments_flip_without_an_event() -> None:
    segments = load_segments(CONFIG_DIR / "segments.toml")
    p = doc(first_seen_ms=NOW - DAY_MS, sessions={"count": 6, "recent_ms": [NOW - DAY_MS]})
    assert "highly_engaged_new" in segments.evaluate(profile_facts(p, NOW))
    flip = segments.next_change_ms(p, NOW)
    assert flip is not None and flip <= NOW - DAY_MS + 7 * DAY_MS + 1
    later = NOW - DAY_MS + 7 * DAY_MS + 1
    assert "highly_engaged_new" not in segments.evaluate(profile_facts(p, later))
    assert "dormant" in segments.evaluate(profile_facts(p, NOW - DAY_MS + 31 * DAY_MS))


def test_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[segments.a]\nwhen = "in_segment(\\"b\\")"\n[segments.b]\nwhen = "in_segment(\\"a\\")"\n'
    )
    with pytest.raises(RuleError, match="cycle"):
        load_segments(path)
    path.write_text('[segments.a]\nwhen = "in_segment(\\"zzz\\")"\n')
    with pytest.raises(RuleError, match="unknown segment 'zzz'"):
        load_segments(path)
    path.write_text("".join(f'[segments.s{i}]\nwhen = "sessions > {i}"\n' for i in range(21)))
    with pytest.raises(RuleError, match="cap is 20"):
        load_segments(path)
    assert len(load_segments(path, max_segments=25).order) == 21
    assert tomllib.loads(path.read_text())


# --- properties ----------------------------------------------------------------------------
numeric_facts = ["sessions", "event_count", "features_used", "help_views", "steps_completed"]
leaves = st.builds(
    lambda name, op, value: Compare(op, Name(name), Lit(value)),
    st.sampled_from(numeric_facts),
    st.sampled_from(["==", "!=", "<", "<=", ">", ">="]),
    st.integers(0, 6),
)
trees: st.SearchStrategy[Node] = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(Not, inner),
        st.builds(lambda items: BoolOp("and", tuple(items)), st.lists(inner, min_size=2, max_size=3)),
        st.builds(lambda items: BoolOp("or", tuple(items)), st.lists(inner, min_size=2, max_size=3)),
    ),
    max_leaves=8,
)
fact_values = st.fixed_dictionaries({name: st.integers(0, 6) for name in numeric_facts})


def python_truth(node: Node, facts: dict[str, int]) -> bool:
    if isinstance(node, Not):
        return not python_truth(node.expr, facts)
    if isinstance(node, BoolOp):
        results = [python_truth(i, facts) for i in node.items]
        return all(results) if node.op == "and" else any(results)
    assert isinstance(node, Compare) and isinstance(node.left, Name) and isinstance(node.right, Lit)
    a, b = facts[node.left.name], node.right.value
    return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[node.op]


@settings(max_examples=300)
@given(trees, fact_values)
def test_printed_rules_parse_back_and_evaluate_like_python(tree: Node, facts: dict[str, int]) -> None:
    reparsed = parse_rule("p", unparse(tree))
    assert evaluate(reparsed, facts) == evaluate(tree, facts) == python_truth(tree, facts)
    assert evaluate(Not(tree), facts) == (not evaluate(tree, facts))


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_rule_error(text: str) -> None:
    with contextlib.suppress(RuleError):  # anything else (IndexError, ...) fails the test
        parse_rule("fuzz", text)


@given(trees, fact_values, st.frozensets(st.sampled_from(["a", "b"])))
def test_compiled_rules_agree_with_the_interpreter(
    tree: Node, facts: dict[str, int], member: frozenset[str]
) -> None:
    assert compile_rule(tree)(facts, member) == evaluate(tree, facts, member)


def test_compiled_rules_agree_on_the_language_features() -> None:
    profile = doc(help_views={"profile": 3}, features={"export": 2})
    for rule in (
        'help_views_on("profile") >= 3 and used_feature("export")',
        'country in ["DE", "FR"] or device_type == "mobile"',
        "days_since_signup between 0 and 7 and not signed_up_within(1h)",
        "last_seen_more_than(30d) or sessions > 5",
        'completed_step("signup", "profile") or lifecycle == "new"',
        'sessions > "text"',
    ):
        node = parse_rule("r", rule)
        facts = profile_facts(profile, NOW)
        assert compile_rule(node)(facts, frozenset()) == evaluate(node, facts), rule


HOUR_MS = DAY_MS // 24
offsets_h = st.integers(min_value=0, max_value=120 * 24)


@settings(max_examples=300, deadline=None)
@given(
    age_h=offsets_h,
    idle_h=offsets_h,
    session_ages_h=st.lists(offsets_h, max_size=8),
    help_views=st.integers(0, 6),
    features=st.integers(0, 7),
    steps=st.integers(0, 3),
    step=st.floats(0.01, 0.99),
)
def test_no_membership_changes_before_the_next_change_instant(
    age_h: int,
    idle_h: int,
    session_ages_h: list[int],
    help_views: int,
    features: int,
    steps: int,
    step: float,
) -> None:
    """Time-driven re-evaluation is only correct if nothing can flip before ``next_change_ms``.

    The timer re-evaluates a profile at that instant and not before: a membership that
    changes earlier (a fact drifting with time that the anchors miss) would be published late.
    """
    segments = load_segments(CONFIG_DIR / "segments.toml")
    first = NOW - max(age_h, idle_h) * HOUR_MS
    last = NOW - idle_h * HOUR_MS
    recent = sorted({max(first, NOW - a * HOUR_MS) for a in session_ages_h if a >= idle_h} | {last})
    p = doc(
        first_seen_ms=first,
        last_seen_ms=last,
        sessions={"count": len(recent), "recent_ms": recent},
        help_views={"profile": help_views} if help_views else {},
        features={f"f{i}": 1 for i in range(features)},
        onboarding={
            "signup": {
                "status": "in_progress",
                "completed_steps": {f"s{i}": {} for i in range(steps)},
            }
        },
    )
    now_members = segments.evaluate(profile_facts(p, NOW))
    flip = segments.next_change_ms(p, NOW)
    horizon = flip if flip is not None else NOW + 200 * DAY_MS
    probe = NOW + int((horizon - NOW) * step)
    if probe < horizon:
        assert segments.evaluate(profile_facts(p, probe)) == now_members, (probe - NOW) / HOUR_MS


def test_lifecycle_rules_flip_at_the_configured_thresholds_not_fixed_ones() -> None:
    """LIFECYCLE_DORMANT_AFTER_DAYS=10: a `lifecycle == "dormant"` rule flips 10 days after the
    last event, and the timer must look then (the anchors were hard-coded to 30 and 90 days)."""
    from stream_app.profile import ProfileRules
    from stream_app.segments.rules import SegmentDefinition, SegmentSet, parse_rule

    rules = ProfileRules(dormant_after_ms=10 * DAY_MS, churned_after_ms=20 * DAY_MS)
    rule = 'lifecycle == "dormant"'
    segments = SegmentSet([SegmentDefinition("sleepy", "", rule, parse_rule("sleepy", rule), ())])
    last = NOW - DAY_MS
    p = doc(first_seen_ms=last - DAY_MS, last_seen_ms=last, sessions={"count": 1, "recent_ms": [last]})
    flip = segments.next_change_ms(p, NOW, rules)
    assert flip == last + 7 * DAY_MS + 1  # the week of sessions first, then:
    later = last + 8 * DAY_MS
    assert segments.next_change_ms(p, later, rules) == last + 10 * DAY_MS + 1
    assert "sleepy" not in segments.evaluate(profile_facts(p, last + 10 * DAY_MS, rules))
    assert "sleepy" in segments.evaluate(profile_facts(p, last + 10 * DAY_MS + 1, rules))


def test_file_mistakes_name_the_segment_and_key(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[segments.a]\nwhen = "sessions > 1"\ncolour = "red"\n')
    with pytest.raises(RuleError, match=r"segment 'a'.*unknown keys \['colour'\]"):
        load_segments(path)
    path.write_text('[segments.a]\ndescription = "no rule"\n')
    with pytest.raises(RuleError, match=r"segment 'a'.*needs `when`"):
        load_segments(path)
    path.write_text('[segments.a]\nwhen = "sessions > 1"\nrequires = "b"\n')
    with pytest.raises(RuleError, match=r"segment 'a'.*`requires` must be a list"):
        load_segments(path)
