"""``headwater status`` (per stage and partition: consumer lag and throughput; dead letters and
warnings by reason in the last hour; rows per table; whether Kafka and ClickHouse answer) and
the live status line of ``headwater up``.

Lag is read from Kafka, not from the processes: each stage's consumer group's committed offsets
against the end of each partition. Tansu's end offsets are not trusted (ADR 0002: a non-
transactional topic's high watermark is the start of its last batch + 1), so the end is found by
reading: a read_committed consumer starts at the last batch (watermark - 1) and reads to the
partition's end (``enable.partition.eof``). How transaction markers are counted: ADR 0012.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .settings import Settings
from .topics import (
    EVENTS_DEAD_LETTER,
    EVENTS_ENRICHED,
    EVENTS_RAW,
    GROUP_TYPES,
    GROUPS,
    IDENTITY_INBOX,
    INGESTION_WARNINGS,
    PERSON_DISTINCT_IDS,
    PERSONS,
    TopicSpec,
)

if TYPE_CHECKING:
    from .stack import LocalStack

log = logging.getLogger(__name__)

WINDOW_S = 3600
"""Dead letters and warnings are counted over this last stretch of time."""

TABLES = ("events", "persons", "person_distinct_ids", "person_overrides", "groups", "group_types", "sessions",
          "ingestion_warnings", "events_dead_letter")
"""The analysts' tables whose rows status counts (as stored: versioned tables hold a row per version)."""


@dataclass(frozen=True)
class StageSpec:
    """A stage as status sees it: its consumer group (after the topic prefix) and input topics."""

    name: str
    group: str
    inputs: tuple[TopicSpec, ...]


STAGES: tuple[StageSpec, ...] = (
    # processors/runtime.py: group "{prefix}headwater-{stage}"
    StageSpec("identity", "headwater-identity", (EVENTS_RAW, IDENTITY_INBOX)),
    # sinks/clickhouse/sink.py: group "{prefix}headwater-sink", one route per topic
    StageSpec("sink", "headwater-sink", (EVENTS_ENRICHED, INGESTION_WARNINGS, EVENTS_DEAD_LETTER, PERSONS,
                                         PERSON_DISTINCT_IDS, GROUPS, GROUP_TYPES)),
)


@dataclass(frozen=True)
class PartitionEnd:
    """Where one partition ends for a read_committed reader (``end``), and the offset just after its
    last record that such a reader gets (``data_end``): offsets between them are transaction
    markers (or aborted records), which no consumer ever commits past by reading."""

    end: int
    data_end: int


def partition_lag(committed: int | None, low: int, end: PartitionEnd) -> int:
    """Records (and markers between them) a group has still to read: from its committed offset
    (none: the log start, as ``auto.offset.reset=earliest``) to the last record; markers after
    the last record do not count, so a caught-up group has lag 0."""
    start = low if committed is None or committed < 0 else max(committed, low)
    return max(0, end.data_end - start)


def _quiet_kafka(settings: Settings, **overrides: Any) -> dict[str, Any]:
    # librdkafka logs every failed connection on stderr: status reports reachability itself
    return settings.kafka_config(**{"log_level": 2, **overrides})


