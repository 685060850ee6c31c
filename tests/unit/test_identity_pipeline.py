import uuid

import orjson

from headwater.rows import EVENT_COLUMNS
from headwater.topics import TopicNames
from headwater.wire import PERSON_NAMESPACE
from processors.identity.pipeline import IdentityPipeline
from tests.factories import FakeMessage, raw_bytes

TOPICS = TopicNames("x_")


def run(*values: bytes):
    pipeline = IdentityPipeline(TOPICS, {"phc_test": 7})
    messages = [FakeMessage(v, offset=i) for i, v in enumerate(values)]
    return pipeline, pipeline.process_batch(messages)


def test_valid_event_becomes_a_row_keyed_by_team_and_distinct_id():
    _, records = run(raw_bytes(distinct_id="alice"))
    (record,) = records
    assert record.topic == "x_events_enriched"
    assert record.key == b"7:alice"
    row = orjson.loads(record.value)
    assert tuple(row) == EVENT_COLUMNS
    assert row["person_id"] == str(uuid.uuid5(PERSON_NAMESPACE, "7:alice"))
    assert row["$session_id"] == "0192f0e4-0000-7000-8000-000000000001"


def test_bad_message_becomes_a_dead_letter_with_coordinates_and_the_batch_goes_on():
    pipeline, records = run(raw_bytes(distinct_id="a"), b"{oops", raw_bytes(distinct_id="b"))
    assert [r.topic for r in records] == ["x_events_enriched", "x_events_dead_letter", "x_events_enriched"]
    dead = records[1]
    headers = dict(dead.headers)
    assert dead.value == b"{oops" and dead.key == b"k"
    assert headers["dlq_reason"] == b"invalid_json"
    assert headers["dlq_stage"] == b"identity"
    assert (headers["dlq_topic"], headers["dlq_partition"], headers["dlq_offset"]) == (b"events_raw", b"0", b"1")
    assert b"dlq_timestamp" in [k.encode() for k in headers]
    assert pipeline.counts == {"ok": 2, "dead_letter": 1, "dropped": 0, "warnings": 0}


def test_a_step_that_raises_becomes_a_processing_error_dead_letter(monkeypatch):
    import processors.identity.pipeline as module

    def broken(event):
        raise RuntimeError("boom")

    monkeypatch.setattr(module, "resolve_person", broken)
    _, records = run(raw_bytes())
    assert dict(records[0].headers)["dlq_reason"] == b"processing_error"


def test_dropped_event_produces_a_warning_record():
    _, records = run(raw_bytes(distinct_id="y" * 500))
    (record,) = records
    assert record.topic == "x_ingestion_warnings"
    warning = orjson.loads(record.value)
    assert warning["type"] == "skipping_event_invalid_distinct_id"
    assert warning["team_id"] == 7
