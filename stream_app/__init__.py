"""Real-time onboarding personalization engine.

Kafka interaction events (Segment-spec shape) become Redis-backed user profiles,
segments and personalization triggers while the user is still there.
"""

__version__ = "0.1.0"
