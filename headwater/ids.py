"""UUIDv7 (RFC 9562): time-ordered ids for events and sessions. Python 3.11 has no ``uuid.uuid7``."""

from __future__ import annotations

import os
import time
import uuid


def uuid7(unix_ms: int | None = None, rand: bytes | None = None) -> uuid.UUID:
    """A UUIDv7 for ``unix_ms`` (default: now). ``rand`` (10 bytes) makes it deterministic."""
    ms = int(time.time() * 1000) if unix_ms is None else unix_ms
    tail = rand if rand is not None else os.urandom(10)
    if len(tail) < 10:
        raise ValueError("uuid7 needs 10 bytes of randomness")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (int.from_bytes(tail[:2], "big") & 0x0FFF) << 64
    value |= 0b10 << 62
    value |= int.from_bytes(tail[2:10], "big") & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def uuid7_unix_ms(value: uuid.UUID) -> int:
    return value.int >> 80
