"""The sink's group routes against the embedded broker and ClickHouse: groups and group_types
records → tables, the groups_latest view correct without any merge having run, bad values kept as
dead letters; and migration 0004 on the events table, applied idempotently."""

from __future__ import annotations

import orjson
import pytest
from confluent_kafka import Producer, TopicPartition

from headwater.kafka_admin import ensure_topics
from headwater.rows import EVENT_COLUMNS
from headwater.topics import TopicNames
from sinks.clickhouse.migrate import apply_migrations, load_migrations
from tests.conftest import wait_until
from tests.sink_harness import committed, running_sink

pytestmark = pytest.mark.pipeline

CREATED_AT = 1_790_000_000_123_456  # µs since the epoch


def group(index: int, key: str, version: int, properties: dict, *, team_id: int = 7, created_at: int = CREATED_AT) -> bytes:
    return orjson.dumps({
        "team_id": team_id, "group_type_index": index, "group_key": key,
        "group_properties": orjson.dumps(properties).decode(), "created_at": created_at, "version": version,
    })


def group_type(group_type: str, index: int, *, team_id: int = 7) -> bytes:
    return orjson.dumps({"team_id": team_id, "group_type": group_type, "group_type_index": index})


def count(clickhouse, sql: str) -> int:
    return clickhouse.query(sql).result_rows[0][0]


def test_groups_and_group_types_land_and_groups_latest_picks_the_highest_version(settings, clickhouse):
    db = settings.clickhouse.database
    topics = TopicNames(settings.topic_prefix)
    ensure_topics(settings)
    # No merge may run until the view has been checked: it must not need one.
    for table in ("groups", "group_types"):
        clickhouse.command(f"SYSTEM STOP MERGES {db}.{table}")

    # Three rounds, each inserted before the next is produced, so each version is its own part.
    rounds = [
        (
            [("7:0:acme", group(0, "acme", 1, {"name": "Acme"})),
             ("7:0:globex", group(0, "globex", 1, {"name": "Globex"})),
             ("7:1:proj-1", group(1, "proj-1", 1, {"stage": "alpha"})),
             ("8:0:acme", group(0, "acme", 1, {"name": "Other team's Acme"}, team_id=8))],
            [("7:company", group_type("company", 0)), ("7:project", group_type("project", 1)),
             ("8:company", group_type("company", 0, team_id=8))],
        ),
        (
            [("7:0:acme", group(0, "acme", 3, {"name": "Acme", "plan": "pro"})),
             ("7:0:globex", None)],  # a tombstone carries no row
            [("7:company", group_type("company", 0)),  # the same mapping again (a replay)
             ("7:gone", None)],
        ),
        (
            [("7:0:acme", group(0, "acme", 2, {"name": "Acme", "plan": "free"}))],  # arrives after v3
            [],
        ),
    ]
    producer = Producer(settings.kafka_config())
    with running_sink(settings) as sink:
        groups_sent = types_sent = 0
        for groups_round, types_round in rounds:
            for key, value in groups_round:
                producer.produce(topics.groups, value, key=key.encode())
            for key, value in types_round:
                producer.produce(topics.group_types, value, key=key.encode())
            assert producer.flush(30) == 0
            groups_sent += sum(value is not None for _, value in groups_round)
            types_sent += sum(value is not None for _, value in types_round)
            wait_until(
                lambda: sink.rows_written[f"{db}.groups"] >= groups_sent
                and sink.rows_written[f"{db}.group_types"] >= types_sent,
                60,
                message=f"{groups_sent} group rows and {types_sent} group type rows written",
            )
    assert sink.rows_written[f"{db}.groups"] == 6
    assert sink.rows_written[f"{db}.group_types"] == 4
    assert count(clickhouse, f"SELECT count() FROM {db}.groups") == 6
    assert count(clickhouse, f"SELECT count() FROM {db}.group_types") == 4
    assert count(clickhouse, f"SELECT count() FROM {db}.events_dead_letter") == 0
    assert clickhouse.query(
        f"SELECT team_id, group_type_index, group_key, group_properties, toUnixTimestamp64Micro(created_at), version "
        f"FROM {db}.groups WHERE group_key = 'acme' AND team_id = 7 ORDER BY version"
    ).result_rows == [
        (7, 0, "acme", '{"name":"Acme"}', CREATED_AT, 1),
        (7, 0, "acme", '{"name":"Acme","plan":"free"}', CREATED_AT, 2),
        (7, 0, "acme", '{"name":"Acme","plan":"pro"}', CREATED_AT, 3),
    ]

    def groups_latest() -> list[tuple]:
        return clickhouse.query(
            f"SELECT team_id, group_type_index, group_key, group_properties, toUnixTimestamp64Micro(created_at), version "
            f"FROM {db}.groups_latest ORDER BY team_id, group_type_index, group_key"
        ).result_rows

    def group_types() -> list[tuple]:
        return clickhouse.query(
            f"SELECT DISTINCT team_id, group_type, group_type_index FROM {db}.group_types ORDER BY team_id, group_type"
        ).result_rows

    expected_latest = [
        (7, 0, "acme", '{"name":"Acme","plan":"pro"}', CREATED_AT, 3),  # v3, though v2 arrived last
        (7, 0, "globex", '{"name":"Globex"}', CREATED_AT, 1),  # its tombstone removed nothing
        (7, 1, "proj-1", '{"stage":"alpha"}', CREATED_AT, 1),
        (8, 0, "acme", '{"name":"Other team\'s Acme"}', CREATED_AT, 1),
    ]
    assert groups_latest() == expected_latest
    expected_types = [(7, "company", 0), (7, "project", 1), (8, "company", 0)]
    assert group_types() == expected_types
    columns = clickhouse.query(f"DESCRIBE TABLE {db}.groups_latest").result_rows
    assert [(name, type_) for name, type_, *_ in columns] == [
        ("team_id", "Int64"), ("group_type_index", "UInt8"), ("group_key", "String"), ("group_properties", "String"),
        ("created_at", "DateTime64(6, 'UTC')"), ("version", "Int64"),
    ]

    # After the merges, one row per key, and the view answers exactly the same.
    for table in ("groups", "group_types"):
        clickhouse.command(f"SYSTEM START MERGES {db}.{table}")
        clickhouse.command(f"OPTIMIZE TABLE {db}.{table} FINAL")
    assert count(clickhouse, f"SELECT count() FROM {db}.groups") == 4
    assert count(clickhouse, f"SELECT count() FROM {db}.group_types") == 3
    assert groups_latest() == expected_latest
    assert group_types() == expected_types


