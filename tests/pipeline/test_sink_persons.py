"""The sink's identity routes against the embedded broker and ClickHouse: persons and
person_distinct_ids records → tables, and the views analysts query (persons_latest,
person_overrides, events_with_person) correct without any merge having run."""

from __future__ import annotations

import uuid

import orjson
import pytest
from confluent_kafka import Producer, TopicPartition

from headwater.kafka_admin import ensure_topics
from headwater.topics import TopicNames
from tests.conftest import wait_until
from tests.sink_harness import committed, running_sink

pytestmark = pytest.mark.pipeline

CREATED_AT = 1_790_000_000_123_456  # µs since the epoch


def person(pid: str, version: int, properties: dict, *, is_identified: int = 0, is_deleted: int = 0) -> bytes:
    return orjson.dumps({
        "id": pid, "team_id": 7, "properties": orjson.dumps(properties).decode(), "is_identified": is_identified,
        "created_at": CREATED_AT, "version": version, "is_deleted": is_deleted,
    })


def distinct_id(did: str, pid: str, version: int, *, is_deleted: int = 0) -> bytes:
    return orjson.dumps({"team_id": 7, "distinct_id": did, "person_id": pid, "version": version, "is_deleted": is_deleted})


def count(clickhouse, sql: str) -> int:
    return clickhouse.query(sql).result_rows[0][0]


def test_persons_and_distinct_ids_land_and_the_views_pick_the_latest_versions(settings, clickhouse):
    db = settings.clickhouse.database
    topics = TopicNames(settings.topic_prefix)
    ensure_topics(settings)
    a, b, c, d = (str(uuid.uuid4()) for _ in range(4))

    # No merge may run until the views have been checked: they must not need one (a background
    # merge would otherwise hide a view that only works on merged data).
    identity_tables = ("persons", "person_distinct_ids", "person_overrides")
    for table in identity_tables:
        clickhouse.command(f"SYSTEM STOP MERGES {db}.{table}")

    # Three rounds, each inserted before the next is produced, so each version is its own part
    # (within one insert block ReplacingMergeTree already keeps only the highest version per key).
    rounds = [
        (
            [(a, person(a, 0, {"plan": "free"})), (b, person(b, 0, {"name": "b"})), (c, person(c, 0, {"name": "c"}))],
            [("a-anon", distinct_id("a-anon", a, 0)), ("b-user", distinct_id("b-user", b, 0)),
             ("c-anon", distinct_id("c-anon", c, 0)), ("d-anon", distinct_id("d-anon", d, 0))],
        ),
        (
            [
                (a, person(a, 2, {"plan": "team", "email": "a@example.com"}, is_identified=1)),
                (b, person(b, 100, {"name": "b"}, is_deleted=1)),  # merged into a: deleted snapshot ...
                (b, None),  # ... then the tombstone, which carries no row
            ],
            [("b-user", distinct_id("b-user", a, 1)),  # re-pointed by the merge of b into a
             ("d-anon", distinct_id("d-anon", a, 1))],
        ),
        (
            [(a, person(a, 1, {"plan": "pro"}, is_identified=1))],  # arrives after v2: the view goes by version
            [("d-anon", distinct_id("d-anon", a, 101, is_deleted=1))],  # an override whose latest version is deleted
        ),
    ]
    producer = Producer(settings.kafka_config())
    with running_sink(settings) as sink:
        persons_sent = distinct_ids_sent = 0
        for persons_round, distinct_ids_round in rounds:
            for pid, value in persons_round:
                producer.produce(topics.persons, value, key=f"7:{pid}".encode())
            for did, value in distinct_ids_round:
                producer.produce(topics.person_distinct_ids, value, key=f"7:{did}".encode())
            assert producer.flush(30) == 0
            persons_sent += sum(value is not None for _, value in persons_round)
            distinct_ids_sent += len(distinct_ids_round)
            wait_until(
                lambda: sink.rows_written[f"{db}.persons"] >= persons_sent
                and sink.rows_written[f"{db}.person_distinct_ids"] >= distinct_ids_sent,
                60,
                message=f"{persons_sent} person rows and {distinct_ids_sent} distinct-id rows written",
            )
    assert sink.rows_written[f"{db}.persons"] == 6  # the tombstone is no row
    assert sink.rows_written[f"{db}.person_distinct_ids"] == 7
    assert count(clickhouse, f"SELECT count() FROM {db}.persons") == 6
    assert count(clickhouse, f"SELECT count() FROM {db}.person_distinct_ids") == 7
    assert count(clickhouse, f"SELECT count() FROM {db}.events_dead_letter") == 0

    def persons_latest() -> list[tuple]:
        return clickhouse.query(
            f"SELECT toString(id), team_id, properties, is_identified, toUnixTimestamp64Micro(created_at), version "
            f"FROM {db}.persons_latest ORDER BY version DESC"
        ).result_rows

    def overrides() -> list[tuple]:
        return clickhouse.query(
            f"SELECT distinct_id, toString(person_id), version, is_deleted FROM {db}.person_overrides "
            f"ORDER BY distinct_id, version"
        ).result_rows

    # persons_latest: the highest version of each person, b (deleted at its latest version) hidden
    expected_latest = [
        (a, 7, '{"plan":"team","email":"a@example.com"}', 1, CREATED_AT, 2),
        (c, 7, '{"name":"c"}', 0, CREATED_AT, 0),
    ]
    assert persons_latest() == expected_latest
    assert count(clickhouse, f"SELECT count() FROM {db}.persons_latest WHERE id = '{b}'") == 0
    assert count(clickhouse, f"SELECT count() FROM {db}.persons WHERE id = '{b}'") == 2  # still in the table

    # person_overrides: exactly the distinct-id rows with version > 0
    assert overrides() == [("b-user", a, 1, 0), ("d-anon", a, 1, 0), ("d-anon", a, 101, 1)]

    # events_with_person: events ingested before the merge get the override's person
    events = {str(uuid.uuid4()): (did, pid) for did, pid in [("a-anon", a), ("b-user", b), ("c-anon", c), ("d-anon", d)]}
    clickhouse.insert(
        f"{db}.events",
        [[u, 7, "$pageview", did, pid, CREATED_AT] for u, (did, pid) in events.items()],
        column_names=["uuid", "team_id", "event", "distinct_id", "person_id", "timestamp"],
    )
    other_team = str(uuid.uuid4())  # same distinct_id in another team: not overridden
    clickhouse.insert(
        f"{db}.events", [[str(uuid.uuid4()), 8, "$pageview", "b-user", other_team, CREATED_AT]],
        column_names=["uuid", "team_id", "event", "distinct_id", "person_id", "timestamp"],
    )
    rows = clickhouse.query(
        f"SELECT team_id, distinct_id, toString(person_id), toString(original_person_id), event "
        f"FROM {db}.events_with_person ORDER BY team_id, distinct_id"
    ).result_rows
    assert rows == [
        (7, "a-anon", a, a, "$pageview"),
        (7, "b-user", a, b, "$pageview"),  # overridden
        (7, "c-anon", c, c, "$pageview"),
        (7, "d-anon", d, d, "$pageview"),  # its latest override is deleted: the event's own person
        (8, "b-user", other_team, other_team, "$pageview"),
    ]
    columns = [name for name, *_ in clickhouse.query(f"DESCRIBE TABLE {db}.events_with_person").result_rows]
    events_columns = [name for name, *_ in clickhouse.query(f"DESCRIBE TABLE {db}.events").result_rows]
    assert columns == events_columns + ["original_person_id"]
    # the same answer when the analyst's session has join_use_nulls on
    with_nulls = clickhouse.query(
        f"SELECT distinct_id, toString(person_id) FROM {db}.events_with_person WHERE team_id = 7 ORDER BY distinct_id",
        settings={"join_use_nulls": 1},
    ).result_rows
    assert with_nulls == [("a-anon", a), ("b-user", a), ("c-anon", c), ("d-anon", d)]

    # After the merges, the tables hold one row per key and the views answer exactly the same.
    for table in identity_tables:
        clickhouse.command(f"SYSTEM START MERGES {db}.{table}")
        clickhouse.command(f"OPTIMIZE TABLE {db}.{table} FINAL")
    assert count(clickhouse, f"SELECT count() FROM {db}.persons") == 3
    assert persons_latest() == expected_latest
    assert overrides() == [("b-user", a, 1, 0), ("d-anon", a, 101, 1)]
    again = clickhouse.query(
        f"SELECT team_id, distinct_id, toString(person_id), toString(original_person_id), event "
        f"FROM {db}.events_with_person ORDER BY team_id, distinct_id"
    ).result_rows
    assert again == rows