def read_ends(settings: Settings, partitions: list[tuple[str, int]], timeout: float = 10.0
              ) -> dict[tuple[str, int], tuple[int, PartitionEnd]]:
    """``(low watermark, PartitionEnd)`` of each partition, found by reading its last batch."""
    from confluent_kafka import Consumer, IsolationLevel, KafkaError, TopicPartition
    from confluent_kafka.admin import AdminClient, OffsetSpec

    if not partitions:
        return {}
    admin = AdminClient(_quiet_kafka(settings))
    marks: dict[tuple[str, int], list[int]] = {}
    for spec in (OffsetSpec.earliest(), OffsetSpec.latest()):
        futures = admin.list_offsets({TopicPartition(t, p): spec for t, p in partitions},
                                     isolation_level=IsolationLevel.READ_UNCOMMITTED, request_timeout=timeout)
        for tp, future in futures.items():
            marks.setdefault((tp.topic, tp.partition), []).append(future.result().offset)
    result: dict[tuple[str, int], tuple[int, PartitionEnd]] = {}
    starts: dict[tuple[str, int], int] = {}
    for key, (low, high) in marks.items():
        if high <= low:
            result[key] = (low, PartitionEnd(low, low))
        else:
            starts[key] = max(low, high - 1)
    if not starts:
        return result
    reader = Consumer(_quiet_kafka(settings, **{
        "group.id": f"{settings.topic_prefix}headwater-status", "enable.auto.commit": False,
        "isolation.level": "read_committed", "enable.partition.eof": True, "fetch.wait.max.ms": 10,
        "auto.offset.reset": "latest"}))
    last: dict[tuple[str, int], int] = {}
    eof: dict[tuple[str, int], int] = {}
    try:
        reader.assign([TopicPartition(t, p, offset) for (t, p), offset in starts.items()])
        deadline = time.monotonic() + timeout
        while len(eof) < len(starts) and time.monotonic() < deadline:
            for m in reader.consume(10_000, 0.1):
                key = (m.topic(), m.partition())
                error = m.error()
                if error is None:
                    last[key] = m.offset()
                elif error.code() == KafkaError._PARTITION_EOF:
                    eof[key] = m.offset()
    finally:
        reader.close()
    for key, start in starts.items():
        low, high = marks[key]
        data_end = last[key] + 1 if key in last else start
        end = eof.get(key, max(high, data_end))  # no end seen in time: the watermark, or what was read
        result[key] = (low, PartitionEnd(max(end, data_end), data_end))
    return result


def _committed(admin: Any, group: str, timeout: float) -> dict[tuple[str, int], int]:
    from confluent_kafka import ConsumerGroupTopicPartitions

    future = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)], request_timeout=timeout)[group]
    return {(tp.topic, tp.partition): tp.offset for tp in future.result().topic_partitions or [] if tp.offset >= 0}


def _group_state(admin: Any, group: str, timeout: float) -> tuple[str, int | None]:
    try:
        description = admin.describe_consumer_groups([group], request_timeout=timeout)[group].result()
    except Exception as exc:  # noqa: BLE001 - a broker that cannot describe groups still has lag to show
        return f"unknown ({str(exc)[:60]})", None
    return description.state.name.lower(), len(description.members)