BAD_GROUPS = {
    "index_out_of_range": {"group_type_index": 5},
    "properties_object_not_text": {"group_properties": {"name": "Acme"}},
    "properties_not_an_object": {"group_properties": "[1]"},
    "version_zero": {"version": 0},
}


def test_bad_group_values_become_dead_letters_and_tombstone_only_partitions_commit(settings, clickhouse):
    db = settings.clickhouse.database
    topics = TopicNames(settings.topic_prefix)
    ensure_topics(settings)
    assert settings.partitions >= 3

    producer = Producer(settings.kafka_config())
    good = orjson.loads(group(0, "acme", 1, {"name": "Acme"}))
    for overrides in BAD_GROUPS.values():  # partition 0, offsets 0..3
        producer.produce(topics.groups, orjson.dumps({**good, **overrides}), key=b"7:0:acme", partition=0)
    producer.produce(topics.groups, orjson.dumps(good), key=b"7:0:acme", partition=0)  # offset 4
    producer.produce(topics.groups, None, key=b"7:0:gone", partition=1)  # partition 1: a tombstone only
    producer.produce(topics.group_types, group_type("company", "0"), key=b"7:company", partition=2)  # type: str
    producer.produce(topics.group_types, group_type("company", 0), key=b"7:company", partition=2)
    assert producer.flush(30) == 0

    wanted = {(topics.groups, 0): 5, (topics.groups, 1): 1, (topics.group_types, 2): 2}
    partitions = [TopicPartition(topic, partition) for topic, partition in wanted]
    with running_sink(settings) as sink:
        wait_until(lambda: committed(settings, sink.group_id, partitions) == wanted, 60, interval=0.5,
                   message=f"committed offsets {wanted}")
    assert clickhouse.query(f"SELECT team_id, group_key, version FROM {db}.groups").result_rows == [(7, "acme", 1)]
    assert clickhouse.query(f"SELECT team_id, group_type, group_type_index FROM {db}.group_types").result_rows == [
        (7, "company", 0)
    ]
    dead = clickhouse.query(
        f"SELECT reason, stage, source_topic, source_partition, source_offset, raw FROM {db}.events_dead_letter "
        f"ORDER BY source_topic, source_offset"
    ).result_rows
    assert [row[:5] for row in dead] == [
        ("sink_unreadable_row", "sink", topics.group_types, 2, 0),
        *(("sink_unreadable_row", "sink", topics.groups, 0, offset) for offset in range(len(BAD_GROUPS))),
    ]
    assert [orjson.loads(row[5]) for row in dead[1:]] == [{**good, **o} for o in BAD_GROUPS.values()]
    assert orjson.loads(dead[0][5])["group_type_index"] == "0"


