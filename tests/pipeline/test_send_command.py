"""``headwater send``: JSON Lines from a file or stdin onto events_raw, run as a subprocess against
the embedded broker. Bad lines are reported with their numbers and counted, the good ones are
read back from events_raw, and the exit status says whether everything went. The first tests
check the line rules alone (no broker)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import uuid
from datetime import datetime, timezone

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from headwater.kafka_admin import ensure_topics
from headwater.settings import Settings
from headwater.topics import TopicNames
from producers.backend import EventsProducer
from producers.send import BadLine, event_from_line, read_lines, send_lines
from tests.conftest import ROOT, wait_until
from tests.unit.test_backend_client import MemoryProducer

TOKEN = "phc_test"
TEAMS = {"phc_test": 7, "phc_other": 8}
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def line(**doc) -> bytes:
    return orjson.dumps(doc)


# -- the line rules -----------------------------------------------------------------------------------
def test_a_line_becomes_its_envelope_keyed_token_distinct_id():
    given = str(uuid.uuid4())
    message = event_from_line(
        line(token=TOKEN, distinct_id="u1", event="signed_up", uuid=given.upper(), timestamp="2024-05-01T14:00:00+02:00",
             properties={"plan": "pro"}, **{"$set": {"email": "a@b.c"}}, ip="10.0.0.1", custom="kept"),
        teams=TEAMS, default_token=None, now=NOW, max_message_bytes=100_000)
    assert message.key == b"phc_test:u1" and message.uuid == given
    assert orjson.loads(message.value) == {
        "token": TOKEN, "distinct_id": "u1", "event": "signed_up", "uuid": given,
        "timestamp": "2024-05-01T12:00:00+00:00", "properties": {"plan": "pro"}, "$set": {"email": "a@b.c"},
        "ip": "10.0.0.1", "custom": "kept", "now": "2024-05-01T12:00:00+00:00",
    }


def test_a_minimal_line_gets_the_default_token_a_uuid7_and_now():
    message = event_from_line(line(distinct_id="u1", event="e", timestamp="2024-05-01T08:00:00"),
                              teams=TEAMS, default_token="phc_other", now=NOW, max_message_bytes=100_000)
    envelope = orjson.loads(message.value)
    assert message.key == b"phc_other:u1" and envelope["token"] == "phc_other"
    assert uuid.UUID(envelope["uuid"]).version == 7
    assert envelope["timestamp"] == "2024-05-01T08:00:00+00:00"  # naive is UTC
    assert envelope["now"] == "2024-05-01T12:00:00+00:00" and envelope["properties"] == {}


BAD_LINES = [
    ("not json", b"{nope", "invalid JSON"),
    ("not an object", b"[1, 2]", "not a JSON object but list"),
    ("no token", line(distinct_id="u", event="e"), "no token"),
    ("unknown token", line(token="phc_nope", distinct_id="u", event="e"), "unknown token 'phc_nope'"),
    ("numeric distinct_id", line(token=TOKEN, distinct_id=42, event="e"), "distinct_id must be a str, got int"),
    ("no event", line(token=TOKEN, distinct_id="u"), "event must be a str, got NoneType"),
    ("bad uuid", line(token=TOKEN, distinct_id="u", event="e", uuid="nope"), "'nope' is not a valid UUID"),
    ("epoch timestamp", line(token=TOKEN, distinct_id="u", event="e", timestamp=1714564800),
     "timestamp must be an ISO 8601 string, got int"),
    ("bad timestamp", line(token=TOKEN, distinct_id="u", event="e", timestamp="yesterday"), "not an ISO 8601"),
    ("properties list", line(token=TOKEN, distinct_id="u", event="e", properties=[1]),
     "properties must be a JSON object, got list"),
    ("$set string", line(token=TOKEN, distinct_id="u", event="e", **{"$set": "x"}), "$set must be a JSON object"),
    ("too big", line(token=TOKEN, distinct_id="u", event="e", properties={"blob": "x" * 2000}),
     "the limit is 1024"),
    ("invalid utf-8", b'{"token": "phc_test", "distinct_id": "\xff", "event": "e"}', "invalid JSON"),
]


@pytest.mark.parametrize(("raw", "reason"), [(r, why) for _, r, why in BAD_LINES], ids=[n for n, _, _ in BAD_LINES])
def test_a_bad_line_says_why(raw: bytes, reason: str):
    with pytest.raises(BadLine) as bad:
        event_from_line(raw, teams=TEAMS, default_token=None, now=NOW, max_message_bytes=1024)
    assert reason in str(bad.value)


@pytest.mark.parametrize("data", [b"", b"a", b"a\n", b"a\nb", b"a\n\nb\n", b"x" * 200_000 + b"\ny\n" + b"z" * 70_000],
                         ids=["empty", "no-newline", "one", "last-unterminated", "blank-inside", "longer-than-a-read"])
def test_read_lines_splits_at_newlines_across_reads(tmp_path, data: bytes):
    path = tmp_path / "lines"
    path.write_bytes(data)
    with open(path, "rb") as stream:
        assert list(read_lines(stream)) == data.split(b"\n")[:-1 if data.endswith(b"\n") or not data else None]


def test_send_lines_reports_failed_deliveries_with_their_line_numbers():
    timed_out = KafkaError(KafkaError._MSG_TIMED_OUT)
    producer = EventsProducer(bootstrap="unused", topic="events_raw",
                              producer=MemoryProducer(fail=lambda value: timed_out if b"doomed" in value else None))
    lines = [line(token=TOKEN, distinct_id="u", event=name) for name in ("fine", "doomed", "fine")]
    err = io.StringIO()
    summary = send_lines([*lines, b"{bad"], producer, teams=TEAMS, default_token=None, max_message_bytes=10_000,
                         err=err, close_timeout_s=5)
    assert (summary.sent, summary.failed, summary.bad_lines, summary.exit_code) == (2, 1, 1, 1)
    assert str(summary) == "sent 2, failed 1, bad lines 1"
    failed, bad = sorted(err.getvalue().splitlines())
    assert failed == "line 2: delivery failed: Local: Message timed out"
    assert bad.startswith("line 4: invalid JSON: ")
    assert producer.closed


# -- the command against the embedded broker -------------------------------------------------------------
@pytest.fixture
def send_env(kafka_bootstrap: str) -> dict[str, str]:
    env = {
        "HEADWATER_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "HEADWATER_TOPIC_PREFIX": f"send{uuid.uuid4().hex[:10]}_",
        "HEADWATER_TEAMS": "phc_test:7,phc_other:8",
    }
    ensure_topics(Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=env["HEADWATER_TOPIC_PREFIX"]))
    return env


def headwater_send(env: dict[str, str], *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "headwater.cli", "send", *args], input=stdin, capture_output=True,
                          env={**os.environ, **env}, cwd=ROOT, timeout=120)


def read_events_raw(env: dict[str, str], count: int) -> list:
    """The messages of events_raw once ``count`` are there, and nothing more after a short wait."""
    settings = Settings(kafka_bootstrap=env["HEADWATER_KAFKA_BOOTSTRAP"], topic_prefix=env["HEADWATER_TOPIC_PREFIX"])
    topic = TopicNames(settings.topic_prefix).events_raw
    consumer = Consumer(settings.consumer_config(f"reader-{uuid.uuid4()}"))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
    found: list = []

    def more() -> bool:
        found.extend(m for m in consumer.consume(1000, 0.2) if not m.error())
        return len(found) >= count

    try:
        wait_until(more, 30, message=f"{count} messages on {topic}")
        extra = [m for m in consumer.consume(1000, 1.0) if not m.error()]
        assert extra == [], "more messages on events_raw than were sent"
    finally:
        consumer.close()
    return found


@pytest.mark.pipeline
def test_send_a_file_with_bad_lines_reports_each_and_sends_the_good_ones(send_env, tmp_path):
    good_uuid = str(uuid.uuid4())
    lines = [
        line(token=TOKEN, distinct_id="user-1", event="signed_up", uuid=good_uuid, properties={"plan": "pro"}),
        b"{not json",
        b"",  # blank: skipped, not an event
        line(token=TOKEN, distinct_id="user-2", event="$identify", **{"$set": {"email": "b@example.com"}},
             properties={"$anon_distinct_id": "anon-2"}),
        line(token="phc_nope", distinct_id="user-3", event="e"),
        line(token=TOKEN, event="no distinct id"),
        line(token="phc_other", distinct_id="user-1", event="other_team", timestamp="2024-05-01T10:00:00+02:00"),
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = headwater_send(send_env, str(path))
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert result.stdout.decode().strip() == "sent 3, failed 0, bad lines 3"
    assert "line 2: invalid JSON" in stderr
    assert "line 5: unknown token 'phc_nope'" in stderr
    assert "line 6: distinct_id must be a str, got NoneType" in stderr
    assert "line 1:" not in stderr and "line 4:" not in stderr and "line 7:" not in stderr

    messages = read_events_raw(send_env, 3)
    by_event = {orjson.loads(m.value())["event"]: (m.key(), orjson.loads(m.value())) for m in messages}
    assert set(by_event) == {"signed_up", "$identify", "other_team"}
    assert by_event["signed_up"][0] == b"phc_test:user-1" and by_event["signed_up"][1]["uuid"] == good_uuid
    assert by_event["signed_up"][1]["properties"] == {"plan": "pro"}
    assert by_event["$identify"][1]["$set"] == {"email": "b@example.com"}
    assert by_event["other_team"][0] == b"phc_other:user-1"
    assert by_event["other_team"][1]["timestamp"] == "2024-05-01T08:00:00+00:00"
    assert uuid.UUID(by_event["other_team"][1]["uuid"]).version == 7


@pytest.mark.pipeline
@pytest.mark.parametrize("args", [("-",), ()], ids=["dash", "no-file"])
def test_send_reads_stdin_with_a_default_token(send_env, args):
    stdin = b"\n".join(line(distinct_id=f"user-{i}", event="clicked", properties={"i": i}) for i in range(25)) + b"\n"
    result = headwater_send(send_env, *args, "--token", TOKEN, stdin=stdin)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "sent 25, failed 0, bad lines 0"
    assert result.stderr.decode() == ""
    messages = read_events_raw(send_env, 25)
    assert sorted(m.key() for m in messages) == sorted(f"{TOKEN}:user-{i}".encode() for i in range(25))
    assert sorted(orjson.loads(m.value())["properties"]["i"] for m in messages) == list(range(25))


@pytest.mark.pipeline
def test_send_fails_clearly_when_events_raw_does_not_exist(kafka_bootstrap):
    env = {"HEADWATER_KAFKA_BOOTSTRAP": kafka_bootstrap, "HEADWATER_TOPIC_PREFIX": f"absent{uuid.uuid4().hex[:8]}_",
           "HEADWATER_TEAMS": "phc_test:7"}
    result = headwater_send(env, "-", stdin=line(token=TOKEN, distinct_id="u", event="e"))
    assert result.returncode == 1
    assert f"topic {env['HEADWATER_TOPIC_PREFIX']}events_raw does not exist" in result.stderr.decode()


@pytest.mark.pipeline
def test_send_refuses_an_unknown_default_token_and_a_missing_file(send_env, tmp_path):
    unknown = headwater_send(send_env, "--token", "phc_nope", stdin=b"")
    assert unknown.returncode == 2 and "--token 'phc_nope' is not in HEADWATER_TEAMS" in unknown.stderr.decode()
    missing = headwater_send(send_env, str(tmp_path / "absent.jsonl"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr.decode()


@pytest.mark.pipeline
def test_ctrl_c_stops_reading_sends_what_was_read_and_exits_1(send_env):
    process = subprocess.Popen([sys.executable, "-m", "headwater.cli", "send", "--token", TOKEN],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, **send_env}, cwd=ROOT)
    try:
        process.stdin.write(b"".join(line(distinct_id=f"user-{i}", event="typed") + b"\n" for i in range(3)))
        process.stdin.flush()  # stdin stays open: the command waits for more
        read_events_raw(send_env, 3)  # it has read and sent the three lines
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr.decode()
    assert stdout.decode().strip() == "sent 3, failed 0, bad lines 0"
    assert "interrupted after line 3" in stderr.decode()
