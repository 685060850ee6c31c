"""Stateful client: posthog-js's frontend semantics in Python, for apps acting for one user at a time.

    user = StatefulClient(Client("phc_local"))
    user.capture("$pageview", {"$current_url": "/pricing"})    # anonymous: a UUIDv7 distinct id
    user.identify("user-42", set={"email": "ada@example.com"})  # $identify with $anon_distinct_id
    user.group("company", "acme", {"name": "Acme"})            # $groups on every later event
    user.reset()                                                # logout: new anonymous id

It keeps what posthog-js keeps in the browser (distinct id, anonymous or identified, super
properties, groups, session and window ids) and sends every event through a backend ``Client``
(``Client.capture``), which does the checks, the encoding and the delivery. Time comes from
``clock`` (an aware datetime; tests inject one). Sources: posthog-js
``packages/browser/src/posthog-core.ts`` (identify, alias, group, resetGroups, reset) and
``sessionid.ts`` (``SessionIdManager``); ingestion-semantics §1.9 and §3; ADR 0010.
"""

from __future__ import annotations

import threading
import uuid as uuid_mod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from headwater.ids import uuid7

from .backend import (
    Client,
    InvalidCall,
    ReportCallback,
    check_distinct_id,
    check_group_key,
    check_group_type,
    check_properties,
    check_timestamp,
)

Clock = Callable[[], datetime]

DEFAULT_SESSION_IDLE_TIMEOUT_S = 30 * 60
MIN_SESSION_IDLE_TIMEOUT_S = 60
MAX_SESSION_IDLE_TIMEOUT_S = 10 * 60 * 60
SESSION_LENGTH_LIMIT_MS = 24 * 3600 * 1000
#: posthog-js's idle timer resets the session this long (x idle timeout) after the last activity
IDLE_TIMER_FACTOR = 1.1
#: ids posthog-js refuses in identify (``isDistinctIdStringLike``)
_DISTINCT_ID_LIKE = ("distinct_id", "distinctid")
#: properties the client owns; ``register`` refuses them
_MANAGED = ("$groups", "$session_id", "$window_id", "$device_id", "$is_identified")


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


@dataclass
class SessionIds:
    """posthog-js's ``SessionIdManager`` as a plain object (no storage, no timers; the idle timer
    is applied when the next check comes). Both ids are UUIDv7 made at ``now_ms``.

    ``check(ts_ms, now_ms, read_only)`` starts a new session (new session and window ids, start
    ``ts_ms``) when there is none, when ``|ts - last activity| > idle timeout`` (not read_only),
    or when ``|ts - session start| > 24 h`` (even read_only). The activity time becomes ``ts_ms``,
    except that a read_only check keeps it. The idle timer: when no activity was recorded for
    ``1.1 x timeout`` of clock time and the session is idle at ``now_ms``, the session is reset.
    """

    idle_timeout_ms: int
    session_id: str | None = None
    window_id: str | None = None
    start_ms: int | None = None
    activity_ms: int | None = None
    timer_armed_ms: int | None = None

    def reset(self) -> None:
        """``resetSessionId``: the next check starts a new session."""
        self.session_id = self.start_ms = self.activity_ms = None

    def _idle(self, ts_ms: int, activity_ms: int | None) -> bool:
        return ts_ms > 0 and activity_ms is not None and activity_ms > 0 and abs(ts_ms - activity_ms) > self.idle_timeout_ms

    def check(self, ts_ms: int, now_ms: int, read_only: bool = False) -> tuple[str, str]:
        if (self.session_id and self.timer_armed_ms is not None
                and now_ms - self.timer_armed_ms >= self.idle_timeout_ms * IDLE_TIMER_FACTOR
                and self._idle(now_ms, self.activity_ms)):
            self.reset()  # posthog-js's _resetIdleTimer fired meanwhile
            self.timer_armed_ms = None
        past_max = self.start_ms is not None and self.start_ms > 0 and abs(ts_ms - self.start_ms) > SESSION_LENGTH_LIMIT_MS
        no_session = not self.session_id
        idle = not no_session and not read_only and self._idle(ts_ms, self.activity_ms)
        if no_session or idle or past_max:
            self.session_id = str(uuid7(now_ms))
            self.window_id = str(uuid7(now_ms))
            self.start_ms = ts_ms
        elif not self.window_id:
            self.window_id = str(uuid7(now_ms))
        keep_activity = self.activity_ms is not None and self.activity_ms > 0 and read_only and not past_max
        if not keep_activity:
            self.activity_ms = ts_ms
        if not (self.start_ms and self.start_ms > 0):
            self.start_ms = now_ms
        if not read_only:
            self.timer_armed_ms = now_ms
        assert self.session_id is not None and self.window_id is not None
        return self.session_id, self.window_id


