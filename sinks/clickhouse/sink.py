"""The ClickHouse sink: topics → tables in batches, effectively once (ADR 0007).

Per (topic, partition) the sink buffers messages and writes them as one batch when the buffer holds
``sink_batch_rows`` messages or its oldest is ``sink_batch_ms`` old. A batch is an offset range
``[first, last]`` of one partition, and every insert of it carries
``insert_deduplication_token = "<topic>:<partition>:<first>-<last>"`` and ``async_insert=0``.

Effectively once, in four steps per flush:
1. The batch's range is written to ``sink_batches`` (key ``topic:partition``) before anything else.
2. Events only: each event's ``team_id:uuid`` is looked up in ``event_uuids``. An event whose uuid
   was first carried at another offset (a client sent it again; SDKs retry with the same uuid) is
   dropped and counted; the uuids seen for the first time are recorded with their offsets. The
   event batches of one flush (one per partition) share one lookup and one such insert, taken in
   order, so the verdicts are those of checking them one after the other.
3. The rows are inserted with the batch's token. The batches of one flush share one insert per table
   for events, persons, distinct ids, groups and group types, with the tokens joined.
4. The offsets are committed.
A sink that crashed anywhere in between leaves the committed offset at the batch's ``first``. The
partition's next owner reads the range from ``sink_batches`` and forms exactly the same batch again
(same messages, same uuid verdicts, since the first carrier of a uuid is kept), so batch boundaries
never depend on timing after a crash. That replayed batch goes alone, since its previous owner may
have inserted it beside other partitions' batches under a joined token. For events, the sink leaves
out what it finds in the events table and inserts the rest with a token of its own. For the other
tables it uses the batch's token; a repeat of rows already there is refused or, in the
ReplacingMergeTree tables, collapsed by version. In a flush, event batches are written after the
other tables' batches.

Events travel raw: their JSON rows are joined and sent as ``INSERT ... SELECT ... FROM input()
FORMAT JSONEachRow``, so ClickHouse parses them and the sink decodes nothing on the hot path. If
ClickHouse refuses the batch's data, the sink decodes and type-checks every row in Python, keeps
the bad ones as dead letters (``sink_unreadable_row``) and inserts the rest with the same token.
The other topics (persons, groups, warnings, dead letters) are small: their rows are decoded and
type-checked before insertion, so one bad value cannot fail every retry of its batch.

When ClickHouse is down or erroring, the sink pauses its partitions, keeps its group membership,
retries with backoff (0.2 s doubling to 5 s, one log line per attempt) and commits nothing until
the insert succeeds; a partition revoked meanwhile is abandoned to its next owner.

Routes: ``events_enriched`` → ``events``, ``ingestion_warnings`` → ``ingestion_warnings``,
``events_dead_letter`` → ``events_dead_letter``, the compacted identity topics ``persons`` →
``persons`` and ``person_distinct_ids`` → ``person_distinct_ids`` (whose materialized view feeds
``person_overrides``), and the compacted group topics ``groups`` → ``groups`` and ``group_types`` →
``group_types``. A row function returns ``None`` for a message that carries no row: a Kafka
tombstone (value None) on the compacted topics, which is what compaction needs, not an error. Its
offset still counts in its partition's batch, so a partition holding only tombstones commits too.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError, OperationalError
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from headwater import metrics
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
from headwater.tansu import CHECK_EVERY_S, SETTLE_KEY, TransactionSettler, settled_topics
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

EVENT_TIME_COLUMNS = frozenset(
    ("timestamp", "person_created_at", "created_at", *(f"group{i}_created_at" for i in range(GROUP_SLOTS)))
)
"""The event row's times: int microseconds since the epoch (UTC) on the topic, DateTime64(6) in the table."""

_EVENT_INPUT_TYPES = {"uuid": "UUID", "person_id": "UUID", "team_id": "Int64", **dict.fromkeys(EVENT_TIME_COLUMNS, "Int64")}


