"""The capture HTTP endpoint against the real embedded broker: every path with and without its
trailing slash, the encodings, PostHog's status codes with JSON bodies, CORS, health, HTTP
framing, 503 when Kafka cannot take the events, and one run through the whole pipeline into
ClickHouse (``headwater capture`` as a process)."""

from __future__ import annotations

import gzip
import http.client
import itertools
import socket
import time
import uuid
from base64 import b64encode
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from headwater.kafka_admin import ensure_topics
from headwater.settings import Settings
from headwater.topics import TopicNames
from headwater.wire import PERSON_NAMESPACE
from producers.backend import Client
from producers.capture import CaptureThread
from tests.conftest import free_port, stop_process, wait_until

pytestmark = pytest.mark.pipeline

TOKEN = "phc_test"
_run = itertools.count()


@pytest.fixture(scope="module")
def capture_settings(kafka_bootstrap: str) -> Settings:
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=f"cap{int(time.time())}_", teams="phc_test:7,phc_other:8",
                        max_message_bytes=100_000)
    ensure_topics(settings)
    return settings


@pytest.fixture(scope="module")
def capture(capture_settings: Settings) -> Iterator[tuple[str, int]]:
    server = CaptureThread(capture_settings, delivery_timeout_s=10)
    address = server.start()
    try:
        yield address
    finally:
        server.stop()


class Answer:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status, self.body, self.headers = status, body, headers

    def json(self):
        return orjson.loads(self.body)