def kafka_status(settings: Settings, interval: float, timeout: float = 10.0, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(broker reachability, stages): per stage its group's state, and per input partition the
    committed offset, the end, the lag and the throughput (committed offsets per second over
    ``interval`` seconds, timed by ``clock``; None when ``interval`` is 0)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    broker: dict[str, Any] = {"bootstrap": settings.bootstrap_servers, "reachable": False, "error": None}
    admin = AdminClient(_quiet_kafka(settings))
    try:
        topics = admin.list_topics(timeout=min(timeout, 5.0)).topics
    except KafkaException as exc:
        error = exc.args[0]
        broker["error"] = (error.str() if hasattr(error, "str") else str(error))[:200]
        return broker, []
    broker["reachable"] = True
    prefix = settings.topic_prefix
    groups = {stage.name: f"{prefix}{stage.group}" for stage in STAGES}
    partitions: dict[str, list[tuple[str, int]]] = {}
    missing: dict[str, list[str]] = {}
    for stage in STAGES:
        for spec in stage.inputs:
            name = spec.name(prefix)
            meta = topics.get(name)
            if meta is None or meta.error is not None:
                missing.setdefault(stage.name, []).append(name)
                continue
            partitions.setdefault(stage.name, []).extend((name, p) for p in sorted(meta.partitions))
    first = {name: _committed(admin, group, timeout) for name, group in groups.items()}
    started = clock()
    if interval > 0:
        sleep(interval)
        second = {name: _committed(admin, group, timeout) for name, group in groups.items()}
        elapsed = clock() - started
    else:
        second, elapsed = first, 0.0
    ends = read_ends(settings, [key for keys in partitions.values() for key in keys], timeout)
    stages = []
    for stage in STAGES:
        state, members = _group_state(admin, groups[stage.name], timeout)
        rows = []
        for key in partitions.get(stage.name, []):
            low, end = ends[key]
            committed = second[stage.name].get(key)
            before = first[stage.name].get(key, low)
            rate = None
            if elapsed > 0:
                rate = round(max(0, (committed if committed is not None else low) - before) / elapsed, 1)
            rows.append({"topic": key[0], "partition": key[1], "committed": committed, "end": end.end,
                         "lag": partition_lag(committed, low, end), "throughput": rate})
        stages.append({
            "stage": stage.name, "group": groups[stage.name], "state": state, "members": members,
            "lag": sum(r["lag"] for r in rows),
            "throughput": None if elapsed <= 0 else round(sum(r["throughput"] for r in rows), 1),
            "missing_topics": missing.get(stage.name, []), "partitions": rows,
        })
    return broker, stages


def clickhouse_status(settings: Settings, window_s: int = WINDOW_S) -> dict[str, Any]:
    """ClickHouse reachability, dead letters by reason and warnings by type over the last
    ``window_s`` seconds, and rows per table (None for a table that is not there)."""
    from sinks.clickhouse.client import connect

    target = settings.clickhouse
    db = target.database
    report: dict[str, Any] = {"url": target.display, "reachable": False, "error": None,
                              "dead_letters": None, "warnings": None, "tables": None}
    driver_log = logging.getLogger("clickhouse_connect")
    level = driver_log.level
    driver_log.setLevel(logging.CRITICAL)  # it logs a failed connection itself; the report says it
    try:
        client = connect(target, connect_timeout=5, send_receive_timeout=30)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is "not reachable"
        report["error"] = str(exc).splitlines()[0][:200]
        return report
    finally:
        driver_log.setLevel(level)
    report["reachable"] = True
    try:
        present = {row[0] for row in client.query(
            "SELECT name FROM system.tables WHERE database = {db:String}", parameters={"db": db}).result_rows}
        tables: dict[str, int | None] = dict.fromkeys(TABLES)
        counted = [t for t in TABLES if t in present]
        if counted:
            sql = " UNION ALL ".join(f"SELECT '{t}', count() FROM {db}.{t}" for t in counted)
            tables.update({name: int(rows) for name, rows in client.query(sql).result_rows})
        report["tables"] = tables
        if "events_dead_letter" in present:
            report["dead_letters"] = _by(client, f"SELECT reason, count() FROM {db}.events_dead_letter FINAL "
                                                 "WHERE dead_lettered_at >= now64(3) - toIntervalSecond({w:UInt32}) "
                                                 "GROUP BY reason ORDER BY count() DESC, reason", window_s)
        if "ingestion_warnings" in present:
            report["warnings"] = _by(client, f"SELECT type, count() FROM {db}.ingestion_warnings "
                                             "WHERE timestamp >= now64(6) - toIntervalSecond({w:UInt32}) "
                                             "GROUP BY type ORDER BY count() DESC, type", window_s)
    except Exception as exc:  # noqa: BLE001 - report what was read, and why the rest is missing
        report["error"] = str(exc).splitlines()[0][:200]
    finally:
        client.close()
    return report


def _by(client: Any, sql: str, window_s: int) -> dict[str, Any]:
    counts = {str(key): int(n) for key, n in client.query(sql, parameters={"w": window_s}).result_rows}
    return {"window_s": window_s, "total": sum(counts.values()), "by_reason": counts}


def collect_status(settings: Settings, *, interval: float = 2.0, window_s: int = WINDOW_S) -> dict[str, Any]:
    """Everything ``headwater status`` reports, as one JSON-ready dict (its ``--json`` output)."""
    broker, stages = kafka_status(settings, interval)
    clickhouse = clickhouse_status(settings, window_s)
    return {
        "taken_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "interval_s": interval,
        "broker": broker,
        "clickhouse": {k: clickhouse[k] for k in ("url", "reachable", "error")},
        "stages": stages,
        "dead_letters": clickhouse["dead_letters"],
        "warnings": clickhouse["warnings"],
        "tables": clickhouse["tables"],
    }


def render_status(report: dict[str, Any]) -> str:
    """The human table of a :func:`collect_status` report."""
    from .tables import render

    def reach(part: dict[str, Any], where: str) -> str:
        return f"{where}: " + ("reachable" if part["reachable"] else f"NOT reachable ({part['error']})")

    out = [reach(report["broker"], f"Kafka {report['broker']['bootstrap']}"),
           reach(report["clickhouse"], f"ClickHouse {report['clickhouse']['url']}"), ""]
    if report["stages"]:
        rows = []
        for stage in report["stages"]:
            members = "-" if stage["members"] is None else stage["members"]
            by_topic: dict[str, list[dict[str, Any]]] = {}
            for row in stage["partitions"]:
                by_topic.setdefault(row["topic"], []).append(row)
            for topic, parts in by_topic.items():
                rate = None if stage["throughput"] is None else sum(r["throughput"] for r in parts)
                rows.append([stage["stage"], f"{stage['state']}, {members}", topic, sum(r["lag"] for r in parts),
                             " ".join(f"{r['partition']}:{r['lag']}" for r in parts),
                             "-" if rate is None else f"{rate:,.1f}"])
            for topic in stage["missing_topics"]:
                rows.append([stage["stage"], f"{stage['state']}, {members}", topic, "-", "topic missing", "-"])
        out += [render(["stage", "group, members", "topic", "lag", "lag by partition", "offsets/s"], rows), ""]
    for title, part, label in (("Dead letters", report["dead_letters"], "reason"),
                               ("Warnings", report["warnings"], "type")):
        if part is None:
            continue
        out.append(f"{title} in the last {part['window_s'] // 60} minutes: {part['total']:,}")
        if part["by_reason"]:
            out.append(render([label, "count"], list(part["by_reason"].items())))
        out.append("")
    if report["tables"] is not None:
        out.append(render(["table", "rows"], [[t, "-" if n is None else n] for t, n in report["tables"].items()]))
    return "\n".join(out).rstrip()


# -- the live line of `headwater up` ------------------------------------------------------------------

COUNTS_SQL = (
    "SELECT (SELECT count() FROM {db}.events), (SELECT count() FROM {db}.events_dead_letter), "
    "(SELECT count() FROM {db}.ingestion_warnings)"
)


def run_until_stopped(stack: LocalStack, settings: Settings, stop: threading.Event, interval: float = 1.0) -> None:
    from sinks.clickhouse.client import connect

    client = connect(settings.clickhouse)
    tty = sys.stderr.isatty()
    last_rows, last_time, last_log = None, time.monotonic(), 0.0
    while not stop.wait(interval):
        for event in stack.check():
            sys.stderr.write(("\n" if tty else "") + f"headwater: {event}\n")
        try:
            rows, dead, warnings = client.query(COUNTS_SQL.format(db=settings.clickhouse.database)).result_rows[0]
        except Exception as exc:  # the status line must never take the stack down
            line = f"ClickHouse not answering ({str(exc).splitlines()[0][:80]})"
        else:
            now = time.monotonic()
            rate = 0.0 if last_rows is None else (rows - last_rows) / (now - last_time)
            last_rows, last_time = rows, now
            alive = sum(c.alive for c in stack.supervisor.children)
            line = f"events {rows:,} ({rate:,.0f}/s) | dead letters {dead:,} | warnings {warnings:,} | processes {alive}/{len(stack.supervisor.children)}"
        if tty:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
        elif time.monotonic() - last_log >= 10:
            last_log = time.monotonic()
            log.info(line)
    client.close()
