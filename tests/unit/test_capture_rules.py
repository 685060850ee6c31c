"""The capture rules (producers/capture/rules.py) as pure functions, each against PostHog's Rust
capture behaviour (ingestion-semantics §5): payload shapes, tokens, encodings, timestamps,
distinct ids, limits, CORS; and the HTTP head parser."""

from __future__ import annotations

import base64
import gzip
import uuid
from datetime import datetime
from urllib.parse import quote, urlencode

import orjson
import pytest

from headwater.outcomes import Ok
from processors.identity.steps.parse import parse_raw_event
from producers.capture.http import HttpError, parse_head, render, Response
from producers.capture.rules import (
    BATCH_BODY_LIMIT,
    CAPTURE_PATHS,
    EVENT_BODY_LIMIT,
    CaptureError,
    RequestContext,
    build_message,
    build_messages,
    cors_headers,
    decode_payload,
    event_timestamp_us,
    extract_distinct_id,
    extract_payload,
    parse_date_us,
    parse_json,
    parse_sent_at,
    payload_shape,
    prepare_request,
    request_token,
    route_path,
)

TEAMS = {"phc_test": 7, "phc_other": 8}
FORM = "application/x-www-form-urlencoded"


def us(text: str) -> int:
    dt = datetime.fromisoformat(text)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


NOW = us("2023-01-01T12:00:00+00:00")


def prepare(body: bytes | str, path: str = "/batch", content_type: str = "application/json", query: str = "",
            max_message_bytes: int = 1_000_000):
    if isinstance(body, str):
        body = body.encode()
    return prepare_request(path, body, content_type, query, teams=TEAMS, now_us=NOW, ip="10.0.0.1",
                           max_message_bytes=max_message_bytes)


def refused(body: bytes | str, **kwargs) -> CaptureError:
    with pytest.raises(CaptureError) as info:
        prepare(body, **kwargs)
    return info.value


def envelopes(prepared) -> list[dict]:
    return [orjson.loads(value) for _, value in prepared.messages]


def one(event: dict, **kwargs) -> dict:
    [env] = envelopes(prepare(orjson.dumps({"token": "phc_test", **event}), path="/e", **kwargs))
    return env


# -- paths ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/e", "/e/", "/i/v0/e", "/i/v0/e/", "/capture", "/capture/", "/batch", "/batch/",
                                  "/track/", "/engage/"])
def test_capture_paths_with_and_without_trailing_slash(path):
    assert route_path(path) in CAPTURE_PATHS


def test_only_one_trailing_slash_is_dropped_and_root_stays():
    assert route_path("/e//") == "/e/"
    assert route_path("/") == "/"


def test_body_limits_are_2mb_for_events_and_20mb_for_batch():
    assert CAPTURE_PATHS["/e"] == CAPTURE_PATHS["/capture"] == CAPTURE_PATHS["/i/v0/e"] == EVENT_BODY_LIMIT == 2 * 1024 * 1024
    assert CAPTURE_PATHS["/batch"] == BATCH_BODY_LIMIT == 20 * 1024 * 1024


# -- payload shapes ------------------------------------------------------------------------------
def test_array_batch_and_single_shapes():
    event = {"event": "e", "distinct_id": "d"}
    assert payload_shape([event, event]).events == [event, event]
    batch = payload_shape({"api_key": "phc_test", "batch": [event], "sent_at": "2023-01-01T12:00:00Z",
                           "historical_migration": True})
    assert (batch.events, batch.batch_token, batch.sent_at, batch.historical_migration) == (
        [event], "phc_test", "2023-01-01T12:00:00Z", True)
    assert payload_shape({"token": "t", "batch": []} | {"batch": [event]}).batch_token == "t"
    single = payload_shape(event)
    assert (single.events, single.batch_token, single.sent_at) == ([event], None, None)


@pytest.mark.parametrize(("doc", "code"), [
    ([], "empty_batch"),
    ({"api_key": "phc_test", "batch": []}, "empty_batch"),
    ({"api_key": "phc_test", "batch": {"event": "e"}}, "invalid_json"),
    ({"api_key": 5, "batch": [{}]}, "invalid_json"),
    ("text", "invalid_json"),
    (12, "invalid_json"),
])
def test_bad_shapes_are_400(doc, code):
    with pytest.raises(CaptureError) as info:
        payload_shape(doc)
    assert (info.value.status, info.value.code) == (400, code)


