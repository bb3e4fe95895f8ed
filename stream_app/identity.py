"""Identity hygiene: which links between ids are allowed. Pure: no I/O.

An ``identify`` with an ``anonymousId`` and an ``alias`` fold one id's history into
another profile. Real traffic makes that dangerous: SDK bugs send placeholder ids
(blocked in :mod:`stream_app.contract`), and a merge that follows a shared or recycled
id folds strangers together, who then share segments and triggers. Two guards, as
Segment and RudderStack have them:

* a cap on the ids folded into one profile (``IDENTITY_MAX_MERGED_IDS``): a further
  link is refused, counted and logged, never silently truncated (erasure follows the
  list of merged ids, so it must stay complete);
* an identified profile (one that has had events with its own ``userId``) is never
  absorbed into another unless ``IDENTITY_MERGE_IDENTIFIED=true``: the anonymous
  history of a visitor joins a user, two users never merge by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

from stream_app.profile import Profile

#: outcomes of a refused link (labels of ``onboarding_identity_merges_total``)
REFUSED_IDENTIFIED = "refused_identified"
REFUSED_LIMIT = "refused_limit"


@dataclass(frozen=True, slots=True)
class IdentityRules:
    max_merged_ids: int = 50
    merge_identified: bool = False


def refuse_link(source: Profile | None, target: Profile | None, rules: IdentityRules) -> str | None:
    """Why linking ``source`` into ``target`` must not happen (an outcome label), or None."""
    if source is not None and source.get("identified") and not rules.merge_identified:
        return REFUSED_IDENTIFIED
    merged = len((target or {}).get("merged_from", ())) + 1 + len((source or {}).get("merged_from", ()))
    if merged > rules.max_merged_ids:
        return REFUSED_LIMIT
    return None
