"""The stateful client (posthog-js's frontend semantics): anonymous id until identify, $identify
with $anon_distinct_id only from anonymous, groups as a super property, reset and reset_groups,
super properties, alias, and posthog-js's session rules (30 min idle, 24 h max, window id, the
read-only check and its idle timer), with an injected clock.

It runs over the real backend ``Client`` and an in-memory producer, so each test checks the
envelopes that would go to ``events_raw``; the ``pipeline`` test sends through the embedded broker."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from headwater.ids import uuid7_unix_ms
from headwater.kafka_admin import ensure_topics
from headwater.settings import Settings
from headwater.topics import TopicNames
from producers.backend import Client, InvalidCall
from producers.stateful import StatefulClient
from tests.conftest import wait_until
from tests.unit.test_backend_client import MemoryProducer

TOKEN = "phc_test"
T0 = datetime(2024, 5, 1, 9, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def memory() -> MemoryProducer:
    return MemoryProducer()


@pytest.fixture
def user(memory: MemoryProducer, clock: Clock):
    backend = Client(TOKEN, producer=memory)
    yield StatefulClient(backend, clock=clock)
    backend.close()


def sent(memory: MemoryProducer) -> list[dict]:
    return memory.envelopes()


def last(memory: MemoryProducer) -> dict:
    return memory.envelopes()[-1]


# -- anonymous, identify ---------------------------------------------------------------------------
def test_an_anonymous_user_has_a_uuid7_distinct_id_made_by_the_clock(user: StatefulClient, memory: MemoryProducer):
    anon = uuid.UUID(user.distinct_id)
    assert anon.version == 7 and uuid7_unix_ms(anon) == int(T0.timestamp() * 1000)
    user.capture("$pageview", {"$current_url": "/pricing"})
    event = last(memory)
    assert (event["distinct_id"], event["event"]) == (user.distinct_id, "$pageview")
    assert memory.messages[-1][1] == f"{TOKEN}:{user.distinct_id}".encode()
    assert event["timestamp"] == "2024-05-01T09:00:00+00:00"
    props = event["properties"]
    assert props["$current_url"] == "/pricing" and props["$device_id"] == user.distinct_id
    assert props["$is_identified"] is False and "$groups" not in props


def test_identify_from_anonymous_sends_identify_with_the_anonymous_id(user: StatefulClient, memory: MemoryProducer,
                                                                       clock: Clock):
    anon = user.distinct_id
    user.capture("$pageview")
    clock.advance(minutes=1)
    uuid_sent = user.identify("user-42", set={"email": "ada@example.com"}, set_once={"first_seen": "web"})
    identify = last(memory)
    assert identify["uuid"] == uuid_sent
    assert (identify["event"], identify["distinct_id"]) == ("$identify", "user-42")
    assert identify["properties"]["$anon_distinct_id"] == anon
    assert identify["properties"]["distinct_id"] == "user-42"
    assert identify["properties"]["$set"] == {"email": "ada@example.com"}
    assert identify["properties"]["$set_once"] == {"first_seen": "web"}
    assert identify["properties"]["$is_identified"] is True
    assert memory.messages[-1][1] == b"phc_test:user-42"
    user.capture("clicked")
    assert (last(memory)["distinct_id"], last(memory)["properties"]["$is_identified"]) == ("user-42", True)
    assert user.is_identified and user.device_id == anon


def test_identify_again_does_not_resend_anon_distinct_id(user: StatefulClient, memory: MemoryProducer):
    user.identify("user-42")
    assert user.identify("user-42") is None  # nothing to send
    user.identify("user-42", set={"plan": "pro"})
    events = sent(memory)
    assert [e["event"] for e in events] == ["$identify", "$set"]
    assert events[1]["distinct_id"] == "user-42"
    assert events[1]["properties"]["$set"] == {"plan": "pro"} and events[1]["properties"]["$set_once"] == {}
    assert "$anon_distinct_id" not in events[1]["properties"]


def test_identify_with_another_id_once_identified_switches_without_identify(user: StatefulClient,
                                                                            memory: MemoryProducer):
    user.identify("user-42")
    assert user.identify("user-43", set_once={"x": 1}) is not None
    events = sent(memory)
    assert [(e["event"], e["distinct_id"]) for e in events] == [("$identify", "user-42"), ("$set", "user-43")]
    assert user.distinct_id == "user-43"


def test_identify_with_the_current_anonymous_id_is_no_identify(user: StatefulClient, memory: MemoryProducer):
    assert user.identify(user.distinct_id) is None
    assert memory.messages == [] and not user.is_identified


@pytest.mark.parametrize("bad", ["", "   ", "distinct_id", "DistinctId", 42, None])
def test_identify_refuses_invalid_ids_and_changes_nothing(user: StatefulClient, memory: MemoryProducer, bad):
    anon = user.distinct_id
    with pytest.raises(InvalidCall):
        user.identify(bad)
    assert user.distinct_id == anon and not user.is_identified and memory.messages == []


def test_a_refused_identify_event_leaves_the_user_anonymous(user: StatefulClient, memory: MemoryProducer):
    anon = user.distinct_id
    with pytest.raises(InvalidCall, match="not JSON-serializable"):
        user.identify("user-42", set={"tags": {"a"}})
    assert (user.distinct_id, user.is_identified, memory.messages) == (anon, False, [])


# -- groups ------------------------------------------------------------------------------------------
def test_group_registers_groups_on_later_events_and_groupidentify_only_with_properties(
        user: StatefulClient, memory: MemoryProducer):
    assert user.group("company", "acme") is None
    assert memory.messages == []  # no properties: no $groupidentify
    user.capture("clicked")
    assert last(memory)["properties"]["$groups"] == {"company": "acme"}
    user.group("project", 7, {"name": "Seven"})
    group_identify = last(memory)
    assert group_identify["event"] == "$groupidentify" and group_identify["distinct_id"] == user.distinct_id
    assert {k: group_identify["properties"][k] for k in ("$group_type", "$group_key", "$group_set", "$groups")} == {
        "$group_type": "project", "$group_key": "7", "$group_set": {"name": "Seven"},
        "$groups": {"company": "acme", "project": "7"},
    }
    user.group("company", "globex", {})  # an empty object is still properties, as in posthog-js
    assert last(memory)["event"] == "$groupidentify" and last(memory)["properties"]["$group_set"] == {}
    user.capture("clicked")
    assert last(memory)["properties"]["$groups"] == {"company": "globex", "project": "7"}


def test_an_events_own_groups_win_over_the_registered_ones(user: StatefulClient, memory: MemoryProducer):
    user.group("company", "acme")
    user.capture("moved", {"$groups": {"company": "other"}})
    assert last(memory)["properties"]["$groups"] == {"company": "other"}
    assert user.groups == {"company": "acme"}


def test_reset_groups_forgets_groups_only(user: StatefulClient, memory: MemoryProducer):
    user.identify("user-42")
    user.register({"plan": "pro"})
    user.group("company", "acme")
    user.capture("before")
    user.reset_group()
    user.capture("after")
    before, after = sent(memory)[-2:]
    assert "$groups" not in after["properties"] and user.groups == {}
    assert after["distinct_id"] == "user-42" and after["properties"]["plan"] == "pro"
    assert after["properties"]["$session_id"] == before["properties"]["$session_id"]


@pytest.mark.parametrize(("args", "message"), [
    (("", "acme"), "group_type must be a non-empty str"),
    (("company", ""), "group_key must not be empty"),
    (("company", None), "group_key must be a str (or int)"),
    (("company", "acme", ["name"]), "properties must be a dict"),
])
def test_group_refuses_invalid_calls_and_registers_nothing(user: StatefulClient, memory: MemoryProducer, args, message):
    with pytest.raises(InvalidCall) as raised:
        user.group(*args)
    assert message in str(raised.value) and user.groups == {} and memory.messages == []


# -- reset, super properties, alias ----------------------------------------------------------------------
def test_reset_starts_a_new_anonymous_user_session_and_forgets_groups_and_super_properties(
        user: StatefulClient, memory: MemoryProducer, clock: Clock):
    first_anon = user.distinct_id
    user.register({"plan": "pro"})
    user.group("company", "acme")
    user.identify("user-42")
    session_before = last(memory)["properties"]["$session_id"]
    clock.advance(seconds=5)
    user.reset()
    assert user.distinct_id not in (first_anon, "user-42") and uuid.UUID(user.distinct_id).version == 7
    assert not user.is_identified and user.groups == {} and user.super_properties == {}
    user.capture("$pageview")
    event = last(memory)
    assert event["distinct_id"] == user.distinct_id
    assert "plan" not in event["properties"] and "$groups" not in event["properties"]
    assert event["properties"]["$session_id"] != session_before
    assert event["properties"]["$device_id"] == first_anon  # kept, as posthog-js does
    user.identify("user-99")  # anonymous again: a new $identify with the new anonymous id
    assert last(memory)["properties"]["$anon_distinct_id"] == event["distinct_id"]


def test_reset_with_reset_device_id_makes_the_new_anonymous_id_the_device(user: StatefulClient):
    first = user.device_id
    user.reset(reset_device_id=True)
    assert user.device_id == user.distinct_id != first


def test_super_properties_go_on_every_event_and_the_events_own_win(user: StatefulClient, memory: MemoryProducer):
    user.register({"plan": "pro", "app_version": "1.2"})
    user.capture("a")
    user.capture("b", {"plan": "free"})
    user.unregister("app_version")
    user.unregister("never-registered")
    user.capture("c")
    a, b, c = (e["properties"] for e in sent(memory))
    assert (a["plan"], a["app_version"]) == ("pro", "1.2")
    assert b["plan"] == "free"
    assert c["plan"] == "pro" and "app_version" not in c
    assert user.super_properties == {"plan": "pro"}


def test_the_session_and_identity_properties_are_the_clients_own(user: StatefulClient, memory: MemoryProducer):
    with pytest.raises(InvalidCall, match=r"\$groups, \$session_id are the client's own"):
        user.register({"$session_id": "mine", "$groups": {}})
    user.capture("e", {"$session_id": "mine", "$is_identified": True})
    props = last(memory)["properties"]
    assert props["$session_id"] != "mine" and props["$is_identified"] is False


def test_alias_sends_create_alias_as_the_original_and_alias_to_itself_is_identify(user: StatefulClient,
                                                                                 memory: MemoryProducer):
    user.identify("user-42")
    user.alias("ada@example.com")
    alias = last(memory)
    assert (alias["event"], alias["distinct_id"]) == ("$create_alias", "user-42")
    assert alias["properties"]["alias"] == "ada@example.com" and alias["properties"]["distinct_id"] == "user-42"
    user.alias("old-account", original="user-7")
    assert (last(memory)["distinct_id"], last(memory)["properties"]["alias"]) == ("user-7", "old-account")
    assert user.distinct_id == "user-42"  # alias does not change who the user is
    count = len(memory.messages)
    assert user.alias("user-42") is None and len(memory.messages) == count  # identify(same id): nothing


# -- sessions -------------------------------------------------------------------------------------------
def _session(memory: MemoryProducer) -> tuple[str, str]:
    props = last(memory)["properties"]
    return props["$session_id"], props["$window_id"]


def test_session_and_window_ids_are_uuid7_and_stay_while_active(user: StatefulClient, memory: MemoryProducer,
                                                                clock: Clock):
    user.capture("a")
    session, window = _session(memory)
    assert uuid.UUID(session).version == 7 and uuid.UUID(window).version == 7 and session != window
    assert uuid7_unix_ms(uuid.UUID(session)) == int(T0.timestamp() * 1000)
    for _ in range(6):  # 29-minute gaps: 2.9 h of one session
        clock.advance(minutes=29)
        user.capture("b")
        assert _session(memory) == (session, window)


def test_a_new_session_and_window_after_more_than_30_minutes_idle(user: StatefulClient, memory: MemoryProducer,
                                                                  clock: Clock):
    user.capture("a")
    first = _session(memory)
    clock.advance(minutes=30)  # exactly the timeout: still the same session (strictly greater ends it)
    user.capture("b")
    assert _session(memory) == first
    clock.advance(minutes=30, milliseconds=1)
    user.capture("c")
    second = _session(memory)
    assert second[0] != first[0] and second[1] != first[1]
    assert uuid7_unix_ms(uuid.UUID(second[0])) == int(clock.now.timestamp() * 1000)


def test_a_session_ends_after_24_hours_even_when_active(user: StatefulClient, memory: MemoryProducer, clock: Clock):
    user.capture("start")
    first = _session(memory)[0]
    for _ in range(24 * 6):  # every 10 minutes for 24 h
        clock.advance(minutes=10)
        user.capture("tick")
        if _session(memory)[0] != first:
            break
    assert _session(memory)[0] == first and clock.now - T0 == timedelta(hours=24)  # 24 h exactly: same
    clock.advance(milliseconds=1)
    user.capture("tick")
    assert _session(memory)[0] != first


def test_the_event_timestamp_drives_the_session(user: StatefulClient, memory: MemoryProducer):
    user.capture("a", timestamp=T0)
    first = _session(memory)[0]
    user.capture("b", timestamp=T0 + timedelta(minutes=31))
    assert _session(memory)[0] != first
    assert last(memory)["timestamp"] == "2024-05-01T09:31:00+00:00"


def test_the_idle_timeout_is_configurable_and_clamped_like_posthog_js(memory: MemoryProducer, clock: Clock):
    backend = Client(TOKEN, producer=memory)
    short = StatefulClient(backend, clock=clock, session_idle_timeout_s=10)  # clamped up to 60 s
    short.capture("a")
    first = _session(memory)[0]
    clock.advance(seconds=59)
    short.capture("b")
    assert _session(memory)[0] == first
    clock.advance(seconds=61)
    short.capture("c")
    assert _session(memory)[0] != first
    assert StatefulClient(backend, clock=clock, session_idle_timeout_s=10**6)._sessions.idle_timeout_ms == 36_000_000
    with pytest.raises(InvalidCall):
        StatefulClient(backend, clock=clock, session_idle_timeout_s=0)
    backend.close()


def test_get_session_id_is_read_only_and_the_idle_timer_ends_an_idle_session(user: StatefulClient,
                                                                            memory: MemoryProducer, clock: Clock):
    user.capture("a")
    first = _session(memory)[0]
    clock.advance(minutes=20)
    assert user.get_session_id() == first  # read-only: does not extend the session...
    clock.advance(minutes=11)
    user.capture("b")  # ...so 31 minutes after the last activity this is a new session
    second = _session(memory)[0]
    assert second != first
    clock.advance(minutes=32)  # idle, but before posthog-js's timer (1.1 x 30 min) fires
    assert user.get_session_id() == second
    clock.advance(minutes=2)  # 34 min: the timer has reset the session
    third = user.get_session_id()
    assert third != second
    user.capture("c")
    assert _session(memory)[0] == third


def test_a_refused_capture_does_not_move_the_session(user: StatefulClient, memory: MemoryProducer, clock: Clock):
    user.capture("a")
    first = _session(memory)[0]
    clock.advance(minutes=29)
    with pytest.raises(InvalidCall):
        user.capture("")  # refused: must not count as activity
    clock.advance(minutes=2)
    user.capture("b")
    assert _session(memory)[0] != first


def test_the_clock_must_be_timezone_aware(memory: MemoryProducer):
    backend = Client(TOKEN, producer=memory)
    with pytest.raises(InvalidCall, match="clock must return a timezone-aware datetime"):
        StatefulClient(backend, clock=lambda: datetime(2024, 5, 1))
    backend.close()


# -- through the embedded broker ---------------------------------------------------------------------------
@pytest.mark.pipeline
def test_a_visit_through_the_embedded_broker(kafka_bootstrap: str):
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=f"sc{uuid.uuid4().hex[:10]}_", teams=f"{TOKEN}:7")
    ensure_topics(settings)
    backend = Client.from_settings(settings, TOKEN)
    user = StatefulClient(backend)
    anon = user.distinct_id
    user.capture("$pageview", {"$current_url": "/"})
    user.identify("user-42", set={"email": "ada@example.com"})
    user.group("company", "acme", {"name": "Acme"})
    user.capture("invoice_paid", {"amount": 49})
    assert backend.flush() == 0 and (backend.delivered, backend.failed) == (4, 0)
    backend.close()

    topic = TopicNames(settings.topic_prefix).events_raw
    consumer = Consumer(settings.consumer_config(f"reader-{uuid.uuid4()}"))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
    found: list = []

    def four() -> bool:
        found.extend(m for m in consumer.consume(100, 0.2) if not m.error())
        return len(found) >= 4

    try:
        wait_until(four, 30, message="the visit's 4 events on events_raw")
    finally:
        consumer.close()
    events = {e["event"]: e for e in (orjson.loads(m.value()) for m in found)}
    assert {name: e["distinct_id"] for name, e in events.items()} == {
        "$pageview": anon, "$identify": "user-42", "$groupidentify": "user-42", "invoice_paid": "user-42",
    }
    assert events["$identify"]["properties"]["$anon_distinct_id"] == anon
    assert events["invoice_paid"]["properties"]["$groups"] == {"company": "acme"}
    assert len({e["properties"]["$session_id"] for e in events.values()}) == 1
    assert {m.key() for m in found} == {f"{TOKEN}:{anon}".encode(), f"{TOKEN}:user-42".encode()}
