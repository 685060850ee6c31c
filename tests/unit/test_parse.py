import uuid

import orjson
import pytest

from headwater.outcomes import DeadLetter, Drop, Ok
from processors.identity.steps.parse import parse_raw_event, to_epoch_us
from tests.factories import _MISSING, make_raw_event, raw_bytes

TEAMS = {"phc_test": 7}


def parse(value: bytes, offset: int = 0):
    return parse_raw_event(value, TEAMS, topic="events_raw", partition=2, offset=offset, broker_timestamp_ms=1_793_600_000_000)


def test_valid_event_is_parsed():
    outcome = parse(raw_bytes(distinct_id="u-9", event="signed_up"))
    assert isinstance(outcome, Ok)
    assert outcome.value.team_id == 7
    assert outcome.value.distinct_id == "u-9"
    assert outcome.value.event == "signed_up"
    assert outcome.value.timestamp_us == to_epoch_us("2026-11-01T12:00:00.123456+00:00")
    assert outcome.warnings == ()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"text"', "not_an_object"),
        (raw_bytes(token=_MISSING), "missing_token"),
        (raw_bytes(token=""), "missing_token"),
        (raw_bytes(token="phc_nobody"), "unknown_token"),
        (raw_bytes(distinct_id=_MISSING), "missing_distinct_id"),
        (raw_bytes(distinct_id=None), "missing_distinct_id"),
        (raw_bytes(distinct_id=""), "missing_distinct_id"),
        (raw_bytes(distinct_id="   "), "invalid_distinct_id"),
        (raw_bytes(distinct_id=42), "invalid_distinct_id"),
        (raw_bytes(event=_MISSING), "missing_event"),
        (raw_bytes(event=""), "missing_event"),
        (raw_bytes(uuid="not-a-uuid"), "invalid_uuid"),
        (raw_bytes(uuid=12), "invalid_uuid"),
        (raw_bytes(properties=[1]), "invalid_properties"),
        (raw_bytes(**{"$set": "x"}), "invalid_person_update"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_is_dead_lettered_with_its_reason(value, reason):
    outcome = parse(value)
    assert isinstance(outcome, DeadLetter)
    assert outcome.reason == reason


def test_too_long_distinct_id_is_dropped_with_a_warning():
    outcome = parse(raw_bytes(distinct_id="x" * 401))
    assert isinstance(outcome, Drop)
    assert outcome.warning.type == "skipping_event_invalid_distinct_id"


def test_invalid_timestamp_keeps_the_event_at_now_with_a_warning():
    outcome = parse(raw_bytes(timestamp="yesterday-ish", now="2026-11-02T00:00:00Z"))
    assert isinstance(outcome, Ok)
    assert outcome.value.timestamp_us == to_epoch_us("2026-11-02T00:00:00+00:00")
    assert [w.type for w in outcome.warnings] == ["ignored_invalid_timestamp"]


def test_a_timestamp_more_than_23_hours_ahead_is_now_with_a_warning():
    far = parse(raw_bytes(timestamp="2026-11-05T00:00:00Z", now="2026-11-02T00:00:00Z"))
    assert isinstance(far, Ok)
    assert far.value.timestamp_us == to_epoch_us("2026-11-02T00:00:00+00:00")
    assert [(w.type, w.details["timestamp"]) for w in far.warnings] == [("event_timestamp_in_future", "2026-11-05T00:00:00Z")]
    near = parse(raw_bytes(timestamp="2026-11-02T22:59:00Z", now="2026-11-02T00:00:00Z"))
    assert near.value.timestamp_us == to_epoch_us("2026-11-02T22:59:00+00:00") and near.warnings == ()


def test_missing_timestamp_and_now_fall_back_to_the_broker_time():
    outcome = parse(raw_bytes(timestamp=_MISSING))
    assert isinstance(outcome, Ok)
    assert outcome.value.timestamp_us == 1_793_600_000_000 * 1000


def test_missing_uuid_is_derived_from_the_coordinates_so_replays_agree():
    first = parse(raw_bytes(uuid=_MISSING), offset=41)
    again = parse(raw_bytes(uuid=_MISSING), offset=41)
    other = parse(raw_bytes(uuid=_MISSING), offset=42)
    assert first.value.uuid == again.value.uuid != other.value.uuid
    assert uuid.UUID(first.value.uuid).version == 5


def test_uuid_is_normalised_to_lower_case():
    outcome = parse(raw_bytes(uuid="0192F0E4-0000-7000-8000-00000000000A"))
    assert outcome.value.uuid == "0192f0e4-0000-7000-8000-00000000000a"


def test_top_level_set_overrides_properties_set():
    value = raw_bytes(properties={"$set": {"a": 1, "b": 1}}, **{"$set": {"b": 2}, "$set_once": {"c": 3}})
    props = parse(value).value.properties
    assert props["$set"] == {"a": 1, "b": 2}
    assert props["$set_once"] == {"c": 3}


def test_naive_timestamps_are_utc():
    assert to_epoch_us("2026-01-01T00:00:00") == to_epoch_us("2026-01-01T00:00:00+00:00")
    assert to_epoch_us("2026-01-01T01:00:00+01:00") == to_epoch_us("2026-01-01T00:00:00Z")
    assert to_epoch_us(1234) is None


def test_event_name_is_truncated_to_200_chars():
    assert len(parse(raw_bytes(event="e" * 300)).value.event) == 200


def test_api_key_is_accepted_as_token():
    event = make_raw_event(token=_MISSING, api_key="phc_test")
    assert isinstance(parse(orjson.dumps(event)), Ok)
