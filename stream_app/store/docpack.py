"""How a profile document is stored: JSON, deflated against a fixed dictionary when that is smaller.

A profile's JSON repeats the same key names in every document (``onboarding``,
``completed_steps``, ``current_step_started_ms``, the engine's outbox messages ...), which
zlib alone cannot exploit in 1-2 KB. A preset dictionary holding those names (and the
contract's event names) halves the compressed size again: measured on synthetic profiles,
1,556 bytes of JSON -> 821 with plain zlib -> 480 with the dictionary (V1, 2026-12-01).
With V2, on the memory bench's documents: ~30 us per write and ~6 us more per read than
plain JSON (``PROFILE_COMPRESSION`` switches it off; documents read either way).

Layouts, told apart by the first byte (every one still reads):

* ``{``: plain JSON (written before compression, or with ``PROFILE_COMPRESSION=false``);
* a zlib stream (first byte ``0x?8``): plain, or against ``DICT_V1`` named by its Adler-32
  in the header (2026-12-01 to 12-02);
* ``0x02``: a raw deflate stream against ``DICT_V2`` (since 2026-12-02, later): no zlib
  header and checksum (10 bytes of each document; Redis keeps the bytes it was given), and a
  dictionary that also holds the values the engine itself writes (device kinds and OS and
  browser families from User-Agent parsing, lifecycle stages, the default segments' and
  trigger types' names, the default traits policy's kept names). Measured on the memory
  bench's documents: 495 -> 447 bytes per profile; a tombstone's 37 bytes of JSON -> 26.

A dictionary's bytes are never edited: a better one is added as ``V3`` next to these, and
documents written with the older ones keep reading.
"""

from __future__ import annotations

import zlib

import orjson

from stream_app.profile import Profile

