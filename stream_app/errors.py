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
