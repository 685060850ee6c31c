"""``headwater send``: events from JSON Lines (a file or stdin) onto ``events_raw``.

Each non-blank line is one event envelope as on ``events_raw`` (``headwater/schema/
events_raw.schema.json``): ``token`` (or ``--token``), ``distinct_id``, ``event``, and optionally
``uuid``, ``timestamp``, ``properties``, ``$set``, ``$set_once``, ``now``, ``sent_at``, ``ip`` and
any other field (kept as it is). The line is checked with the backend client's checks, then
sent keyed ``token:distinct_id``:
- a missing ``uuid`` gets a UUIDv7 (give one to make sending the file again harmless);
- ``timestamp`` and ``now`` are written as UTC ISO 8601 (naive text is UTC), ``now`` and a
  missing ``timestamp`` being the time the line was read.

A bad line is reported on stderr with its number and counted; a failed delivery likewise. The
summary goes to stdout: ``sent N, failed N, bad lines N``. Exit status 0 when every line was
acknowledged by Kafka, 1 otherwise (also after Ctrl-C, which stops reading but still sends and
counts what was read), 2 for a usage error.
"""

from __future__ import annotations

import os
import select
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any

import orjson
from confluent_kafka import KafkaError, KafkaException

from headwater.ids import uuid7
from headwater.settings import Settings
from headwater.topics import EVENTS_RAW

from .backend import (
    DeliveryReport,
    EventsProducer,
    InvalidCall,
    OutgoingEvent,
    check_distinct_id,
    check_event,
    check_uuid,
    encode_event,
    iso_utc,
)


class BadLine(Exception):
    """A line that is not an event headwater can send; the message says why."""


