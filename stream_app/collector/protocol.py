"""The Segment HTTP Tracking API, as the analytics SDKs speak it. Pure: no I/O, no clock reads.

What a request body becomes on ``onboarding.events``:

* routes ``/v1/{track,identify,page,screen,group,alias}`` and analytics.js' short ones
  ``/v1/{t,i,p,s,g,a}`` carry one event (its type is the route's); ``/v1/batch``,
  ``/v1/import`` and ``/v1/b`` carry ``{"batch": [...], "context", "integrations", "sentAt"}``,
  whose top-level ``context`` merges into each item (the item's own keys win);
* the write key comes as the HTTP Basic user name (empty password) or as ``writeKey`` in
  the body; it never travels on: the event records the key's source name instead
  (``context.source``);
* time: ``receivedAt`` is stamped with the collector's clock; with ``sentAt``, the event's
  ``timestamp`` is corrected for the client's clock as Segment does,
  ``receivedAt - (sentAt - timestamp)``, and the client's value kept as
  ``originalTimestamp`` (the engine does not correct such an event again);
* Segment's limits: 32 KB per event, 500 KB per request (decompressed), 2,500 events per
  batch; over them, or a body that is not JSON: 400 ``{"code", "message"}``, which the SDKs
  do not retry;
* an event without ``messageId`` gets one derived from its content and write key, so an
  SDK's retry of the same request is still recognized downstream.

Whether an event meets the engine's contract is decided by :func:`stream_app.contract.parse_event`
(the server sends a breaking one to the dead-letter topic); this module only speaks HTTP.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from stream_app.contract import iso_ms, parse_timestamp

#: route name -> event type (None: a batch)
ROUTES: dict[str, str | None] = {
    "track": "track",
    "t": "track",
    "identify": "identify",
    "i": "identify",
    "page": "page",
    "p": "page",
    "screen": "screen",
    "s": "screen",
    "group": "group",
    "g": "group",
    "alias": "alias",
    "a": "alias",
    "batch": None,
    "b": None,
    "import": None,
}


@dataclass(frozen=True, slots=True)
class Limits:
    max_event_bytes: int = 32 * 1024
    max_request_bytes: int = 500 * 1024
    max_batch_events: int = 2500


@dataclass(frozen=True, slots=True)
class ApiError:
    """A request the collector refuses, as the SDKs expect it: a status and ``{"code", "message"}``."""

    status: int
    code: str
    message: str

    def body(self) -> bytes:
        return orjson.dumps({"code": self.code, "message": self.message})


@dataclass(frozen=True, slots=True)
class WriteKeys:
    """Accepted write keys and the source each names (``web=abc123``: source ``web``)."""

    sources: Mapping[str, str]
    allow_anonymous: bool = False

    @classmethod
    def parse(cls, setting: str | None, allow_anonymous: bool = False) -> WriteKeys:
        sources: dict[str, str] = {}
        for item in (setting or "").split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, key = item.partition("=")
            sources[key.strip() if sep else name] = name.strip() if sep else ""
        return cls(sources, allow_anonymous)


def read_body(raw: bytes, content_encoding: str | None, limits: Limits) -> bytes | ApiError:
    """The request body, gunzipped when it says so, within the request size limit."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        try:
            inflater = zlib.decompressobj(wbits=31 if encoding != "deflate" else 15)
            # never inflate more than the limit: a small bomb must not take the process's memory
            body = inflater.decompress(raw, limits.max_request_bytes + 1)
        except (zlib.error, gzip.BadGzipFile) as exc:
            return ApiError(400, "invalid_gzip", f"the body is not valid {encoding}: {exc}")
        if len(body) > limits.max_request_bytes or inflater.unconsumed_tail:
            return _too_large(limits)
        if not inflater.eof:
            return ApiError(400, "invalid_gzip", f"the {encoding} body is truncated")
        return body
    if encoding not in ("", "identity"):
        return ApiError(400, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported")
    if len(raw) > limits.max_request_bytes:
        return _too_large(limits)
    return raw


def _too_large(limits: Limits) -> ApiError:
    return ApiError(400, "request_too_large", f"requests are limited to {limits.max_request_bytes} bytes")


def parse_json(body: bytes) -> dict[str, Any] | ApiError:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}")
    if not isinstance(doc, dict):
        return ApiError(400, "invalid_json", "the body must be a JSON object")
    return doc