# -- tokens ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("event", [
    {"token": "phc_test"}, {"$token": "phc_test"}, {"api_key": "phc_test"}, {"properties": {"token": "phc_test"}},
    {"token": "phc_test", "properties": {"token": "phc_other"}},  # top-level wins
])
def test_token_from_the_event_or_its_properties(event):
    assert request_token(payload_shape([{"event": "e", **event}]), TEAMS) == "phc_test"


def test_batch_api_key_wins_over_event_tokens():
    doc = {"api_key": "phc_test", "batch": [{"event": "e", "token": "phc_other"}]}
    assert request_token(payload_shape(doc), TEAMS) == "phc_test"


def test_events_without_a_token_share_the_one_named():
    doc = [{"event": "e", "token": "phc_test"}, {"event": "e"}]
    assert request_token(payload_shape(doc), TEAMS) == "phc_test"


@pytest.mark.parametrize(("doc", "code"), [
    ([{"event": "e"}], "ingest_key_required"),
    ({"batch": [{"event": "e"}]}, "ingest_key_required"),
    ([{"event": "e", "token": "phc_test"}, {"event": "e", "token": "phc_other"}], "multiple_tokens"),
    ({"api_key": "", "batch": [{"event": "e"}]}, "invalid_token"),
    ([{"event": "e", "token": "phx_personal"}], "invalid_token"),
    ([{"event": "e", "token": "phc_stranger"}], "unknown_token"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_token_errors_are_401(doc, code):
    with pytest.raises(CaptureError) as info:
        request_token(payload_shape(doc), TEAMS)
    assert (info.value.status, info.value.code) == (401, code)


def test_a_token_that_is_not_a_string_is_400():
    with pytest.raises(CaptureError) as info:
        request_token(payload_shape([{"event": "e", "token": 5}]), TEAMS)
    assert info.value.status == 400


# -- encodings ------------------------------------------------------------------------------------
EVENT = {"event": "e", "distinct_id": "d", "token": "phc_test"}
JSON = orjson.dumps([EVENT])


@pytest.mark.parametrize("hint", [None, "gzip", "gzip-js", "base64", "nonsense"])
def test_gzip_is_detected_by_magic_bytes_whatever_the_hint(hint):
    assert decode_payload(gzip.compress(JSON), hint, EVENT_BODY_LIMIT) == JSON


def test_gzip_hint_on_a_plain_body_and_broken_gzip_are_400():
    for payload, hint in ((JSON, "gzip"), (b"\x1f\x8b\x08garbage", None), (gzip.compress(JSON)[:-10], None)):
        with pytest.raises(CaptureError) as info:
            decode_payload(payload, hint, EVENT_BODY_LIMIT)
        assert (info.value.status, info.value.code) == (400, "invalid_payload")


def test_a_gzip_bomb_is_413_without_inflating_it_all():
    with pytest.raises(CaptureError) as info:
        decode_payload(gzip.compress(b" " * (EVENT_BODY_LIMIT + 1)), None, EVENT_BODY_LIMIT)
    assert (info.value.status, info.value.code) == (413, "payload_too_large")


def test_a_plain_body_over_the_limit_is_413():
    with pytest.raises(CaptureError) as info:
        decode_payload(b"[" + b" " * 100 + b"]", None, 50)
    assert info.value.status == 413


def test_form_data_base64_with_pluses_turned_to_spaces():
    encoded = base64.b64encode(orjson.dumps([{**EVENT, "properties": {"x": ">>>?"}}])).decode()
    assert "+" in encoded or "/" in encoded
    body = "data=" + encoded.replace("+", " ") + "&compression=base64"  # a form encoder that left '+' raw
    payload, hint = extract_payload(body.encode(), FORM, {})
    assert hint == "base64"
    assert orjson.loads(decode_payload(payload, hint, EVENT_BODY_LIMIT))[0]["properties"] == {"x": ">>>?"}


def test_form_data_urlencoded_json_and_gzip_in_base64():
    payload, hint = extract_payload(urlencode({"data": JSON.decode()}).encode(), FORM + "; charset=utf-8", {})
    assert decode_payload(payload, hint, EVENT_BODY_LIMIT) == JSON
    wrapped = base64.b64encode(gzip.compress(JSON)).decode()
    payload, hint = extract_payload(("data=" + quote(wrapped, safe="")).encode(), FORM, {})
    assert decode_payload(payload, hint, EVENT_BODY_LIMIT) == JSON


def test_get_query_data_and_unannounced_base64_body():
    payload, hint = extract_payload(b"", "", {"data": [base64.b64encode(JSON).decode()], "compression": ["base64"]})
    assert decode_payload(payload, hint, EVENT_BODY_LIMIT) == JSON
    payload, hint = extract_payload(base64.b64encode(JSON), "text/plain", {})
    assert decode_payload(payload, hint, EVENT_BODY_LIMIT) == JSON


def test_json_body_sent_with_the_form_type_is_taken_as_json():
    payload, _ = extract_payload(JSON, FORM, {})  # curl -d, urllib
    assert payload == JSON


@pytest.mark.parametrize(("body", "content_type", "query", "code"), [
    (b"", "", {}, "empty_payload"),
    (b"ver=1.2.3", FORM, {}, "invalid_payload"),
])
def test_payload_extraction_errors(body, content_type, query, code):
    with pytest.raises(CaptureError) as info:
        extract_payload(body, content_type, query)
    assert (info.value.status, info.value.code) == (400, code)


def test_lz64_is_refused_with_a_clear_400():
    with pytest.raises(CaptureError) as info:
        decode_payload(b"N4IgbghgTg9g", "lz64", EVENT_BODY_LIMIT)
    assert info.value.status == 400 and "lz64" in info.value.message


def test_malformed_json_is_400_and_lone_surrogates_become_replacement_chars():
    with pytest.raises(CaptureError) as info:
        parse_json(b'{"event": ')
    assert (info.value.status, info.value.code) == (400, "invalid_json")
    assert parse_json(b'{"a": "x\\ud800y", "b": "\\udc00", "c": "\\ud83d\\ude00"}') == {"a": "x\ufffdy", "b": "\ufffd", "c": "\U0001F600"}


# -- distinct_id ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("event", "expected"), [
    ({"distinct_id": "myid"}, "myid"),
    ({"$distinct_id": "23"}, "23"),
    ({"properties": {"distinct_id": "myid"}}, "myid"),
    ({"distinct_id": 23, "properties": {"distinct_id": "myid"}}, "23"),
    ({"distinct_id": 23}, "23"),
    ({"distinct_id": 23.4}, "23.4"),
    ({"distinct_id": ["a", "b"]}, '["a","b"]'),
    ({"distinct_id": {"string": "a", "number": 3}}, '{"number":3,"string":"a"}'),
    ({"distinct_id": True}, "true"),
    ({"distinct_id": "  hello  "}, "  hello  "),
    ({"distinct_id": "a\0b"}, "a\ufffdb"),
    ({"distinct_id": "x" * 222}, "x" * 200),
    ({"distinct_id": "\u20ac" * 150}, "\u20ac" * 150),  # 450 bytes, 150 chars: kept
    ({"distinct_id": "\u20ac" * 250}, "\u20ac" * 200),
    ({"distinct_id": None, "properties": {"distinct_id": "p"}}, "p"),
])
def test_distinct_id_rules(event, expected):
    assert extract_distinct_id(event) == expected


@pytest.mark.parametrize("event", [{}, {"distinct_id": None}, {"distinct_id": ""}, {"distinct_id": " \t\n"},
                                   {"properties": {"distinct_id": None}}])
def test_missing_null_empty_or_blank_distinct_id_is_400(event):
    assert extract_distinct_id(event) is None
    error = refused(orjson.dumps({"token": "phc_test", "event": "e", **event}), path="/e")
    assert (error.status, error.code) == (400, "missing_distinct_id")


# -- timestamps -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("2023-01-01T11:00:00Z", "2023-01-01T11:00:00+00:00"),
    ("2023-01-01T11:00:00.123456+00:00", "2023-01-01T11:00:00.123456+00:00"),
    ("2025-09-17T14:05:04.805+03", "2025-09-17T11:05:04.805+00:00"),
    ("2023-01-01T12:00:00", "2023-01-01T12:00:00+00:00"),  # naive = UTC
    ("2023-01-01 12:00:00", "2023-01-01T12:00:00+00:00"),
    ("2023-01-01", "2023-01-01T00:00:00+00:00"),
    ("2023/01/02", "2023-01-02T00:00:00+00:00"),
    ("01/02/2023", "2023-01-02T00:00:00+00:00"),
    ("Tue, 1 Jul 2003 10:52:37 +0200", "2003-07-01T08:52:37+00:00"),
    ("1672574400000", "2023-01-01T12:00:00+00:00"),
    ("1672574400", "2023-01-01T12:00:00+00:00"),
])
def test_timestamp_formats(text, expected):
    assert parse_date_us(text) == us(expected)


