"""A worker's cache of the profile documents it wrote last, bounded in entries and in bytes.

A batch uses a cached document instead of fetching it once Redis confirms its version (the
profile store's ``load(known=...)``), so a copy another worker made stale is read again
before anything is folded on it; the write is still a compare-and-set. The byte bound makes
the worker's memory a setting (``PROFILE_CACHE_MB``) rather than a function of how many
users it has seen and how large their documents grew.
"""

from __future__ import annotations

from collections import OrderedDict


class DocumentCache:
    """Least recently written first out, once more than ``max_entries`` or ``max_bytes``."""

    def __init__(self, max_entries: int = 0, max_bytes: int = 0) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._docs: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __contains__(self, pid: object) -> bool:
        return pid in self._docs

    def __len__(self) -> int:
        return len(self._docs)

    def get(self, pid: str) -> tuple[int, bytes] | None:
        """(version, serialized document) as this worker last wrote it."""
        return self._docs.get(pid)

    def put(self, pid: str, version: int, raw: bytes) -> None:
        if not self.enabled:
            return
        self.pop(pid)
        self._docs[pid] = (version, raw)
        self.bytes += len(raw)
        while self._docs and (len(self._docs) > self.max_entries or self.bytes > self.max_bytes):
            _pid, (_version, old) = self._docs.popitem(last=False)
            self.bytes -= len(old)

    def pop(self, pid: str) -> None:
        entry = self._docs.pop(pid, None)
        if entry is not None:
            self.bytes -= len(entry[1])