def _iso_field(doc: Mapping[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadLine(f"{name} must be an ISO 8601 string, got {type(value).__name__} {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadLine(f"{name} {value[:60]!r} is not an ISO 8601 date-time") from None
    return iso_utc(parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc))


def _object_field(doc: Mapping[str, Any], name: str) -> None:
    value = doc.get(name)
    if value is not None and not isinstance(value, dict):
        raise BadLine(f"{name} must be a JSON object, got {type(value).__name__}")


def event_from_line(line: bytes, *, teams: Mapping[str, int], default_token: str | None, now: datetime,
                    max_message_bytes: int) -> OutgoingEvent:
    """One JSON line → its ``events_raw`` message, or ``BadLine``. Pure (time is ``now``)."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise BadLine(f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadLine(f"not a JSON object but {type(doc).__name__}")
    token = doc.get("token") or doc.get("api_key") or doc.get("$token") or default_token
    if token is None:
        raise BadLine("no token (give the line a token or use --token)")
    if not isinstance(token, str):
        raise BadLine(f"token must be a string, got {type(token).__name__}")
    if token not in teams:
        raise BadLine(f"unknown token {token[:64]!r} (not in HEADWATER_TEAMS)")
    try:
        distinct_id = check_distinct_id(doc.get("distinct_id"))
        event = check_event(doc.get("event"))
        raw_uuid = doc.get("uuid")
        event_uuid = check_uuid(raw_uuid) if raw_uuid not in (None, "") else str(uuid7(int(now.timestamp() * 1000)))
    except InvalidCall as exc:
        raise BadLine(str(exc)) from None
    for name in ("properties", "$set", "$set_once"):
        _object_field(doc, name)
    if doc.get("ip") is not None and not isinstance(doc["ip"], str):
        raise BadLine(f"ip must be a string, got {type(doc['ip']).__name__}")
    sent_at = _iso_field(doc, "sent_at")
    envelope = {
        **doc,
        "token": token,
        "distinct_id": distinct_id,
        "event": event,
        "uuid": event_uuid,
        "timestamp": _iso_field(doc, "timestamp") or iso_utc(now),
        "properties": doc.get("properties") or {},
        "now": _iso_field(doc, "now") or iso_utc(now),
    }
    if sent_at is not None:
        envelope["sent_at"] = sent_at
    message = encode_event(token, distinct_id, event, envelope)
    size = len(message.key) + len(message.value)
    if size > max_message_bytes:
        raise BadLine(f"the event is {size} bytes; the limit is {max_message_bytes} (HEADWATER_MAX_MESSAGE_BYTES)")
    return message


def read_lines(stream: IO[bytes], wake_s: float = 0.2) -> Iterator[bytes]:
    """The lines of ``stream`` (without their newline). The reads wait in ``select`` for at most
    ``wake_s`` at a time: a thread blocked in one long ``read`` was seen not to receive Ctrl-C
    once librdkafka was connected (the signal stayed pending until the read returned)."""
    fd = stream.fileno()
    parts: list[bytes] = []  # pieces of the line being read
    while True:
        if not select.select([fd], [], [], wake_s)[0]:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        if b"\n" not in chunk:
            parts.append(chunk)
            continue
        first, *rest = chunk.split(b"\n")
        yield b"".join([*parts, first])
        *middle, last = rest
        yield from middle
        parts = [last] if last else []
    if parts:
        yield b"".join(parts)


@dataclass
class SendSummary:
    sent: int = 0
    failed: int = 0
    bad_lines: int = 0
    interrupted: bool = False  # Ctrl-C: the lines not read yet are not counted anywhere

    @property
    def exit_code(self) -> int:
        return 0 if self.failed == 0 and self.bad_lines == 0 and not self.interrupted else 1

    def __str__(self) -> str:
        return f"sent {self.sent}, failed {self.failed}, bad lines {self.bad_lines}"


def send_lines(lines: Iterable[bytes], producer: EventsProducer, *, teams: Mapping[str, int], default_token: str | None,
               max_message_bytes: int, err: IO[str], close_timeout_s: float) -> SendSummary:
    """Send every good line, report every bad line and failed delivery on ``err``, wait for
    every delivery report (closing ``producer``), and count."""
    summary = SendSummary()
    err_lock = threading.Lock()

    def complain(text: str) -> None:
        with err_lock:
            print(text, file=err, flush=True)

    def reported(number: int, report: DeliveryReport) -> None:
        if report.error is not None:
            complain(f"line {number}: delivery failed: {report.error.str()}")

    number = 0
    try:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                message = event_from_line(line, teams=teams, default_token=default_token,
                                          now=datetime.now(timezone.utc), max_message_bytes=max_message_bytes)
                producer.send(message, on_delivery=lambda report, n=number: reported(n, report))
            except (BadLine, InvalidCall) as exc:
                summary.bad_lines += 1
                complain(f"line {number}: {exc}")
    except KeyboardInterrupt:
        summary.interrupted = True
        complain(f"interrupted after line {number}: sending what was read, the rest is not sent")
    finally:
        left = producer.close(close_timeout_s)
    if left:
        complain(f"{left} events got no delivery report within {close_timeout_s:.0f} s: counted as failed")
    summary.sent = producer.delivered
    summary.failed = producer.failed + left
    return summary


def run_send(settings: Settings, source: str | None, *, token: str | None, delivery_timeout_s: float,
             out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> int:
    """The ``headwater send`` command; returns its exit status."""
    teams = settings.team_by_token
    if token is not None and token not in teams:
        print(f"headwater send: --token {token!r} is not in HEADWATER_TEAMS ({', '.join(teams)})", file=err)
        return 2
    stdin = source in (None, "-")
    try:
        stream = sys.stdin.buffer if stdin else open(source, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        print(f"headwater send: cannot read {source}: {exc.strerror}", file=err)
        return 2
    producer = EventsProducer(
        bootstrap=settings.bootstrap_servers,
        topic=EVENTS_RAW.name(settings.topic_prefix),
        producer_config={k: v for k, v in settings.kafka_config().items() if k != "bootstrap.servers"},
        delivery_timeout_s=delivery_timeout_s,
    )
    try:
        try:
            partitions = producer.list_topic_partitions(timeout=min(delivery_timeout_s, 10.0))
        except KafkaException as exc:
            reason = exc.args[0].str() if exc.args and isinstance(exc.args[0], KafkaError) else str(exc)
            print(f"headwater send: cannot reach Kafka at {settings.bootstrap_servers}: {reason}", file=err)
            producer.close(0)
            return 1
        if partitions is None:
            print(f"headwater send: topic {producer.topic} does not exist (create it with `headwater topics`)", file=err)
            producer.close(0)
            return 1
        summary = send_lines(read_lines(stream), producer, teams=teams, default_token=token,
                             max_message_bytes=settings.max_message_bytes, err=err,
                             close_timeout_s=delivery_timeout_s + 5.0)
    finally:
        if not stdin:
            stream.close()
    print(summary, file=out)
    return summary.exit_code
