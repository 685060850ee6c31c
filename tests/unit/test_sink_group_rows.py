"""The sink's group row functions: ``groups`` and ``group_types`` values → ClickHouse rows; and the
event row's group creation times."""

import orjson
import pytest

from headwater.rows import EVENT_COLUMNS, GROUP_COLUMNS, GROUP_TYPE_COLUMNS
from sinks.clickhouse.sink import event_row, group_row, group_type_row
from tests.factories import FakeMessage

CREATED_AT = 1_790_000_000_123_456


def group(**overrides) -> dict:
    value = {
        "team_id": 7,
        "group_type_index": 0,
        "group_key": "acme",
        "group_properties": '{"name": "Acme", "plan": "pro"}',
        "created_at": CREATED_AT,
        "version": 3,
    }
    return {**value, **overrides}


def group_type(**overrides) -> dict:
    return {**{"team_id": 7, "group_type": "company", "group_type_index": 0}, **overrides}


def message(value: dict | None, topic: str = "groups") -> FakeMessage:
    return FakeMessage(None if value is None else orjson.dumps(value), key=b"7:0:acme", topic=topic)


def test_the_group_columns_are_the_contract():
    assert GROUP_COLUMNS == ("team_id", "group_type_index", "group_key", "group_properties", "created_at", "version")
    assert GROUP_TYPE_COLUMNS == ("team_id", "group_type", "group_type_index")


def test_group_row_has_the_groups_columns_in_order():
    value = group()
    assert group_row(message(value)) == [value[c] for c in GROUP_COLUMNS]
    assert group_row(message(value)) == [7, 0, "acme", '{"name": "Acme", "plan": "pro"}', CREATED_AT, 3]


def test_group_properties_are_written_as_sent():
    text = '{ "b": 1,  "a": {"nested": [1, 2]} }'  # not re-serialized
    assert group_row(message(group(group_properties=text)))[3] == text
    assert group_row(message(group(group_properties="{}")))[3] == "{}"


@pytest.mark.parametrize("index", range(5))
def test_every_group_slot_index_is_accepted(index):
    assert group_row(message(group(group_type_index=index)))[1] == index
    assert group_type_row(message(group_type(group_type_index=index), "group_types"))[2] == index


def test_group_type_row_has_the_group_types_columns_in_order():
    value = group_type()
    assert group_type_row(message(value, "group_types")) == [value[c] for c in GROUP_TYPE_COLUMNS]
    assert group_type_row(message(value, "group_types")) == [7, "company", 0]


def test_keys_beyond_the_columns_are_ignored():
    assert group_row(message({**group(), "extra": 1})) == group_row(message(group()))
    assert group_type_row(message({**group_type(), "extra": 1}, "group_types")) == [7, "company", 0]


def test_tombstones_carry_no_row():
    assert group_row(FakeMessage(None, key=b"7:0:acme", topic="groups")) is None
    assert group_type_row(FakeMessage(None, key=b"7:company", topic="group_types")) is None


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"team_id": "7"}, TypeError),
        ({"team_id": 7.0}, TypeError),
        ({"team_id": True}, TypeError),
        ({"team_id": 1 << 63}, ValueError),
        ({"group_type_index": 5}, ValueError),
        ({"group_type_index": -1}, ValueError),
        ({"group_type_index": "0"}, ValueError),
        ({"group_type_index": 0.0}, ValueError),
        ({"group_type_index": False}, ValueError),
        ({"group_type_index": None}, ValueError),
        ({"group_key": 42}, TypeError),
        ({"group_key": None}, TypeError),
        ({"group_key": ""}, ValueError),
        ({"group_properties": {"name": "Acme"}}, TypeError),  # must be JSON text, not an object
        ({"group_properties": None}, TypeError),
        ({"group_properties": "[1, 2]"}, ValueError),  # JSON, but not an object
        ({"group_properties": '"Acme"'}, ValueError),
        ({"group_properties": "null"}, ValueError),
        ({"group_properties": '{"name": '}, ValueError),  # not JSON
        ({"group_properties": ""}, ValueError),
        ({"created_at": 1_790_000_000.5}, TypeError),
        ({"created_at": "2026-09-21T14:13:20Z"}, TypeError),
        ({"created_at": None}, TypeError),
        ({"version": 0}, ValueError),
        ({"version": -1}, ValueError),
        ({"version": 1.0}, TypeError),
        ({"version": "1"}, TypeError),
        ({"version": None}, TypeError),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else v.__name__,
)
def test_a_group_value_of_the_wrong_type_is_refused_before_the_insert(overrides, error):
    with pytest.raises(error):
        group_row(message(group(**overrides)))


@pytest.mark.parametrize("missing", GROUP_COLUMNS)
def test_a_group_value_missing_a_column_is_refused(missing):
    value = group()
    del value[missing]
    with pytest.raises(KeyError):
        group_row(message(value))


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"team_id": "7"}, TypeError),
        ({"team_id": None}, TypeError),
        ({"group_type": 1}, TypeError),
        ({"group_type": None}, TypeError),
        ({"group_type": ""}, ValueError),
        ({"group_type_index": 5}, ValueError),
        ({"group_type_index": -1}, ValueError),
        ({"group_type_index": "1"}, ValueError),
        ({"group_type_index": True}, ValueError),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else v.__name__,
)
def test_a_group_type_value_of_the_wrong_type_is_refused(overrides, error):
    with pytest.raises(error):
        group_type_row(message(group_type(**overrides), "group_types"))


@pytest.mark.parametrize("missing", GROUP_TYPE_COLUMNS)
def test_a_group_type_value_missing_a_column_is_refused(missing):
    value = group_type()
    del value[missing]
    with pytest.raises(KeyError):
        group_type_row(message(value, "group_types"))


def test_bytes_that_are_not_a_json_object_are_refused():
    with pytest.raises(ValueError):  # orjson.JSONDecodeError is a ValueError
        group_row(FakeMessage(b'{"team_id": ', topic="groups"))
    with pytest.raises(TypeError):
        group_type_row(FakeMessage(b"[1, 2]", topic="group_types"))


# The event row's group creation times.

def event(**overrides) -> dict:
    value = {c: "" for c in EVENT_COLUMNS}
    value.update({"uuid": "0190a1b2-0000-7000-8000-000000000001", "person_id": "0190a1b2-0000-5000-8000-000000000002",
                  "team_id": 7, "timestamp": CREATED_AT, "person_created_at": 0, "created_at": CREATED_AT})
    value.update({f"group{i}_created_at": 0 for i in range(5)})
    return {**value, **overrides}


def test_the_group_creation_times_follow_the_group_properties_in_the_event_columns():
    props = EVENT_COLUMNS.index("group4_properties")
    assert EVENT_COLUMNS[props + 1 : props + 6] == tuple(f"group{i}_created_at" for i in range(5))
    value = event(group2_created_at=CREATED_AT)
    assert event_row(FakeMessage(orjson.dumps(value), topic="events_enriched")) == [value[c] for c in EVENT_COLUMNS]


def test_an_event_row_missing_a_column_is_refused():
    value = event()
    del value["person_created_at"]
    with pytest.raises(KeyError):
        event_row(FakeMessage(orjson.dumps(value), topic="events_enriched"))
