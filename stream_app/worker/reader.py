"""The reader's view of a profile, for the worker's HTTP API and the ``stream-app profile`` command.

Follows identity links, applies the traits policy again (a document written before a
stricter policy never serves what it now forbids), renders times as ISO-8601, evaluates the
rule segments at read time (time-relative rules are current) and hides the engine's own
bookkeeping. Needs only the profile store: no broker, no worker running.
"""

from __future__ import annotations

import time
from typing import Any

from stream_app.contract import ContractRules, iso_ms
from stream_app.privacy import apply_policy
from stream_app.profile import Profile, ProfileRules, is_tombstone, render_profile
from stream_app.segments.facts import profile_facts
from stream_app.segments.rules import SegmentSet
from stream_app.store.profiles import ProfileStore
from stream_app.store.step_stats import StepStats, StepStatsStore

MAX_LINK_HOPS = 4


class ProfileReader:
    def __init__(
        self,
        store: ProfileStore,
        rules: ProfileRules,
        segments: SegmentSet,
        contract: ContractRules,
        step_stats: StepStatsStore | None = None,
    ) -> None:
        self.store, self.rules, self.segments, self.contract = store, rules, segments, contract
        self.stats = step_stats

    async def step_stats(self) -> list[StepStats]:
        """Every step's completion statistics (``/stats/steps``)."""
        return await self.stats.all() if self.stats is not None else []

    async def read(self, user_id: str) -> Profile | None:
        """The view of ``user_id``'s profile (or of the user it is linked to); None when unknown or erased."""
        doc = await self.store.get(user_id)
        for _hop in range(MAX_LINK_HOPS):
            if not is_tombstone(doc):
                break
            doc = await self.store.get(doc["merged_into"])
        if doc is None or is_tombstone(doc):
            return None
        now_ms = int(time.time() * 1000)
        doc = self._within_policy(doc)
        view = render_profile(doc, now_ms, self.rules)
        engine = view.pop("engine", None) or {}
        refused = doc.get("consent", {}).get("personalization") is False
        facts = profile_facts(doc, now_ms, self.rules)
        view["segments"] = [] if refused else sorted(self.segments.evaluate(facts))
        cluster = engine.get("cluster")
        view["cluster"] = {"id": cluster["id"], "name": cluster["name"]} if cluster else None
        view["triggers"] = [
            {
                "trigger_id": f["trigger_id"],
                "type": f["type"],
                "subject": f["subject"],
                "group": f["group"],
                "at": iso_ms(f["at"]),
            }
            for f in engine.get("fired", [])
        ]
        return view

    def _within_policy(self, doc: Profile) -> Profile:
        policy, salt = self.contract.traits_policy, self.contract.pii_salt

        def allowed(traits: Any) -> dict[str, Any]:
            return apply_policy(traits or {}, policy, salt)[0]

        doc = dict(doc)
        doc["traits"] = allowed(doc.get("traits"))
        doc["groups"] = {
            gid: {**group, "traits": allowed(group.get("traits"))}
            for gid, group in (doc.get("groups") or {}).items()
            if isinstance(group, dict)
        }
        return doc
