"""Typed errors of the engine: one base class, a small hierarchy.

Every message says what the operator should do next.
"""

from __future__ import annotations


class StreamAppError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(StreamAppError):
    """A setting is missing or invalid; start-up stops and names the setting."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"invalid setting {setting}: {problem}")


class EmbeddedServiceError(StreamAppError):
    """An embedded broker or Redis could not be started; the message says which and why."""


class ContentionError(StreamAppError):
    """Profiles kept changing under a batch (other writers won every compare-and-set).

    Transient by nature: the batch is retried as a whole. A real bug raises something else,
    which is not retried as if it were contention.
    """


class RedisDataLost(StreamAppError):
    """Redis has no record of partitions the consumer group has committed offsets for: it lost
    its data. The worker stops (README "Redis lost its data")."""

    def __init__(self, partitions: list[int], topic: str) -> None:
        self.partitions = partitions
        super().__init__(
            f"Redis has no data for partitions {partitions} of {topic} although this consumer group "
            "has applied events there (committed offsets): Redis lost its data (restarted without "
            "persistence, failed over to an empty replica, or flushed). Stopping instead of rebuilding "
            "profiles from the middle of the stream. Recovery: stop every worker, delete the consumer "
            "group (kafka-consumer-groups.sh --delete --group <APP_ID>) so the retained events are "
            "replayed, then start; or accept Redis as it is with ACCEPT_REDIS_STATE=true"
        )
