"""Start-up refusals: an exposed API without tokens, the public development PII salt."""

from __future__ import annotations

import pytest

from stream_app.errors import ConfigError
from stream_app.settings import DEV_PII_SALT, Settings
from stream_app.worker.app import check_safe_to_serve


def settings(**values: object) -> Settings:
    base: dict[str, object] = {"pii_hash_salt": "a-secret-of-our-own"}
    return Settings(**(base | values))  # type: ignore[arg-type]


def test_loopback_without_tokens_is_fine() -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        check_safe_to_serve(settings(web_host=host))


def test_an_exposed_api_needs_tokens() -> None:
    with pytest.raises(ConfigError) as err:
        check_safe_to_serve(settings(web_host="0.0.0.0"))
    assert err.value.setting == "API_TOKENS" and "WEB_HOST=0.0.0.0" in str(err.value)
    check_safe_to_serve(settings(web_host="0.0.0.0", api_tokens="t1"))


def test_the_development_salt_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        check_safe_to_serve(settings(pii_hash_salt=DEV_PII_SALT))
    assert err.value.setting == "PII_HASH_SALT"
