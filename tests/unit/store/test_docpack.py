"""Stored documents: compact, and readable whichever way they were written."""

from __future__ import annotations

import zlib
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from stream_app.profile import new_profile
from stream_app.store.docpack import DICT_V1, decode_doc, encode_doc

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=60,
)


@given(st.dictionaries(st.text(max_size=20), JSON, max_size=12))
def test_any_document_reads_back_as_written(doc: dict[str, Any]) -> None:
    assert decode_doc(encode_doc(doc)) == doc


def test_a_profile_is_deflated_against_the_dictionary_and_small_ones_stay_json() -> None:
    doc = new_profile("user-1")
    doc["features"] = {f"feature-{i}": i for i in range(30)}
    doc["onboarding"] = {"signup": {"status": "in_progress", "started_ms": 1, "completed_ms": None,
                                    "current_step": "profile", "current_step_started_ms": 2,
                                    "completed_steps": {}}}  # fmt: skip
    packed = encode_doc(doc)
    plain = orjson.dumps(doc)
    assert packed[0] & 0x0F == 8 and packed[1] & 0x20  # a zlib stream, with a preset dictionary
    assert len(packed) < len(zlib.compress(plain, 6))  # the dictionary earns its keep
    assert encode_doc({"merged_into": "u1"}) == b'{"merged_into":"u1"}'  # a tombstone stays JSON


def test_documents_written_before_read_as_before() -> None:
    doc = new_profile("old")
    assert decode_doc(orjson.dumps(doc)) == doc  # plain JSON
    assert decode_doc(zlib.compress(orjson.dumps(doc), 1)) == doc  # plain zlib


def test_the_dictionary_is_frozen() -> None:
    """Stored documents name it by its Adler-32: editing it would make them unreadable. Add a
    new one (V2) instead."""
    assert zlib.adler32(DICT_V1) == 2904786882 and len(DICT_V1) == 1944
