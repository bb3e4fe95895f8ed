"""``config/personalization.toml``: checklists and flags by rule segment or cluster.

Checklists are tried in file order and the first whose ``segments`` or ``clusters`` match
the user wins; ``[default]`` is the checklist of everybody else (unknown users, users who
refused personalization, users matching nothing). A flag is on for a user in any of its
segments or clusters. Clusters are named by the cluster model's names ("quick adopters",
"steady", "passive", "struggling") or ids (``c1``, ...). Errors name the table and key.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from annotated_types import Ge, Le
from pydantic import Field, field_validator

from stream_app.errors import StreamAppError
from stream_app.segments.cluster_model import NAME_PROFILES
from stream_app.tomlmodels import Strict, TomlError, validate

CLUSTER_ID = re.compile(r"^c[0-9]+$")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class PersonalizationConfigError(StreamAppError):
    pass


class Item(Strict):
    id: str = Field(pattern=NAME.pattern)
    title: str = Field(min_length=1, max_length=200)
    url: str | None = Field(None, max_length=2000)


class Checklist(Strict):
    name: str = Field(pattern=NAME.pattern)
    segments: list[str] = []
    clusters: list[str] = []
    items: list[Item] = Field(min_length=1, max_length=20)


class Default(Strict):
    name: str = Field(pattern=NAME.pattern)
    items: list[Item] = Field(min_length=1, max_length=20)


class Flag(Strict):
    segments: list[str] = []
    clusters: list[str] = []


class Recommendations(Strict):
    count: Annotated[int, Ge(0), Le(10)] = 3
    #: pairs and items seen for fewer users than this are not in the shared model
    min_support: Annotated[int, Ge(1), Le(1000)] = 5


class File(Strict):
    default: Default
    checklists: list[Checklist] = []
    flags: dict[str, Flag] = {}
    recommendations: Recommendations = Recommendations()

    @field_validator("flags")
    @classmethod
    def _flag_names(cls, flags: dict[str, Flag]) -> dict[str, Flag]:
        for name in flags:
            if not NAME.match(name):
                raise ValueError(f"flag name {name!r} must be lower-case letters, digits and _")
        return flags


@dataclass(frozen=True)
class PersonalizationConfig:
    default: Default
    checklists: tuple[Checklist, ...]
    flags: dict[str, Flag]
    recommendations: Recommendations


def parse_config(raw: dict[str, Any], segment_names: frozenset[str] | None = None) -> PersonalizationConfig:
    """The validated configuration; segment names are checked against ``segment_names``."""
    file = validate(File, raw)
    seen: set[str] = {file.default.name}
    for i, checklist in enumerate(file.checklists):
        where = f"checklists[{i}]"
        if checklist.name in seen:
            raise TomlError(where, f"`name` {checklist.name!r} is used twice")
        seen.add(checklist.name)
        if not checklist.segments and not checklist.clusters:
            raise TomlError(where, "needs `segments` or `clusters` (the default is [default])")
        _check_targets(where, checklist.segments, checklist.clusters, segment_names)
    for name, flag in file.flags.items():
        where = f"flags.{name}"
        if not flag.segments and not flag.clusters:
            raise TomlError(where, "needs `segments` or `clusters`")
        _check_targets(where, flag.segments, flag.clusters, segment_names)
    return PersonalizationConfig(file.default, tuple(file.checklists), file.flags, file.recommendations)


def _check_targets(
    where: str, segments: list[str], clusters: list[str], segment_names: frozenset[str] | None
) -> None:
    if segment_names is not None:
        unknown = sorted(set(segments) - segment_names)
        if unknown:
            raise TomlError(
                where, f"`segments`: no such segment {unknown} (defined: {sorted(segment_names)})"
            )
    bad = sorted(c for c in clusters if c not in NAME_PROFILES and not CLUSTER_ID.match(c))
    if bad:
        raise TomlError(
            where, f"`clusters`: {bad} is neither a cluster name {sorted(NAME_PROFILES)} nor an id like c1"
        )


def load_config(path: Path, segment_names: frozenset[str] | None = None) -> PersonalizationConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PersonalizationConfigError(f"{path}: {exc}") from exc
    try:
        return parse_config(raw, segment_names)
    except TomlError as exc:
        raise PersonalizationConfigError(f"{path}: {exc}") from exc
