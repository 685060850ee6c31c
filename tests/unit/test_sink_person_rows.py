"""The sink's identity row functions: ``persons`` and ``person_distinct_ids`` values → ClickHouse rows."""

import uuid

import orjson
import pytest

from headwater.rows import DISTINCT_ID_COLUMNS, PERSON_COLUMNS
from sinks.clickhouse.sink import distinct_id_row, event_row, person_row
from tests.factories import FakeMessage

PERSON_ID = "0192f0e4-0000-7000-8000-0000000000aa"


def person(**overrides) -> dict:
    value = {
        "id": PERSON_ID,
        "team_id": 7,
        "properties": '{"email": "a@example.com"}',
        "is_identified": 1,
        "created_at": 1_790_000_000_123_456,
        "version": 3,
        "is_deleted": 0,
    }
    return {**value, **overrides}


def distinct_id(**overrides) -> dict:
    return {**{"team_id": 7, "distinct_id": "anon-1", "person_id": PERSON_ID, "version": 1, "is_deleted": 0}, **overrides}


def message(value: dict | None, topic: str = "persons") -> FakeMessage:
    return FakeMessage(None if value is None else orjson.dumps(value), key=b"7:k", topic=topic)


def test_person_row_has_the_persons_columns_in_order():
    assert PERSON_COLUMNS == ("id", "team_id", "properties", "is_identified", "created_at", "version", "is_deleted")
    value = person()
    assert person_row(message(value)) == [value[c] for c in PERSON_COLUMNS]
    assert person_row(message(value)) == [PERSON_ID, 7, '{"email": "a@example.com"}', 1, 1_790_000_000_123_456, 3, 0]


def test_distinct_id_row_has_the_distinct_id_columns_in_order():
    assert DISTINCT_ID_COLUMNS == ("team_id", "distinct_id", "person_id", "version", "is_deleted")
    value = distinct_id()
    assert distinct_id_row(message(value, "person_distinct_ids")) == [7, "anon-1", PERSON_ID, 1, 0]


def test_keys_beyond_the_columns_are_ignored_and_uuids_are_written_canonically():
    upper = PERSON_ID.upper()
    row = person_row(message({**person(id=upper), "last_seen_at": 1, "extra": {"x": 1}}))
    assert row[0] == PERSON_ID and len(row) == len(PERSON_COLUMNS)
    assert distinct_id_row(message(distinct_id(person_id=uuid.UUID(PERSON_ID).hex), "person_distinct_ids"))[2] == PERSON_ID


def test_a_deleted_snapshot_is_a_row_and_its_tombstone_is_none():
    deleted = person(version=103, is_deleted=1)
    assert person_row(message(deleted))[-2:] == [103, 1]
    assert person_row(FakeMessage(None, key=b"7:" + PERSON_ID.encode(), topic="persons")) is None
    assert distinct_id_row(FakeMessage(None, key=b"7:anon-1", topic="person_distinct_ids")) is None


def test_an_events_row_is_not_allowed_to_be_a_tombstone():
    """Only the compacted identity topics carry tombstones; elsewhere None stays an unreadable row."""
    with pytest.raises(ValueError):  # orjson.JSONDecodeError: the sink keeps it as a dead letter
        event_row(FakeMessage(None, topic="events_enriched"))


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"id": "not-a-uuid"}, ValueError),
        ({"id": ""}, ValueError),  # would be written as the zero UUID
        ({"id": None}, TypeError),
        ({"team_id": "7"}, TypeError),
        ({"team_id": 1 << 63}, ValueError),
        ({"properties": {"email": "a@example.com"}}, TypeError),  # must be JSON text, not an object
        ({"is_identified": True}, ValueError),
        ({"is_identified": 2}, ValueError),
        ({"created_at": 1_790_000_000.5}, TypeError),
        ({"created_at": "2026-09-21T14:13:20Z"}, TypeError),
        ({"version": None}, TypeError),
        ({"is_deleted": "0"}, ValueError),
    ],
)
def test_a_person_value_of_the_wrong_type_is_refused_before_the_insert(overrides, error):
    with pytest.raises(error):
        person_row(message(person(**overrides)))


@pytest.mark.parametrize("missing", PERSON_COLUMNS)
def test_a_person_value_missing_a_column_is_refused(missing):
    value = person()
    del value[missing]
    with pytest.raises(KeyError):
        person_row(message(value))


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (distinct_id(person_id="nope"), ValueError),
        (distinct_id(distinct_id=42), TypeError),
        (distinct_id(version=1.0), TypeError),
        (distinct_id(is_deleted=-1), ValueError),
        ({k: v for k, v in distinct_id().items() if k != "person_id"}, KeyError),
    ],
)
def test_a_distinct_id_value_of_the_wrong_shape_is_refused(value, error):
    with pytest.raises(error):
        distinct_id_row(message(value, "person_distinct_ids"))


def test_bytes_that_are_not_a_json_object_are_refused():
    with pytest.raises(ValueError):  # orjson.JSONDecodeError is a ValueError
        person_row(FakeMessage(b'{"id": ', topic="persons"))
    with pytest.raises(TypeError):
        distinct_id_row(FakeMessage(b"[1, 2]", topic="person_distinct_ids"))
