"""The traits policy: nothing identifying is stored or served in plain text unless it says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_app.contract import ContractRules, Event, parse_event
from stream_app.privacy import (
    PolicyError,
    apply_policy,
    hash_pii,
    load_policy,
    normalize_name,
    shipped_policy,
)

SALT = b"salt"
POLICY = shipped_policy()
NOW = 1_795_000_000_000

JANE = {
    "Email": "Jane.Doe@example.com",
    "name": "Jane Doe",
    "First Name": "Jane",
    "address": {"street": "1 Main St", "city": "Springfield", "zip": "12345"},
    "contact": {"phone": "+1 555 0100", "Work Email": "jane@corp.example", "preferred": "email"},
    "plan": "pro",
    "company": {"name": "Acme", "industry": "saas", "employees": 40},
    "bio": "I like hiking and my email is jane@example.com",
    "created_ms": 1_000_000_000_000_000_000,
}


def test_the_issue_identify_keeps_nothing_identifying() -> None:
    kept, dropped = apply_policy(JANE, POLICY, SALT)
    assert kept == {
        "Email_sha256": hash_pii("Jane.Doe@example.com", SALT),
        "contact": {
            "phone_sha256": hash_pii("+1 555 0100", SALT),
            "Work Email_sha256": hash_pii("jane@corp.example", SALT),
        },
        "plan": "pro",
        "company": {"industry": "saas", "employees": 40},
    }
    # name, First Name, address (3 parts), contact.preferred, company.name, bio, created_ms
    assert dropped == 9


def test_names_match_in_any_case_and_spelling() -> None:
    for spelling in ("email", "EMAIL", "e-mail", "E_Mail", "eMail"):
        assert normalize_name(spelling) == "email"
        kept, _ = apply_policy({spelling: "a@b.c"}, POLICY, SALT)
        assert kept == {f"{spelling}_sha256": hash_pii("a@b.c", SALT)}


def test_the_engine_never_stores_a_raw_trait_the_policy_forbids() -> None:
    event = {
        "type": "identify",
        "messageId": "m",
        "userId": "u",
        "traits": JANE,
        "timestamp": "2026-11-18T10:00:00Z",
    }
    parsed = parse_event(orjson.dumps(event), ContractRules(pii_salt=SALT), None, NOW)
    assert isinstance(parsed, Event) and parsed.traits is not None and parsed.dropped_traits == 9
    text = orjson.dumps(parsed.traits).decode()
    for secret in ("Jane", "Doe", "Main St", "555", "hiking", "corp.example", "Acme"):
        assert secret not in text


def test_hashes_made_by_the_policy_survive_it_again() -> None:
    once, _ = apply_policy(JANE, POLICY, SALT)
    twice, dropped = apply_policy(once, POLICY, SALT)
    assert twice == once and dropped == 0


def test_bounds_on_count_and_free_text() -> None:
    many = {f"plan{i}": "x" for i in range(5)} | {"plan": "p" * 300}
    policy = load_policy(Path(__file__).parents[2] / "config" / "traits.toml")
    kept, dropped = apply_policy({"plan": "p" * 300, "role": "dev"}, policy, SALT)
    assert kept == {"role": "dev"} and dropped == 1
    assert apply_policy(many, policy, SALT)[0] == {}


def test_a_bad_policy_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "traits.toml"
    path.write_text('default = "maybe"\n')
    with pytest.raises(PolicyError, match="default"):
        load_policy(path)
    path.write_text('[keep]\nnames = ["email"]\n[hash]\nnames = ["EMAIL"]\n')
    with pytest.raises(PolicyError, match=r"keep\.names"):
        load_policy(path)
    path.write_text('[keep]\nnamez = ["x"]\n')
    with pytest.raises(PolicyError, match=r"keep: unknown keys \['namez'\]"):
        load_policy(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=30,
)
PII = ["jane.doe@example.com", "+1 555 0100", "Jane Doe", "1 Main St"]


@given(
    st.dictionaries(
        st.sampled_from(["Email", "phone", "name", "address", "plan", "contact", "misc", "x"]), JSON
    )
)
def test_no_planted_pii_ever_survives(traits: dict[str, Any]) -> None:
    """Plant PII under identifying names at any depth: none of it is ever kept in plain text."""

    def plant(doc: Any, depth: int = 0) -> Any:
        if isinstance(doc, dict):
            out = {k: plant(v, depth + 1) for k, v in doc.items()}
            out.update({"EMAIL": PII[0], "Phone Number": PII[1], "full_name": PII[2], "Street": PII[3]})
            return out
        return doc

    kept, _ = apply_policy(plant(traits), POLICY, SALT)
    text = orjson.dumps(kept).decode()
    assert not any(secret in text for secret in PII)
