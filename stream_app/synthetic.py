"""A seeded generator of realistic onboarding event streams with known ground truth.

Simulated users belong to an *archetype* (quick adopters, steady, passive,
struggling) that shapes their step times, help views, abandonment, sessions and
feature use. Events follow the wire contract (``schemas/onboarding.events.schema.json``):
an anonymous landing visit, an ``identify`` that links the anonymousId to the userId,
the onboarding steps, later sessions with feature use. Used by the demo, the
benchmarks and the clustering quality measurement. Deterministic for a given seed;
never reads the clock.
"""

from __future__ import annotations

import heapq
import random
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from stream_app.contract import iso_ms

FLOW = "signup"
STEPS = ("account", "profile", "connect_data", "invite_team", "first_project")
FEATURES = (
    "search",
    "export",
    "dashboards",
    "alerts",
    "api",
    "sharing",
    "templates",
    "integrations",
    "comments",
    "automation",
)
DEVICES = (
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/17.2 Mobile/15E148 Safari/604.1",
        "mobile",
    ),
    (
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 "
        "Mobile Safari/537.36",
        "mobile",
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 "
        "Safari/537.36",
        "desktop",
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_2) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 "
        "Safari/605.1.15",
        "desktop",
    ),
    (
        "Mozilla/5.0 (iPad; CPU OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 "
        "Mobile/15E148 Safari/604.1",
        "tablet",
    ),
)
LOCALES = (
    ("en-US", "us"),
    ("de-DE", "de"),
    ("fr-FR", "fr"),
    ("en-GB", "gb"),
    ("es-ES", "es"),
    ("ja-JP", "jp"),
)


@dataclass(frozen=True)
class Archetype:
    step_seconds: tuple[float, float]  # typical time to finish one step (log-uniform range)
    abandon_per_step: float  # chance to stop onboarding at a step
    help_views: tuple[int, int]  # help views per step (min, max), drawn when help_chance hits
    help_chance: float
    later_sessions: tuple[int, int]
    features: tuple[int, int]  # distinct features used
    uses_per_feature: tuple[int, int]
    session_gap_hours: tuple[float, float]


ARCHETYPES: dict[str, Archetype] = {
    "quick_adopter": Archetype((10, 40), 0.0, (1, 1), 0.02, (5, 9), (6, 9), (2, 4), (2, 12)),
    "steady": Archetype((60, 180), 0.02, (1, 1), 0.15, (3, 5), (2, 4), (1, 3), (12, 36)),
    "passive": Archetype((150, 400), 0.25, (1, 1), 0.05, (0, 1), (0, 1), (1, 1), (48, 120)),
    "struggling": Archetype((600, 1500), 0.12, (2, 5), 0.85, (1, 3), (0, 2), (1, 2), (24, 72)),
}
DEFAULT_MIX: dict[str, float] = {"quick_adopter": 0.2, "steady": 0.35, "passive": 0.25, "struggling": 0.2}


#: Per archetype, two typical orders in which users adopt features (two jobs to be done);
#: each user follows one, with a few neighbours swapped (:func:`adoption_path`).
FEATURE_PATHS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "quick_adopter": (
        (
            "api",
            "automation",
            "integrations",
            "alerts",
            "dashboards",
            "sharing",
            "export",
            "search",
            "templates",
            "comments",
        ),
        (
            "dashboards",
            "sharing",
            "comments",
            "templates",
            "export",
            "search",
            "alerts",
            "integrations",
            "api",
            "automation",
        ),
    ),
    "steady": (
        (
            "dashboards",
            "export",
            "alerts",
            "sharing",
            "search",
            "templates",
            "comments",
            "integrations",
            "api",
            "automation",
        ),
        (
            "search",
            "templates",
            "comments",
            "sharing",
            "integrations",
            "api",
            "dashboards",
            "automation",
            "export",
            "alerts",
        ),
    ),
    "passive": (
        (
            "search",
            "export",
            "dashboards",
            "templates",
            "sharing",
            "comments",
            "alerts",
            "api",
            "integrations",
            "automation",
        ),
        (
            "templates",
            "comments",
            "sharing",
            "alerts",
            "search",
            "api",
            "dashboards",
            "export",
            "automation",
            "integrations",
        ),
    ),
    "struggling": (
        (
            "templates",
            "comments",
            "search",
            "sharing",
            "dashboards",
            "export",
            "alerts",
            "integrations",
            "automation",
            "api",
        ),
        (
            "search",
            "dashboards",
            "export",
            "alerts",
            "templates",
            "api",
            "comments",
            "sharing",
            "integrations",
            "automation",
        ),
    ),
}


def adoption_path(archetype: str, rng: random.Random, swap_chance: float = 0.15) -> list[str]:
    """The order in which one user of ``archetype`` would adopt every feature."""
    path = list(FEATURE_PATHS[archetype][rng.randrange(2)])
    for i in range(len(path) - 1):
        if rng.random() < swap_chance:
            path[i], path[i + 1] = path[i + 1], path[i]
    return path


def adopted_features(events: list[dict[str, Any]]) -> list[str]:
    """The features of a user's events in the order of their first use."""
    names = [e["properties"]["feature"] for e in events if e.get("event") == "Feature Used"]
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class SimUser:
    user_id: str
    anonymous_id: str
    archetype: str
    seed: int


