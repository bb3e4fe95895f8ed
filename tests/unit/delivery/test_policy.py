"""Webhook policy: signatures a receiver can check, which answers are retried, the endpoint file."""

from __future__ import annotations

import hashlib
import hmac
import random
from pathlib import Path

import pytest

from stream_app.delivery.policy import Verdict, backoff, judge, load_targets, signature, verify
from stream_app.errors import ConfigError

SECRET = b"whsec-0123456789abcdef"


def test_the_signature_is_stripes_scheme_and_verifies() -> None:
    body = b'{"trigger_id":"t-1"}'
    header = signature(SECRET, body, 1_800_000_000)
    expected = hmac.new(SECRET, b"1800000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1800000000,v1={expected}"
    assert verify(SECRET, body, header, now_s=1_800_000_100)
    assert not verify(SECRET, body + b" ", header, now_s=1_800_000_100)  # body changed
    assert not verify(b"another-secret-value", body, header, now_s=1_800_000_100)
    assert not verify(SECRET, body, header, now_s=1_800_000_000 + 301)  # an old request replayed
    assert not verify(SECRET, body, "v1=abc", now_s=1_800_000_000)


@pytest.mark.parametrize(
    ("status", "verdict"),
    [(200, Verdict.DELIVERED), (204, Verdict.DELIVERED), (None, Verdict.RETRY), (500, Verdict.RETRY),
     (503, Verdict.RETRY), (429, Verdict.RETRY), (408, Verdict.RETRY), (400, Verdict.REFUSED),
     (401, Verdict.REFUSED), (404, Verdict.REFUSED), (410, Verdict.REFUSED), (301, Verdict.REFUSED)],
)  # fmt: skip
def test_outages_are_retried_refusals_are_not(status: int | None, verdict: Verdict) -> None:
    assert judge(status) is verdict


def test_back_off_grows_is_capped_and_never_zero() -> None:
    rng = random.Random(1)
    delays = [backoff(n, rng) for n in range(1, 12)]
    assert all(d >= 0.25 for d in delays) and max(delays) <= 30
    assert delays[4] > delays[0] and all(15 <= d <= 30 for d in delays[8:])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "webhooks.toml"
    path.write_text(text)
    return path


def test_endpoints_load_with_their_secrets_and_mistakes_name_what_is_wrong(tmp_path: Path) -> None:
    good = (
        '[[endpoints]]\nname = "in_app"\nurl = "https://x.example/h"\n'
        'types = ["stalled_step"]\nsecret_env = "S1"\n'
    )
    (target,) = load_targets(write(tmp_path, good), {"S1": "s" * 16})
    assert target.wants({"type": "stalled_step"}) and not target.wants({"type": "onboarding_completed"})
    with pytest.raises(ConfigError) as err:
        load_targets(write(tmp_path, good), {"S1": "short"})
    assert err.value.setting == "S1" and "in_app" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_targets(write(tmp_path, good.replace("https://", "ftp://")), {"S1": "s" * 16})
    assert err.value.setting == "WEBHOOKS_FILE" and "endpoints[0]" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_targets(write(tmp_path, good + good), {"S1": "s" * 16})
    assert "used twice" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_targets(write(tmp_path, good.replace("secret_env", "secret")), {"S1": "s" * 16})
    assert "needs `secret_env`" in str(err.value)
