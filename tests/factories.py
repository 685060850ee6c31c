"""Test factories: small builders with overrides, rather than big fixture objects."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

_MISSING = object()


def make_raw_event(**overrides: Any) -> dict[str, Any]:
    """A valid events_raw envelope; ``field=_MISSING`` removes a field."""
    event: dict[str, Any] = {
        "token": "phc_test",
        "distinct_id": "user-1",
        "event": "$pageview",
        "uuid": str(uuid.uuid4()),
        "timestamp": "2026-11-01T12:00:00.123456+00:00",
        "properties": {"$current_url": "https://example.com/", "$session_id": "0192f0e4-0000-7000-8000-000000000001"},
    }
    for key, value in overrides.items():
        if value is _MISSING:
            event.pop(key, None)
        else:
            event[key] = value
    return event


def raw_bytes(**overrides: Any) -> bytes:
    return orjson.dumps(make_raw_event(**overrides))


class FakeMessage:
    """The parts of a Kafka message a stage reads; for unit tests of pipelines."""

    def __init__(self, value: bytes | None, key: bytes | None = b"k", topic: str = "events_raw", partition: int = 0, offset: int = 0, timestamp_ms: int = 1_793_600_000_000, headers=None):
        self._value, self._key, self._topic, self._partition, self._offset = value, key, topic, partition, offset
        self._timestamp_ms, self._headers = timestamp_ms, headers

    def value(self): return self._value
    def key(self): return self._key
    def topic(self): return self._topic
    def partition(self): return self._partition
    def offset(self): return self._offset
    def timestamp(self): return (1, self._timestamp_ms)
    def headers(self): return self._headers
    def error(self): return None
