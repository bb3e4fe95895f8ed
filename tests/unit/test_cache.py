"""The worker's document cache keeps within both of its bounds, oldest write out first."""

from __future__ import annotations

from stream_app.cache import DocumentCache


def test_the_byte_bound_evicts_the_least_recently_written() -> None:
    cache = DocumentCache(max_entries=100, max_bytes=25)
    for n in range(4):
        cache.put(f"u{n}", n, b"x" * 10)
    assert len(cache) == 2 and cache.bytes == 20
    assert "u0" not in cache and "u1" not in cache
    cache.put("u2", 5, b"y" * 10)  # rewritten: now the newest
    cache.put("u9", 1, b"z" * 10)
    assert "u3" not in cache and cache.get("u2") == (5, b"y" * 10) and cache.bytes == 20


def test_the_entry_bound_and_pop_keep_the_byte_count_exact() -> None:
    cache = DocumentCache(max_entries=3, max_bytes=10_000)
    for n in range(5):
        cache.put(f"u{n}", n, b"a" * (n + 1))
    assert len(cache) == 3 and cache.bytes == 3 + 4 + 5
    cache.pop("u3")
    cache.pop("missing")
    assert cache.bytes == 3 + 5 and cache.get("u3") is None


def test_a_document_larger_than_the_whole_cache_is_not_kept() -> None:
    cache = DocumentCache(max_entries=10, max_bytes=5)
    cache.put("big", 1, b"b" * 6)
    assert len(cache) == 0 and cache.bytes == 0


def test_a_zero_bound_turns_the_cache_off() -> None:
    for cache in (DocumentCache(0, 100), DocumentCache(100, 0)):
        cache.put("u", 1, b"x")
        assert not cache.enabled and cache.get("u") is None
