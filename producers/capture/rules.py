"""The capture rules, as pure functions: request bytes → Kafka messages for ``events_raw``.

Each rule follows PostHog's Rust capture (``rust/capture``, ``rust/common/types``); the source of
each is named where it is applied (and in ``docs/adr/0009-capture-endpoint.md``). No I/O, no
clock: ``now_us`` comes in as an argument. Every failure is a :class:`CaptureError` that carries
the HTTP status, a snake_case ``code`` and a message; a request is accepted or refused as a whole
(PostHog returns the first failing event's error for the whole request, before anything is sent).

Entry point: :func:`prepare_request` (decoded request parts → token and ``(key, value)`` pairs).
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid as uuid_mod
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qs

import orjson

from headwater.ids import uuid7
from headwater.wire import partition_key

# -- limits (rust/capture/src/router.rs) ---------------------------------------------------------
EVENT_BODY_LIMIT = 2 * 1024 * 1024  # /e, /i/v0/e, /capture, /track, /engage
BATCH_BODY_LIMIT = 20 * 1024 * 1024  # /batch
MAX_DISTINCT_ID_CHARS = 200  # extract_distinct_id truncates to 200 chars
FUTURE_CLAMP_US = 23 * 3600 * 1_000_000  # timestamp.rs FUTURE_EVENT_HOURS_CUTOFF_MILLIS

#: capture paths (without a trailing slash) → body limit; ``/engage`` defaults a missing event name
CAPTURE_PATHS: dict[str, int] = {
    "/e": EVENT_BODY_LIMIT,
    "/i/v0/e": EVENT_BODY_LIMIT,
    "/capture": EVENT_BODY_LIMIT,
    "/track": EVENT_BODY_LIMIT,
    "/engage": EVENT_BODY_LIMIT,
    "/batch": BATCH_BODY_LIMIT,
}
HEALTH_PATHS = frozenset({"/", "/_readiness", "/_liveness"})

GZIP_MAGIC = b"\x1f\x8b\x08"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MIN_US = -62_135_596_800_000_000  # 0001-01-01T00:00:00Z
_MAX_US = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z
_YEAR_2021_US = 1_609_459_200_000_000
_UUID_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_BASE64 = re.compile(rb"[A-Za-z0-9+/_\-\s]+=*\s*")
_LONE_HIGH = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")
_LONE_LOW = re.compile(rb"(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


class CaptureError(Exception):
    """A refused request: HTTP ``status``, a ``code`` for machines and a message for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> bytes:
        return orjson.dumps({"status": self.status, "code": self.code, "error": self.message})


def bad_request(code: str, message: str) -> CaptureError:
    return CaptureError(400, code, message)


def too_big(message: str) -> CaptureError:
    return CaptureError(413, "payload_too_large", message)


# -- path ----------------------------------------------------------------------------------------
def route_path(path: str) -> str:
    """``/e/`` and ``/e`` are the same route (router.rs registers both); one trailing slash only."""
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


# -- payload decoding (rust/capture/src/payload/common.rs, decompression.rs) ---------------------
def _first_value(values: Mapping[str, list[str]], name: str) -> str | None:
    found = values.get(name)
    return found[0] if found else None


