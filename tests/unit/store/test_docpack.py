"""Stored documents: compact, and readable whichever way they were written."""

from __future__ import annotations

import zlib
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from stream_app.profile import new_profile
from stream_app.store.docpack import DICT_V1, DICT_V2, decode_doc, encode_doc

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=60,
)


@given(st.dictionaries(st.text(max_size=20), JSON, max_size=12))
def test_any_document_reads_back_as_written(doc: dict[str, Any]) -> None:
    assert decode_doc(encode_doc(doc)) == doc


def v1_stream(doc: dict[str, Any]) -> bytes:
    """What encode_doc wrote 12-01 to 12-02: a zlib stream against DICT_V1, named in its header."""
    packer = zlib.compressobj(6, zlib.DEFLATED, 12, 8, zlib.Z_DEFAULT_STRATEGY, zdict=DICT_V1)
    return packer.compress(orjson.dumps(doc)) + packer.flush()


def test_a_profile_is_deflated_against_the_dictionary() -> None:
    doc = new_profile("user-1")
    doc["features"] = {f"feature-{i}": i for i in range(30)}
    doc["onboarding"] = {"signup": {"status": "in_progress", "started_ms": 1, "completed_ms": None,
                                    "current_step": "profile", "current_step_started_ms": 2,
                                    "completed_steps": {}}}  # fmt: skip
    doc["device"] = {"type": "desktop", "os": "Mac OS X", "os_version": "14.2", "browser": "Safari"}
    doc["engine"] = {"segments": ["active_engaged"], "handled": {"segment_entered|active_engaged@17": 17}}
    packed = encode_doc(doc)
    plain = orjson.dumps(doc)
    assert packed[0] == 2  # a raw deflate stream against DICT_V2: no zlib header or checksum
    assert len(packed) < len(zlib.compress(plain, 6))  # the dictionary earns its keep
    assert len(packed) < len(v1_stream(doc)) - 10  # and the new one more than the old
    assert decode_doc(packed) == doc


def test_a_tombstone_is_deflated_too_and_what_deflate_cannot_shrink_stays_json() -> None:
    tomb = {"merged_into": "user-505-219-526cb0"}
    assert len(encode_doc(tomb)) < len(orjson.dumps(tomb)) - 8  # 37 bytes of JSON -> 26
    assert decode_doc(encode_doc(tomb)) == tomb
    assert encode_doc({}) == b"{}"


def test_documents_written_before_read_as_before() -> None:
    doc = new_profile("old")
    assert decode_doc(orjson.dumps(doc)) == doc  # plain JSON
    assert decode_doc(zlib.compress(orjson.dumps(doc), 1)) == doc  # plain zlib
    assert decode_doc(v1_stream(doc)) == doc  # zlib against DICT_V1


def test_the_dictionaries_are_frozen() -> None:
    """Stored documents name theirs (V1 by its Adler-32, V2 by the first byte): editing one would
    make them unreadable. Add a new one (V3) instead."""
    assert zlib.adler32(DICT_V1) == 2904786882 and len(DICT_V1) == 1944
    assert zlib.adler32(DICT_V2) == 3433254679 and len(DICT_V2) == 3313
    assert len(DICT_V2) <= 4096  # all of it inside the 4 KiB window the documents are written with