def authenticate(authorization: str | None, body: Mapping[str, Any], keys: WriteKeys) -> str | ApiError:
    """The source name of the request's write key (Basic user name, else ``writeKey``)."""
    key: str | None = None
    if authorization and authorization[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return ApiError(401, "invalid_write_key", "the Authorization header is not valid Basic auth")
        key = decoded.partition(":")[0]
    if not key:
        candidate = body.get("writeKey")
        if candidate is None and isinstance(body.get("batch"), list) and body["batch"]:
            first = body["batch"][0]
            candidate = first.get("writeKey") if isinstance(first, dict) else None
        key = candidate if isinstance(candidate, str) else None
    if key and key in keys.sources:
        return keys.sources[key]
    if keys.allow_anonymous:
        return ""
    return ApiError(401, "invalid_write_key", "missing or unknown write key")


@dataclass(frozen=True, slots=True)
class Normalized:
    """One event of a request, ready for ``onboarding.events``: the object and its JSON bytes."""

    event: dict[str, Any]
    raw: bytes


def events_from_request(
    route_type: str | None, body: dict[str, Any], received_ms: int, source: str, limits: Limits
) -> list[Normalized] | ApiError:
    """The events of one request, normalized for ``onboarding.events`` (see the module docstring)."""
    if route_type is not None:
        items: list[Any] = [body]
        envelope: dict[str, Any] = {}
    else:
        batch = body.get("batch")
        if not isinstance(batch, list):
            return ApiError(400, "invalid_batch", "a batch request needs a 'batch' array")
        if len(batch) > limits.max_batch_events:
            return ApiError(400, "batch_too_large", f"a batch holds at most {limits.max_batch_events} events")
        items = batch
        envelope = body
    clock = _RequestClock(received_ms)
    out: list[Normalized] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            return ApiError(400, "invalid_event", f"batch item {index} is not a JSON object")
        event = _normalize(item, envelope, route_type, clock, source)
        raw = orjson.dumps(event)
        if len(raw) > limits.max_event_bytes:
            return ApiError(
                400,
                "event_too_large",
                f"event {index} is {len(raw)} bytes; events are limited to {limits.max_event_bytes}",
            )
        out.append(Normalized(event, raw))
    return out


class _RequestClock:
    """The receive time of one request, and its clients' ``sentAt`` values, parsed once each."""

    def __init__(self, received_ms: int) -> None:
        self.received_ms = received_ms
        self.received = iso_ms(received_ms)
        self._sent: dict[str, int | None] = {}

    def corrected(self, stamped: str, sent_at: str) -> str | None:
        """``receivedAt - (sentAt - timestamp)`` as ISO-8601; None if either is unreadable."""
        if sent_at not in self._sent:
            self._sent[sent_at] = _ms_or_none(sent_at)
        sent = self._sent[sent_at]
        stamp = _ms_or_none(stamped)
        if sent is None or stamp is None:
            return None
        return iso_ms(self.received_ms - (sent - stamp))


def _ms_or_none(text: str) -> int | None:
    try:
        return parse_timestamp(text)
    except (ValueError, OverflowError, OSError):
        return None


def _normalize(
    item: dict[str, Any],
    envelope: Mapping[str, Any],
    route_type: str | None,
    clock: _RequestClock,
    source: str,
) -> dict[str, Any]:
    event = {k: v for k, v in item.items() if k != "writeKey"}
    if route_type is not None:
        event["type"] = route_type
    top_context = envelope.get("context")
    context = event.get("context")
    if isinstance(top_context, dict):
        context = {**top_context, **context} if isinstance(context, dict) else dict(top_context)
    if isinstance(context, dict) or source:
        context = dict(context) if isinstance(context, dict) else {}
        if source:
            context["source"] = source
        event["context"] = context
    if isinstance(context, dict) and event.get("type") == "identify" and "traits" not in event:
        traits = context.get("traits")  # RudderStack's SDKs send identify traits here
        if isinstance(traits, dict):
            event["traits"] = traits
    sent_at = event.get("sentAt", envelope.get("sentAt"))
    event["receivedAt"] = clock.received
    stamped = event.get("timestamp")
    if stamped is None:
        event["timestamp"] = clock.received
    elif isinstance(stamped, str) and isinstance(sent_at, str):
        corrected = clock.corrected(stamped, sent_at)
        if corrected is not None:  # else left as sent: the contract dead-letters it with its reason
            event["originalTimestamp"] = stamped
            event["timestamp"] = corrected
    if isinstance(sent_at, str):
        event["sentAt"] = sent_at
    if not event.get("messageId"):
        digest = hashlib.sha256(source.encode() + b"\x1f" + orjson.dumps(item, option=orjson.OPT_SORT_KEYS))
        event["messageId"] = f"col-{digest.hexdigest()[:32]}"
    return event
