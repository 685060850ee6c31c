import uuid

import orjson
import pytest

from headwater.rows import EVENT_COLUMNS
from headwater.topics import TopicNames
from headwater.wire import PERSON_NAMESPACE
from processors.identity.pipeline import IdentityPipeline
from processors.state import PartitionState
from tests.factories import FakeMessage, raw_bytes

TOPICS = TopicNames("x_")
EVENT_TOPICS = ("x_events_enriched", "x_events_dead_letter", "x_ingestion_warnings")


def run(*values: bytes):
    """One partition: every home is here. Returns the records other than person/id snapshots."""
    pipeline = IdentityPipeline(TOPICS, {"phc_test": 7}, partitions=1)
    messages = [FakeMessage(v, topic=TOPICS.events_raw, offset=i) for i, v in enumerate(values)]
    records = pipeline.process_partition(0, messages, PartitionState())
    return pipeline, [r for r in records if r.topic in EVENT_TOPICS]


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
    assert (headers["dlq_topic"], headers["dlq_partition"], headers["dlq_offset"]) == (b"x_events_raw", b"0", b"1")
    assert b"dlq_timestamp" in [k.encode() for k in headers]
    assert pipeline.counts == {"ok": 2, "dead_letter": 1, "dropped": 0, "warnings": 0, "merges": 0, "duplicates": 0}


def test_a_step_that_raises_becomes_a_processing_error_dead_letter(monkeypatch):
    import processors.identity.pipeline as module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(module.persons, "create", broken)
    pipeline = IdentityPipeline(TOPICS, {"phc_test": 7}, partitions=1)
    state = PartitionState()
    records = pipeline.process_partition(0, [FakeMessage(raw_bytes(), topic=TOPICS.events_raw)], state)
    (record,) = records
    assert dict(record.headers)["dlq_reason"] == b"processing_error"
    assert state.pending() == [], "the failed message's state writes are rolled back"


def test_the_settlers_record_on_the_inbox_is_skipped():
    """On Tansu the settler commits one record without a value (key ``__settle__``) on an inbox
    partition a transaction was left prepared on (ADR 0015): no message of the protocol, no dead letter."""
    from headwater.tansu import SETTLE_KEY

    pipeline = IdentityPipeline(TOPICS, {"phc_test": 7}, partitions=1)
    messages = [FakeMessage(None, key=SETTLE_KEY, topic=TOPICS.identity_inbox, offset=3),
                FakeMessage(raw_bytes(distinct_id="a"), topic=TOPICS.events_raw, offset=0)]
    records = pipeline.process_partition(0, messages, PartitionState())
    assert [r.topic for r in records if r.topic in EVENT_TOPICS] == ["x_events_enriched"]
    assert pipeline.counts["dead_letter"] == 0 and pipeline.counts["ok"] == 1

def test_dropped_event_produces_a_warning_record():
    _, records = run(raw_bytes(distinct_id="y" * 500))
    (record,) = records
    assert record.topic == "x_ingestion_warnings"
    warning = orjson.loads(record.value)
    assert warning["type"] == "skipping_event_invalid_distinct_id"
    assert warning["team_id"] == 7


def test_an_event_row_over_the_message_limit_loses_person_properties_then_is_dead_lettered():
    pipeline = IdentityPipeline(TOPICS, {"phc_test": 7}, partitions=1, max_message_bytes=2000)
    big_set = raw_bytes(distinct_id="a", properties={"$set": {"bio": "x" * 1200}})
    big_event = raw_bytes(distinct_id="b", properties={"text": "y" * 3000})
    messages = [FakeMessage(v, topic=TOPICS.events_raw, offset=i) for i, v in enumerate([big_set, big_event])]
    records = pipeline.process_partition(0, messages, PartitionState())
    rows = [orjson.loads(r.value) for r in records if r.topic == "x_events_enriched"]
    assert [r["distinct_id"] for r in rows] == ["a"] and rows[0]["person_properties"] == "{}"
    warnings = [orjson.loads(r.value) for r in records if r.topic == "x_ingestion_warnings"]
    assert [(w["type"], w["distinct_id"]) for w in warnings] == [
        ("person_properties_dropped_from_event", "a"), ("person_properties_dropped_from_event", "b")]
    (dead,) = [r for r in records if r.topic == "x_events_dead_letter"]
    assert dict(dead.headers)["dlq_reason"] == b"event_row_too_large" and dead.key == b"7:b"
    # its source coordinates, as every dead letter has (the table's key: copies never collapse)
    assert [dict(dead.headers)[h] for h in ("dlq_topic", "dlq_partition", "dlq_offset")] == [b"x_events_raw", b"0", b"1"]