@pytest.mark.parametrize("text", ["not a date", "", "2023-13-45T00:00:00Z", "32/32/2023"])
def test_unparseable_timestamps(text):
    assert parse_date_us(text) is None
    assert event_timestamp_us(text, None, None, NOW) == NOW


def test_clock_skew_is_corrected_with_sent_at_both_ways():
    ts = "2023-01-01T11:00:00Z"
    ahead = event_timestamp_us(ts, None, us("2023-01-01T12:00:10+00:00"), NOW)
    behind = event_timestamp_us(ts, None, us("2023-01-01T11:59:50+00:00"), NOW)
    assert ahead == us("2023-01-01T10:59:50+00:00")
    assert behind == us("2023-01-01T11:00:10+00:00")
    assert event_timestamp_us(ts, None, None, NOW) == us("2023-01-01T11:00:00+00:00")
    assert event_timestamp_us(None, None, us("2023-01-01T12:00:05+00:00"), NOW) == NOW


def test_offset_overrides_timestamp_and_skew():
    assert event_timestamp_us("2023-01-01T11:00:00Z", 5_000, us("2023-01-01T12:00:10+00:00"), NOW) == NOW - 5_000_000


def test_future_clamp_at_23_hours():
    assert event_timestamp_us("2023-01-02T10:59:00Z", None, None, NOW) == us("2023-01-02T10:59:00+00:00")
    assert event_timestamp_us("2023-01-02T11:01:00Z", None, None, NOW) == NOW
    assert event_timestamp_us(None, -(24 * 3600 * 1000), None, NOW) == NOW