def event_input_insert(table: str) -> str:
    """The statement that inserts raw event rows (JSONEachRow, one per line, sent as the body)."""
    structure = ", ".join(f"`{c}` {_EVENT_INPUT_TYPES.get(c, 'String')}" for c in EVENT_COLUMNS)
    select = ", ".join(f"fromUnixTimestamp64Micro(`{c}`, 'UTC')" if c in EVENT_TIME_COLUMNS else f"`{c}`" for c in EVENT_COLUMNS)
    columns = ", ".join(f"`{c}`" for c in EVENT_COLUMNS)
    return f"INSERT INTO {table} ({columns}) SELECT {select} FROM input('{structure}') FORMAT JSONEachRow"


_UUID_TEXT = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_ROW_HEAD = b'{"uuid":"'
_TEAM_HEAD = b'","team_id":'


def event_identity(value: bytes | None) -> str | None:
    """``"team_id:uuid"`` of an event row as the identity stage writes it (uuid, then team_id,
    first), read without decoding the row; None when the row does not start that way."""
    if value is None or not value.startswith(_ROW_HEAD) or value[45:57] != _TEAM_HEAD:
        return None
    text = value[9:45]
    if not _UUID_TEXT.match(text):
        return None
    end = value.find(b",", 57, 80)
    team = value[57:end]
    if end < 0 or not team.lstrip(b"-").isdigit():
        return None
    return f"{int(team)}:{text.decode()}"


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


LOOKUP_IDS = 10_000
"""Ids per ``event_uuids`` lookup. Measured on chDB 26.9: up to 20,000 ids, ``id IN [...]`` reads
the ids by key (35-90 ms); at 30,000 it scans the table and searches the array for every row
(9-32 s against 100-200k entries), which made one batch in a few benchmark runs take 26 s."""


class TextArray:
    """An ``Array(String)`` query parameter of texts without quotes or backslashes (event ids),
    formatted in one join: clickhouse-connect escapes a string one character at a time, which costs
    the sink ~8 µs per event id."""

    def __init__(self, texts: list[str]) -> None:
        if any("'" in t or "\\" in t for t in texts):
            raise ValueError("texts with quotes or backslashes need escaping")
        self.text = "['" + "','".join(texts) + "']" if texts else "[]"

    def __str__(self) -> str:
        return self.text


_EVENT_CHECKS: tuple[tuple[str, Callable[[dict[str, Any], str], Any]], ...] = tuple(
    (c, _uuid if c in ("uuid", "person_id") else _int64 if c == "team_id" or c in EVENT_TIME_COLUMNS else _text)
    for c in EVENT_COLUMNS
)


_TIMESTAMP = EVENT_COLUMNS.index("timestamp")


def event_row(message: Message) -> list[Any]:
    """An ``events_enriched`` value as a row in EVENT_COLUMNS order, every value type-checked (the
    checks ClickHouse makes: UUIDs, Int64 team and times, strings), for a batch ClickHouse refused."""
    row = orjson.loads(message.value())
    if not isinstance(row, dict):
        raise TypeError(f"an event row must be a JSON object, not {type(row).__name__}")
    return [check(row, column) for column, check in _EVENT_CHECKS]


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


ROW_ERRORS = (ValueError, KeyError, TypeError, AttributeError)
"""What a row function raises for a message it cannot read (ValueError includes JSONDecodeError)."""


@dataclass(frozen=True)
class TableRoute:
    table: str
    columns: tuple[str, ...]
    to_row: Callable[[Message], list[Any] | None]  # None: the message carries no row (a tombstone)


@dataclass
class Buffer:
    messages: list[Message] = field(default_factory=list)
    opened: float = 0.0


@dataclass(frozen=True)
class Batch:
    """One partition's offset range ``[first, last]`` and the messages read from it."""

    topic: str
    partition: int
    first: int
    last: int
    messages: list[Message]
    replayed: bool = False  # formed again from the range its partition's previous owner recorded

    @property
    def source(self) -> str:
        return f"{self.topic}:{self.partition}"

    @property
    def token(self) -> str:
        return f"{self.source}:{self.first}-{self.last}"


def _ours(messages: list[Message]) -> list[Message]:
    """The messages that are rows: without the settler's records (ADR 0015), which the batch's
    offset range still covers."""
    return [m for m in messages if m.key() != SETTLE_KEY]


class Abandoned(Exception):
    """The batch's partition was revoked (or the sink is stopping) while ClickHouse was failing."""


