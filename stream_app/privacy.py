"""The traits policy: which user and group traits a profile may keep, and in what form. Pure.

Traits arrive as whatever a frontend's ``identify``/``group`` call sends: often an email, a
name, an address, a phone number, nested in objects, in any letter case. Each trait name is
matched case-insensitively and ignoring separators (``First Name``, ``first_name`` and
``firstName`` are one name), at any depth, against the policy's lists:

* **keep**: stored as sent (an object is kept and its own traits judged the same way);
* **hash**: stored only as a salted HMAC-SHA256 under ``<name>_sha256``, wherever it appears;
* **drop**: never stored;
* anything not listed gets the policy's ``default`` (``drop`` as shipped: a trait is kept
  only if the policy says so); an unlisted *object* is looked into, and kept with what its
  own traits are allowed (``contact: {phone: ...}`` keeps ``contact.phone_sha256``).

Dropped traits are counted (``onboarding_traits_dropped_total``), never silently kept. The
policy is applied when an event is read (:mod:`stream_app.contract`) and again when a profile
is served, so a document written before a stricter policy never serves what it now forbids.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from stream_app.tomlmodels import Strict, TomlError, validate

HASH_SUFFIX = "_sha256"
Action = Literal["keep", "hash", "drop"]
_SEPARATORS = re.compile(r"[^a-z0-9]")


def normalize_name(name: str) -> str:
    """``First Name``, ``first_name``, ``FIRSTNAME``, ``first-name`` -> ``firstname``."""
    return _SEPARATORS.sub("", name.lower())


def hash_pii(value: str, salt: bytes) -> str:
    """Salted SHA-256 (HMAC) of a normalized PII value: the only form in which it is kept."""
    return hmac.new(salt, value.strip().lower().encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class TraitsPolicy:
    keep: frozenset[str] = frozenset()
    hash: frozenset[str] = frozenset({"email", "phone"})
    drop: frozenset[str] = frozenset()
    default: Action = "drop"
    max_traits: int = 50  # per profile (or group), at any depth; further ones are dropped
    max_value_chars: int = 256  # a longer string is free text: dropped
    _cache: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, keep: list[str], hash: list[str], drop: list[str], **kwargs: Any) -> TraitsPolicy:
        return cls(
            frozenset(map(normalize_name, keep)),
            frozenset(map(normalize_name, hash)),
            frozenset(map(normalize_name, drop)),
            **kwargs,
        )

    def action(self, name: str) -> Action | Literal["hashed", "unlisted"]:
        """What happens to a trait of this name (``hashed``: already a hash this policy made;
        ``unlisted``: not named by the policy, see :func:`apply_policy`)."""
        found = self._cache.get(name)
        if found is not None:
            return found  # type: ignore[return-value]
        key = normalize_name(name)
        result: Action | Literal["hashed", "unlisted"]
        if name.endswith(HASH_SUFFIX) and normalize_name(name[: -len(HASH_SUFFIX)]) in self.hash:
            result = "hashed"
        elif key in self.hash:
            result = "hash"
        elif key in self.drop:
            result = "drop"
        elif key in self.keep:
            result = "keep"
        else:
            result = "unlisted"
        if len(self._cache) < 10_000:
            self._cache[name] = result
        return result


@dataclass
class _Budget:
    left: int
    dropped: int = 0


def apply_policy(traits: Mapping[str, Any], policy: TraitsPolicy, salt: bytes) -> tuple[dict[str, Any], int]:
    """The traits the policy allows, in the form it allows; and how many were dropped."""
    budget = _Budget(policy.max_traits)
    return _apply(traits, policy, salt, budget), budget.dropped


def _apply(traits: Mapping[str, Any], policy: TraitsPolicy, salt: bytes, budget: _Budget) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in traits.items():
        if not isinstance(name, str):
            budget.dropped += 1
            continue
        action = policy.action(name)
        if action == "unlisted":
            if isinstance(value, dict):  # look inside: a phone in it is still hashed, not lost
                inner = _apply(value, policy, salt, budget)
                if inner:
                    out[name] = inner
                continue
            action = policy.default
        if action == "drop" or budget.left <= 0:
            budget.dropped += _leaves(value)
            continue
        if action == "hashed":
            if isinstance(value, str) and len(value) == 64:
                out[name] = value
                budget.left -= 1
            else:
                budget.dropped += 1
            continue
        if action == "hash":
            if isinstance(value, str | int | float) and not isinstance(value, bool) and str(value).strip():
                out[f"{name}{HASH_SUFFIX}"] = hash_pii(str(value), salt)
                budget.left -= 1
            else:  # an object or list under a hashed name: its parts are PII as well
                budget.dropped += _leaves(value)
            continue
        kept = _keep(value, policy, salt, budget)
        if kept is not _DROPPED:
            out[name] = kept
    return out


_DROPPED = object()


def _keep(value: Any, policy: TraitsPolicy, salt: bytes, budget: _Budget) -> Any:
    if isinstance(value, dict):
        return _apply(value, policy, salt, budget)
    if isinstance(value, list):
        items = [_keep(v, policy, salt, budget) for v in value[:20]]
        budget.dropped += max(0, len(value) - 20)
        return [v for v in items if v is not _DROPPED]
    if isinstance(value, str) and len(value) > policy.max_value_chars:
        budget.dropped += 1
        return _DROPPED
    budget.left -= 1
    return value


def _leaves(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_leaves(v) for v in value.values()) or 1
    if isinstance(value, list):
        return sum(_leaves(v) for v in value) or 1
    return 1


# --- the policy file ----------------------------------------------------------------------------

SHIPPED_POLICY = Path(__file__).resolve().parents[1] / "config" / "traits.toml"


@lru_cache(maxsize=1)
def shipped_policy() -> TraitsPolicy:
    """The policy in ``config/traits.toml`` (what a profile keeps unless TRAITS_POLICY_FILE says else)."""
    return load_policy(SHIPPED_POLICY)


class _Names(Strict):
    names: list[str] = Field(default_factory=list)


class _PolicyFile(Strict):
    default: Action = "drop"
    max_traits: int = Field(50, ge=1, le=1000)
    max_value_chars: int = Field(256, ge=1, le=65536)
    keep: _Names = Field(default_factory=_Names)
    hash: _Names = Field(default_factory=_Names)
    drop: _Names = Field(default_factory=_Names)


class PolicyError(ValueError):
    """The traits policy file is invalid; the message names the table and key."""


def load_policy(path: Path) -> TraitsPolicy:
    try:
        parsed = validate(_PolicyFile, tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"{path}: {exc}") from exc
    except TomlError as exc:
        raise PolicyError(f"{path}: {exc.where}: {exc.problem}") from exc
    overlap = {normalize_name(n) for n in parsed.keep.names} & {
        normalize_name(n) for n in parsed.hash.names + parsed.drop.names
    }
    if overlap:
        raise PolicyError(f"{path}: keep.names: {sorted(overlap)} also listed under hash or drop")
    return TraitsPolicy.of(
        parsed.keep.names,
        parsed.hash.names,
        parsed.drop.names,
        default=parsed.default,
        max_traits=parsed.max_traits,
        max_value_chars=parsed.max_value_chars,
    )
