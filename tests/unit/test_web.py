"""Bearer tokens of the worker's HTTP API (pure parts)."""

from __future__ import annotations

from stream_app.web import _authorized, api_tokens


def test_api_tokens_are_comma_separated_and_trimmed() -> None:
    assert api_tokens(" a, b ,,c ") == frozenset({"a", "b", "c"})
    assert api_tokens(None) == frozenset() and api_tokens("") == frozenset()


def test_only_a_known_bearer_token_is_authorized() -> None:
    tokens = frozenset({"secret-1", "secret-2"})
    assert _authorized("Bearer secret-1", tokens)
    assert _authorized("bearer secret-2", tokens)  # the scheme is case-insensitive
    assert not _authorized("Bearer secret-3", tokens)
    assert not _authorized("Basic secret-1", tokens)
    assert not _authorized("Bearer ", tokens)
    assert not _authorized("", tokens)
    assert not _authorized("secret-1", tokens)