def test_state_on_rocksdb_reads_its_writes_and_keeps_only_committed_ones(tmp_path):
    state = PartitionState(tmp_path / "p0")
    state.put("d:1:a", {"r": "a"})
    assert state.get("d:1:a") == {"r": "a"}
    state.rollback()
    assert state.get("d:1:a") is None, "an aborted batch leaves nothing"
    state.put("d:1:a", {"r": "a"})
    state.put("d:1:b", {"r": "a"})
    state.commit(state.pending())
    state.delete("d:1:b")
    state.commit(state.pending())
    assert (state.get("d:1:a"), state.get("d:1:b"), len(state)) == ({"r": "a"}, None, 1)
    state.close()
    assert not (tmp_path / "p0").exists()


@pytest.mark.parametrize("on_disk", [True, False])
def test_changelog_records_applied_in_one_write_take_effect_in_their_order(tmp_path, on_disk):
    """A restore's run of records, or a batch's writes, go to RocksDB as one write batch: a key
    written then deleted in the run is gone, one deleted then written is there, the last value wins."""
    state = PartitionState(tmp_path / "p0" if on_disk else None)
    state.apply([(b"d:1:a", b'{"r":"a"}'), (b"d:1:b", b'{"r":"b"}'), (b"d:1:a", None),
                 (b"d:1:c", None), (b"d:1:c", b'{"r":"c"}'), (b"d:1:b", b'{"r":"b2"}')])
    assert [state.get(k) for k in ("d:1:a", "d:1:b", "d:1:c")] == [None, {"r": "b2"}, {"r": "c"}]
    state.apply([(b"d:1:never", None)])  # deleting a key that is not there is no error
    state.apply([])
    assert len(state) == 2
    state.close()


def test_a_restore_keeps_changelog_records_of_committed_batches_only() -> None:
    from processors.runtime import BATCH_HEADER, batch_committed

    def tag(**offsets: int) -> list[tuple[str, bytes]]:
        return [("other", b"x"), (BATCH_HEADER, orjson.dumps(offsets))]

    committed = {"events_raw": 120, "identity_inbox": 40}
    assert batch_committed(tag(events_raw=120, identity_inbox=33), committed)
    assert batch_committed(tag(identity_inbox=40), committed)
    assert not batch_committed(tag(events_raw=121), committed)  # the aborted batch after the commit
    assert not batch_committed(tag(events_raw=100, identity_inbox=41), committed)
    assert not batch_committed(tag(events_raw=1), {})  # nothing committed yet
    assert batch_committed(None, committed) and batch_committed([("other", b"x")], committed)  # untagged


def test_a_person_created_or_updated_shares_no_nested_value_with_its_event() -> None:
    """``detached`` copies containers only (``deepcopy`` of every scalar was 6 calls per event):
    the stored person never aliases the event's lists and objects."""
    from processors.identity.rules import PropertyUpdates, apply_property_updates
    from processors.identity.steps.persons import Changes, create

    tags, address = ["a"], {"city": "Oslo"}
    ev = {"e": "$identify", "u": "u1", "t": 1, "d": "d1", "ts": 5,
          "p": {"$set": {"tags": tags, "plan": "pro"}, "$set_once": {"address": address}}}
    person = create(ev, [("d1", 0)], identified=False, changes=Changes())
    assert person is not None and person["props"]["tags"] == ["a"] and person["props"]["address"] == address
    assert person["props"]["tags"] is not tags and person["props"]["address"] is not address
    after = apply_property_updates({"plan": "free"}, PropertyUpdates({"tags": tags, "plan": "pro"}, [], True))
    assert after == {"plan": "pro", "tags": ["a"]} and after["tags"] is not tags
