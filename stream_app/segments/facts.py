"""Facts a segment rule can name, derived from a profile document at an instant. Pure.

Times are epoch milliseconds; ``now_ms`` is always passed in, never read from a clock.
"""

from __future__ import annotations

from typing import Any

from stream_app.profile import Profile, ProfileRules, lifecycle_stage

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS

#: name -> one-line description (the rule language's documentation is generated from it)
FACTS: dict[str, str] = {
    "sessions": "number of sessions",
    "event_count": "events applied",
    "days_since_signup": "days since first seen",
    "days_since_last_seen": "days since last seen",
    "sessions_per_week": "sessions started in the last 7 days (not extrapolated for younger accounts)",
    "features_used": "distinct features used",
    "feature_events": "Feature Used events",
    "feature_usage_score": "0-100: 10 points per distinct feature (max 60) + 2 per feature event (max 40)",
    "help_views": "Help Viewed events, all steps",
    "onboarding_completed": "true if any onboarding flow is completed",
    "steps_completed": "onboarding steps completed, all flows",
    "lifecycle": "new | activated | active | dormant | churned",
    "device_type": "mobile | tablet | desktop | bot | other",
    "country": "ISO country code, upper case",
    "consent_personalization": "latest consent: true, false, or null when never given",
}


def profile_facts(doc: Profile, now_ms: int, rules: ProfileRules | None = None) -> dict[str, Any]:
    first, last = doc.get("first_seen_ms"), doc.get("last_seen_ms")
    sessions = doc.get("sessions", {})
    recent = [t for t in sessions.get("recent_ms", []) if now_ms - WEEK_MS < t <= now_ms]
    # Not extrapolated for accounts younger than a week: one session on day one is not
    # "7 a week", and an extrapolated rate would drift with age at instants no deadline marks.
    per_week = len(recent)
    features = doc.get("features", {})
    feature_events = sum(features.values())
    flows = doc.get("onboarding", {}).values()
    return {
        "sessions": sessions.get("count", 0),
        "event_count": doc.get("event_count", 0),
        "days_since_signup": (now_ms - first) / DAY_MS if first is not None else None,
        "days_since_last_seen": (now_ms - last) / DAY_MS if last is not None else None,
        "sessions_per_week": per_week,
        "features_used": len(features),
        "feature_events": feature_events,
        "feature_usage_score": min(60, 10 * len(features)) + min(40, 2 * feature_events),
        "help_views": sum(doc.get("help_views", {}).values()),
        "onboarding_completed": any(f.get("status") == "completed" for f in flows),
        "steps_completed": sum(len(f.get("completed_steps", {})) for f in flows),
        "lifecycle": lifecycle_stage(doc, now_ms, rules or ProfileRules()),
        "device_type": (doc.get("device") or {}).get("type"),
        "country": doc.get("country"),
        "consent_personalization": doc.get("consent", {}).get("personalization"),
        # raw material of the functions (not nameable in rules)
        "_doc": doc,
        "_now_ms": now_ms,
    }