def test_tombstone_only_partitions_commit_and_a_bad_identity_value_becomes_a_dead_letter(settings, clickhouse):
    db = settings.clickhouse.database
    topics = TopicNames(settings.topic_prefix)
    ensure_topics(settings)
    assert settings.partitions >= 3
    good = str(uuid.uuid4())

    producer = Producer(settings.kafka_config())
    producer.produce(topics.persons, None, key=b"7:gone-1", partition=1)  # partition 1: tombstones only
    producer.produce(topics.persons, None, key=b"7:gone-2", partition=1)
    producer.produce(topics.person_distinct_ids, None, key=b"7:gone", partition=2)
    bad = orjson.loads(person(good, 0, {}))
    bad["properties"] = {"not": "text"}  # an object where JSON text belongs
    producer.produce(topics.persons, orjson.dumps(bad), key=f"7:{good}".encode(), partition=0)
    producer.produce(topics.persons, person(good, 1, {"ok": True}), key=f"7:{good}".encode(), partition=0)
    assert producer.flush(30) == 0

    wanted = {(topics.persons, 0): 2, (topics.persons, 1): 2, (topics.person_distinct_ids, 2): 1}
    partitions = [TopicPartition(topic, partition) for topic, partition in wanted]
    with running_sink(settings) as sink:
        wait_until(lambda: committed(settings, sink.group_id, partitions) == wanted, 60, interval=0.5,
                   message=f"committed offsets {wanted}")
    assert count(clickhouse, f"SELECT count() FROM {db}.persons") == 1
    assert clickhouse.query(f"SELECT toString(id), version, properties FROM {db}.persons").result_rows == [(good, 1, '{"ok":true}')]
    dead = clickhouse.query(
        f"SELECT reason, stage, source_topic, source_partition, source_offset, raw FROM {db}.events_dead_letter"
    ).result_rows
    assert len(dead) == 1
    reason, stage, topic, partition, offset, raw = dead[0]
    assert (reason, stage, topic, partition, offset) == ("sink_unreadable_row", "sink", topics.persons, 0, 0)
    assert orjson.loads(raw)["properties"] == {"not": "text"}

