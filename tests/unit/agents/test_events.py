"""AckGuard: only records the agent handled become committable (pure bookkeeping, fake consumer)."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import pytest

from agents.events import AckGuard


@dataclass(eq=False)
class Message:  # the fields of faust's Message the guard reads or writes
    topic: str
    partition: int
    offset: int
    acked: bool = False


@dataclass(eq=False)
class Event:
    message: Message


@dataclass
class Consumer:  # Faust's bookkeeping, reduced to what decides the commit
    acked: list[int] = field(default_factory=list)
    _unacked_messages: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)

    def ack(self, message: Message) -> bool:
        message.acked = True
        self._unacked_messages.discard(message)
        self.acked.append(message.offset)
        return True


def test_a_record_faust_skipped_is_settled_but_not_committable(caplog: pytest.LogCaptureFixture) -> None:
    consumer = Consumer()
    guard = AckGuard("events")
    guard.install(consumer)
    handled = [Message("events", 0, o) for o in (10, 11)]
    skipped = Message("events", 0, 12)  # dropped from Faust's queue in a rebalance, then acked
    for m in (*handled, skipped):
        consumer._unacked_messages.add(m)

    guard.handled_all([Event(m) for m in handled])
    with caplog.at_level(logging.INFO):
        assert [consumer.ack(m) for m in handled] == [True, True]
        assert consumer.ack(skipped) is False

    assert consumer.acked == [10, 11]  # the commit can reach 12, not pass it
    assert skipped.acked and skipped not in consumer._unacked_messages  # nobody waits for it
    assert guard.refused == 1
    assert "skipped in a rebalance" in caplog.text


def test_other_topics_and_a_second_install_are_untouched() -> None:
    consumer = Consumer()
    guard = AckGuard("events")
    guard.install(consumer)
    wrapped = consumer.ack
    guard.install(consumer)  # an agent restart re-installs: no double wrapping
    assert consumer.ack is wrapped
    assert consumer.ack(Message("changelog", 0, 5)) is True
    assert consumer.acked == [5] and guard.refused == 0
