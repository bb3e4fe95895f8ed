"""The rule language of segments: tokenizer, parser, safe evaluator. Pure; no eval/exec.

Grammar (precedence from low to high)::

    expr    := and ("or" and)*
    and     := unary ("and" unary)*
    unary   := "not" unary | compare
    compare := value [("==" | "!=" | "<" | "<=" | ">" | ">=") value
                      | "between" value "and" value | "in" list]
    value   := NUMBER | DURATION | STRING | true | false | null | list
             | NAME | NAME "(" [value ("," value)*] ")" | "(" expr ")"
    list    := "[" [value ("," value)*] "]"

NAMEs are the facts of :mod:`stream_app.segments.facts`; durations are ``30m``,
``12h``, ``7d``, ``2w``. Comparing a missing fact (null) or values of different kinds
is false, never an error: evaluation cannot raise on any profile.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from stream_app.errors import StreamAppError
from stream_app.profile import ProfileRules
from stream_app.segments.facts import DAY_MS, FACTS
from stream_app.tomlmodels import Strict, TomlError, validate

DEFAULT_MAX_SEGMENTS = 20
_UNITS = {"m": 60_000, "h": 3_600_000, "d": DAY_MS, "w": 7 * DAY_MS}
_TOKEN = re.compile(
    r"\s*(?:(?P<duration>\d+(?:\.\d+)?[mhdw])\b|(?P<number>\d+(?:\.\d+)?)"
    r"|(?P<string>\"[^\"\n]*\"|'[^'\n]*')|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,))"
)
_KEYWORDS = {"and", "or", "not", "in", "between", "true", "false", "null"}
_COMPARE = {"==", "!=", "<", "<=", ">", ">="}


class RuleError(StreamAppError):
    """A segment definition is wrong; the message names the segment and points at the mistake."""

    def __init__(self, segment: str, problem: str, source: str = "", pos: int | None = None) -> None:
        where = ""
        if pos is not None:
            line = source.count("\n", 0, pos) + 1
            col = pos - (source.rfind("\n", 0, pos) + 1) + 1
            text = source.splitlines()[line - 1] if source else ""
            where = f" (line {line}, column {col})\n    {text}\n    {' ' * (col - 1)}^"
        self.segment, self.problem, self.pos = segment, problem, pos
        super().__init__(f"segment {segment!r}: {problem}{where}")


# --- AST -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lit:
    value: Any


@dataclass(frozen=True)
class Dur:
    ms: int
    text: str


@dataclass(frozen=True)
class Name:
    name: str


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Node, ...]


@dataclass(frozen=True)
class ListOf:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    expr: Node


@dataclass(frozen=True)
class BoolOp:
    op: str  # and | or
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Compare:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Between:
    expr: Node
    low: Node
    high: Node


@dataclass(frozen=True)
class In:
    expr: Node
    options: Node


Node = Lit | Dur | Name | Call | ListOf | Not | BoolOp | Compare | Between | In

#: function name -> (argument kinds, description)
FUNCTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "signed_up_within": (("duration",), "first seen no longer ago than the duration"),
    "last_seen_more_than": (("duration",), "last seen longer ago than the duration"),
    "completed_step": (("string", "string"), "completed step (flow, step)"),
    "completed_onboarding": (("string",), "completed the onboarding flow"),
    "used_feature": (("string",), "used the feature at least once"),
    "help_views_on": (("string",), "number of Help Viewed events on a step"),
    "in_segment": (("string",), "member of another segment (evaluated first)"),
}


# --- parsing -------------------------------------------------------------------------------
class _Parser:
    def __init__(self, segment: str, source: str) -> None:
        self.segment, self.source = segment, source
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(source):
            if source[pos:].strip() == "":
                break
            m = _TOKEN.match(source, pos)
            if m is None or m.end() == pos:
                raise RuleError(
                    segment,
                    f"unexpected character {source[pos:].lstrip()[:1]!r}",
                    source,
                    len(source) - len(source[pos:].lstrip()),
                )
            kind = m.lastgroup or ""
            text = m.group(kind)
            start = m.start(kind)
            if kind == "name" and text in _KEYWORDS:
                kind = text
            self.tokens.append((kind, text, start))
            pos = m.end()
        self.i = 0

    def fail(self, problem: str) -> RuleError:
        pos = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.source)
        return RuleError(self.segment, problem, self.source, pos)

    def peek(self) -> str:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else "end"

    def take(self, *kinds: str) -> tuple[str, str, int]:
        if self.peek() not in kinds and not (self.peek() == "op" and self.tokens[self.i][1] in kinds):
            found = self.tokens[self.i][1] if self.i < len(self.tokens) else "the end of the rule"
            raise self.fail(f"expected {' or '.join(kinds)}, found {found!r}")
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def at_op(self, *ops: str) -> bool:
        return self.peek() == "op" and self.tokens[self.i][1] in ops

    def parse(self) -> Node:
        if not self.tokens:
            raise RuleError(self.segment, "the rule is empty", self.source, 0)
        node = self.expr()
        if self.i < len(self.tokens):
            raise self.fail(f"unexpected {self.tokens[self.i][1]!r} after a complete expression")
        return node

    def expr(self) -> Node:
        items = [self.conj()]
        while self.peek() == "or":
            self.i += 1
            items.append(self.conj())
        return items[0] if len(items) == 1 else BoolOp("or", tuple(items))

    def conj(self) -> Node:
        items = [self.unary()]
        while self.peek() == "and":
            self.i += 1
            items.append(self.unary())
        return items[0] if len(items) == 1 else BoolOp("and", tuple(items))

    def unary(self) -> Node:
        if self.peek() == "not":
            self.i += 1
            return Not(self.unary())
        return self.compare()

    def compare(self) -> Node:
        left = self.value()
        if self.at_op(*_COMPARE):
            op = self.tokens[self.i][1]
            self.i += 1
            return Compare(op, left, self.value())
        if self.peek() == "between":
            self.i += 1
            low = self.value()
            self.take("and")
            return Between(left, low, self.value())
        if self.peek() == "in":
            self.i += 1
            if not self.at_op("["):
                raise self.fail('expected a list like ["a", "b"] after \'in\'')
            return In(left, self.value())
        return left

    def value(self) -> Node:
        kind = self.peek()
        if kind == "end":
            raise self.fail("the rule ends too early")
        tok = self.tokens[self.i]
        if kind == "number":
            self.i += 1
            return Lit(float(tok[1]) if "." in tok[1] else int(tok[1]))
        if kind == "duration":
            self.i += 1
            return Dur(int(float(tok[1][:-1]) * _UNITS[tok[1][-1]]), tok[1])
        if kind == "string":
            self.i += 1
            return Lit(tok[1][1:-1])
        if kind in ("true", "false", "null"):
            self.i += 1
            return Lit({"true": True, "false": False, "null": None}[kind])
        if kind == "name":
            self.i += 1
            if self.at_op("("):
                return self.call(tok)
            if tok[1] not in FACTS:
                raise RuleError(
                    self.segment,
                    f"unknown fact {tok[1]!r}; known: {', '.join(sorted(FACTS))}",
                    self.source,
                    tok[2],
                )
            return Name(tok[1])
        if self.at_op("("):
            self.i += 1
            node = self.expr()
            self.take(")")
            return node
        if self.at_op("["):
            self.i += 1
            items: list[Node] = []
            while not self.at_op("]"):
                items.append(self.value())
                if not self.at_op("]"):
                    self.take(",")
            self.i += 1
            return ListOf(tuple(items))
        raise self.fail(f"unexpected {tok[1]!r}")

    def call(self, tok: tuple[str, str, int]) -> Node:
        name = tok[1]
        if name not in FUNCTIONS:
            raise RuleError(
                self.segment,
                f"unknown function {name!r}; known: {', '.join(sorted(FUNCTIONS))}",
                self.source,
                tok[2],
            )
        self.i += 1  # (
        args: list[Node] = []
        while not self.at_op(")"):
            args.append(self.value())
            if not self.at_op(")"):
                self.take(",")
        self.i += 1
        kinds = FUNCTIONS[name][0]
        if len(args) != len(kinds):
            raise RuleError(
                self.segment, f"{name}() takes {len(kinds)} argument(s), got {len(args)}", self.source, tok[2]
            )
        for arg, want in zip(args, kinds, strict=True):
            ok = (
                isinstance(arg, Dur)
                if want == "duration"
                else isinstance(arg, Lit) and isinstance(arg.value, str)
            )
            if not ok:
                raise RuleError(self.segment, f"{name}() needs a {want} argument", self.source, tok[2])
        return Call(name, tuple(args))


def parse_rule(segment: str, source: str) -> Node:
    return _Parser(segment, source).parse()


def unparse(node: Node) -> str:
    """Source text that parses back to ``node``."""
    if isinstance(node, Lit):
        if node.value is None:
            return "null"
        if isinstance(node.value, bool):
            return "true" if node.value else "false"
        return f'"{node.value}"' if isinstance(node.value, str) else repr(node.value)
    if isinstance(node, Dur):
        return node.text
    if isinstance(node, Name):
        return node.name
    if isinstance(node, Call):
        return f"{node.name}({', '.join(unparse(a) for a in node.args)})"
    if isinstance(node, ListOf):
        return f"[{', '.join(unparse(a) for a in node.items)}]"
    if isinstance(node, Not):
        return f"not ({unparse(node.expr)})"
    if isinstance(node, BoolOp):
        return f" {node.op} ".join(f"({unparse(i)})" for i in node.items)
    if isinstance(node, Compare):
        return f"({unparse(node.left)}) {node.op} ({unparse(node.right)})"
    if isinstance(node, Between):
        return f"({unparse(node.expr)}) between ({unparse(node.low)}) and ({unparse(node.high)})"
    return f"({unparse(node.expr)}) in {unparse(node.options)}"


# --- evaluation ----------------------------------------------------------------------------
_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def call_value(node: Call, facts: Mapping[str, Any], member: frozenset[str]) -> Any:
    """The value of a function call of the rule language (shared by every evaluator)."""
    doc: Mapping[str, Any] = facts.get("_doc") or {}
    now = facts.get("_now_ms", 0)
    arg = node.args[0]
    if node.name == "signed_up_within":
        first = doc.get("first_seen_ms")
        return first is not None and now - first <= arg.ms  # type: ignore[union-attr]
    if node.name == "last_seen_more_than":
        last = doc.get("last_seen_ms")
        return last is not None and now - last > arg.ms  # type: ignore[union-attr]
    text = arg.value  # type: ignore[union-attr]
    if node.name == "completed_step":
        step = node.args[1].value  # type: ignore[union-attr]
        return step in doc.get("onboarding", {}).get(text, {}).get("completed_steps", {})
    if node.name == "completed_onboarding":
        return doc.get("onboarding", {}).get(text, {}).get("status") == "completed"
    if node.name == "used_feature":
        return text in doc.get("features", {})
    if node.name == "help_views_on":
        return doc.get("help_views", {}).get(text, 0)
    return text in member  # in_segment


Compiled = Callable[[Mapping[str, Any], frozenset[str]], Any]


def compile_rule(node: Node) -> Compiled:
    """The rule as nested closures, what the engine evaluates (no interpreter re-dispatching on
    node types at every evaluation: profiles are evaluated on every write). No eval/exec.
    ``tests/unit/segments/rule_oracle.py`` is a plain interpreter the tests check it against."""
    fn = _compile(node)

    def truth(facts: Mapping[str, Any], member: frozenset[str]) -> bool:
        return bool(fn(facts, member))

    return truth


def _compile_value(node: Node) -> Compiled:
    if isinstance(node, Lit):
        value = node.value
        return lambda _f, _m: value
    if isinstance(node, Dur):
        ms = node.ms
        return lambda _f, _m: ms
    if isinstance(node, Name):
        name = node.name
        return lambda f, _m: f.get(name)
    if isinstance(node, ListOf):
        items = [_compile_value(i) for i in node.items]
        return lambda f, m: [i(f, m) for i in items]
    if isinstance(node, Call):
        call = node
        return lambda f, m: call_value(call, f, m)
    return _compile(node)


def _compile(node: Node) -> Compiled:
    if isinstance(node, BoolOp):
        parts = [_compile(i) for i in node.items]
        if node.op == "and":
            return lambda f, m: all(p(f, m) for p in parts)
        return lambda f, m: any(p(f, m) for p in parts)
    if isinstance(node, Not):
        inner = _compile(node.expr)
        return lambda f, m: not inner(f, m)
    if isinstance(node, Compare):
        left, right, op = _compile_value(node.left), _compile_value(node.right), _CMP[node.op]
        nullable = node.op in ("==", "!=")

        def compare(f: Mapping[str, Any], m: frozenset[str]) -> bool:
            try:
                a, b = left(f, m), right(f, m)
                if (a is None or b is None) and not nullable:
                    return False
                return bool(op(a, b))
            except TypeError:
                return False

        return compare
    if isinstance(node, Between):
        value_of, low_of, high_of = (
            _compile_value(node.expr),
            _compile_value(node.low),
            _compile_value(node.high),
        )

        def between(f: Mapping[str, Any], m: frozenset[str]) -> bool:
            try:
                value = value_of(f, m)
                return value is not None and bool(low_of(f, m) <= value <= high_of(f, m))
            except TypeError:
                return False

        return between
    if isinstance(node, In):
        value_of, options_of = _compile_value(node.expr), _compile_value(node.options)

        def inside(f: Mapping[str, Any], m: frozenset[str]) -> bool:
            try:
                return value_of(f, m) in options_of(f, m)
            except TypeError:
                return False

        return inside
    value = _compile_value(node)
    return lambda f, m: bool(value(f, m))


def _walk(node: Node) -> list[Node]:
    out: list[Node] = [node]
    for child in getattr(node, "items", ()) if isinstance(node, BoolOp | ListOf) else ():
        out.extend(_walk(child))
    for attr in ("expr", "left", "right", "low", "high", "options"):
        if hasattr(node, attr):
            out.extend(_walk(getattr(node, attr)))
    if isinstance(node, Call):
        for arg in node.args:
            out.extend(_walk(arg))
    return out


def _text_arg(call: Call) -> str:
    arg = call.args[0]
    return str(arg.value) if isinstance(arg, Lit) else ""


# --- segment sets --------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentDefinition:
    name: str
    description: str
    source: str
    rule: Node
    requires: tuple[str, ...]


class SegmentSet:
    """Validated segment definitions, evaluated in dependency order."""

    def __init__(
        self, definitions: list[SegmentDefinition], max_segments: int = DEFAULT_MAX_SEGMENTS
    ) -> None:
        if len(definitions) > max_segments:
            raise RuleError(
                definitions[max_segments].name,
                f"{len(definitions)} segments defined; the cap is {max_segments} "
                "(over-segmentation dilutes personalization; raise max_segments deliberately)",
            )
        by_name = {d.name: d for d in definitions}
        self.order: list[SegmentDefinition] = []
        state: dict[str, str] = {}

        def visit(d: SegmentDefinition, path: tuple[str, ...]) -> None:
            if state.get(d.name) == "done":
                return
            if state.get(d.name) == "busy":
                raise RuleError(
                    d.name, f"segments require each other in a cycle: {' -> '.join((*path, d.name))}"
                )
            state[d.name] = "busy"
            referenced = [
                _text_arg(n) for n in _walk(d.rule) if isinstance(n, Call) and n.name == "in_segment"
            ]
            for dep in (*d.requires, *referenced):
                if dep not in by_name:
                    raise RuleError(d.name, f"refers to unknown segment {dep!r}")
                visit(by_name[dep], (*path, d.name))
            state[d.name] = "done"
            self.order.append(d)

        for d in definitions:
            visit(d, ())
        self.definitions = by_name

    def evaluate(self, facts: Mapping[str, Any]) -> frozenset[str]:
        member: set[str] = set()
        for d, truth in self._compiled:
            if all(r in member for r in d.requires) and truth(facts, frozenset(member)):
                member.add(d.name)
        return frozenset(member)

    @functools.cached_property
    def _compiled(self) -> list[tuple[SegmentDefinition, Compiled]]:
        return [(d, compile_rule(d.rule)) for d in self.order]

    def next_change_ms(
        self, doc: Mapping[str, Any], now_ms: int, rules: ProfileRules | None = None
    ) -> int | None:
        """The next instant after ``now_ms`` at which a time-relative condition can flip with no event.

        ``rules`` are the profile rules the facts are computed with: the lifecycle stage flips
        at their dormant/churned thresholds (``LIFECYCLE_*_DAYS``), not at fixed ones.
        """
        first, last = doc.get("first_seen_ms"), doc.get("last_seen_ms")
        first_offsets, last_offsets, sessions = self._anchors
        candidates: list[int] = []
        if first is not None:
            candidates.extend(first + off for off in first_offsets)
        if last is not None:
            candidates.extend(last + off for off in last_offsets)
            if sessions:  # lifecycle (and the week of sessions) moves with idleness
                lifecycle = rules or ProfileRules()
                candidates.extend(
                    last + t + 1 for t in (lifecycle.dormant_after_ms, lifecycle.churned_after_ms)
                )
        if sessions:
            candidates.extend(t + 7 * DAY_MS + 1 for t in doc.get("sessions", {}).get("recent_ms", []))
        future = [c for c in candidates if c > now_ms]
        return min(future) if future else None

    @functools.cached_property
    def _anchors(self) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
        """Offsets (ms) after first / last seen at which some rule can flip, computed once from the rules."""
        first: set[int] = set()
        last: set[int] = set()
        sessions = False
        for d in self.order:
            for node in _walk(d.rule):
                if isinstance(node, Call) and node.name == "signed_up_within":
                    first.add(node.args[0].ms + 1)  # type: ignore[union-attr]
                elif isinstance(node, Call) and node.name == "last_seen_more_than":
                    last.add(node.args[0].ms + 1)  # type: ignore[union-attr]
                elif isinstance(node, Compare | Between):
                    names = [n.name for n in _walk(node) if isinstance(n, Name)]
                    bounds = [
                        n.value
                        for n in _walk(node)
                        if isinstance(n, Lit)
                        and isinstance(n.value, int | float)
                        and not isinstance(n.value, bool)
                    ]
                    if "days_since_signup" in names:
                        first.update(int(b * DAY_MS) + 1 for b in bounds)
                    if "days_since_last_seen" in names:
                        last.update(int(b * DAY_MS) + 1 for b in bounds)
                    if "sessions_per_week" in names or "lifecycle" in names:
                        sessions = True  # the lifecycle thresholds come with the profile rules
        return tuple(sorted(first)), tuple(sorted(last)), sessions


class _Segment(Strict):
    when: str
    description: str = ""
    requires: list[str] = Field(default_factory=list)


class _SegmentsFile(Strict):
    segments: dict[str, _Segment] = Field(default_factory=dict)


def load_segments(path: Path, max_segments: int = DEFAULT_MAX_SEGMENTS) -> SegmentSet:
    """Read and validate a segments TOML file; any mistake raises RuleError naming the segment."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RuleError(str(path), f"cannot read the segments file: {exc}") from exc
    try:
        parsed = validate(_SegmentsFile, raw)
    except TomlError as exc:  # "segments.<name>": the segment at fault
        name = exc.where.split(".")[1] if exc.where.startswith("segments.") else exc.where
        raise RuleError(name, exc.problem) from exc
    definitions = []
    for name, entry in parsed.segments.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise RuleError(name, "segment names are lower_snake_case")
        definitions.append(
            SegmentDefinition(
                name, entry.description, entry.when, parse_rule(name, entry.when), tuple(entry.requires)
            )
        )
    return SegmentSet(definitions, max_segments)
