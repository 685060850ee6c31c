"""What a stage sends: records for the producer, and the two shapes every stage shares
(dead letters and ingestion warnings). No Kafka import: the runtime does the sending.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, NamedTuple, Protocol

import orjson

from headwater.outcomes import Warn


class SourceMessage(Protocol):
    """The parts of a consumed Kafka message a stage reads (confluent_kafka.Message has them)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def timestamp(self) -> tuple[int, int]: ...
    def headers(self) -> list[tuple[str, bytes]] | None: ...


class Record(NamedTuple):
    """One message to send. ``value`` None is a tombstone; ``partition`` None lets the producer's
    partitioner (murmur2) place it by key."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None = None
    partition: int | None = None


def dead_letter(message: SourceMessage, *, dlq_topic: str, stage: str, reason: str, detail: str = "") -> Record:
    """The original message (key, bytes, headers) with the ``dlq_*`` headers added."""
    headers = list(message.headers() or [])
    headers += [
        ("dlq_reason", reason.encode()),
        ("dlq_stage", stage.encode()),
        ("dlq_topic", (message.topic() or "").encode()),
        ("dlq_partition", str(message.partition()).encode()),
        ("dlq_offset", str(message.offset()).encode()),
        ("dlq_timestamp", datetime.now(timezone.utc).isoformat(timespec="milliseconds").encode()),
    ]
    if detail:
        headers.append(("dlq_detail", detail.encode(errors="replace")))
    return Record(dlq_topic, message.key(), message.value() or b"", headers)


def warning_record(
    warning: Warn, *, topic: str, team_id: int, event_uuid: str, distinct_id: str, timestamp_us: int
) -> Record:
    value: dict[str, Any] = {
        "type": warning.type,
        "team_id": team_id,
        "event_uuid": event_uuid,
        "distinct_id": distinct_id,
        "details": orjson.dumps(warning.details).decode(),
        "timestamp": timestamp_us,
    }
    return Record(topic, str(team_id).encode(), orjson.dumps(value))
