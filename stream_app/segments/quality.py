"""Cluster quality on synthetic users with known archetypes (benchmarks and tests).

Profiles are built the way the engine builds them (the pure pipeline on the in-memory
store, identity links included) from :mod:`stream_app.synthetic` streams.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson

from stream_app.contract import ContractRules
from stream_app.metrics import Metrics
from stream_app.pipeline import EventProcessor, Record
from stream_app.profile import Profile, ProfileRules, StepDuration
from stream_app.segments.cluster_model import features
from stream_app.store.profiles import InMemoryProfileStore
from stream_app.synthetic import generate_users, interleaved_stream, record_key

T0 = 1_795_000_000_000


@dataclass
class Population:
    user_ids: list[str]
    archetypes: list[str]
    docs: list[Profile]
    step_means: dict[str, float]

    def vectors(self) -> list[list[float]]:
        return [features(d, self.step_means) for d in self.docs]


def simulate(users: int, seed: int) -> Population:
    """``users`` synthetic users run through the pipeline; their final profiles and step means."""
    return asyncio.run(build(users, seed))


async def build(users: int, seed: int) -> Population:
    """:func:`simulate` for callers already inside an event loop."""
    sim = generate_users(users, seed)
    store = InMemoryProfileStore()
    durations: dict[str, list[float]] = {}

    async def stats(batch: list[StepDuration]) -> None:
        for d in batch:
            durations.setdefault(f"{d.flow}|{d.step}", []).append(d.duration_s)

    processor = EventProcessor(
        store, ContractRules(pii_salt=b"q"), ProfileRules(), Metrics(), step_stats=stats
    )
    stream = list(interleaved_stream(sim, T0, seed))
    records = [Record(orjson.dumps(e), record_key(e), "sim", 0, i, None) for i, e in enumerate(stream)]
    for i in range(0, len(records), 2000):
        await processor.process(records[i : i + 2000])
    docs, ids, kinds = [], [], []
    for user in sim:
        raw = store.profiles.get(user.user_id)
        if raw is None:
            continue
        ids.append(user.user_id)
        kinds.append(user.archetype)
        docs.append(orjson.loads(raw[1]))
    means = {k: sum(v) / len(v) for k, v in durations.items()}
    return Population(ids, kinds, docs, means)