def test_out_of_range_years_become_the_epoch():
    assert event_timestamp_us("0001-01-01T00:00:00Z", None, NOW + 3_600_000_000, NOW) == 0


def test_sent_at_from_the_batch_body_or_the_query_in_milliseconds():
    assert parse_sent_at("2023-01-01T12:00:10Z", {}) == us("2023-01-01T12:00:10+00:00")
    assert parse_sent_at(None, {"_": ["1672574410000"]}) == us("2023-01-01T12:00:10+00:00")
    assert parse_sent_at(None, {"sent_at": ["1672574410000"]}) == us("2023-01-01T12:00:10+00:00")
    assert parse_sent_at("2023-01-01T12:00:10Z", {"_": ["1672574499000"]}) == us("2023-01-01T12:00:10+00:00")
    assert parse_sent_at("garbage", {"_": ["1672574410000"]}) == us("2023-01-01T12:00:10+00:00")
    assert parse_sent_at(None, {"_": ["1672574410"]}) is None  # seconds: year 1970, ignored
    assert parse_sent_at(None, {"_": ["soon"]}) is None


def test_skew_correction_end_to_end_and_ignore_sent_at():
    body = {"api_key": "phc_test", "sent_at": "2023-01-01T12:00:10Z", "batch": [
        {"event": "a", "distinct_id": "d", "timestamp": "2023-01-01T11:00:00Z"},
        {"event": "b", "distinct_id": "d", "timestamp": "2023-01-01T11:00:00Z", "properties": {"$ignore_sent_at": True}},
        {"event": "c", "distinct_id": "d", "offset": 1500},
        {"event": "d", "distinct_id": "d"},
    ]}
    a, b, c, d = envelopes(prepare(orjson.dumps(body)))
    assert a["timestamp"] == "2023-01-01T10:59:50+00:00"
    assert b["timestamp"] == "2023-01-01T11:00:00+00:00"
    assert c["timestamp"] == "2023-01-01T11:59:58.500000+00:00"
    assert d["timestamp"] == d["now"] == "2023-01-01T12:00:00+00:00"
    assert a["sent_at"] == "2023-01-01T12:00:10+00:00"


