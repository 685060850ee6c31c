"""The ClickHouse sink: topics → tables in batches, offsets committed only after the insert.

Per (topic, partition) the sink buffers rows and inserts them when the buffer holds
``sink_batch_rows`` rows or its oldest row is ``sink_batch_ms`` old. Each insert carries
``insert_deduplication_token = "<topic>:<partition>:<first>-<last>"`` (offset range) and
``async_insert=0``, so a batch inserted again after a crash between the insert and the commit is
refused by ClickHouse rather than duplicated. When ClickHouse is down or erroring, the sink
pauses its partitions, keeps its group membership, retries with backoff and commits nothing
until the insert succeeds.

Routes: ``events_enriched`` → ``events``, ``ingestion_warnings`` → ``ingestion_warnings``,
``events_dead_letter`` → ``events_dead_letter``, the compacted identity topics ``persons`` →
``persons`` and ``person_distinct_ids`` → ``person_distinct_ids`` (whose materialized view feeds
``person_overrides``), and the compacted group topics ``groups`` → ``groups`` and ``group_types`` →
``group_types``. A row function returns ``None`` for a message that carries no row: a Kafka
tombstone (value None) on the compacted topics, which is what compaction needs, not an error. Its
offset still counts in its partition's batch, so a partition holding only tombstones commits too.
A message of our own topics that cannot become a row (bad JSON, missing key, wrong type) is kept
as a dead letter rather than dropped; the identity and group rows are type-checked before
insertion, so one bad value cannot fail every retry of its batch.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from headwater.rows import (
    DISTINCT_ID_COLUMNS,
    EVENT_COLUMNS,
    GROUP_COLUMNS,
    GROUP_SLOTS,
    GROUP_TYPE_COLUMNS,
    PERSON_COLUMNS,
    WARNING_COLUMNS,
)
from headwater.settings import Settings
from headwater.topics import TopicNames

log = logging.getLogger(__name__)

DEAD_LETTER_COLUMNS = (
    "reason",
    "detail",
    "stage",
    "source_topic",
    "source_partition",
    "source_offset",
    "dead_lettered_at",
    "key",
    "raw",
)


def event_row(message: Message) -> list[Any]:
    row = orjson.loads(message.value())
    return [row[c] for c in EVENT_COLUMNS]


def warning_row(message: Message) -> list[Any]:
    row = orjson.loads(message.value())
    return [row[c] for c in WARNING_COLUMNS]


_INT64 = range(-(1 << 63), 1 << 63)


def _int64(row: dict[str, Any], column: str) -> int:
    value = row[column]
    if type(value) is not int:  # bool and float are refused too
        raise TypeError(f"{column} must be an int, not {type(value).__name__}")
    if value not in _INT64:
        raise ValueError(f"{column} is out of the Int64 range: {value}")
    return value


def _flag(row: dict[str, Any], column: str) -> int:
    value = row[column]
    if type(value) is not int or value not in (0, 1):
        raise ValueError(f"{column} must be 0 or 1, not {value!r}")
    return value


def _text(row: dict[str, Any], column: str) -> str:
    value = row[column]
    if not isinstance(value, str):
        raise TypeError(f"{column} must be a string, not {type(value).__name__}")
    return value


def _uuid(row: dict[str, Any], column: str) -> str:
    return str(uuid.UUID(_text(row, column)))  # ValueError if it is not a UUID


def _key(row: dict[str, Any], column: str) -> str:
    value = _text(row, column)
    if not value:
        raise ValueError(f"{column} must not be empty")
    return value


def _group_type_index(row: dict[str, Any]) -> int:
    value = row["group_type_index"]
    if type(value) is not int or not 0 <= value < GROUP_SLOTS:
        raise ValueError(f"group_type_index must be an int 0..{GROUP_SLOTS - 1}, not {value!r}")
    return value


def _json_object_text(row: dict[str, Any], column: str) -> str:
    value = _text(row, column)
    if not isinstance(orjson.loads(value), dict):  # JSONDecodeError (a ValueError) if not JSON
        raise ValueError(f"{column} must be the JSON text of an object")
    return value


def person_row(message: Message) -> list[Any] | None:
    """A ``persons`` value as a row in PERSON_COLUMNS order; None for a tombstone (no row)."""
    value = message.value()
    if value is None:
        return None
    row = orjson.loads(value)
    return [
        _uuid(row, "id"),
        _int64(row, "team_id"),
        _text(row, "properties"),
        _flag(row, "is_identified"),
        _int64(row, "created_at"),  # µs since the epoch = DateTime64(6) ticks
        _int64(row, "version"),
        _flag(row, "is_deleted"),
    ]


def distinct_id_row(message: Message) -> list[Any] | None:
    """A ``person_distinct_ids`` value as a row in DISTINCT_ID_COLUMNS order; None for a tombstone."""
    value = message.value()
    if value is None:
        return None
    row = orjson.loads(value)
    return [
        _int64(row, "team_id"),
        _text(row, "distinct_id"),
        _uuid(row, "person_id"),
        _int64(row, "version"),
        _flag(row, "is_deleted"),
    ]


def group_row(message: Message) -> list[Any] | None:
    """A ``groups`` value as a row in GROUP_COLUMNS order; None for a tombstone (no row)."""
    value = message.value()
    if value is None:
        return None
    row = orjson.loads(value)
    version = _int64(row, "version")
    if version < 1:
        raise ValueError(f"version must be at least 1, not {version}")
    return [
        _int64(row, "team_id"),
        _group_type_index(row),
        _key(row, "group_key"),
        _json_object_text(row, "group_properties"),
        _int64(row, "created_at"),  # µs since the epoch = DateTime64(6) ticks
        version,
    ]


def group_type_row(message: Message) -> list[Any] | None:
    """A ``group_types`` value as a row in GROUP_TYPE_COLUMNS order; None for a tombstone."""
    value = message.value()
    if value is None:
        return None
    row = orjson.loads(value)
    return [_int64(row, "team_id"), _key(row, "group_type"), _group_type_index(row)]


def unreadable_row(message: Message, error: Exception) -> list[Any]:
    """A message of our own topics the sink cannot turn into a row: kept as a dead letter."""
    return [
        "sink_unreadable_row",
        repr(error)[:300],
        "sink",
        message.topic() or "",
        message.partition() or 0,
        message.offset() or 0,
        message.timestamp()[1],
        message.key() or b"",
        message.value() or b"",
    ]


def dead_letter_row(message: Message) -> list[Any]:
    headers = {k: v for k, v in (message.headers() or [])}

    def text(name: str) -> str:
        return (headers.get(name) or b"").decode(errors="replace")

    def number(name: str) -> int:
        value = text(name)
        return int(value) if value.lstrip("-").isdigit() and int(value) >= 0 else 0

    return [
        text("dlq_reason") or "unknown",
        text("dlq_detail"),
        text("dlq_stage"),
        text("dlq_topic"),
        number("dlq_partition"),
        number("dlq_offset"),
        message.timestamp()[1],  # broker time of the dead letter, ms = DateTime64(3) ticks
        message.key() or b"",
        message.value() or b"",
    ]


@dataclass(frozen=True)
class TableRoute:
    table: str
    columns: tuple[str, ...]
    to_row: Callable[[Message], list[Any] | None]  # None: the message carries no row (a tombstone)


@dataclass
class Buffer:
    rows: list[list[Any]] = field(default_factory=list)
    first_offset: int = -1
    last_offset: int = -1
    opened: float = 0.0


class ClickHouseSink:
    def __init__(self, settings: Settings, client: Client, *, worker_id: str = "0") -> None:
        self.settings = settings
        self.client = client
        self.database = settings.clickhouse.database
        topics = TopicNames(settings.topic_prefix)
        db = self.database
        self.routes: dict[str, TableRoute] = {
            topics.events_enriched: TableRoute(f"{db}.events", EVENT_COLUMNS, event_row),
            topics.ingestion_warnings: TableRoute(f"{db}.ingestion_warnings", WARNING_COLUMNS, warning_row),
            topics.events_dead_letter: TableRoute(f"{db}.events_dead_letter", DEAD_LETTER_COLUMNS, dead_letter_row),
            topics.persons: TableRoute(f"{db}.persons", PERSON_COLUMNS, person_row),
            topics.person_distinct_ids: TableRoute(f"{db}.person_distinct_ids", DISTINCT_ID_COLUMNS, distinct_id_row),
            topics.groups: TableRoute(f"{db}.groups", GROUP_COLUMNS, group_row),
            topics.group_types: TableRoute(f"{db}.group_types", GROUP_TYPE_COLUMNS, group_type_row),
        }
        self.group_id = f"{settings.topic_prefix}headwater-sink"
        self.consumer = Consumer(settings.consumer_config(self.group_id, **{"client.id": f"sink-{worker_id}"}))
        self.buffers: dict[tuple[str, int], Buffer] = {}
        self.dead_letter_route = self.routes[topics.events_dead_letter]
        self.unreadable: list[list[Any]] = []  # inserted before their offsets are committed
        self.rows_written: dict[str, int] = {r.table: 0 for r in self.routes.values()}
        self.insert_failures = 0

    def run(self, stop: threading.Event) -> None:
        self.consumer.subscribe(list(self.routes), on_revoke=self._on_revoke)
        log.info("sink: %s -> %s", ",".join(self.routes), self.database)
        try:
            while not stop.is_set():
                for message in self.consumer.consume(self.settings.sink_batch_rows, 0.05):
                    self._buffer(message)
                self._flush(force=False, stop=stop)
            self._flush(force=True, stop=stop)
        finally:
            self.consumer.close()

    def _buffer(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.fatal():
                raise KafkaException(error)
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("sink: consumer error: %s", error)
            return
        key = (message.topic(), message.partition())
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = self.buffers[key] = Buffer(opened=time.monotonic(), first_offset=message.offset())
        if buffer.first_offset < 0:
            buffer.first_offset = message.offset()
            buffer.opened = time.monotonic()
        buffer.last_offset = message.offset()  # rowless messages (tombstones) are committed with the batch
        try:
            row = self.routes[message.topic()].to_row(message)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # ValueError includes JSONDecodeError
            # Our own processors wrote this topic, so this is a bug upstream: keep it as a dead letter.
            log.error("sink: unreadable row at %s[%s]@%s: %r", *key, message.offset(), exc)
            self.unreadable.append(unreadable_row(message, exc))
            return
        if row is not None:
            buffer.rows.append(row)

    def _flush(self, *, force: bool, stop: threading.Event) -> None:
        if self.unreadable:
            first = self.unreadable[0]
            token = f"unreadable:{first[3]}:{first[4]}:{first[5]}:{len(self.unreadable)}"
            if not self._insert_with_retry(self.dead_letter_route, self.unreadable, token, stop):
                return
            self.rows_written[self.dead_letter_route.table] += len(self.unreadable)
            self.unreadable = []
        now = time.monotonic()
        max_age = self.settings.sink_batch_ms / 1000
        commits: list[TopicPartition] = []
        for (topic, partition), buffer in self.buffers.items():
            if buffer.first_offset < 0:
                continue
            due = force or len(buffer.rows) >= self.settings.sink_batch_rows or now - buffer.opened >= max_age
            if not due:
                continue
            if buffer.rows:
                route = self.routes[topic]
                token = f"{topic}:{partition}:{buffer.first_offset}-{buffer.last_offset}"
                if not self._insert_with_retry(route, buffer.rows, token, stop):
                    return  # stopping while ClickHouse is down: commit nothing
                self.rows_written[route.table] += len(buffer.rows)
            commits.append(TopicPartition(topic, partition, buffer.last_offset + 1))
            self.buffers[(topic, partition)] = Buffer()
        if commits:
            self.consumer.commit(offsets=commits, asynchronous=False)

    def _insert_with_retry(self, route: TableRoute, rows: list[list[Any]], token: str, stop: threading.Event) -> bool:
        delay = 0.2
        paused = False
        while True:
            try:
                self.client.insert(
                    route.table,
                    rows,
                    column_names=list(route.columns),
                    settings={"async_insert": 0, "insert_deduplication_token": token},
                )
                if paused:
                    self.consumer.resume(self.consumer.assignment())
                    log.info("sink: ClickHouse is back; inserted %d rows into %s", len(rows), route.table)
                return True
            except (ClickHouseError, OSError) as exc:
                self.insert_failures += 1
                log.warning("sink: insert into %s failed (%s); retrying in %.1fs, nothing committed", route.table, str(exc).splitlines()[0][:200], delay)
                if not paused:
                    self.consumer.pause(self.consumer.assignment())
                    paused = True
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline:
                    if stop.is_set():
                        return False
                    self.consumer.consume(1, min(0.1, delay))  # keep group membership alive
                delay = min(delay * 2, 5.0)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Drop buffers of revoked partitions: their rows are read again by the next owner."""
        for tp in partitions:
            self.buffers.pop((tp.topic, tp.partition), None)
