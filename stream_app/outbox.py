"""What a profile write causes, on its way out: the outbox. Pure bookkeeping, no I/O.

Segment changes and triggers are decided by the compare-and-set that writes a profile, and
stored in that same document (``engine.outbox``); the worker publishes them before it acks
the batch. A crash between the write and the publish must not lose them, and a publish that
went out must not be repeated forever, so:

* :class:`Outbox` remembers which stored outboxes this process has published (by
  :func:`outbox_key`, the ids of its messages);
* once published, the outbox's key is also recorded on the stored profile
  (``ProfileStore.mark_published``); a process loading the profile learns it
  (:meth:`Outbox.learn`), so a restart, a rebalance or a rolling deploy sends nothing twice;
* a loaded document whose outbox is not known as published (the process that wrote it
  died between the write and the publish, or before recording it) is queued again
  (:meth:`Outbox.unpublished`): sent again with the same ids, which consumers deduplicate;
* when a reaction replaces the stored outbox before that happened, the messages not known
  to be published are carried into the new one (:meth:`Outbox.carry`), so a second crash
  cannot lose them either.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from stream_app.profile import Profile


class _Published(Protocol):
    @property
    def published(self) -> str | None: ...


L = TypeVar("L", bound=_Published)

Kind = Literal["segments", "triggers", "holdout"]
SEGMENTS: Kind = "segments"
TRIGGERS: Kind = "triggers"
HOLDOUT: Kind = "holdout"
KINDS: tuple[Kind, ...] = (SEGMENTS, TRIGGERS, HOLDOUT)


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One message for an output topic: its kind (which topic), record key and value."""

    kind: Kind
    key: str  # the user id: every output topic is keyed by user
    value: Mapping[str, Any]

    @property
    def id(self) -> str:
        """The idempotency key consumers deduplicate by (``trigger_id`` or ``change_id``)."""
        return str(self.value.get("trigger_id") or self.value.get("change_id"))

    def stored(self) -> dict[str, Any]:
        """The form kept in the profile document."""
        return {"to": self.kind, "value": dict(self.value)}

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> OutboxMessage:
        value = stored["value"]
        return cls(stored["to"], str(value["user_id"]), value)


def segment_change(value: Mapping[str, Any]) -> OutboxMessage:
    return OutboxMessage(SEGMENTS, str(value["user_id"]), value)


def stored_outbox(doc: Profile | None) -> list[OutboxMessage]:
    stored = ((doc or {}).get("engine") or {}).get("outbox") or []
    return [OutboxMessage.from_stored(m) for m in stored]


def store_outbox(doc: Profile, messages: Iterable[OutboxMessage]) -> None:
    doc.setdefault("engine", {})["outbox"] = [m.stored() for m in messages]


def outbox_key(doc: Profile | None) -> str | None:
    """Identity of a document's outbox (None when empty): the ids of its messages."""
    messages = stored_outbox(doc)
    return ",".join(m.id for m in messages) if messages else None


class Outbox:
    """Which stored outboxes this process has published (bounded memory, oldest forgotten)."""

    def __init__(self, memory: int = 50_000) -> None:
        self.memory = memory
        self._published: OrderedDict[str, None] = OrderedDict()

    def published(self, key: str | None) -> bool:
        return key is not None and key in self._published

    def learn(self, loaded: Mapping[str, L]) -> Mapping[str, L]:
        """Take note of the outboxes loaded profiles record as published (by any process)."""
        self.mark_published([entry.published for entry in loaded.values() if entry.published])
        return loaded

    def mark_published(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._published[key] = None
            self._published.move_to_end(key)
        while len(self._published) > self.memory:
            self._published.popitem(last=False)

    def unpublished(self, doc: Profile) -> tuple[list[OutboxMessage], str | None]:
        """The stored outbox if this process does not know it as published (to send again,
        and to carry into the next outbox), with its key; else ``([], None)``."""
        key = outbox_key(doc)
        if key is None or key in self._published:
            return [], None
        return stored_outbox(doc), key

    @staticmethod
    def carry(doc: Profile, unpublished: Sequence[OutboxMessage]) -> None:
        """Keep ``unpublished`` in the outbox a reaction just replaced (same ids, not twice)."""
        if not unpublished or doc.get("engine") is None:
            return
        fresh = stored_outbox(doc)
        ids = {m.id for m in fresh}
        store_outbox(doc, [*(m for m in unpublished if m.id not in ids), *fresh])