def test_posthog_js_query_sent_at_is_applied():
    event = [{"event": "e", "properties": {"token": "phc_test", "distinct_id": "d"}, "timestamp": "2023-01-01T11:00:00Z"}]
    [env] = envelopes(prepare(orjson.dumps(event), path="/e", query="ip=1&_=1672574410000&ver=1.0"))
    assert env["timestamp"] == "2023-01-01T10:59:50+00:00"


# -- one event, the envelope ----------------------------------------------------------------------
def test_envelope_is_what_the_identity_stage_parses():
    event = {"event": "$pageview", "distinct_id": 42, "uuid": "0190A0B0-C0D0-7000-8000-000000000001",
             "timestamp": "2023-01-01T11:00:00Z", "properties": {"$current_url": "https://x"},
             "$set": {"plan": "pro"}, "$set_once": {"first": 1}, "unknown_field": 1}
    [(key, value)] = prepare(orjson.dumps({"api_key": "phc_test", "batch": [event]})).messages
    assert key == b"phc_test:42"
    env = orjson.loads(value)
    assert env == {"token": "phc_test", "distinct_id": "42", "event": "$pageview",
                   "uuid": "0190a0b0-c0d0-7000-8000-000000000001", "timestamp": "2023-01-01T11:00:00+00:00",
                   "properties": {"$current_url": "https://x"}, "now": "2023-01-01T12:00:00+00:00", "ip": "10.0.0.1",
                   "$set": {"plan": "pro"}, "$set_once": {"first": 1}}
    outcome = parse_raw_event(value, TEAMS, topic="events_raw", partition=0, offset=0, broker_timestamp_ms=0)
    assert isinstance(outcome, Ok) and outcome.warnings == ()
    parsed = outcome.value
    assert (parsed.team_id, parsed.distinct_id, parsed.uuid) == (7, "42", "0190a0b0-c0d0-7000-8000-000000000001")
    assert parsed.timestamp_us == us("2023-01-01T11:00:00+00:00") and parsed.now_us == NOW
    assert parsed.properties["$set"] == {"plan": "pro"}


def test_missing_or_empty_uuid_gets_a_uuid7_and_a_bad_one_is_400():
    for event in ({}, {"uuid": ""}, {"uuid": None}):
        generated = uuid.UUID(one({"event": "e", "distinct_id": "d", **event})["uuid"])
        assert generated.version == 7
    for bad in ("not-a-uuid", 12):
        error = refused(orjson.dumps({"token": "phc_test", "event": "e", "distinct_id": "d", "uuid": bad}), path="/e")
        assert (error.status, error.code) == (400, "invalid_uuid")


