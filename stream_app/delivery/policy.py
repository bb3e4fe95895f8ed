"""Webhook delivery decisions: which endpoints get a trigger, how it is signed, when to retry.

No I/O. ``config/webhooks.toml`` (``WEBHOOKS_FILE``) lists the endpoints::

    [[endpoints]]
    name = "in_app"                      # a metric label and a dead-letter header
    url = "https://notify.example.com/hooks/onboarding"
    types = ["stalled_step"]             # trigger types to send (absent: all)
    secret_env = "WEBHOOK_SECRET_IN_APP" # environment variable holding the HMAC key
    timeout_seconds = 5
    max_attempts = 6

Each request carries the trigger JSON as sent to ``onboarding.triggers``, ``Idempotency-Key``
= ``trigger_id`` (a re-delivery after a crash repeats it: receivers dedupe by it) and
``Onboarding-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``
(Stripe's scheme: the timestamp in the signed text stops replays of old requests).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from annotated_types import Ge, Gt, Le
from pydantic import Field

from stream_app.errors import ConfigError
from stream_app.tomlmodels import Strict, TomlError, validate

SIGNATURE_HEADER = "Onboarding-Signature"
NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class Endpoint(Strict):
    name: str = Field(pattern=NAME.pattern)
    url: str = Field(pattern=r"^https?://")
    types: list[str] | None = None
    secret_env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$")
    timeout_seconds: Annotated[float, Gt(0), Le(60)] = 5.0
    max_attempts: Annotated[int, Ge(1), Le(50)] = 6


class _File(Strict):
    endpoints: list[Endpoint] = Field(min_length=1)


@dataclass(frozen=True)
class Target:
    """An endpoint with its secret resolved."""

    endpoint: Endpoint
    secret: bytes

    @property
    def name(self) -> str:
        return self.endpoint.name

    def wants(self, trigger: Mapping[str, Any]) -> bool:
        types = self.endpoint.types
        return types is None or trigger.get("type") in types


def load_targets(path: Path, environ: Mapping[str, str] | None = None) -> list[Target]:
    """The endpoints of ``path`` with their secrets; a mistake stops start-up naming WEBHOOKS_FILE."""
    env = os.environ if environ is None else environ
    try:
        raw = tomllib.loads(path.read_text())
        file = validate(_File, raw)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("WEBHOOKS_FILE", f"{path}: {exc}") from exc
    except TomlError as exc:
        raise ConfigError("WEBHOOKS_FILE", f"{path}: {exc}") from exc
    names = [e.name for e in file.endpoints]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError("WEBHOOKS_FILE", f"{path}: endpoint names {dupes} are used twice")
    targets = []
    for i, endpoint in enumerate(file.endpoints):
        secret = env.get(endpoint.secret_env, "")
        if len(secret) < 16:
            raise ConfigError(
                endpoint.secret_env,
                f"the signing secret of endpoint {endpoint.name!r} (endpoints[{i}].secret_env) is not set "
                "or shorter than 16 characters",
            )
        targets.append(Target(endpoint, secret.encode()))
    return targets


def signature(secret: bytes, body: bytes, at_s: int) -> str:
    """The ``Onboarding-Signature`` header value for ``body`` sent at ``at_s``."""
    mac = hmac.new(secret, f"{at_s}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at_s},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, now_s: int, tolerance_s: int = 300) -> bool:
    """What a receiver checks (documented for them; the tests use it too)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        at_s = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now_s - at_s) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, body, at_s), header.strip())


class Verdict(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # an outage of the endpoint: try again later
    REFUSED = "refused"  # the endpoint rejects this request for good: dead-letter it


def judge(status: int | None) -> Verdict:
    """An answer's meaning: 2xx delivered; no answer, 408, 429 and 5xx retried; other 4xx refused."""
    if status is None or status in (408, 425, 429) or status >= 500:
        return Verdict.RETRY
    if 200 <= status < 300:
        return Verdict.DELIVERED
    return Verdict.REFUSED


def backoff(attempt: int, rng: random.Random, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): exponential with "equal
    jitter" (half fixed, half random), so retries spread out but never come at once."""
    step = min(cap_s, base_s * 2 ** (attempt - 1))
    return step / 2 + rng.uniform(0, step / 2)
