"""Validating the engine's TOML files with pydantic, with errors that name the table and key.

Each file (triggers, segments, topics, traits policy) has a pydantic model with
``extra="forbid"``; :func:`validate` turns the first validation error into ``(where,
problem)``: the dotted table path (``stalled_step.actions[0]``) and a sentence naming the key
(```multiplier` must be >= 1``), which the file's own error type then carries.
"""

from __future__ import annotations

from typing import Any, TypeVar

from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """A table of a config file: unknown keys are errors, values are not coerced from strings."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TomlError(ValueError):
    def __init__(self, where: str, problem: str) -> None:
        self.where, self.problem = where, problem
        super().__init__(f"[{where}]: {problem}")


def validate(model: type[M], raw: Any, root: str = "") -> M:
    """``model`` from a parsed TOML table, or :class:`TomlError` naming the table and key."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _explain(model, exc, root) from exc


def _explain(model: type[BaseModel], exc: ValidationError, root: str) -> TomlError:
    errors = exc.errors()
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    if first["type"] == "extra_forbidden":  # every unknown key of that table at once
        table = loc[:-1]
        unknown = sorted(
            str(e["loc"][-1])
            for e in errors
            if e["type"] == "extra_forbidden" and [str(p) for p in e["loc"][:-1]] == table
        )
        return TomlError(_where(root, table), f"unknown keys {unknown}")
    key = loc[-1] if loc else ""
    table = loc[:-1]
    field = _field(model, loc)
    if first["type"] in ("greater_than_equal", "less_than_equal", "greater_than", "less_than") and field:
        low = next((m.ge for m in field.metadata if isinstance(m, Ge)), None)
        above = next((m.gt for m in field.metadata if isinstance(m, Gt)), None)
        high = next((m.le for m in field.metadata if isinstance(m, Le)), None)
        if low is not None and high is not None:
            return TomlError(
                _where(root, table), f"`{key}` must be between {low:g} and {high:g}, got {first['input']!r}"
            )
        if above is not None:
            return TomlError(_where(root, table), f"`{key}` must be > {above:g}, got {first['input']!r}")
        return TomlError(_where(root, table), f"`{key}` must be >= {low:g}, got {first['input']!r}")
    if first["type"] in ("float_type", "int_type", "float_parsing", "int_parsing", "int_from_float"):
        return TomlError(_where(root, table), f"`{key}` must be a number, got {first['input']!r}")
    if first["type"] == "missing":
        return TomlError(_where(root, table), f"needs `{key}`")
    if first["type"] in ("string_type", "bool_type", "list_type", "dict_type", "model_type"):
        expected = first["type"].removesuffix("_type").replace("dict", "table").replace("model", "table")
        return TomlError(_where(root, table), f"`{key}` must be a {expected}, got {first['input']!r}")
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "value_error":  # a check of ours: its message names what it is about
        return TomlError(_where(root, loc), message)
    return TomlError(_where(root, table), f"`{key}`: {message}, got {first['input']!r}")


def _where(root: str, parts: list[str]) -> str:
    out = root
    for part in parts:
        if part.isdigit():
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else part
    return out or "(top)"


def _field(model: type[BaseModel], loc: list[str]) -> Any:
    """The FieldInfo at ``loc`` (through nested models), or None."""
    current: Any = model
    field = None
    for part in loc:
        if part.isdigit():
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return None
        field = fields[part]
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        nested = [a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        current = nested[0] if nested else None
    return field
