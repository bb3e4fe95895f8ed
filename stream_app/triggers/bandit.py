"""A bandit among a trigger type's variants, per context (the user's cluster). Pure: no I/O.

Thompson sampling on Beta(1 + rewards, 1 + pulls - rewards) per arm, with a floor of
exploration: with probability ``exploration`` the arm is drawn by the variants' weights
instead (so every arm keeps being measured, and a shift in what works is noticed).

Deterministic: the random draws are seeded by the trigger id, so recomputing a decision
(a redelivery, a second timer, a replay) with the same statistics gives the same arm.
The decision is stored with the trigger in the profile anyway; the seed only makes the
function a function.

A *pull* is a treated trigger sent with the arm's variant; a *reward* is its outcome of the
type's ``reward`` kind (``clicked`` by default) reported back (``Intervention Clicked``).
Both are counted once per trigger id (:mod:`stream_app.store.bandit`). The holdout stays
outside the bandit: control users get no intervention, whatever the arms say.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stream_app.triggers.config import TriggerConfig, Variant, pick_by_weight

NO_CLUSTER = "all"  # the context of users without a cluster (no model yet, or no behaviour)


@dataclass(frozen=True, slots=True)
class ArmStats:
    pulls: int = 0
    rewards: int = 0

    @property
    def rate(self) -> float:
        return self.rewards / self.pulls if self.pulls else 0.0


#: (trigger type, context, variant) -> counts
Arms = Mapping[tuple[str, str, str], ArmStats]


@dataclass(frozen=True, slots=True)
class ArmEvent:
    """One pull or one reward of an arm, counted once per ``trigger_id``."""

    type: str
    context: str
    variant: str
    trigger_id: str


def context_of(cluster_id: str | None) -> str:
    return f"cluster:{cluster_id}" if cluster_id else NO_CLUSTER


def choose(
    seed: str, type_: str, context: str, variants: Sequence[Variant], arms: Arms, exploration: float
) -> Variant:
    """The variant for one treated trigger (``seed``: its trigger id)."""
    rng = random.Random(int.from_bytes(hashlib.sha256(f"bandit\x1f{seed}".encode()).digest()[:8], "big"))
    if rng.random() < exploration:
        return pick_by_weight(rng.random(), variants)
    best: Variant = variants[0]
    best_draw = -1.0
    for variant in variants:
        stats = arms.get((type_, context, variant.name), ArmStats())
        failures = max(0, stats.pulls - stats.rewards)
        draw = rng.betavariate(1 + min(stats.rewards, stats.pulls), 1 + failures)
        if draw > best_draw:
            best, best_draw = variant, draw
    return best


def pulls_of(messages: Sequence[Mapping[str, Any]]) -> list[ArmEvent]:
    """The pulls among trigger messages sent: treated triggers whose variant the bandit chose."""
    out = []
    for m in messages:
        policy = m.get("policy")
        if isinstance(policy, Mapping) and policy.get("kind") == "bandit" and m.get("group") == "treatment":
            out.append(ArmEvent(m["type"], policy["context"], m["variant"], m["trigger_id"]))
    return out


def rewards_of(
    fired: Sequence[Mapping[str, Any]], noted: Sequence[tuple[str, str]], config: TriggerConfig
) -> list[ArmEvent]:
    """The rewards among outcomes noted for the first time (``(trigger id, outcome)``): those of
    the trigger type's reward kind, for triggers the bandit chose (the profile's fired records;
    a trigger older than the records kept is not credited)."""
    by_id = {f["trigger_id"]: f for f in fired if "arm" in f}
    out = []
    for tid, outcome in noted:
        record = by_id.get(tid)
        if record is None:
            continue
        ttype = config.types.get(record["type"])
        if ttype is not None and ttype.reward == outcome:
            out.append(ArmEvent(record["type"], record["arm"], record["variant"], tid))
    return out