@pytest.mark.parametrize(("event", "code"), [
    ({"distinct_id": "d"}, "invalid_json"),  # no event name: PostHog's RawEvent fails to parse
    ({"distinct_id": "d", "event": ""}, "missing_event_name"),
    ({"distinct_id": "d", "event": 5}, "invalid_json"),
    ({"distinct_id": "d", "event": "e", "properties": [1]}, "invalid_json"),
    ({"distinct_id": "d", "event": "e", "timestamp": 1672574400}, "invalid_json"),
    ({"distinct_id": "d", "event": "e", "offset": "10"}, "invalid_json"),
    ({"distinct_id": "d", "event": "e", "$set": "x"}, "invalid_json"),
    ({"distinct_id": "d", "event": "e", "properties": {"$cookieless_mode": "yes"}}, "invalid_cookieless_mode"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_events_are_400(event, code):
    error = refused(orjson.dumps({"token": "phc_test", **event}), path="/e")
    assert (error.status, error.code) == (400, code)


def test_one_bad_event_refuses_the_whole_batch():
    body = {"api_key": "phc_test", "batch": [{"event": "ok", "distinct_id": "d"}, {"event": "bad"}]}
    assert refused(orjson.dumps(body)).code == "missing_distinct_id"


def test_engage_without_event_name_is_identify():
    [env] = envelopes(prepare(orjson.dumps({"token": "phc_test", "distinct_id": "d", "$set": {"a": 1}}), path="/engage"))
    assert env["event"] == "$identify" and env["$set"] == {"a": 1}


def test_capture_internal_events_get_the_loopback_ip_and_properties_stay_as_sent():
    env = one({"event": "e", "distinct_id": "d", "properties": {"capture_internal": True, "token": "phc_test"}})
    assert env["ip"] == "127.0.0.1"
    assert env["properties"] == {"capture_internal": True, "token": "phc_test"}


def _parsed_properties(value: bytes) -> dict:
    outcome = parse_raw_event(value, TEAMS, topic="events_raw", partition=0, offset=0, broker_timestamp_ms=0)
    assert isinstance(outcome, Ok)
    return outcome.value.properties


_ABSENT = object()


@pytest.mark.parametrize(("sent", "expected"), [
    (_ABSENT, "10.0.0.1"),  # the client address capture saw (ip="10.0.0.1" in prepare())
    (None, "10.0.0.1"),  # falsy: replaced, as PostHog's `if (!properties['$ip'] && event.ip)`
    ("", "10.0.0.1"),
    ("0.0.0.0", "0.0.0.0"),  # a client's own (truthy) $ip is kept: how a page redacts it
    ("2001:db8::1", "2001:db8::1"),
], ids=["absent", "null", "empty", "placeholder", "ipv6"])
def test_the_client_ip_becomes_the_ip_property_unless_the_event_has_one(sent, expected):
    properties = {"token": "phc_test"} if sent is _ABSENT else {"token": "phc_test", "$ip": sent}
    [(_, value)] = prepare(orjson.dumps({"event": "e", "distinct_id": "d", "properties": properties}), path="/e").messages
    assert orjson.loads(value)["ip"] == "10.0.0.1"  # the envelope keeps the address itself
    assert _parsed_properties(value)["$ip"] == expected


def test_capture_internal_events_get_the_loopback_ip_property():
    event = {"token": "phc_test", "event": "e", "distinct_id": "d", "properties": {"capture_internal": True}}
    [(_, value)] = prepare(orjson.dumps(event), path="/e").messages
    assert _parsed_properties(value)["$ip"] == "127.0.0.1"


def test_events_without_an_envelope_ip_get_no_ip_property():
    """Backend producers (producers.backend, any Kafka client) have no client address to report."""
    value = orjson.dumps({"token": "phc_test", "distinct_id": "d", "event": "invoice_paid", "properties": {"amount": 3}})
    assert _parsed_properties(value) == {"amount": 3}


def test_sent_at_becomes_the_sent_at_property():
    body = {"api_key": "phc_test", "sent_at": "2023-01-01T12:00:10Z", "batch": [{"event": "e", "distinct_id": "d"}]}
    [(_, value)] = prepare(orjson.dumps(body)).messages
    assert _parsed_properties(value)["$sent_at"] == "2023-01-01T12:00:10+00:00"
    [(_, value)] = prepare(orjson.dumps({"api_key": "phc_test", "batch": [{"event": "e", "distinct_id": "d"}]})).messages
    assert "$sent_at" not in _parsed_properties(value)  # no sent_at, no property


# -- what posthog-js sends (1.449, the version tests/js pins) ---------------------------------------
def _posthog_js_batch(distinct_id: str) -> bytes:
    """posthog-js's body: {api_key, batch, sent_at}, events with token and distinct_id in properties."""
    return orjson.dumps({"api_key": "phc_test", "sent_at": "2023-01-01T12:00:10.000Z", "batch": [
        {"uuid": "01a20439-1d55-7411-985f-659ef29277e6", "event": "$pageview", "timestamp": "2023-01-01T11:00:00.000Z",
         "properties": {"token": "phc_test", "distinct_id": distinct_id, "$session_id": "01a20439-1d46-706b-9242-2634341d922a",
                        "$lib": "web"}}]})


def test_posthog_js_gzip_body_sent_as_text_plain_without_query():
    [env] = envelopes(prepare(gzip.compress(_posthog_js_batch("anon-1")), path="/e", content_type="text/plain"))
    assert (env["distinct_id"], env["event"], env["uuid"]) == ("anon-1", "$pageview", "01a20439-1d55-7411-985f-659ef29277e6")
    assert env["timestamp"] == "2023-01-01T10:59:50+00:00"  # the body's sent_at corrected the 10 s skew
    assert env["properties"]["$session_id"] == "01a20439-1d46-706b-9242-2634341d922a"


def test_posthog_js_page_hide_beacon_base64_form_with_compression_in_the_query():
    """sendBeacon without gzip: `data=<encodeURIComponent(base64(json))>` as a form, `?compression=base64`."""
    body = "data=" + quote(base64.b64encode(_posthog_js_batch("anon-2")).decode(), safe="")
    [env] = envelopes(prepare(body, path="/e", content_type=FORM, query="compression=base64"))
    assert (env["distinct_id"], env["token"]) == ("anon-2", "phc_test")


def test_older_posthog_js_query_parameters_are_accepted_and_ignored():
    """`ip=1` (an option posthog-js no longer honours; PostHog's capture ignores it), `ver`, `_`, `compression`."""
    query = "ip=1&_=1672574410000&ver=1.160.0&compression=gzip-js"
    [env] = envelopes(prepare(gzip.compress(_posthog_js_batch("anon-3")), path="/e", content_type="text/plain", query=query))
    assert env["ip"] == "10.0.0.1" and env["distinct_id"] == "anon-3"


def test_historical_migration_is_passed_on():
    body = {"api_key": "phc_test", "historical_migration": True, "batch": [{"event": "e", "distinct_id": "d"}]}
    assert envelopes(prepare(orjson.dumps(body)))[0]["historical_migration"] is True


def test_an_event_bigger_than_a_kafka_message_is_413():
    error = refused(orjson.dumps({"token": "phc_test", "event": "e", "distinct_id": "d", "properties": {"x": "y" * 2000}}),
                    path="/e", max_message_bytes=1024)
    assert (error.status, error.code) == (413, "payload_too_large")


def test_build_messages_keeps_order_and_keys():
    ctx = RequestContext(token="phc_test", now_us=NOW, sent_at_us=None, ip="1.2.3.4")
    messages = build_messages([{"event": "e", "distinct_id": f"d{i}"} for i in range(5)], ctx, 1_000_000)
    assert [key for key, _ in messages] == [f"phc_test:d{i}".encode() for i in range(5)]
    assert build_message({"event": "e", "distinct_id": "x"}, ctx, "now", None)[0] == b"phc_test:x"


def test_error_body_is_json_with_status_code_and_error():
    error = refused(b'{"event": "e", "distinct_id": "d"}', path="/e")
    assert orjson.loads(error.body()) == {"status": 401, "code": "ingest_key_required",
                                          "error": "event submitted without an api_key"}


# -- CORS -----------------------------------------------------------------------------------------
def test_cors_mirrors_origin_with_credentials():
    headers = dict(cors_headers("https://app.example", None, preflight=False))
    assert headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert "Access-Control-Allow-Methods" not in headers


def test_cors_preflight_allows_methods_and_mirrors_requested_headers():
    headers = dict(cors_headers("https://app.example", "content-type, x-funky", preflight=True))
    assert headers["Access-Control-Allow-Methods"] == "GET,POST,OPTIONS"
    assert headers["Access-Control-Allow-Headers"] == "content-type, x-funky"


def test_no_origin_no_allow_origin():
    headers = dict(cors_headers(None, None, preflight=False))
    assert "Access-Control-Allow-Origin" not in headers and "Vary" in headers


# -- the HTTP head parser -------------------------------------------------------------------------
def test_parse_head_splits_path_query_and_lowercases_headers():
    method, path, query, version, headers = parse_head(
        b"POST /e/?ip=1&_=5 HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nX-A: 1\r\nx-a: 2")
    assert (method, path, query, version) == ("POST", "/e/", "ip=1&_=5", "HTTP/1.1")
    assert headers == {"host": "x", "content-type": "text/plain", "x-a": "1, 2"}


@pytest.mark.parametrize("head", [b"GARBAGE", b"GET /e HTTP/2.0", b"GET e HTTP/1.1", b"GET /e HTTP/1.1\r\nNoColon"])
def test_malformed_heads_are_400(head):
    with pytest.raises(HttpError) as info:
        parse_head(head)
    assert info.value.status == 400


def test_render_has_length_and_no_body_for_204():
    assert render(Response(200, b"{}"), [("Vary", "origin")], close=True) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nVary: origin\r\n"
        b"Connection: close\r\n\r\n{}")
    assert render(Response(204), [], close=False) == b"HTTP/1.1 204 No Content\r\n\r\n"