def extract_payload(
    body: bytes, content_type: str, query: Mapping[str, list[str]]
) -> tuple[bytes, str | None]:
    """The payload bytes and the compression hint: the query's ``data`` (GET), else the body; a
    urlencoded form's ``data`` field. The hint comes from the form, else the query."""
    data = _first_value(query, "data")
    from_query = bool(data)
    if data:
        payload = data.encode()
    elif body:
        payload = body
    else:
        raise bad_request("empty_payload", "request missing data payload")
    hint = _first_value(query, "compression")
    is_form = content_type.split(";", 1)[0].strip().lower() == "application/x-www-form-urlencoded"
    # a JSON or gzip body sent with the form type (curl -d, urllib) is taken as it is
    if is_form and not from_query and not payload.lstrip().startswith((b"{", b"[")) and not payload.startswith(GZIP_MAGIC):
        try:
            form = parse_qs(payload.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            raise bad_request("invalid_payload", "failed to decode request: expected form data in POST request payload") from None
        form_data = _first_value(form, "data")
        if form_data is None:
            raise bad_request("invalid_payload", "failed to decode request: form has no data field")
        # a base64 ``data`` lost its '+' to the urlencoding: restore them (common.rs)
        payload = form_data.replace(" ", "+").encode() if _looks_base64(form_data.encode()) else form_data.encode()
        hint = _first_value(form, "compression") or hint
    return payload, (hint or "").lower() or None


def _looks_base64(data: bytes) -> bool:
    return bool(data) and _BASE64.fullmatch(data) is not None


def _gunzip(data: bytes, limit: int) -> bytes:
    """Gzip with the output capped at ``limit`` bytes (a bomb fails with 413, not memory)."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = decompressor.decompress(data, limit + 1)
    except zlib.error:
        raise bad_request("invalid_payload", "failed to decode request: invalid gzip data") from None
    if len(out) > limit:
        raise too_big(f"decompressed payload would exceed {limit} bytes")
    if not decompressor.eof:
        raise bad_request("invalid_payload", "failed to decode request: truncated gzip data")
    return out


def _unbase64(data: bytes) -> bytes | None:
    text = b"".join(data.split()).replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def decode_payload(payload: bytes, hint: str | None, limit: int) -> bytes:
    """Payload bytes → JSON text (bytes). Gzip is detected by its magic bytes whatever the hint
    says; a payload that is base64 (hint ``base64``, or legacy SDKs sending it unannounced) is
    unwrapped, then checked for gzip again. ``lz64`` is not supported (400)."""
    if payload.startswith(GZIP_MAGIC) or hint in ("gzip", "gzip-js"):
        if not payload.startswith(GZIP_MAGIC):
            raise bad_request("invalid_payload", "failed to decode request: invalid gzip data")
        return _gunzip(payload, limit)
    if hint == "lz64":
        raise bad_request("invalid_payload", "failed to decode request: lz64 compression is not supported, use gzip")
    stripped = payload.lstrip()
    if not stripped.startswith((b"{", b"[")) and _looks_base64(stripped):
        decoded = _unbase64(stripped)
        if decoded is None:
            raise bad_request("invalid_payload", "failed to decode request: invalid base64 data")
        if decoded.startswith(GZIP_MAGIC):
            return _gunzip(decoded, limit)
        payload = decoded
    if len(payload) > limit:
        raise too_big(f"uncompressed payload size limit {limit} exceeded: {len(payload)}")
    return payload


def parse_json(text: bytes) -> Any:
    """One JSON decode for the whole request. Lone UTF-16 surrogates (``\\ud800``), which PostHog
    replaces rather than refuses, become U+FFFD."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if b"\\u" in text and "surrogate" in str(exc):
            fixed = _LONE_LOW.sub(rb"\\ufffd", _LONE_HIGH.sub(rb"\\ufffd", text))
            try:
                return orjson.loads(fixed)
            except orjson.JSONDecodeError:
                pass
        raise bad_request("invalid_json", f"failed to parse request: {str(exc)[:200]}") from None


# -- shapes and token (rust/capture/src/v0_request.rs, common/types event.rs) --------------------
@dataclass(slots=True)
class Payload:
    events: list[Any]
    batch_token: str | None  # the batch body's api_key/token, if any
    sent_at: str | None  # the batch body's sent_at (ISO 8601), if any
    historical_migration: bool


def payload_shape(doc: Any) -> Payload:
    """PostHog's untagged enum, tried in order: an array of events (posthog-js), a batch
    ``{api_key|token, batch, sent_at?, historical_migration?}``, a single event."""
    if isinstance(doc, list):
        events, token, sent_at, historical = doc, None, None, False
    elif isinstance(doc, dict) and "batch" in doc:
        events = doc["batch"]
        if not isinstance(events, list):
            raise bad_request("invalid_json", "failed to parse request: batch is not an array")
        token = doc.get("api_key", doc.get("token"))
        if token is not None and not isinstance(token, str):
            raise bad_request("invalid_json", "failed to parse request: api_key is not a string")
        sent_at = doc.get("sent_at") if isinstance(doc.get("sent_at"), str) else None
        historical = doc.get("historical_migration") is True
    elif isinstance(doc, dict):
        events, token, sent_at, historical = [doc], None, None, False
    else:
        raise bad_request("invalid_json", "failed to parse request: expected an event, an array or a batch")
    if not events:
        raise bad_request("empty_batch", "request holds no event")
    return Payload(events, token, sent_at, historical)


def event_token(event: Mapping[str, Any]) -> str | None:
    """``token`` (aliases ``$token``, ``api_key``), else ``properties.token`` if it is a string."""
    for name in ("token", "$token", "api_key"):
        value = event.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise bad_request("invalid_json", f"failed to parse request: {name} is not a string")
            return value
    properties = event.get("properties")
    if isinstance(properties, dict):
        value = properties.get("token")
        if isinstance(value, str):
            return value
    return None


def request_token(payload: Payload, teams: Mapping[str, int]) -> str:
    """The one token of the request. The batch's own ``api_key`` wins; otherwise every event
    that names a token must name the same one (401 ``multiple_tokens``); none → 401. An empty
    token or a personal API key (``phx_``) → 401 ``invalid_token`` (token.rs); a token no team
    has → 401 ``unknown_token`` (headwater knows its teams; PostHog's capture does not)."""
    token = payload.batch_token
    if token is None:
        found = {t for t in map(_token_of_item, payload.events) if t is not None}
        if len(found) > 1:
            raise CaptureError(401, "multiple_tokens", "batch submitted with inconsistent api_key values")
        token = found.pop() if found else None
    if token is None:
        raise CaptureError(401, "ingest_key_required", "event submitted without an api_key")
    if not token:
        raise CaptureError(401, "invalid_token", "API key is not valid: empty")
    if token.startswith("phx_"):
        raise CaptureError(401, "invalid_token", "API key is not valid: personal API key (phx_) used as a project token")
    if token not in teams:
        raise CaptureError(401, "unknown_token", "API key is not valid: no project has this token")
    return token


def _token_of_item(event: Any) -> str | None:
    return event_token(event) if isinstance(event, dict) else None


# -- distinct_id (common/types event.rs extract_distinct_id) -------------------------------------
def extract_distinct_id(event: Mapping[str, Any]) -> str | None:
    """Top-level ``distinct_id`` (alias ``$distinct_id``), else ``properties.distinct_id``; null or
    missing → None. Strings as they are, anything else as compact JSON with sorted keys; NUL →
    U+FFFD; whitespace-only → None (surrounding whitespace is kept); cut to 200 characters."""
    value = event.get("distinct_id")
    if value is None:
        value = event.get("$distinct_id")
    if value is None:
        properties = event.get("properties")
        value = properties.get("distinct_id") if isinstance(properties, dict) else None
        if value is None:
            return None
    if isinstance(value, str):
        did = value
    elif isinstance(value, bool):
        did = "true" if value else "false"
    else:
        did = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    if "\0" in did:
        did = did.replace("\0", "\ufffd")
    if not did.strip():
        return None
    return did[:MAX_DISTINCT_ID_CHARS] if len(did) > MAX_DISTINCT_ID_CHARS else did


# -- timestamps (common/types timestamp.rs parse_event_timestamp) --------------------------------
def _to_us(parsed: datetime) -> int:
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    delta = parsed - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_date_us(text: str) -> int | None:
    """A client date → µs since the epoch, or None. ISO 8601 / RFC 3339 (``+HH`` offsets, naive =
    UTC, date only), ``YYYY/MM/DD`` and ``MM/DD/YYYY``, RFC 2822, numeric epoch (s, ms, µs, ns)."""
    try:
        return _to_us(datetime.fromisoformat(text))
    except ValueError:
        pass
    except OverflowError:
        return None
    text = text.strip()
    if not text:
        return None
    if text.isdigit():
        number = int(text)
        digits = len(text)
        scale = 1_000_000 if digits <= 10 else 1_000 if digits <= 13 else 1 if digits <= 16 else None
        if scale is None:
            return number // 1_000
        return number * scale
    if "/" in text:
        for pattern in ("%Y/%m/%d", "%Y/%m/%d %H:%M:%S", "%m/%d/%Y", "%m/%d/%Y %H:%M:%S", "%m/%d/%y"):
            try:
                return _to_us(datetime.strptime(text, pattern))
            except ValueError:
                continue
        return None
    try:
        return _to_us(parsedate_to_datetime(text))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def parse_sent_at(body_sent_at: str | None, query: Mapping[str, list[str]]) -> int | None:
    """``sent_at`` in µs: the batch body's ISO 8601 ``sent_at``, else the query's ``_`` or
    ``sent_at`` as integer milliseconds, ignored unless its year is after 2020 (v0_request.rs)."""
    if body_sent_at:
        parsed = parse_date_us(body_sent_at)
        if parsed is not None:
            return parsed
    raw = _first_value(query, "sent_at") or _first_value(query, "_")
    if raw and raw.lstrip("-").isdigit():
        sent_at_us = int(raw) * 1_000
        if sent_at_us >= _YEAR_2021_US and sent_at_us <= _MAX_US:
            return sent_at_us
    return None


def event_timestamp_us(timestamp: str | None, offset_ms: int | None, sent_at_us: int | None, now_us: int) -> int:
    """PostHog's rule: a parsed ``timestamp`` corrected by the client's clock skew
    (``timestamp - (sent_at - now)``) when ``sent_at`` is known, else as sent, else ``now``;
    ``offset`` overrides all (``now - offset``); more than 23 h in the future → ``now``; outside
    years 1..9999 → the epoch."""
    ts = now_us
    if timestamp is not None:
        parsed = parse_date_us(timestamp)
        if parsed is not None:
            ts = parsed - (sent_at_us - now_us) if sent_at_us is not None else parsed
    if offset_ms is not None:
        ts = now_us - offset_ms * 1_000
    if ts - now_us > FUTURE_CLAMP_US:
        ts = now_us
    if ts < _MIN_US or ts > _MAX_US:
        ts = 0
    return ts


def iso_us(us: int) -> str:
    return (_EPOCH + timedelta(microseconds=us)).isoformat()


# -- one event → one message ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RequestContext:
    """What every event of one request shares."""

    token: str
    now_us: int
    sent_at_us: int | None
    ip: str
    engage: bool = False  # /engage: a missing event name means $identify
    historical_migration: bool = False


def _event_uuid(raw: Any) -> str:
    if raw is None or raw == "":
        return str(uuid7())
    if not isinstance(raw, str):
        raise bad_request("invalid_uuid", "failed to parse request: uuid is not a string")
    if _UUID_CANONICAL.fullmatch(raw):
        return raw
    try:
        return str(uuid_mod.UUID(raw))
    except ValueError:
        raise bad_request("invalid_uuid", f"failed to parse request: invalid uuid {raw[:64]!r}") from None


def build_message(event: Any, ctx: RequestContext, now_iso: str, sent_at_iso: str | None) -> tuple[bytes, bytes]:
    """One raw event → ``(key, value)`` of ``events_raw`` (the envelope of ``headwater.wire.RawEvent``,
    as ``producers.backend`` writes it). ``timestamp`` is final: skew, offset and clamp applied
    here, so the identity stage takes it as it is. Field types follow PostHog's ``RawEvent``."""
    if not isinstance(event, dict):
        raise bad_request("invalid_json", "failed to parse request: an event is not an object")
    name = event.get("event")
    if name is None and ctx.engage:
        name = "$identify"
    if not isinstance(name, str):
        raise bad_request("invalid_json", "failed to parse request: missing field `event`")
    if not name:
        raise bad_request("missing_event_name", "event submitted with an empty event name")
    properties = event.get("properties")
    if properties is None:
        properties = {}
    elif not isinstance(properties, dict):
        raise bad_request("invalid_json", "failed to parse request: properties is not an object")
    distinct_id = extract_distinct_id(event)
    if distinct_id is None:
        raise bad_request("missing_distinct_id", "event submitted without a distinct_id")
    cookieless = properties.get("$cookieless_mode")
    if cookieless is not None and not isinstance(cookieless, bool):
        raise bad_request("invalid_cookieless_mode", "event submitted with invalid cookieless mode")
    timestamp = event.get("timestamp")
    if timestamp is not None and not isinstance(timestamp, str):
        raise bad_request("invalid_json", "failed to parse request: timestamp is not a string")
    offset = event.get("offset")
    if offset is not None and (type(offset) is not int):
        raise bad_request("invalid_json", "failed to parse request: offset is not an integer")
    sent_at_us = None if properties.get("$ignore_sent_at") is True else ctx.sent_at_us
    if timestamp is None and offset is None:
        ts_iso = now_iso
    else:
        ts_iso = iso_us(event_timestamp_us(timestamp, offset, sent_at_us, ctx.now_us))
    envelope: dict[str, Any] = {
        "token": ctx.token,
        "distinct_id": distinct_id,
        "event": name,
        "uuid": _event_uuid(event.get("uuid")),
        "timestamp": ts_iso,
        "properties": properties,
        "now": now_iso,
        "ip": "127.0.0.1" if "capture_internal" in properties else ctx.ip,
    }
    for key in ("$set", "$set_once"):
        value = event.get(key)
        if value is not None:
            if not isinstance(value, dict):
                raise bad_request("invalid_json", f"failed to parse request: {key} is not an object")
            envelope[key] = value
    if sent_at_iso is not None:
        envelope["sent_at"] = sent_at_iso
    if ctx.historical_migration:
        envelope["historical_migration"] = True
    return partition_key(ctx.token, distinct_id).encode(), orjson.dumps(envelope)


def build_messages(events: list[Any], ctx: RequestContext, max_message_bytes: int) -> list[tuple[bytes, bytes]]:
    """Every event of a request, or the first error. A message bigger than Kafka takes → 413."""
    now_iso = iso_us(ctx.now_us)
    sent_at_iso = iso_us(ctx.sent_at_us) if ctx.sent_at_us is not None else None
    messages = [build_message(event, ctx, now_iso, sent_at_iso) for event in events]
    for key, value in messages:
        if len(value) + len(key) > max_message_bytes:
            raise too_big(f"maximum event size exceeded: an event is {len(value)} bytes, the limit is {max_message_bytes}")
    return messages


# -- the whole request ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PreparedRequest:
    token: str
    messages: list[tuple[bytes, bytes]]


def prepare_request(
    path: str,
    body: bytes,
    content_type: str,
    query_string: str,
    *,
    teams: Mapping[str, int],
    now_us: int,
    ip: str,
    max_message_bytes: int,
) -> PreparedRequest:
    """A capture request (``path`` already routed, e.g. ``/batch``) → its token and messages."""
    limit = CAPTURE_PATHS[path]
    query = parse_qs(query_string, keep_blank_values=True) if query_string else {}
    payload_bytes, hint = extract_payload(body, content_type, query)
    doc = parse_json(decode_payload(payload_bytes, hint, limit))
    payload = payload_shape(doc)
    token = request_token(payload, teams)
    ctx = RequestContext(
        token=token,
        now_us=now_us,
        sent_at_us=parse_sent_at(payload.sent_at, query),
        ip=ip,
        engage=path == "/engage",
        historical_migration=payload.historical_migration,
    )
    return PreparedRequest(token, build_messages(payload.events, ctx, max_message_bytes))


# -- CORS (router.rs: tower-http CorsLayer, origin and headers mirrored, credentials allowed) ------
def cors_headers(origin: str | None, request_headers: str | None, preflight: bool) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    if origin is not None:
        headers.append(("Access-Control-Allow-Origin", origin))
        headers.append(("Access-Control-Allow-Credentials", "true"))
    if preflight:
        headers.append(("Access-Control-Allow-Methods", "GET,POST,OPTIONS"))
        if request_headers:
            headers.append(("Access-Control-Allow-Headers", request_headers))
    headers.append(("Vary", "origin, access-control-request-method, access-control-request-headers"))
    return headers


__all__ = [
    "BATCH_BODY_LIMIT",
    "CAPTURE_PATHS",
    "EVENT_BODY_LIMIT",
    "HEALTH_PATHS",
    "CaptureError",
    "PreparedRequest",
    "RequestContext",
    "build_message",
    "build_messages",
    "cors_headers",
    "decode_payload",
    "event_timestamp_us",
    "extract_distinct_id",
    "extract_payload",
    "parse_date_us",
    "parse_json",
    "parse_sent_at",
    "payload_shape",
    "prepare_request",
    "request_token",
    "route_path",
]
