"""The walking skeleton end to end: producer → events_raw → identity → events_enriched → sink → events."""

import uuid

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from headwater.topics import TopicNames
from headwater.wire import PERSON_NAMESPACE
from producers.backend import Client
from tests.conftest import wait_until
from tests.factories import _MISSING, raw_bytes

pytestmark = pytest.mark.pipeline


def count(clickhouse, sql: str) -> int:
    return clickhouse.query(sql).result_rows[0][0]


def test_10000_events_become_10000_rows_with_deterministic_person_ids(settings, pipeline, clickhouse):
    db = settings.clickhouse.database
    client = Client.from_settings(settings, "phc_test")
    sent = {client.capture(f"user-{i % 997}", "$pageview", {"i": i}) for i in range(10_000)}
    assert client.flush() == 0 and client.failed == 0 and len(sent) == 10_000
    client.close()

    wait_until(lambda: count(clickhouse, f"SELECT count() FROM {db}.events") >= 10_000, 120, message="10,000 rows")
    total, unique = clickhouse.query(f"SELECT count(), uniqExact(uuid) FROM {db}.events").result_rows[0]
    assert (total, unique) == (10_000, 10_000)
    uuids = {str(u) for (u,) in clickhouse.query(f"SELECT uuid FROM {db}.events").result_rows}
    assert uuids == sent
    pairs = clickhouse.query(f"SELECT DISTINCT team_id, distinct_id, person_id FROM {db}.events").result_rows
    assert len(pairs) == 997
    for team_id, distinct_id, person_id in pairs:
        assert person_id == uuid.uuid5(PERSON_NAMESPACE, f"{team_id}:{distinct_id}")
    assert {team for team, _, _ in pairs} == {7}


MALFORMED = {
    "invalid_json": lambda i: b'{"token": "phc_test", "distinct_id": "x' + str(i).encode(),
    "missing_distinct_id": lambda i: raw_bytes(distinct_id=_MISSING, properties={"i": i}),
    "unknown_token": lambda i: raw_bytes(token="phc_stranger", properties={"i": i}),
    "invalid_uuid": lambda i: raw_bytes(uuid=f"not-a-uuid-{i}"),
}


def test_malformed_messages_become_dead_letters_and_valid_ones_around_them_arrive(settings, pipeline, clickhouse):
    db = settings.clickhouse.database
    topics = TopicNames(settings.topic_prefix)
    producer = Producer(settings.kafka_config(**{"enable.idempotence": True}))
    valid: set[str] = set()
    malformed = 0
    for i in range(400):
        if i % 4 == 1:
            reason = list(MALFORMED)[malformed % 4]
            producer.produce(topics.events_raw, MALFORMED[reason](i), key=f"phc_test:bad-{i}".encode())
            malformed += 1
        else:
            event_uuid = str(uuid.uuid4())
            valid.add(event_uuid)
            producer.produce(topics.events_raw, raw_bytes(uuid=event_uuid, distinct_id=f"good-{i}"), key=f"phc_test:good-{i}".encode())
    assert producer.flush(30) == 0
    assert malformed == 100 and len(valid) == 300

    # the dead-letter topic: 100 messages, each with a reason and its source coordinates
    consumer = Consumer(settings.consumer_config("dlq-reader"))
    consumer.assign([TopicPartition(topics.events_dead_letter, p, 0) for p in range(settings.partitions)])
    dead = []
    wait_until(lambda: dead.extend(m for m in consumer.consume(500, 0.2) if not m.error()) or len(dead) >= 100, 60, message="100 dead letters")
    consumer.close()
    assert len(dead) == 100
    reasons: dict[str, int] = {}
    for message in dead:
        headers = {k: v.decode() for k, v in message.headers()}
        assert headers["dlq_stage"] == "identity"
        assert headers["dlq_topic"] == topics.events_raw
        assert int(headers["dlq_partition"]) in range(settings.partitions)
        assert int(headers["dlq_offset"]) >= 0
        assert headers["dlq_timestamp"]
        reasons[headers["dlq_reason"]] = reasons.get(headers["dlq_reason"], 0) + 1
        assert message.key().startswith(b"phc_test:bad-")
    assert reasons == {reason: 25 for reason in MALFORMED}

    # ClickHouse: 300 event rows (exactly the valid ones), 100 dead-letter rows with reasons
    wait_until(lambda: count(clickhouse, f"SELECT count() FROM {db}.events") >= 300 and count(clickhouse, f"SELECT count() FROM {db}.events_dead_letter") >= 100, 60, message="rows in ClickHouse")
    assert {str(u) for (u,) in clickhouse.query(f"SELECT uuid FROM {db}.events").result_rows} == valid
    rows = clickhouse.query(f"SELECT reason, count() FROM {db}.events_dead_letter GROUP BY reason").result_rows
    assert dict(rows) == {reason: 25 for reason in MALFORMED}
    raw = clickhouse.query(f"SELECT raw FROM {db}.events_dead_letter WHERE reason = 'unknown_token' LIMIT 1").result_rows[0][0]
    assert orjson.loads(raw)["token"] == "phc_stranger"


def test_a_row_the_sink_cannot_read_becomes_a_dead_letter_row_not_a_silent_drop(settings, pipeline, clickhouse):
    db = settings.clickhouse.database
    topics = TopicNames(settings.topic_prefix)
    producer = Producer(settings.kafka_config())
    producer.produce(topics.events_enriched, b'{"uuid": "only this"}', key=b"7:broken")
    assert producer.flush(30) == 0
    client = Client.from_settings(settings, "phc_test")
    sent = {client.capture("after-the-broken-row", "$pageview") for _ in range(5)}
    client.close()

    wait_until(lambda: count(clickhouse, f"SELECT count() FROM {db}.events") >= 5 and count(clickhouse, f"SELECT count() FROM {db}.events_dead_letter") >= 1, 60, message="rows and the dead letter")
    assert {str(u) for (u,) in clickhouse.query(f"SELECT uuid FROM {db}.events").result_rows} == sent
    reason, stage, topic, raw = clickhouse.query(f"SELECT reason, stage, source_topic, raw FROM {db}.events_dead_letter").result_rows[0]
    assert (reason, stage, topic) == ("sink_unreadable_row", "sink", topics.events_enriched)
    assert raw == '{"uuid": "only this"}'