def test_migrations_add_the_group_creation_times_to_events_and_apply_twice_harmlessly(settings, clickhouse):
    db = settings.clickhouse.database

    def columns(table: str) -> list[tuple[str, str]]:
        return [(name, type_) for name, type_, *_ in clickhouse.query(f"DESCRIBE TABLE {db}.{table}").result_rows]

    def schema() -> dict[str, list[tuple[str, str]]]:
        tables = [name for (name,) in clickhouse.query(f"SHOW TABLES FROM {db}").result_rows]
        return {table: columns(table) for table in tables}

    events = columns("events")
    assert [name for name, _ in events] == [*EVENT_COLUMNS, "inserted_at"]  # same names, same order
    assert [t for name, t in events if name.endswith("_created_at") and name.startswith("group")] == (
        ["DateTime64(6, 'UTC')"] * 5
    )
    assert [name for name, _ in columns("events_with_person")] == [*EVENT_COLUMNS, "inserted_at", "original_person_id"]
    before = schema()
    assert {"groups", "group_types", "groups_latest"} <= set(before)
    assert clickhouse.query(f"SELECT version FROM {db}.schema_migrations ORDER BY version").result_rows == [
        (m.version,) for m in load_migrations()
    ]

    # The runner skips what it recorded; every statement is also safe to run again (two processes
    # starting together both run a migration neither has recorded yet).
    assert apply_migrations(clickhouse, db) == []
    for migration in load_migrations():
        for statement in migration.statements(db):
            clickhouse.command(statement)
    assert schema() == before

    # An event inserted without the new columns gets 0 (1970-01-01) in each; one with them keeps them.
    clickhouse.insert(
        f"{db}.events",
        [["0192f0e4-0000-7000-8000-000000000001", 7, "$pageview", "u", "0192f0e4-0000-7000-8000-0000000000aa", CREATED_AT]],
        column_names=["uuid", "team_id", "event", "distinct_id", "person_id", "timestamp"],
    )
    clickhouse.insert(
        f"{db}.events",
        [["0192f0e4-0000-7000-8000-000000000002", 7, "$pageview", "u", "0192f0e4-0000-7000-8000-0000000000aa", CREATED_AT,
          "acme", CREATED_AT]],
        column_names=["uuid", "team_id", "event", "distinct_id", "person_id", "timestamp", "$group_0", "group0_created_at"],
    )
    rows = clickhouse.query(
        f"SELECT `$group_0`, {', '.join(f'toUnixTimestamp64Micro(group{i}_created_at)' for i in range(5))} "
        f"FROM {db}.events_with_person ORDER BY uuid"
    ).result_rows
    assert rows == [("", 0, 0, 0, 0, 0), ("acme", CREATED_AT, 0, 0, 0, 0)]
