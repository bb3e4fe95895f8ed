"""The HTTP front door: a Segment-compatible collector that produces to ``onboarding.events``."""