def _clamped_timeout_s(value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise InvalidCall(f"session_idle_timeout_s must be a positive number, got {value!r}")
    return min(max(value, MIN_SESSION_IDLE_TIMEOUT_S), MAX_SESSION_IDLE_TIMEOUT_S)


class StatefulClient:
    """One user's analytics state, as posthog-js keeps it; every event goes through ``backend``.

    ``session_idle_timeout_s`` is clamped to [60 s, 10 h] as posthog-js does. Thread-safe (one
    lock); the events of one client are sent in call order.
    """

    def __init__(self, backend: Client, *, clock: Clock | None = None,
                 session_idle_timeout_s: float = DEFAULT_SESSION_IDLE_TIMEOUT_S) -> None:
        self.backend = backend
        self._clock = clock or _utc_now
        self._lock = threading.RLock()
        self._sessions = SessionIds(int(_clamped_timeout_s(session_idle_timeout_s) * 1000))
        self._distinct_id = self._new_anonymous_id()
        self._device_id = self._distinct_id
        self._identified = False
        self._super: dict[str, Any] = {}
        self._groups: dict[str, str] = {}

    # -- what the client holds ------------------------------------------------------------------
    @property
    def distinct_id(self) -> str:
        return self._distinct_id

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def is_identified(self) -> bool:
        return self._identified

    @property
    def groups(self) -> dict[str, str]:
        return dict(self._groups)

    @property
    def super_properties(self) -> dict[str, Any]:
        return dict(self._super)

    def get_session_id(self) -> str:
        """The current session id, as posthog-js's ``get_session_id``: a read-only check that
        neither extends the session nor ends it for idleness (the 24 h limit still applies)."""
        with self._lock:
            now = self._now()
            return self._sessions.check(_ms(now), _ms(now), read_only=True)[0]

    def _now(self) -> datetime:
        now = self._clock()
        if not isinstance(now, datetime) or now.tzinfo is None:
            raise InvalidCall(f"clock must return a timezone-aware datetime, got {now!r}")
        return now

    def _new_anonymous_id(self) -> str:
        return str(uuid7(_ms(self._now())))

    # -- events ------------------------------------------------------------------------------------
    def capture(self, event: str, properties: Mapping[str, Any] | None = None, *, timestamp: datetime | None = None,
                uuid: str | uuid_mod.UUID | None = None, on_delivery: ReportCallback | None = None) -> str:
        """Send ``event`` for the current user with the super properties, ``$groups``,
        ``$session_id``, ``$window_id`` and ``$is_identified``; return its uuid. The event's own
        properties win over super properties; the session ids and ``$is_identified`` are the
        client's. ``timestamp`` (default: the clock) also drives the session rules."""
        return self._capture(event, properties, timestamp=timestamp, uuid=uuid, on_delivery=on_delivery)

    def _capture(self, event: str, properties: Mapping[str, Any] | None, *, distinct_id: str | None = None,
                 timestamp: datetime | None = None, uuid: Any = None, on_delivery: ReportCallback | None = None) -> str:
        with self._lock:
            props = check_properties(properties)
            now = self._now()
            ts = check_timestamp(timestamp) or now
            base: dict[str, Any] = {"$device_id": self._device_id, **self._super}
            if self._groups:
                base["$groups"] = dict(self._groups)
            # the backend checks the rest before anything changes here; a refused call must not
            # move the session either, so the ids are computed on a copy first
            session = SessionIds(**vars(self._sessions))
            session_id, window_id = session.check(_ms(ts), _ms(now))
            merged = {**base, **props, "$session_id": session_id, "$window_id": window_id,
                      "$is_identified": self._identified}
            sent = self.backend.capture(distinct_id or self._distinct_id, event, merged, timestamp=ts, uuid=uuid,
                                        on_delivery=on_delivery)
            self._sessions = session
            return sent

    def identify(self, distinct_id: str, set: Mapping[str, Any] | None = None,  # noqa: A002 (posthog-js's name)
                 set_once: Mapping[str, Any] | None = None) -> str | None:
        """Become ``distinct_id``. From anonymous to a new id: ``$identify`` with
        ``$anon_distinct_id`` (the anonymous id) and ``$set``/``$set_once``, and the client is
        identified from then on. Otherwise (already identified, or the same id) no
        ``$identify``: only a ``$set`` event when ``set`` or ``set_once`` is given. Returns the
        uuid of the event sent, or None."""
        new_id = check_distinct_id(distinct_id)
        if new_id.lower() in _DISTINCT_ID_LIKE:
            raise InvalidCall(f"identify({new_id!r}): that looks like the name 'distinct_id', not a user's id")
        to_set = check_properties(set, "set") if set is not None else None
        to_set_once = check_properties(set_once, "set_once") if set_once is not None else None
        with self._lock:
            previous = self._distinct_id
            if new_id != previous and not self._identified:
                # identified before the event is built, so that it carries $is_identified: true
                self._distinct_id, self._identified = new_id, True
                props = {"distinct_id": new_id, "$anon_distinct_id": previous,
                         "$set": to_set or {}, "$set_once": to_set_once or {}}
                try:
                    return self._capture("$identify", props)
                except BaseException:
                    self._distinct_id, self._identified = previous, False
                    raise
            sent = None
            if to_set is not None or to_set_once is not None:
                props = {"$set": to_set or {}, "$set_once": to_set_once or {}}
                sent = self._capture("$set", props, distinct_id=new_id)
            self._distinct_id = new_id
            return sent

    def alias(self, alias: str, original: str | None = None) -> str | None:
        """``$create_alias {alias, distinct_id: original}`` sent as ``original`` (default: the
        current distinct id): the server merges ``alias``'s person into ``original``'s. An alias
        equal to ``original`` is ``identify(alias)`` instead, as in posthog-js."""
        alias = check_distinct_id(alias, "alias")
        with self._lock:
            original = self._distinct_id if original is None else check_distinct_id(original, "original")
            if alias == original:
                return self.identify(alias)
            return self._capture("$create_alias", {"alias": alias, "distinct_id": original}, distinct_id=original)

    def group(self, group_type: str, group_key: str | int, properties: Mapping[str, Any] | None = None) -> str | None:
        """Put the user in ``group_key`` of ``group_type``: every later event carries
        ``$groups[group_type] = group_key``. With ``properties`` (even ``{}``, as posthog-js
        tests ``if (props)`` on an object), also send ``$groupidentify``; returns its uuid."""
        group_type = check_group_type(group_type)
        group_key = check_group_key(group_key)
        group_set = check_properties(properties) if properties is not None else None
        with self._lock:
            self._groups = {**self._groups, group_type: group_key}
            if group_set is None:
                return None
            props = {"$group_type": group_type, "$group_key": group_key, "$group_set": group_set}
            return self._capture("$groupidentify", props)

    def reset_groups(self) -> None:
        """posthog-js ``resetGroups()``: forget every group; nothing else changes."""
        with self._lock:
            self._groups = {}

    reset_group = reset_groups  # the name DESIGN §6.1 uses

    def register(self, properties: Mapping[str, Any]) -> None:
        """Super properties: sent with every later event (an event's own properties win)."""
        props = check_properties(properties, required=True)
        managed = sorted(k for k in props if k in _MANAGED)
        if managed:
            raise InvalidCall(f"register: {', '.join(managed)} are the client's own (use group() for $groups)")
        with self._lock:
            self._super.update(props)

    def unregister(self, name: str) -> None:
        if not isinstance(name, str):
            raise InvalidCall(f"unregister takes a property name (str), got {name!r}")
        with self._lock:
            self._super.pop(name, None)

    def reset(self, reset_device_id: bool = False) -> None:
        """Logout, posthog-js ``reset()``: a new anonymous distinct id (UUIDv7), anonymous
        again, no super properties, no groups, and the next event starts a new session. The
        ``$device_id`` stays unless ``reset_device_id``."""
        with self._lock:
            self._distinct_id = self._new_anonymous_id()
            if reset_device_id:
                self._device_id = self._distinct_id
            self._identified = False
            self._super = {}
            self._groups = {}
            self._sessions.reset()

    def flush(self, timeout: float = 30.0) -> int:
        return self.backend.flush(timeout)