def generate_users(n: int, seed: int, mix: Mapping[str, float] | None = None) -> list[SimUser]:
    """``n`` users with archetypes drawn from ``mix`` (default :data:`DEFAULT_MIX`)."""
    rng = random.Random(seed)
    weights = dict(mix or DEFAULT_MIX)
    names = list(weights)
    users = []
    for i in range(n):
        archetype = rng.choices(names, [weights[a] for a in names])[0]
        tag = uuid.UUID(int=rng.getrandbits(128)).hex[:12]
        users.append(SimUser(f"user-{seed}-{i}-{tag[:6]}", f"anon-{tag}", archetype, rng.getrandbits(32)))
    return users


def _between(rng: random.Random, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return low if high <= low else rng.uniform(low, high)


def user_events(user: SimUser, start_ms: int, time_scale: float = 1.0) -> list[dict[str, Any]]:
    """The user's whole event sequence, in event-time order. ``time_scale`` compresses think times."""
    rng = random.Random(user.seed)
    arch = ARCHETYPES[user.archetype]
    ua, _device = DEVICES[rng.randrange(len(DEVICES))]
    locale, country = LOCALES[rng.randrange(len(LOCALES))]
    consent = rng.random() > 0.05
    events: list[dict[str, Any]] = []
    clock = float(start_ms)

    def emit(kind: str, after_s: float, ids: str = "user", **fields: Any) -> None:
        nonlocal clock
        clock += max(0.001, after_s) * 1000 * time_scale
        doc: dict[str, Any] = {
            "type": kind,
            "messageId": str(uuid.UUID(int=rng.getrandbits(128))),
            "timestamp": iso_ms(int(clock)),
        }
        if ids in ("anon", "both"):
            doc["anonymousId"] = user.anonymous_id
        if ids in ("user", "both"):
            doc["userId"] = user.user_id
        doc["context"] = {
            "userAgent": ua,
            "locale": locale,
            "location": {"country": country},
            "consent": {"categoryPreferences": {"personalization": consent}},
        }
        doc.update(fields)
        events.append(doc)

    emit("page", 0, "anon", name="Landing", properties={"path": "/"})
    emit("track", 1, "anon", event="Session Started", properties={})
    emit("page", rng.uniform(5, 30), "anon", name="Pricing", properties={"path": "/pricing"})
    emit(
        "identify",
        rng.uniform(10, 60),
        "both",
        traits={
            "email": f"{user.user_id}@example.com",
            "plan": rng.choice(["free", "trial", "pro"]),
            "role": rng.choice(["developer", "marketer", "founder", "analyst"]),
        },
    )
    completed_all = True
    for step in STEPS:
        emit(
            "track",
            rng.uniform(1, 5),
            event="Onboarding Step Started",
            properties={"flow": FLOW, "step": step},
        )
        duration = _between(rng, arch.step_seconds) * rng.lognormvariate(0, 0.25)
        if rng.random() < arch.help_chance:
            for _ in range(rng.randint(*arch.help_views)):
                emit(
                    "track",
                    duration / (arch.help_views[1] + 2),
                    event="Help Viewed",
                    properties={"step": step},
                )
        if rng.random() < arch.abandon_per_step:
            completed_all = False
            break
        emit(
            "track",
            duration * 0.6,
            event="Onboarding Step Completed",
            properties={"flow": FLOW, "step": step},
        )
    if completed_all:
        emit("track", 1, event="Onboarding Completed", properties={"flow": FLOW})
    features = adoption_path(user.archetype, rng)[: rng.randint(*arch.features)]
    for feature in features[:2]:
        emit("track", rng.uniform(5, 60), event="Feature Used", properties={"feature": feature})
    adopted = min(2, len(features))
    sessions = rng.randint(*arch.later_sessions)
    for session in range(sessions):
        emit("track", _between(rng, arch.session_gap_hours) * 3600, event="Session Started", properties={})
        known = features[:adopted]
        for feature in rng.sample(known, min(len(known), rng.randint(0, len(known)))):
            for _use in range(rng.randint(*arch.uses_per_feature)):
                emit("track", rng.uniform(10, 120), event="Feature Used", properties={"feature": feature})
        # one new feature a session, in the user's own order (the rest in the last session)
        new = features[adopted:] if session == sessions - 1 else features[adopted : adopted + 1]
        for feature in new:
            for _use in range(rng.randint(*arch.uses_per_feature)):
                emit("track", rng.uniform(10, 120), event="Feature Used", properties={"feature": feature})
        adopted += len(new)
        emit("page", rng.uniform(5, 60), name="Dashboard", properties={"path": "/app"})
    return events


def interleaved_stream(
    users: list[SimUser], start_ms: int, seed: int, time_scale: float = 1.0, arrival_spread_s: float = 600.0
) -> Iterator[dict[str, Any]]:
    """All users' events merged by event time; users arrive over ``arrival_spread_s`` seconds."""
    rng = random.Random(seed)
    heap: list[tuple[str, int, int, list[dict[str, Any]]]] = []
    for index, user in enumerate(users):
        first = start_ms + int(rng.uniform(0, arrival_spread_s) * 1000 * time_scale)
        seq = user_events(user, first, time_scale)
        heap.append((seq[0]["timestamp"], index, 0, seq))
    heapq.heapify(heap)
    while heap:
        _ts, index, pos, seq = heapq.heappop(heap)
        yield seq[pos]
        if pos + 1 < len(seq):
            heapq.heappush(heap, (seq[pos + 1]["timestamp"], index, pos + 1, seq))


def record_key(event: Mapping[str, Any]) -> bytes:
    """The Kafka record key of the contract: userId, else anonymousId."""
    return str(event.get("userId") or event.get("anonymousId")).encode()
