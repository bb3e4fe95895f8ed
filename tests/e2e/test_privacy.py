"""Privacy and poison input, tried as a new user would: identify with real-world traits."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
import redis

from stream_app.contract import iso_ms
from stream_app.store.docpack import decode_doc

from .conftest import Deployment, wait_until

pytestmark = pytest.mark.e2e

TRAITS = {
    "Email": "Jane.Doe@example.com",
    "name": "Jane Doe",
    "address": {"street": "1 Main St", "city": "Springfield", "postalCode": "12345"},
    "contact": {"phone": "+1 555 0100"},
    "plan": "pro",
    "created_ms": 1_000_000_000_000_000_000,  # poison: a "time" 31 million years out
}
SECRETS = ("Jane", "Doe", "Main St", "Springfield", "12345", "555 0100", "example.com")


@pytest.mark.brokers("embedded")  # the broker's kind is not what this is about
def test_no_raw_pii_is_stored_or_served_and_a_poison_trait_breaks_nothing(
    deployment: Deployment, worker_factory: Any
) -> None:
    worker = worker_factory().start()
    now = int(time.time() * 1000)
    deployment.send(
        [
            {
                "type": "identify",
                "messageId": "p-1",
                "userId": "jane",
                "traits": TRAITS,
                "timestamp": iso_ms(now),
            },
            {
                "type": "group",
                "messageId": "p-2",
                "userId": "jane",
                "groupId": "acme",
                "timestamp": iso_ms(now),
                "traits": {"name": "Acme Inc", "industry": "saas", "billing": {"email": "ap@acme.example"}},
            },
        ]
    )
    wait_until(lambda: worker.get("/profiles/jane")[0] == 200, 30, "the profile", worker.tail)
    wait_until(lambda: "acme" in worker.get("/profiles/jane")[1]["groups"], 30, "the group", worker.tail)
    status, profile = worker.get("/profiles/jane")
    assert status == 200
    served = orjson.dumps(profile).decode()
    assert not [s for s in SECRETS if s in served], served
    assert profile["traits"]["plan"] == "pro" and len(profile["traits"]["Email_sha256"]) == 64
    assert profile["traits"]["contact"] == {"phone_sha256": profile["traits"]["contact"]["phone_sha256"]}
    assert profile["groups"]["acme"]["traits"]["industry"] == "saas"
    client = redis.Redis.from_url(deployment.settings.redis_url or "")
    stored = "".join(  # the documents as stored (compressed ones decompressed: no PII inside either)
        orjson.dumps(decode_doc(client.hget(key, "d") or b"{}")).decode()
        for key in client.scan_iter(f"{deployment.settings.redis_key_prefix}:p:*")
    )
    assert stored and not [s for s in SECRETS if s in stored]  # not in Redis either
    assert worker.metric("onboarding_traits_dropped_total") >= 6
