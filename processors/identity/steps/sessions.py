"""Step ``assign_session`` (semantics §3): the session of an event. Pure: no Kafka, no clock.

An event that carries ``$session_id`` keeps it (``client_session_id``; a UUID is lower-cased, as
PostHog's ``sanitizeEvent``). An event without one (a backend event) gets a server-side session
of its person (``assign_session``), by event time, with posthog-js's rules:
- a new session when the gap to the session is **strictly greater** than the idle timeout (30 min),
  or when the session would become **strictly longer** than the maximum length (24 h);
- the id is a UUIDv7 derived from the team, the person and the time of the event that opened the
  session (``session_uuid7``), so replaying the same events in the same order gives the same ids.

Out of order. The state keeps the person's recent sessions; an event joins the kept session it
fits (within the timeout of its span, span still within the maximum length), extending the
session's start or end. A session is kept while the newest event time seen is within
``lateness + timeout`` of the newest event time at its last use; so an event up to ``lateness``
late always finds its session, and an event later than that joins a kept session it fits or
starts a session of its own, kept in turn until it ages out. No event is ever dropped.

Bridge rule: an event that fits several kept sessions joins the nearest (the smallest gap; 0 when
inside a session's span), on a tie the one that started first. Sessions are never merged: an id
once handed out never changes: its timestamp is the event that opened the session, even after a
late event moved the session's start earlier.

Limits. Only kept sessions are known: an event later than a forgotten session opens a new one,
which may overlap it in time (ids already handed out are not revisited). Since an id depends on
(team, person, opening time) only, an event at exactly the µs that opened a forgotten session
re-opens that id; the events the re-opened session gathers are judged against it alone, so the
union of both under that id keeps the timeout between consecutive events but may exceed the
maximum length. More than ``max_kept`` sessions within ``lateness + timeout`` (only late events
can make that many) forget the least recently used one early.

State (JSON, one per person, for RocksDB and the changelog): ``{"n": newest_us, "s": [[first_us,
last_us, origin_us, used_us], ...]}`` where ``first``/``last`` bound the session's events,
``origin`` is the event that opened it (its id), ``used`` the newest event time when it last took
an event. ``s`` is in order of use, least recent first; at most ``SessionRules.max_kept`` entries.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from headwater.ids import uuid7

MINUTE_US = 60_000_000
HOUR_US = 60 * MINUTE_US

_UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_FIRST, _LAST, _ORIGIN, _USED = range(4)


def client_session_id(value: Any) -> str | None:
    """The ``$session_id`` an event keeps, or None when it has none and is sessionized server-side.

    A canonical UUID string (8-4-4-4-12 hex, any version, any case) is lower-cased; any other
    non-empty string is kept as is. None, ``""`` and non-strings (numbers, booleans, objects) give
    None: a number is not a session id (ClickHouse's ``JSONExtractString`` reads ``''`` for it, so
    PostHog would leave the event without a session); headwater gives it a server-side one."""
    if not isinstance(value, str) or not value:
        return None
    return value.lower() if _UUID_TEXT.fullmatch(value) else value


@dataclass(frozen=True)
class SessionRules:
    """Server-side session parameters, in microseconds. ``max_kept`` bounds the sessions a person's
    state remembers (the least recently used is forgotten first)."""

    timeout_us: int = 30 * MINUTE_US
    max_length_us: int = 24 * HOUR_US
    lateness_us: int = HOUR_US
    max_kept: int = 8

    def __post_init__(self) -> None:
        if self.timeout_us < 0 or self.max_length_us < 0 or self.lateness_us < 0:
            raise ValueError("session timeout, maximum length and lateness must not be negative")
        if self.max_kept < 1:
            raise ValueError("a session state must keep at least one session")


@functools.lru_cache(maxsize=1 << 16)  # pure; a session's events ask for its id again and again
def session_uuid7(team_id: int, person_id: str, start_us: int) -> str:
    """The server-side session id: a UUIDv7 (lower-case canonical text) whose 48-bit timestamp is
    ``start_us // 1000`` (ms; masked to 48 bits), version 7, variant ``10``, and whose other 74
    bits are the first 74 bits of ``blake2b(f"{team_id}:{person_id}:{start_us}", digest_size=10)``
    (UTF-8), laid out as ``headwater.ids.uuid7`` does: 12 bits from the digest's first two bytes
    (``rand_a``), 62 from its last eight (``rand_b``)."""
    key = f"{team_id}:{person_id}:{start_us}".encode("utf-8", "surrogatepass")
    return str(uuid7(start_us // 1000, hashlib.blake2b(key, digest_size=10).digest()))


def _gap(session: list[int], timestamp_us: int) -> int:
    if timestamp_us < session[_FIRST]:
        return session[_FIRST] - timestamp_us
    return max(0, timestamp_us - session[_LAST])


def assign_session(state: dict | None, team_id: int, person_id: str, timestamp_us: int,
                   rules: SessionRules) -> tuple[str, dict]:
    """The server-side session id of a person's event at ``timestamp_us``, and the person's new
    state (``state`` None for a person without one; the input is never mutated).

    The event joins the nearest kept session within ``timeout_us`` of it whose span stays within
    ``max_length_us`` (ties: the one that started first), else opens a new session with origin
    ``timestamp_us``. Then sessions unused since ``newest - lateness_us - timeout_us`` are
    forgotten, and the least recently used beyond ``max_kept``; the event's session is always kept.
    """
    newest = timestamp_us if state is None else max(state["n"], timestamp_us)
    sessions = [] if state is None else state["s"]
    best: int | None = None
    best_key: tuple[int, int, int] | None = None
    for i, session in enumerate(sessions):
        gap = _gap(session, timestamp_us)
        if gap > rules.timeout_us:
            continue
        if max(session[_LAST], timestamp_us) - min(session[_FIRST], timestamp_us) > rules.max_length_us:
            continue
        key = (gap, session[_FIRST], session[_ORIGIN])
        if best_key is None or key < best_key:
            best, best_key = i, key
    if best is None:
        chosen = [timestamp_us, timestamp_us, timestamp_us, newest]
    else:
        first, last, origin, _ = sessions[best]
        chosen = [min(first, timestamp_us), max(last, timestamp_us), origin, newest]
    horizon = newest - rules.lateness_us - rules.timeout_us
    kept = [list(s) for i, s in enumerate(sessions) if i != best and s[_USED] >= horizon]
    kept = kept[len(kept) - (rules.max_kept - 1):] if len(kept) >= rules.max_kept else kept
    kept.append(chosen)
    return session_uuid7(team_id, person_id, chosen[_ORIGIN]), {"n": newest, "s": kept}