class ClickHouseSink:
    def __init__(self, settings: Settings, client: Client, *, worker_id: str = "0") -> None:
        self.settings = settings
        self.client = client
        self.database = settings.clickhouse.database
        topics = TopicNames(settings.topic_prefix)
        db = self.database
        self.events_topic = topics.events_enriched
        self.routes: dict[str, TableRoute] = {
            topics.events_enriched: TableRoute(f"{db}.events", EVENT_COLUMNS, event_row),
            topics.ingestion_warnings: TableRoute(f"{db}.ingestion_warnings", WARNING_COLUMNS, warning_row),
            topics.events_dead_letter: TableRoute(f"{db}.events_dead_letter", DEAD_LETTER_COLUMNS, dead_letter_row),
            topics.persons: TableRoute(f"{db}.persons", PERSON_COLUMNS, person_row),
            topics.person_distinct_ids: TableRoute(f"{db}.person_distinct_ids", DISTINCT_ID_COLUMNS, distinct_id_row),
            topics.groups: TableRoute(f"{db}.groups", GROUP_COLUMNS, group_row),
            topics.group_types: TableRoute(f"{db}.group_types", GROUP_TYPE_COLUMNS, group_type_row),
        }
        self.dead_letter_table = f"{db}.events_dead_letter"
        # topics whose batches of one flush go in one insert: chDB costs 10-40 ms per insert
        self.combined_topics = frozenset((topics.events_enriched, topics.persons, topics.person_distinct_ids,
                                          topics.groups, topics.group_types))
        self.event_insert = event_input_insert(f"{db}.events")
        self.group_id = f"{settings.topic_prefix}headwater-sink"
        self.consumer = Consumer(settings.consumer_config(self.group_id, **{
            "client.id": f"sink-{worker_id}",
            # always, Tansu included: a fetch bounded by the last stable offset never passes a batch
            # of an open transaction, which on Tansu's read_uncommitted the sink could skip for good
            # (ADR 0015, "The sink reads committed")
            "isolation.level": "read_committed",
            # whole batches per fetch: the default 1 MB per partition is ~800 event rows
            "max.partition.fetch.bytes": 16 << 20,
            "fetch.max.bytes": 64 << 20,
        }))
        self.buffers: dict[tuple[str, int], Buffer] = {}
        self.assigned: set[tuple[str, int]] = set()
        # the range written to sink_batches by the partition's previous owner, read once per assignment
        self.intents: dict[tuple[str, int], tuple[int, int] | None] = {}
        self.stop = threading.Event()
        # one writer thread does every ClickHouse call, so reading goes on while ClickHouse works
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="sink-writer")
        self.inflight: tuple[str, Future] | None = None
        self.buffered = 0  # messages in self.buffers
        self.held = False  # partitions paused because the writer is behind
        self.failing = False
        self.uncommitted: dict[tuple[str, int], TopicPartition] = {}  # written, commit refused so far
        self.commit_retry_at = 0.0
        self.commit_failures = 0
        self.insert_settings: dict[str, Any] = {"async_insert": 0}
        self.lookup_settings: dict[str, Any] = {}
        if settings.clickhouse_cluster:
            # ADR 0008: a Distributed insert returns once the shards hold the rows (so the commit
            # follows them), and a lookup sees what the last insert wrote on any replica
            self.insert_settings.update(distributed_foreground_insert=1, insert_quorum="auto")
            self.lookup_settings = {"select_sequential_consistency": 1}
        self.rows_written: dict[str, int] = {r.table: 0 for r in self.routes.values()}
        self.duplicates_dropped = 0
        self.dead_lettered = 0
        self.batches_replayed = 0
        self.revocations = 0  # rebalances that took partitions away: a write that waits gives up
        self.worker_id = worker_id
        self.settler: TransactionSettler | None = None  # on Tansu, while running
        self.insert_failures = 0
        self.metrics = metrics.watch_sink(self)  # per-batch counters, lag; the endpoint if configured

    # -- the loop (consumer thread) ----------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.stop = stop
        self.consumer.subscribe(list(self.routes), on_assign=self._on_assign, on_revoke=self._on_revoke)
        log.info("sink: %s -> %s", ",".join(self.routes), self.database)
        settler_thread, settler_stop = None, threading.Event()  # stops with the loop, however it ends
        if self.settings.tansu_workarounds:  # ADR 0015, "The settler"
            self.settler = TransactionSettler(self.settings, settled_topics(TopicNames(self.settings.topic_prefix)),
                                              self.worker_id)
            settler_thread = threading.Thread(target=self.settler.run, args=(settler_stop,), name="settler",
                                              daemon=True)
            settler_thread.start()
        try:
            while not stop.is_set():
                for message in self.consumer.consume(self.settings.sink_batch_rows, 0.05):
                    self._buffer(message)
                self._step(force=False)
            while True:  # write what is buffered (as far as it makes whole batches), then stop
                self._step(force=True, submit=not self.failing)  # ClickHouse failing: stop now
                if self.inflight is None:
                    break
                wait([self.inflight[1]])
        finally:
            self.writer.shutdown(wait=True)
            self.consumer.close()
            settler_stop.set()
            if settler_thread is not None:
                settler_thread.join(2 * CHECK_EVERY_S)

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
            buffer = self.buffers[key] = Buffer()
        if not buffer.messages:
            buffer.opened = time.monotonic()
        buffer.messages.append(message)
        self.buffered += 1

    def _step(self, *, force: bool, submit: bool = True) -> None:
        """Hands the writer thread its next job when it is free, and applies the last one's result.
        While the writer is busy, reading goes on until twice a batch is buffered, then pauses."""
        if self.inflight is not None:
            kind, job = self.inflight
            if not job.done():
                if not self.held and self.buffered >= 2 * self.settings.sink_batch_rows:
                    self.consumer.pause(self.consumer.assignment())
                    self.held = True
                return
            self.inflight = None
            if kind == "intents":
                found: dict[tuple[str, int], tuple[int, int] | None] = job.result()
                for key, intent in found.items():
                    if key in self.assigned:
                        self.intents[key] = intent
            else:
                self._commit(job.result())
        elif self.uncommitted and time.monotonic() >= self.commit_retry_at:
            self._commit([])
        if self.held:  # the writer is free again
            self.consumer.resume(self.consumer.assignment())
            self.held = False
        if not submit:
            return
        due = self._due_keys(force)
        if not due:
            return
        unknown = [key for key in due if key not in self.intents]
        if unknown:
            self.inflight = ("intents", self.writer.submit(self._read_intents, unknown))
            return
        # events last: an event's row shows once the persons, groups and warnings written beside it
        # do, so a query that joins them never sees the event without them (ADR 0007)
        due.sort(key=lambda key: key[0] == self.events_topic)
        batches = self._batches(due)
        if batches:
            self.inflight = ("write", self.writer.submit(self._write_batches, batches))

    def _commit(self, offsets: list[TopicPartition]) -> None:
        """Commit what was written, with any earlier commit that failed. A commit the group refuses
        for now (no coordinator, a rebalance under way, a broker restarting) is tried again a
        second later and with every later commit; if the partition changes hands meanwhile, its
        next owner writes the range again and ClickHouse refuses the repeat (ADR 0007)."""
        for tp in offsets:
            key = (tp.topic, tp.partition)
            if key not in self.uncommitted or self.uncommitted[key].offset < tp.offset:
                self.uncommitted[key] = tp
        commits = [tp for key, tp in self.uncommitted.items() if key in self.assigned]
        self.uncommitted = {(tp.topic, tp.partition): tp for tp in commits}
        if not commits:
            return
        try:
            self.consumer.commit(offsets=commits, asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal():
                raise
            self.commit_failures += 1
            self.commit_retry_at = time.monotonic() + 1.0
            log.warning("sink: commit of %d partitions refused (%s); trying again", len(commits), error)
            return
        self.uncommitted = {}
        self.metrics.committed(commits)  # lag: on this thread, the consumer's own

    def _due_keys(self, force: bool) -> list[tuple[str, int]]:
        now = time.monotonic()
        max_age = self.settings.sink_batch_ms / 1000
        return [
            key for key, buffer in self.buffers.items()
            if buffer.messages and (force or len(buffer.messages) >= self.settings.sink_batch_rows
                                    or now - buffer.opened >= max_age or self.intents.get(key))
        ]

    def _batches(self, due: list[tuple[str, int]]) -> list[Batch]:
        now = time.monotonic()
        batches = []
        for key in due:
            buffer = self.buffers[key]
            intent = self.intents.get(key)
            first = buffer.messages[0].offset()
            if intent is not None and intent[0] <= first <= intent[1]:
                # the previous owner wrote this range (or was writing it): the same batch again
                if buffer.messages[-1].offset() < intent[1] and not self._passed(key, intent[1]):
                    continue  # not all of it read yet
                messages = [m for m in buffer.messages if m.offset() <= intent[1]]
                batch = Batch(key[0], key[1], intent[0], intent[1], _ours(messages), replayed=True)
                self.batches_replayed += 1
                log.info("sink: %s starts inside the range its previous owner wrote; writing %s again", batch.source, batch.token)
            else:
                if intent is not None and first < intent[0]:
                    log.warning("sink: %s:%s starts at %d, before the last recorded batch %d-%d (offsets reset?)",
                                *key, first, *intent)
                messages = buffer.messages
                batch = Batch(key[0], key[1], first, messages[-1].offset(), _ours(messages))
            self.intents[key] = None
            buffer.messages = buffer.messages[len(messages):]
            buffer.opened = now
            self.buffered -= len(messages)
            batches.append(batch)
        return batches

    def _passed(self, key: tuple[str, int], offset: int) -> bool:
        """Whether the consumer has read past ``offset`` (a compacted topic may have lost it)."""
        (position,) = self.consumer.position([TopicPartition(*key)])
        return position.offset > offset

    # -- the writer thread -----------------------------------------------------------------------
    def _read_intents(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int] | None]:
        sources = [f"{topic}:{partition}" for topic, partition in keys]
        found: dict[str, tuple[int, int]] = {}

        def read() -> None:
            rows = self.client.query(
                f"SELECT source, first_offset, last_offset FROM {self.database}.sink_batches "
                "WHERE source IN {sources:Array(String)}",
                parameters={"sources": sources}, settings=self.lookup_settings,
            ).result_rows
            found.update({source: (int(first), int(last)) for source, first, last in rows})

        try:
            self._retry("read sink_batches", read, keys)
        except Abandoned:
            return {}  # read again when the partitions are due again
        return {key: found.get(source) for key, source in zip(keys, sources)}

    def _write_batches(self, batches: list[Batch]) -> list[TopicPartition]:
        """Records the batches' ranges, writes each batch; returns the offsets to commit."""
        batches = [b for b in batches if (b.topic, b.partition) in self.assigned]
        revocations = self.revocations

        def record() -> None:
            if batches:
                self.client.insert(
                    f"{self.database}.sink_batches",
                    [[b.source, b.first, b.last] for b in batches],
                    column_names=["source", "first_offset", "last_offset"],
                    settings=self.insert_settings,
                )

        try:
            self._retry("record the batches' ranges in sink_batches", record, [(b.topic, b.partition) for b in batches])
        except Abandoned:
            return []
        # the events' uuids are checked for all event batches at once: one lookup and one insert
        # into event_uuids instead of one each per partition (ADR 0007)
        events = [b for b in batches if b.topic == self.events_topic]
        checked: dict[str, tuple[list[Message], list[list[Any]]]] = {}
        if events:
            try:
                self._retry("check the events' uuids", self._check_events, [(b.topic, b.partition) for b in events],
                            events, checked)
            except Abandoned:
                batches = [b for b in batches if b.topic != self.events_topic]
        commits: list[TopicPartition] = []
        for group in self._write_groups(batches):
            keys = [(b.topic, b.partition) for b in group]
            started = time.perf_counter()
            try:
                self._retry(f"insert {'+'.join(b.token for b in group)}", self._write, keys, group, checked,
                            since=revocations)
            except Abandoned:
                continue  # revoked or stopping: its next owner writes it again, from the same range
            for batch in group:
                self.metrics.written(batch, time.perf_counter() - started)
                commits.append(TopicPartition(batch.topic, batch.partition, batch.last + 1))
        return commits

    def _write_groups(self, batches: list[Batch]) -> list[list[Batch]]:
        """The inserts of one flush, in order: the batches of a topic whose table takes several
        partitions' batches in one insert (events, and the ReplacingMergeTree tables of persons,
        distinct ids and groups) go together; the others, and a batch formed again after its
        previous owner stopped (``replayed``), go alone (ADR 0007, "One insert per table")."""
        groups: list[list[Batch]] = []
        together: dict[str, list[Batch]] = {}
        for batch in batches:
            if batch.topic in self.combined_topics and not batch.replayed:
                if batch.topic not in together:
                    together[batch.topic] = []
                    groups.append(together[batch.topic])
                together[batch.topic].append(batch)
            else:
                groups.append([batch])
        return groups

    # -- writing one batch ---------------------------------------------------------------------------
    def _write(self, group: list[Batch], checked: dict[str, tuple[list[Message], list[list[Any]]]]) -> None:
        """One insert of ``group`` (batches of one topic), its dead letters one insert per batch."""
        if group[0].topic == self.events_topic:
            self._write_events(group, checked)
            return
        route = self.routes[group[0].topic]
        rows: list[list[Any]] = []
        for batch in group:
            batch_rows, dead = self._checked_rows(batch.messages, route.to_row)
            self._insert_dead_letters(batch, dead)
            rows.extend(batch_rows)
        if rows:
            self._insert(route.table, rows, route.columns, "+".join(b.token for b in group))
            self.rows_written[route.table] += len(rows)

    def _check_events(self, batches: list[Batch], checked: dict[str, tuple[list[Message], list[list[Any]]]]) -> None:
        """Fills ``checked``: per batch token, the events to insert (first carriers of their uuids)
        and the dead letters of rows that cannot be read."""
        started = time.perf_counter()
        checked.clear()
        ids: dict[str, list[str | None]] = {}
        dead: dict[str, list[list[Any]]] = {}
        for batch in batches:
            ids[batch.token] = batch_ids = [event_identity(m.value()) for m in batch.messages]
            dead[batch.token] = []
            for i, message in enumerate(batch.messages):
                if batch_ids[i] is None:  # not as the identity stage writes rows: read it the slow way
                    try:
                        row = event_row(message)
                        batch_ids[i] = f"{row[1]}:{row[0]}"
                    except ROW_ERRORS as exc:
                        dead[batch.token].append(self._unreadable(message, exc))
        keep = self._first_carriers(batches, ids)
        for batch in batches:
            checked[batch.token] = (keep[batch.token], dead[batch.token])
        log.debug("sink: uuids of %d event batches checked in %.0f ms", len(batches), 1e3 * (time.perf_counter() - started))

    def _write_events(self, group: list[Batch], checked: dict[str, tuple[list[Message], list[list[Any]]]]) -> None:
        """The events of ``group`` in one insert, with the token joining the batches' tokens. A
        replayed batch goes alone: the events its previous owner's insert (which may have joined
        other partitions' batches) already put in ClickHouse are left out, and the rest go in with
        a token of their own (ADR 0007)."""
        table = self.routes[self.events_topic].table
        started = time.perf_counter()
        keep = {b.token: checked[b.token][0] for b in group}
        token = "+".join(b.token for b in group)
        if len(group) == 1 and group[0].replayed:
            batch = group[0]
            keep[batch.token] = self._not_inserted(keep[batch.token])
            offsets = ",".join(str(m.offset()) for m in keep[batch.token]).encode()
            token = f"{batch.token}:replay:{hashlib.blake2b(offsets, digest_size=8).hexdigest()}"
        messages = [m for b in group for m in keep[b.token]]
        if not messages:
            for batch in group:
                self._insert_dead_letters(batch, checked[batch.token][1])
            return
        # dead letters are inserted once per batch (one token), after the events: the raw insert may
        # find more of them
        try:
            self.client.command(self.event_insert, data=b"\n".join(m.value() for m in messages),
                                settings={**self.insert_settings, "insert_deduplication_token": token})
        except OperationalError:
            raise  # not an answer about the data: retried
        except DatabaseError as exc:
            # ClickHouse refused the data: check every row here, keep the bad ones as dead letters
            log.warning("sink: ClickHouse refused %s (%s); checking its %d rows one by one", token,
                        str(exc).splitlines()[0][:200], len(messages))
            rows: list[list[Any]] = []
            bad: dict[str, list[list[Any]]] = {}
            for batch in group:
                batch_rows, bad[batch.token] = self._checked_rows(keep[batch.token], event_row)
                rows.extend(batch_rows)
            if rows:
                self._insert(table, rows, EVENT_COLUMNS, token)
            for batch in group:
                self._insert_dead_letters(batch, checked[batch.token][1] + bad[batch.token])
            self.rows_written[table] += len(rows)
            return
        for batch in group:
            self._insert_dead_letters(batch, checked[batch.token][1])
        self.rows_written[table] += len(messages)
        log.debug("sink: %s: %d rows inserted in %.0f ms", token, len(messages), 1e3 * (time.perf_counter() - started))

    def _not_inserted(self, messages: list[Message]) -> list[Message]:
        """``messages`` minus the events already in the events table (by team and uuid, within
        their timestamps' range, so the sorting key prunes the read). Only for a replayed batch: its
        previous owner may have inserted it with other partitions' batches, under another token."""
        wanted: dict[tuple[int, str], Message] = {}
        times: list[int] = []
        for message in messages:
            try:
                row = event_row(message)
            except ROW_ERRORS:
                continue  # not readable: it takes the insert's slow path, never landed as a row
            wanted[(int(row[1]), str(row[0]))] = message
            times.append(row[_TIMESTAMP])
        if not wanted:
            return messages
        found: set[tuple[int, str]] = set()
        keys = list(wanted)
        for start in range(0, len(keys), LOOKUP_IDS):
            chunk = keys[start:start + LOOKUP_IDS]
            rows = self.client.query(
                f"SELECT team_id, toString(uuid) FROM {self.routes[self.events_topic].table} "
                "WHERE team_id IN {teams:Array(Int64)} AND uuid IN {uuids:Array(UUID)} "
                "AND timestamp BETWEEN fromUnixTimestamp64Micro({low:Int64}, 'UTC') "
                "AND fromUnixTimestamp64Micro({high:Int64}, 'UTC')",
                parameters={"teams": sorted({team for team, _ in chunk}), "uuids": TextArray([u for _, u in chunk]),
                            "low": min(times), "high": max(times)},
                settings=self.lookup_settings,
            ).result_rows
            found.update((int(team), str(event_uuid)) for team, event_uuid in rows)
        if found:
            log.info("sink: %d of %d replayed events were inserted before; left out", len(found), len(messages))
        landed = {id(wanted[key]) for key in found & wanted.keys()}
        return [m for m in messages if id(m) not in landed]

    def _first_carriers(self, batches: list[Batch], ids: dict[str, list[str | None]]) -> dict[str, list[Message]]:
        """Per batch token, the batch's events minus those whose uuid was first carried at another
        offset, and records the uuids seen here for the first time (before the events are
        inserted). Batches are taken in order, so a uuid new to ClickHouse that two of them carry
        is kept in the first, as if they were checked one after the other."""
        unique = sorted({i for batch_ids in ids.values() for i in batch_ids if i is not None})
        owners: dict[str, tuple[int, int]] = {}
        for start in range(0, len(unique), LOOKUP_IDS):
            rows = self.client.query(
                f"SELECT id, min((source_partition, source_offset)) FROM {self.database}.event_uuids "
                "WHERE id IN {ids:Array(String)} GROUP BY id",
                parameters={"ids": TextArray(unique[start:start + LOOKUP_IDS])}, settings=self.lookup_settings,
            ).result_rows
            owners.update((i, (int(owner[0]), int(owner[1]))) for i, owner in rows)
        kept: dict[str, list[Message]] = {}
        new: list[list[Any]] = []
        for batch in batches:
            keep = kept[batch.token] = []
            batch_ids = ids[batch.token]
            for message, event_id in zip(batch.messages, batch_ids):
                if event_id is None:
                    continue
                here = (batch.partition, message.offset())
                owner = owners.get(event_id)
                if owner is None:
                    owners[event_id] = here
                    new.append([event_id, here[0], here[1]])
                    keep.append(message)
                elif owner == here:
                    keep.append(message)  # this batch again: its first attempt recorded it
                else:
                    self.duplicates_dropped += 1
            dropped = len(batch.messages) - len(keep) - batch_ids.count(None)
            if dropped:
                log.info("sink: %s: %d events dropped, their uuids were ingested before", batch.token, dropped)
        if new:
            # one insert for all the batches; a repeated (id, partition, offset) row changes no verdict
            self._insert(f"{self.database}.event_uuids", new, ("id", "source_partition", "source_offset"),
                         "+".join(b.token for b in batches) + ":uuids")
        return kept

    def _checked_rows(self, messages: list[Message], to_row: Callable[[Message], list[Any] | None]
                      ) -> tuple[list[list[Any]], list[list[Any]]]:
        """(rows, dead letters) of ``messages``; a message that carries no row (a tombstone) is neither."""
        rows, dead = [], []
        for message in messages:
            try:
                row = to_row(message)
            except ROW_ERRORS as exc:
                dead.append(self._unreadable(message, exc))
                continue
            if row is not None:
                rows.append(row)
        return rows, dead

    def _unreadable(self, message: Message, exc: Exception) -> list[Any]:
        # Our own processors wrote this topic, so this is a bug upstream: keep it as a dead letter.
        log.error("sink: unreadable row at %s[%s]@%s: %r", message.topic(), message.partition(), message.offset(), exc)
        return unreadable_row(message, exc)

    def _insert_dead_letters(self, batch: Batch, rows: list[list[Any]]) -> None:
        if rows:
            self._insert(self.dead_letter_table, rows, DEAD_LETTER_COLUMNS, f"{batch.token}:dead")
            self.dead_lettered += len(rows)
            self.rows_written[self.dead_letter_table] += len(rows)

    def _insert(self, table: str, rows: list[list[Any]], columns: tuple[str, ...], token: str) -> None:
        self.client.insert(table, rows, column_names=list(columns),
                           settings={**self.insert_settings, "insert_deduplication_token": token})

    # -- failures --------------------------------------------------------------------------------------
    def _retry(self, what: str, action: Callable[..., None], keys: list[tuple[str, int]], *args: Any,
               since: int | None = None) -> None:
        """``action(*args)`` until it succeeds, with backoff; ``Abandoned`` if the sink stops, if
        every partition in ``keys`` is revoked while it waits, or (with ``since``, the revocation
        count when the write began) if any revocation happened since: a write joining several
        partitions must not land after one of them has a new owner, who replays its range."""
        delay = 0.2
        while True:
            try:
                action(*args)
                if self.failing:
                    self.failing = False
                    log.info("sink: ClickHouse is back (%s done)", what)
                return
            except (ClickHouseError, OSError) as exc:
                self.insert_failures += 1
                self.failing = True
                log.warning("sink: %s failed (%s); retrying in %.1fs, nothing committed", what,
                            str(exc).splitlines()[0][:200], delay)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline:
                    if self.stop.wait(0.05):
                        raise Abandoned(what) from exc
                    if keys and (not any(key in self.assigned for key in keys)
                                 or (since is not None and self.revocations != since)):
                        log.info("sink: %s: revoked while waiting; the next owner does it", what)
                        raise Abandoned(what) from exc
                delay = min(delay * 2, 5.0)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.assigned.add(key)
            self.intents.pop(key, None)  # read again before the partition's first batch
        if self.held:
            consumer.pause(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Drop buffers of revoked partitions (their next owner reads them again), and let the
        writer finish or abandon what it is doing for them before they change hands."""
        self.revocations += 1
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.assigned.discard(key)
            self.uncommitted.pop(key, None)  # the next owner writes the range again (ADR 0007)
            buffer = self.buffers.pop(key, None)
            if buffer is not None:
                self.buffered -= len(buffer.messages)
            self.intents.pop(key, None)
        if self.inflight is not None:
            done, _ = wait([self.inflight[1]], timeout=30)
            if not done:
                log.warning("sink: the writer is still busy 30 s after a revocation; going on")
