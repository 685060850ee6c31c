"""Step ``parse_raw_event``: raw bytes of ``events_raw`` → a parsed event, or a dead letter.

Input: the message value, the offered team map, and the message's coordinates (for events that
carry no uuid) and broker timestamp (the fallback for ``now``). Output: ``Ok(ParsedEvent)``, a
``DeadLetter`` with one of the reasons below, or a ``Drop`` with a warning. No state, no clock.

Dead-letter reasons: ``invalid_json``, ``not_an_object``, ``missing_token``, ``unknown_token``,
``missing_distinct_id``, ``invalid_distinct_id``, ``missing_event``, ``invalid_uuid``,
``invalid_properties``, ``invalid_person_update``. Drop: ``distinct_id_too_long`` (warning
``skipping_event_invalid_distinct_id``, as PostHog). Warnings without drop: ``ignored_invalid_timestamp``
and ``event_timestamp_in_future`` (more than 23 hours ahead of ``now``; the event keeps ``now``).

Properties added as PostHog's ingestion adds them: ``$ip`` from the envelope's ``ip`` (the client
address capture saw) when the event has no truthy ``$ip`` of its own, ``$sent_at`` from ``sent_at``.
"""

from __future__ import annotations

import re
import uuid as uuid_mod
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from headwater.outcomes import DeadLetter, Drop, Ok, Warn
from headwater.wire import MAX_DISTINCT_ID_CHARS, MAX_EVENT_NAME_CHARS, MESSAGE_NAMESPACE

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: A timestamp further ahead of ``now`` is replaced by ``now`` (capture's 23-hour future clamp).
FUTURE_LIMIT_US = 23 * 3600 * 1_000_000
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(slots=True)
class ParsedEvent:
    uuid: str
    team_id: int
    token: str
    distinct_id: str
    event: str
    timestamp_us: int
    now_us: int
    properties: dict[str, Any]


def to_epoch_us(value: Any) -> int | None:
    """ISO 8601 text (naive = UTC) → microseconds since the epoch; anything else → None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    delta = parsed - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_raw_event(
    value: bytes | None,
    teams: dict[str, int],
    *,
    topic: str,
    partition: int,
    offset: int,
    broker_timestamp_ms: int,
) -> Ok[ParsedEvent] | DeadLetter | Drop:
    try:
        doc = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError as exc:
        return DeadLetter("invalid_json", str(exc)[:200])
    if not isinstance(doc, dict):
        return DeadLetter("not_an_object", type(doc).__name__)

    token = doc.get("token") or doc.get("api_key") or doc.get("$token")
    if not isinstance(token, str) or not token:
        return DeadLetter("missing_token")
    team_id = teams.get(token)
    if team_id is None:
        return DeadLetter("unknown_token", token[:64])

    distinct_id = doc.get("distinct_id")
    if distinct_id is None or distinct_id == "":
        return DeadLetter("missing_distinct_id")
    if not isinstance(distinct_id, str) or not distinct_id.strip():
        return DeadLetter("invalid_distinct_id", repr(distinct_id)[:100])

    event = doc.get("event")
    if not isinstance(event, str) or not event:
        return DeadLetter("missing_event")

    raw_uuid = doc.get("uuid")
    if raw_uuid is None or raw_uuid == "":
        event_uuid = str(uuid_mod.uuid5(MESSAGE_NAMESPACE, f"{topic}:{partition}:{offset}"))
    elif isinstance(raw_uuid, str) and _CANONICAL_UUID.fullmatch(raw_uuid):
        event_uuid = raw_uuid  # already as str(UUID(...)) writes it
    else:
        try:
            event_uuid = str(uuid_mod.UUID(raw_uuid))
        except (TypeError, ValueError, AttributeError):
            return DeadLetter("invalid_uuid", repr(raw_uuid)[:100])

    properties = doc.get("properties")
    if properties is None:
        properties = {}
    elif not isinstance(properties, dict):
        return DeadLetter("invalid_properties", type(properties).__name__)
    for key in ("$set", "$set_once"):
        top = doc.get(key)
        if top is None:
            continue
        if not isinstance(top, dict):
            return DeadLetter("invalid_person_update", f"top-level {key} is {type(top).__name__}")
        inner = properties.get(key)
        # the top-level $set overrides properties.$set on conflicts (semantics §1.5)
        properties[key] = {**inner, **top} if isinstance(inner, dict) else dict(top)
    # PostHog's normalizeEvent: the client ip that capture saw becomes $ip unless the event brought
    # a (truthy) one; the client's send time is kept as $sent_at
    ip = doc.get("ip")
    if ip and isinstance(ip, str) and not properties.get("$ip"):
        properties["$ip"] = ip
    sent_at = doc.get("sent_at")
    if sent_at and isinstance(sent_at, str):
        properties["$sent_at"] = sent_at

    now_us = to_epoch_us(doc.get("now"))
    if now_us is None:
        now_us = broker_timestamp_ms * 1000
    warnings: tuple[Warn, ...] = ()
    raw_ts = doc.get("timestamp")
    timestamp_us = to_epoch_us(raw_ts) if raw_ts is not None else now_us
    if timestamp_us is None:
        timestamp_us = now_us
        warnings = (Warn("ignored_invalid_timestamp", {"timestamp": str(raw_ts)[:100]}),)
    elif timestamp_us - now_us > FUTURE_LIMIT_US:
        # capture clamps already; a producer writing to events_raw directly may not (PostHog's
        # ingestion warned `event_timestamp_in_future` and used `now`)
        warnings = (Warn("event_timestamp_in_future", {"timestamp": str(raw_ts)[:100], "now": str(doc.get("now"))[:100],
                                                       "result": "now"}),)
        timestamp_us = now_us

    if len(distinct_id) > MAX_DISTINCT_ID_CHARS:
        return Drop(
            "distinct_id_too_long",
            Warn("skipping_event_invalid_distinct_id", {"distinct_id_length": len(distinct_id), "event_uuid": event_uuid}),
        )

    parsed = ParsedEvent(
        uuid=event_uuid,
        team_id=team_id,
        token=token,
        distinct_id=distinct_id,
        event=event[:MAX_EVENT_NAME_CHARS],
        timestamp_us=timestamp_us,
        now_us=now_us,
        properties=properties,
    )
    return Ok(parsed, warnings)