def call(address: tuple[str, int], method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> Answer:
    connection = http.client.HTTPConnection(*address, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, response.read(), {k.lower(): v for k, v in response.getheaders()})
    finally:
        connection.close()


def post(address, path: str, doc, headers: dict[str, str] | None = None) -> Answer:
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return call(address, "POST", path, body, {"Content-Type": "application/json", **(headers or {})})


def read_raw(settings: Settings, wanted: Callable[[dict], bool], count: int, timeout: float = 30) -> list:
    """Messages of events_raw whose envelope ``wanted`` accepts, once ``count`` are there."""
    topic = TopicNames(settings.topic_prefix).events_raw
    consumer = Consumer(settings.consumer_config(f"reader-{uuid.uuid4()}"))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
    found: list = []

    def more() -> bool:
        for message in consumer.consume(1000, 0.2):
            if not message.error() and wanted(orjson.loads(message.value())):
                found.append(message)
        return len(found) >= count

    try:
        wait_until(more, timeout, message=f"{count} messages on {topic}")
        time.sleep(0.2)
        more()  # nothing more than expected
    finally:
        consumer.close()
    return found


def marker() -> str:
    return f"run-{next(_run)}-{uuid.uuid4().hex[:8]}"


PATHS = ["/e", "/e/", "/i/v0/e", "/i/v0/e/", "/capture", "/capture/", "/batch", "/batch/", "/track", "/track/",
         "/engage", "/engage/"]


def test_every_capture_path_with_and_without_slash_accepts_and_produces(capture, capture_settings):
    run = marker()
    for path in PATHS:
        answer = post(capture, path, {"api_key": TOKEN, "event": "path_checked", "distinct_id": f"{run}{path}",
                                      "properties": {"run": run}})
        assert (answer.status, answer.json()) == (200, {"status": "Ok"}), path
        assert answer.headers["content-type"] == "application/json"
    messages = read_raw(capture_settings, lambda env: env["properties"].get("run") == run, len(PATHS))
    assert sorted(m.key().decode() for m in messages) == sorted(f"{TOKEN}:{run}{path}" for path in PATHS)
    envelope = orjson.loads(messages[0].value())
    assert envelope["token"] == TOKEN and envelope["event"] == "path_checked"
    assert uuid.UUID(envelope["uuid"]).version == 7 and envelope["ip"] == "127.0.0.1"


def test_sdk_encodings_gzip_form_base64_get_and_beacon(capture, capture_settings):
    run = marker()
    sent_at_ms = int(time.time() * 1000) + 3_600_000  # the client's clock is 1 h ahead

    def events(n: str) -> bytes:  # posthog-js: an array, token and distinct_id inside properties
        return orjson.dumps([{"event": "encoded", "properties": {"token": TOKEN, "distinct_id": f"{run}-{n}", "run": run},
                              "timestamp": "2026-01-01T11:00:00Z"}])

    answers = [
        call(capture, "POST", f"/e/?compression=gzip-js&_={sent_at_ms}", gzip.compress(events("gzip")), {"Content-Type": "text/plain"}),
        call(capture, "POST", "/i/v0/e/", gzip.compress(events("gzip-no-hint"))),
        call(capture, "POST", "/e/", ("data=" + quote(b64encode(events("form-b64")).decode()) + "&compression=base64").encode(),
             {"Content-Type": "application/x-www-form-urlencoded"}),
        call(capture, "POST", "/capture/", ("data=" + quote(events("form-json").decode())).encode(),
             {"Content-Type": "application/x-www-form-urlencoded"}),
        call(capture, "GET", "/e/?data=" + quote(b64encode(events("get")).decode()) + "&compression=base64"),
    ]
    assert [a.status for a in answers] == [200] * 5
    beacon = call(capture, "POST", "/e/?beacon=1", events("beacon"), {"Content-Type": "text/plain"})
    assert (beacon.status, beacon.body) == (204, b"")
    messages = read_raw(capture_settings, lambda env: env["properties"].get("run") == run, 6)
    by_did = {orjson.loads(m.value())["distinct_id"]: orjson.loads(m.value()) for m in messages}
    assert set(by_did) == {f"{run}-{n}" for n in ("gzip", "gzip-no-hint", "form-b64", "form-json", "get", "beacon")}
    # the query's `_` (sent_at in ms) corrected the first event's 1 h clock skew
    corrected = datetime.fromisoformat(by_did[f"{run}-gzip"]["timestamp"])
    assert abs((corrected - datetime.fromisoformat("2026-01-01T10:00:00+00:00")).total_seconds()) < 10
    assert by_did[f"{run}-gzip-no-hint"]["timestamp"] == "2026-01-01T11:00:00+00:00"


def test_capture_and_backend_client_put_a_distinct_id_on_the_same_partition(capture, capture_settings):
    run = marker()
    dids = [f"{run}-{i}" for i in range(20)]
    assert post(capture, "/batch", {"api_key": TOKEN, "batch": [{"event": "via_capture", "distinct_id": d,
                                                                  "properties": {"run": run}} for d in dids]}).status == 200
    client = Client.from_settings(capture_settings, TOKEN)
    for d in dids:
        client.capture(d, "via_backend", {"run": run})
    assert client.flush() == 0
    client.close()
    messages = read_raw(capture_settings, lambda env: env["properties"].get("run") == run, 40)
    partitions: dict[str, set[int]] = {}
    for message in messages:
        partitions.setdefault(message.key().decode(), set()).add(message.partition())
    assert len(partitions) == 20 and all(len(p) == 1 for p in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) > 1  # keys spread over partitions


def test_a_batch_is_acknowledged_whole_and_in_order(capture, capture_settings):
    run = marker()
    batch = [{"event": "ordered", "distinct_id": f"{run}-one", "uuid": str(uuid.uuid4()), "properties": {"run": run, "i": i}}
             for i in range(500)]
    answer = post(capture, "/batch/", {"api_key": TOKEN, "batch": batch, "sent_at": "2023-01-01T12:00:00Z"})
    assert answer.status == 200
    messages = read_raw(capture_settings, lambda env: env["properties"].get("run") == run, 500)
    assert [orjson.loads(m.value())["properties"]["i"] for m in messages] == list(range(500))  # one key, one partition
    assert {orjson.loads(m.value())["uuid"] for m in messages} == {e["uuid"] for e in batch}


@pytest.mark.parametrize("gzip_body", [False, True], ids=["json", "gzip"])
def test_the_official_posthog_python_sdk_works_unchanged(capture, capture_settings, gzip_body):
    posthog = pytest.importorskip("posthog")
    run = marker()
    errors: list = []
    client = posthog.Posthog(TOKEN, host=f"http://{capture[0]}:{capture[1]}", gzip=gzip_body, on_error=lambda e, _: errors.append(e),
                             flush_at=50, disable_geoip=True, enable_local_evaluation=False)
    sent = [client.capture("sdk_event", distinct_id=f"{run}-{i % 3}", properties={"run": run, "i": i},
                           groups={"company": "acme"}) for i in range(120)]
    sent.append(client.set(distinct_id=f"{run}-0", properties={"run": run, "plan": "pro"}))
    sent.append(client.group_identify("company", "acme", properties={"run": run, "name": "Acme"}))
    client.flush()
    client.shutdown()
    assert errors == []
    messages = read_raw(capture_settings, lambda env: run in orjson.dumps(env).decode(), 122)
    envelopes = [orjson.loads(m.value()) for m in messages]
    set_event = next(e for e in envelopes if e["event"] == "$set")
    assert set_event["$set"] == {"run": run, "plan": "pro"}  # top-level $set, merged by the identity stage
    assert {e["uuid"] for e in envelopes} == {str(u) for u in sent}  # the SDK's uuids are kept
    events = {e["event"] for e in envelopes}
    assert events == {"sdk_event", "$set", "$groupidentify"}
    first = next(e for e in envelopes if e["event"] == "sdk_event")
    assert first["properties"]["$lib"] == "posthog-python" and first["properties"]["$groups"] == {"company": "acme"}
    assert first["sent_at"]  # the batch's sent_at was read
    age = datetime.now(timezone.utc) - datetime.fromisoformat(first["timestamp"])
    assert timedelta(0) <= age < timedelta(seconds=60)  # same clock: the skew correction changed next to nothing


BAD_REQUESTS = [
    ("no token", "/e", {"event": "e", "distinct_id": "d"}, 401, "ingest_key_required"),
    ("unknown token", "/e", {"token": "phc_stranger", "event": "e", "distinct_id": "d"}, 401, "unknown_token"),
    ("personal key", "/batch", {"api_key": "phx_secret", "batch": [{"event": "e", "distinct_id": "d"}]}, 401, "invalid_token"),
    ("two tokens", "/e", [{"token": TOKEN, "event": "e", "distinct_id": "d"}, {"token": "phc_other", "event": "e", "distinct_id": "d"}],
     401, "multiple_tokens"),
    ("malformed json", "/e", b'{"token": "phc_test", "event": ', 400, "invalid_json"),
    ("empty body", "/e", b"", 400, "empty_payload"),
    ("empty batch", "/batch", {"api_key": TOKEN, "batch": []}, 400, "empty_batch"),
    ("no distinct_id", "/e", {"token": TOKEN, "event": "e"}, 400, "missing_distinct_id"),
    ("blank distinct_id", "/e", {"token": TOKEN, "event": "e", "distinct_id": "   "}, 400, "missing_distinct_id"),
    ("empty event", "/e", {"token": TOKEN, "event": "", "distinct_id": "d"}, 400, "missing_event_name"),
    ("bad uuid", "/e", {"token": TOKEN, "event": "e", "distinct_id": "d", "uuid": "nope"}, 400, "invalid_uuid"),
    ("bad cookieless", "/e", {"token": TOKEN, "event": "e", "distinct_id": "d", "properties": {"$cookieless_mode": 1}},
     400, "invalid_cookieless_mode"),
    ("broken gzip", "/e", b"\x1f\x8b\x08\x00broken", 400, "invalid_payload"),
    ("event over the message size", "/e", {"token": TOKEN, "event": "e", "distinct_id": "d", "properties": {"x": "y" * 200_000}},
     413, "payload_too_large"),
    ("gzip bomb", "/e", gzip.compress(b"[" + b" " * (3 * 1024 * 1024) + b"]"), 413, "payload_too_large"),
]


@pytest.mark.parametrize(("name", "path", "doc", "status", "code"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_posthog_status_codes_with_json_bodies(capture, name, path, doc, status, code):
    answer = post(capture, path, doc, {"Origin": "https://app.example"})
    assert answer.status == status
    body = answer.json()
    assert (body["status"], body["code"]) == (status, code) and body["error"]
    assert answer.headers["access-control-allow-origin"] == "https://app.example"  # the browser may read the error


def test_bad_batch_produces_nothing(capture, capture_settings):
    run = marker()
    bad = {"api_key": TOKEN, "batch": [{"event": "fine", "distinct_id": "d", "properties": {"run": run}}, {"event": "no id"}]}
    assert post(capture, "/batch", bad).status == 400
    good = {"api_key": TOKEN, "batch": [{"event": "after", "distinct_id": "d", "properties": {"run": run}}]}
    assert post(capture, "/batch", good).status == 200
    [message] = read_raw(capture_settings, lambda env: env["properties"].get("run") == run, 1)
    assert orjson.loads(message.value())["event"] == "after"


def test_body_over_the_path_limit_is_413_before_it_is_sent(capture):
    with socket.create_connection(capture, timeout=10) as sock:
        sock.sendall(b"POST /e/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 3000000\r\n\r\n")
        answer = sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in head
    assert orjson.loads(body)["code"] == "payload_too_large"
    # /batch takes 20 MB
    with socket.create_connection(capture, timeout=10) as sock:
        sock.sendall(b"POST /batch/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")


def test_unknown_paths_and_methods(capture):
    missing = call(capture, "GET", "/s/")
    assert (missing.status, missing.json()["code"]) == (404, "not_found")
    wrong = call(capture, "PUT", "/batch", b"{}")
    assert (wrong.status, wrong.json()["code"]) == (405, "method_not_allowed")


def test_cors_preflight_mirrors_origin_and_headers(capture):
    answer = call(capture, "OPTIONS", "/e/", headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "content-type,x-custom"})
    assert answer.status == 200
    assert answer.headers["access-control-allow-origin"] == "https://shop.example"
    assert answer.headers["access-control-allow-credentials"] == "true"
    assert answer.headers["access-control-allow-methods"] == "GET,POST,OPTIONS"
    assert answer.headers["access-control-allow-headers"] == "content-type,x-custom"
    simple = post(capture, "/batch", {"api_key": TOKEN, "batch": [{"event": "e", "distinct_id": "cors"}]},
                  {"Origin": "https://shop.example"})
    assert simple.headers["access-control-allow-origin"] == "https://shop.example"


def test_health_endpoints(capture):
    for path in ("/", "/_readiness"):
        answer = call(capture, "GET", path)
        assert (answer.status, answer.body) == (200, b"capture")
    assert call(capture, "GET", "/_liveness").status == 200
    head = call(capture, "HEAD", "/_readiness")
    assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "7")


def test_keep_alive_chunked_bodies_and_expect_continue(capture, capture_settings):
    run = marker()
    body = orjson.dumps({"api_key": TOKEN, "batch": [{"event": "framed", "distinct_id": run, "properties": {"run": run}}]})
    with socket.create_connection(capture, timeout=10) as sock:
        stream = sock.makefile("rb")
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
        sock.sendall(b"POST /batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        assert stream.readline().startswith(b"HTTP/1.1 200")
        length = _skip_head(stream)
        assert stream.read(length) == b'{"status":"Ok"}'
        sock.sendall(b"POST /batch HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert stream.readline().startswith(b"HTTP/1.1 100")
        assert stream.readline() == b"\r\n"
        sock.sendall(body)
        assert stream.readline().startswith(b"HTTP/1.1 200")
        stream.read(_skip_head(stream))
    assert len(read_raw(capture_settings, lambda env: env["properties"].get("run") == run, 2)) == 2


def _skip_head(stream) -> int:
    length = 0
    while (line := stream.readline()) != b"\r\n":
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return length


def test_503_when_kafka_is_unreachable(kafka_bootstrap):
    closed = f"127.0.0.1:{free_port()}"
    settings = Settings(kafka_bootstrap=closed, topic_prefix="nowhere_", teams="phc_test:7")
    server = CaptureThread(settings, delivery_timeout_s=1.0)
    address = server.start()
    try:
        started = time.monotonic()
        answer = post(address, "/batch", {"api_key": TOKEN, "batch": [{"event": "e", "distinct_id": "d"}]})
        assert (answer.status, answer.json()["code"]) == (503, "kafka_unavailable")
        assert time.monotonic() - started < 8
        assert call(address, "GET", "/_liveness").status == 503
        assert call(address, "GET", "/_readiness").status == 200
    finally:
        server.stop()


def test_503_when_events_raw_does_not_exist_and_capture_does_not_create_it(kafka_bootstrap):
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=f"missing{uuid.uuid4().hex[:6]}_", teams="phc_test:7")
    server = CaptureThread(settings, delivery_timeout_s=1.0)
    address = server.start()
    try:
        answer = post(address, "/e", {"token": TOKEN, "event": "e", "distinct_id": "d"})
        assert (answer.status, answer.json()["code"]) == (503, "kafka_unavailable")
        assert call(address, "GET", "/_liveness").status == 503
    finally:
        server.stop()
    lister = Consumer(settings.consumer_config("lister"))
    try:
        assert TopicNames(settings.topic_prefix).events_raw not in lister.list_topics(timeout=10).topics
    finally:
        lister.close()


# -- the whole pipeline ---------------------------------------------------------------------------
def test_events_posted_to_batch_land_in_clickhouse_with_their_persons(settings, test_env, pipeline, clickhouse):
    port = free_port()
    pipeline.env["HEADWATER_CAPTURE_ADDR"] = f"127.0.0.1:{port}"
    process = pipeline.start("capture", "capture")

    def listening() -> bool:
        try:
            return call(("127.0.0.1", port), "GET", "/_readiness").status == 200
        except OSError:
            return process.poll() is not None

    wait_until(listening, 30, message="capture listening")
    assert process.poll() is None, pipeline.log("capture")

    users = ["ada", "grace", 1234]  # a number is stringified, as PostHog does
    batch = [{"event": "$pageview", "distinct_id": user, "uuid": str(uuid.uuid4()), "timestamp": "2026-03-01T10:00:00Z",
              "properties": {"$current_url": f"https://example.com/{i}", "$lib": "posthog-python"}}
             for i, user in enumerate(users * 10)]
    # the client's clock is 1 h ahead: every timestamp lands 1 h earlier
    answer = post(("127.0.0.1", port), "/batch/", {"api_key": TOKEN, "sent_at": _iso_in(3600), "batch": batch})
    assert (answer.status, answer.json()) == (200, {"status": "Ok"})

    db = settings.clickhouse.database
    wait_until(lambda: clickhouse.query(f"SELECT count() FROM {db}.events").result_rows[0][0] >= 30, 90, message="30 rows")
    rows = clickhouse.query(f"SELECT uuid, team_id, distinct_id, person_id, timestamp FROM {db}.events").result_rows
    assert len(rows) == 30
    assert {str(r[0]) for r in rows} == {e["uuid"] for e in batch}
    assert {r[2] for r in rows} == {"ada", "grace", "1234"}
    for _, team_id, distinct_id, person_id, timestamp in rows:
        assert team_id == 7
        assert person_id == uuid.uuid5(PERSON_NAMESPACE, f"7:{distinct_id}")
        skew = timestamp.replace(tzinfo=None) - _naive("2026-03-01T09:00:00")
        assert abs(skew.total_seconds()) < 30  # 10:00 minus the 1 h skew, give or take the request's time

    stop_process(process)
    assert process.returncode == 0, pipeline.log("capture")


def _iso_in(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


def _naive(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_a_full_producer_queue_is_waited_out_in_order(capture_settings):
    """More messages than librdkafka's queue holds: the tail is queued again once there is room,
    and the request is acknowledged whole, each key's order kept."""
    import asyncio

    from producers.capture.kafka import AckingProducer

    run = marker()
    producer = AckingProducer({**capture_settings.kafka_config(), "queue.buffering.max.messages": 50}, delivery_timeout_s=10)
    topic = TopicNames(capture_settings.topic_prefix).events_raw
    messages = [(f"{TOKEN}:{run}-{i % 3}".encode(), orjson.dumps({"properties": {"run": run, "i": i}})) for i in range(400)]
    calls = []

    class Counting:  # the real producer, with its produce_batch calls counted
        def __init__(self, inner):
            self.inner = inner

        def produce_batch(self, *args, **kwargs):
            calls.append(len(args[1]))
            return self.inner.produce_batch(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    producer._producer = Counting(producer._producer)
    try:
        asyncio.run(producer.send(topic, messages))
    finally:
        assert producer.close() == 0
    assert len(calls) > 1 and calls[0] == 400  # the queue was full at least once
    found = read_raw(capture_settings, lambda env: env.get("properties", {}).get("run") == run, 400)
    for key in {k for k, _ in messages}:
        order = [orjson.loads(m.value())["properties"]["i"] for m in found if m.key() == key]
        assert order == sorted(order) and len(order) in (133, 134)