#: Never change these bytes: stored documents refer to them by their Adler-32.
DICT_V1 = (
    b'{"merged_into":"","snapshot":null,"snapshot_seen":[]}'
    b'{"to":"segments","value":{"change_id":"","user_id":"","segment":"","source":"rule","change":"entered",'
    b'"at":"2026-01-01T00:00:00.000Z","reason":"matches: "}}'
    b'{"to":"triggers","value":{"trigger_id":"","type":"stalled_step","user_id":"","created_at":"","due_at":"",'
    b'"group":"treatment","evidence":{"flow":"","step":"","step_started_at":"","elapsed_s":0,"threshold_s":0,'
    b'"multiplier":2.0,"mean_s":0,"samples":0,"baseline":"default"},"variant":"","policy":{"kind":"bandit",'
    b'"context":"all"},"action":{"kind":"in_app_message"},"segments":[],"cluster":null}}'
    b'"engine":{"clock_offset_ms":0,"partition":0,"segments":["passive","struggling","power_user","dormant"],'
    b'"cluster":{"id":"c1","name":"","version":1},"handled":{"stalled_step|signup/":0,'
    b'"onboarding_abandoned|signup@":0},"fired":[{"trigger_id":"","type":"stalled_step","subject":"signup/",'
    b'"at":0,"group":"treatment","variant":"","arm":"all"}],"outbox":[]},'
    b'"interventions":{"":{"first_ms":0,"delivered":0,"opened":0,"clicked":0,"dismissed":0,"variant":"",'
    b'"variant_ms":0}},'
    b'{"user_id":"","event_count":0,"counts":{"identify":1,"track":0,"page":0,"screen":0,"group":0,"alias":0},'
    b'"events":{"Onboarding Step Started":1,"Onboarding Step Completed":1,"Onboarding Completed":1,'
    b'"Feature Used":1,"Help Viewed":1,"Session Started":1},"first_seen_ms":17,"last_seen_ms":17,'
    b'"sessions":{"count":1,"recent_ms":[17,17]},"onboarding":{"signup":{"status":"in_progress",'
    b'"started_ms":17,"completed_ms":null,"current_step":null,"current_step_started_ms":null,'
    b'"completed_steps":{"":{"completed_ms":17,"duration_s":1.0,"message_id":""}}}},"features":{},'
    b'"help_views":{},"device":{"type":"mobile","os":"iOS","os_version":"","browser":"Chrome","model":""},'
    b'"country":null,"city":null,"locale":"en-US","traits":{"email_sha256":"","plan":"free","role":""},'
    b'"consent":{"personalization":true,"updated_ms":17},"lifecycle":"new","merged_from":["anon-"],'
    b'"identified":true,"groups":{}}'
)
#: Never change these bytes either (``V1`` then the values the engine writes; the most common
#: last, where a match costs the fewest bits). 3,313 bytes: the whole of it is inside the
#: 4 KiB window.
DICT_V2 = DICT_V1 + (
    b'"device":{"type":"tablet","os":"Linux","browser":"Firefox","model":null},'
    b'"device":{"type":"mobile","os":"iOS","os_version":"17.4","browser":"Mobile Safari","model":"iPhone"},'
    b'"device":{"type":"mobile","os":"Android","os_version":"14","browser":"Chrome Mobile","model":"K"},'
    b'"device":{"type":"desktop","os":"Windows","os_version":"10","browser":"Edge","model":null},'
    b'"device":{"type":"desktop","os":"Mac OS X","os_version":"10.15","browser":"Safari","model":"Mac"},'
    b'"traits":{"plan":"free","tier":"","role":"","job_function":"","seniority":"","industry":"","company":"",'
    b'"company_size":"","team_size":"","signup_source":"","use_case":"","trial":true,"account_type":"",'
    b'"subscription_status":"","onboarding_variant":"","email_sha256":"","phone_sha256":""},'
    b'"lifecycle":"activated","lifecycle":"active","lifecycle":"dormant","lifecycle":"churned",'
    b'"segments":["highly_engaged_new","dormant","active_engaged","power_user","struggling","passive"],'
    b'"handled":{"onboarding_completed|":0,"repeated_help_views|#1":0,"segment_entered|struggling@":0,'
    b'"stalled_step|":0},"fired":[{"trigger_id":"","type":"onboarding_completed","subject":"","at":0,'
    b'"group":"control"},{"trigger_id":"","type":"repeated_help_views","subject":"","at":0,"group":"treatment"},'
    b'{"trigger_id":"","type":"segment_entered","subject":"struggling","at":0,"group":"treatment"}],'
    b'"segments":[],"cluster":null,"partition":0}}'
)
_DICTS = {zlib.adler32(DICT_V1): DICT_V1}  # zlib streams name theirs by Adler-32
_RAW_DICTS = {2: DICT_V2}  # raw streams by their first byte
_WRITE_MARK = 2  # what encode_doc writes
_LEVEL = 6
# a 4 KiB window and zlib's default memory: the same size as the maximum settings for
# documents of a few KB, and ~15 % less CPU (most of the cost is setting the state up)
_WBITS, _MEMLEVEL = 12, 8
_FDICT = 0x20  # a zlib header's flag: a preset dictionary, named by the next 4 bytes


def encode_doc(doc: Profile) -> bytes:
    """Deflated against ``DICT_V2`` when that is smaller than the JSON (every profile; a
    tombstone too: 37 -> 26 bytes, a size class less in its hash)."""
    raw = orjson.dumps(doc)
    packer = zlib.compressobj(
        _LEVEL, zlib.DEFLATED, -_WBITS, _MEMLEVEL, zlib.Z_DEFAULT_STRATEGY, zdict=_RAW_DICTS[_WRITE_MARK]
    )
    packed = bytes((_WRITE_MARK,)) + packer.compress(raw) + packer.flush()
    return packed if len(packed) < len(raw) else raw


def decode_doc(raw: bytes) -> Profile:
    if raw[:1] == b"{":  # JSON: every document is an object
        doc: Profile = orjson.loads(raw)
        return doc
    if raw[0] in _RAW_DICTS:
        unpacker = zlib.decompressobj(-15, zdict=_RAW_DICTS[raw[0]])
        return orjson.loads(unpacker.decompress(raw[1:]) + unpacker.flush())
    if raw[1] & _FDICT:
        unpacker = zlib.decompressobj(zdict=_DICTS[int.from_bytes(raw[2:6], "big")])
        return orjson.loads(unpacker.decompress(raw) + unpacker.flush())
    return orjson.loads(zlib.decompress(raw))
