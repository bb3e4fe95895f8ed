"""A plain interpreter of the segment rule language: the oracle the compiled rules are tested
against (the engine runs :func:`stream_app.segments.rules.compile_rule`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stream_app.segments.rules import (
    _CMP,
    Between,
    BoolOp,
    Call,
    Compare,
    Dur,
    In,
    ListOf,
    Lit,
    Name,
    Node,
    Not,
    call_value,
)


def _value(node: Node, facts: Mapping[str, Any], member: frozenset[str]) -> Any:
    if isinstance(node, Lit):
        return node.value
    if isinstance(node, Dur):
        return node.ms
    if isinstance(node, Name):
        return facts.get(node.name)
    if isinstance(node, ListOf):
        return [_value(i, facts, member) for i in node.items]
    if isinstance(node, Call):
        return call_value(node, facts, member)
    return evaluate(node, facts, member)


def evaluate(node: Node, facts: Mapping[str, Any], member: frozenset[str] = frozenset()) -> bool:
    """Truth of a rule for the facts; ``member`` holds the segments already known to hold."""
    if isinstance(node, BoolOp):
        if node.op == "and":
            return all(evaluate(i, facts, member) for i in node.items)
        return any(evaluate(i, facts, member) for i in node.items)
    if isinstance(node, Not):
        return not evaluate(node.expr, facts, member)
    try:
        if isinstance(node, Compare):
            left, right = _value(node.left, facts, member), _value(node.right, facts, member)
            if (left is None or right is None) and node.op not in ("==", "!="):
                return False
            return bool(_CMP[node.op](left, right))
        if isinstance(node, Between):
            value = _value(node.expr, facts, member)
            low, high = _value(node.low, facts, member), _value(node.high, facts, member)
            return value is not None and bool(low <= value <= high)
        if isinstance(node, In):
            return _value(node.expr, facts, member) in _value(node.options, facts, member)
    except TypeError:
        return False  # values of different kinds: not comparable, so the condition does not hold
    return bool(_value(node, facts, member))
