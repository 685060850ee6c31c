"""The backend client: the messages it builds, the calls it refuses at once, delivery reports
(per call, client-wide, counted, without the caller polling), close, and the asyncio face.

Most tests run the real ``Client`` over ``MemoryProducer``, an in-memory stand-in for
confluent-kafka's Producer; the ``pipeline`` ones send through the embedded broker."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import date, datetime, timedelta, timezone

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from headwater.kafka_admin import ensure_topics
from headwater.settings import Settings
from headwater.topics import TopicNames
from producers.backend import (
    AsyncClient,
    Client,
    DeliveryFailed,
    DeliveryReport,
    InvalidCall,
    build_event,
)
from tests.conftest import wait_until

TOKEN = "phc_test"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


class _Delivered:
    def __init__(self, topic: str, partition: int, offset: int, key: bytes, value: bytes) -> None:
        self._topic, self._partition, self._offset, self._key, self._value = topic, partition, offset, key, value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value


class MemoryProducer:
    """What the client uses of confluent_kafka.Producer, in memory: ``produce`` keeps the
    message, ``poll``/``flush`` serve its delivery report; ``fail(value)`` may return a
    KafkaError to fail a message."""

    def __init__(self, fail=None) -> None:
        self.fail = fail
        self.messages: list[tuple[str, bytes, bytes]] = []
        self._waiting: list = []
        self._lock = threading.Lock()

    def produce(self, topic, value, key, on_delivery):
        with self._lock:
            self.messages.append((topic, key, value))
            self._waiting.append((on_delivery, _Delivered(topic, 0, len(self.messages) - 1, key, value)))

    def poll(self, timeout: float = 0) -> int:
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for on_delivery, message in waiting:
            on_delivery(self.fail(message.value()) if self.fail else None, message)
        if not waiting and timeout:
            time.sleep(min(timeout, 0.01))
        return len(waiting)

    def flush(self, timeout: float = 0) -> int:
        self.poll(0)
        return len(self)

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)

    def envelopes(self) -> list[dict]:
        return [orjson.loads(value) for _, _, value in self.messages]


@pytest.fixture
def memory() -> MemoryProducer:
    return MemoryProducer()


@pytest.fixture
def client(memory: MemoryProducer):
    client = Client(TOKEN, topic="events_raw", producer=memory)
    yield client
    client.close()


# -- the messages ------------------------------------------------------------------------------------
def test_capture_builds_the_events_raw_envelope_keyed_token_distinct_id():
    message = build_event(TOKEN, "user-1", "invoice_paid", {"amount": 49, "$groups": {"team": "t1"}},
                          groups={"company": "acme", "project": 42},
                          timestamp=datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))), now=T0)
    assert message.key == b"phc_test:user-1"
    envelope = orjson.loads(message.value)
    assert envelope == {
        "token": TOKEN,
        "distinct_id": "user-1",
        "event": "invoice_paid",
        "uuid": message.uuid,
        "timestamp": "2024-05-01T12:00:00+00:00",  # converted to UTC
        "properties": {"amount": 49, "$groups": {"team": "t1", "company": "acme", "project": "42"}},
        "now": "2024-05-01T12:00:00+00:00",
    }
    assert uuid.UUID(message.uuid).version == 7
    assert uuid.UUID(message.uuid).int >> 80 == int(T0.timestamp() * 1000)  # a v7 made at `now`


def test_without_timestamp_the_event_happened_now_and_the_given_uuid_is_kept_canonical():
    given = uuid.uuid4()
    message = build_event(TOKEN, "u", "e", uuid=str(given).upper(), now=T0)
    envelope = orjson.loads(message.value)
    assert envelope["uuid"] == str(given) == message.uuid
    assert envelope["timestamp"] == envelope["now"] == "2024-05-01T12:00:00+00:00"
    assert envelope["properties"] == {}


def test_every_call_returns_its_uuid_and_sends_posthogs_shape(client: Client, memory: MemoryProducer):
    sent = [
        client.capture("user-1", "signed_up", {"plan": "pro"}, timestamp=T0),
        client.identify("user-1", {"email": "ada@example.com"}, set_once={"first": "web"}, anon_distinct_id="anon-7"),
        client.set("user-1", {"plan": "team"}),
        client.set_once("user-1", {"source": "ads"}),
        client.alias("old-id", "user-1"),
        client.group_identify("company", "acme", {"name": "Acme"}),
    ]
    envelopes = memory.envelopes()
    assert [e["uuid"] for e in envelopes] == sent
    assert [(key, e["distinct_id"], e["event"]) for (_, key, _), e in zip(memory.messages, envelopes)] == [
        (b"phc_test:user-1", "user-1", "signed_up"),
        (b"phc_test:user-1", "user-1", "$identify"),
        (b"phc_test:user-1", "user-1", "$set"),
        (b"phc_test:user-1", "user-1", "$set"),
        (b"phc_test:user-1", "user-1", "$create_alias"),
        (b"phc_test:$company_acme", "$company_acme", "$groupidentify"),
    ]
    assert [e["properties"] for e in envelopes] == [
        {"plan": "pro"},
        {"$set": {"email": "ada@example.com"}, "$set_once": {"first": "web"}, "$anon_distinct_id": "anon-7"},
        {"$set": {"plan": "team"}},
        {"$set_once": {"source": "ads"}},
        {"alias": "old-id"},
        {"$group_type": "company", "$group_key": "acme", "$group_set": {"name": "Acme"}},
    ]
    assert envelopes[0]["timestamp"] == "2024-05-01T12:00:00+00:00"
    assert all(topic == "events_raw" for topic, _, _ in memory.messages)


def test_the_callers_properties_are_not_changed(client: Client):
    properties = {"a": 1, "$groups": {"team": "x"}}
    client.capture("u", "e", properties, groups={"company": "acme"})
    assert properties == {"a": 1, "$groups": {"team": "x"}}


# -- invalid calls ----------------------------------------------------------------------------------
NAIVE = datetime(2024, 5, 1, 12, 0)

INVALID_CALLS = [
    ("distinct_id None", lambda c: c.capture(None, "e"), "distinct_id must be a str, got NoneType"),
    ("distinct_id int", lambda c: c.capture(42, "e"), "distinct_id must be a str, got int"),
    ("distinct_id empty", lambda c: c.capture("", "e"), "distinct_id must not be empty"),
    ("distinct_id blank", lambda c: c.capture("   ", "e"), "only whitespace"),
    ("distinct_id too long", lambda c: c.capture("x" * 401, "e"), "401 characters long; the limit is 400"),
    ("event empty", lambda c: c.capture("u", ""), "event must not be empty"),
    ("event not str", lambda c: c.capture("u", b"e"), "event must be a str, got bytes"),
    ("event too long", lambda c: c.capture("u", "e" * 201), "the limit is 200"),
    ("properties list", lambda c: c.capture("u", "e", [("a", 1)]), "properties must be a dict, got list"),
    ("properties str", lambda c: c.capture("u", "e", "a=1"), "properties must be a dict, got str"),
    ("properties int key", lambda c: c.capture("u", "e", {1: "a"}), "properties keys must be str, got int"),
    ("properties value", lambda c: c.capture("u", "e", {"tags": {"a", "b"}}), "not JSON-serializable"),
    ("nested non-str key", lambda c: c.capture("u", "e", {"a": {1: 2}}), "not JSON-serializable"),
    ("$groups not a dict", lambda c: c.capture("u", "e", {"$groups": "acme"}, groups={"company": "acme"}),
     "properties['$groups'] must be a dict"),
    ("groups str", lambda c: c.capture("u", "e", groups="acme"), "groups must be a dict"),
    ("group type empty", lambda c: c.capture("u", "e", groups={"": "acme"}), "group_type must be a non-empty str"),
    ("group type int", lambda c: c.capture("u", "e", groups={1: "acme"}), "group_type must be a non-empty str"),
    ("group key None", lambda c: c.capture("u", "e", groups={"company": None}), "groups['company'] must be a str"),
    ("group key bool", lambda c: c.capture("u", "e", groups={"company": True}), "got bool"),
    ("group key empty", lambda c: c.capture("u", "e", groups={"company": ""}), "must not be empty"),
    ("timestamp naive", lambda c: c.capture("u", "e", timestamp=NAIVE), "timestamp must be timezone-aware"),
    ("timestamp str", lambda c: c.capture("u", "e", timestamp="2024-05-01T12:00:00Z"), "got str"),
    ("timestamp date", lambda c: c.capture("u", "e", timestamp=date(2024, 5, 1)), "got date"),
    ("timestamp epoch", lambda c: c.capture("u", "e", timestamp=1714564800), "got int"),
    ("uuid not a uuid", lambda c: c.capture("u", "e", uuid="not-a-uuid"), "'not-a-uuid' is not a valid UUID"),
    ("uuid int", lambda c: c.capture("u", "e", uuid=123), "uuid must be a uuid.UUID or str, got int"),
    ("identify anon id", lambda c: c.identify("u", anon_distinct_id=7), "anon_distinct_id must be a str"),
    ("identify props", lambda c: c.identify("u", ["email"]), "properties must be a dict, got list"),
    ("identify set_once", lambda c: c.identify("u", set_once="x"), "set_once must be a dict"),
    ("set None", lambda c: c.set("u", None), "properties must be a dict, got NoneType"),
    ("set_once None", lambda c: c.set_once("u", None), "properties must be a dict, got NoneType"),
    ("alias to itself", lambda c: c.alias("u", "u"), "previous_id and distinct_id must differ"),
    ("alias previous None", lambda c: c.alias(None, "u"), "previous_id must be a str"),
    ("group_identify type", lambda c: c.group_identify("", "acme", {}), "group_type must be a non-empty str"),
    ("group_identify key", lambda c: c.group_identify("company", None, {}), "group_key must be a str (or int)"),
    ("group_identify props", lambda c: c.group_identify("company", "acme", "x"), "properties must be a dict"),
]


@pytest.mark.parametrize(("call", "message"), [(c, m) for _, c, m in INVALID_CALLS],
                         ids=[name for name, _, _ in INVALID_CALLS])
def test_an_invalid_call_raises_at_once_and_queues_nothing(client: Client, memory: MemoryProducer, call, message):
    with pytest.raises(InvalidCall, match=None) as raised:
        call(client)
    assert message in str(raised.value)
    assert isinstance(raised.value, TypeError) and isinstance(raised.value, ValueError)
    assert memory.messages == [] and client.pending == 0


def test_a_client_needs_a_token():
    with pytest.raises(InvalidCall, match="token must be a non-empty str"):
        Client("", producer=MemoryProducer())


def test_an_event_larger_than_message_max_bytes_is_refused_at_once_by_librdkafka():
    # a real librdkafka producer (no broker needed: the size is checked when queueing)
    client = Client(TOKEN, bootstrap="127.0.0.1:1", producer_config={"message.max.bytes": 10_000})
    try:
        with pytest.raises(InvalidCall, match=r"more than the producer's message.max.bytes \(10000\)"):
            client.capture("u", "big", {"blob": "x" * 20_000})
        client.capture("u", "small")  # the client goes on
        assert client.flush(0.5) >= 1  # the small one was queued and waits (no broker here to take it)
    finally:
        client.close(0)


# -- delivery reports -------------------------------------------------------------------------------
def test_delivery_reports_reach_the_callbacks_without_the_caller_polling():
    every: list[DeliveryReport] = []
    memory = MemoryProducer()
    client = Client(TOKEN, producer=memory, on_delivery=every.append)
    mine: list[DeliveryReport] = []
    try:
        first = client.capture("u1", "e", on_delivery=mine.append)
        second = client.identify("u2", {"a": 1}, on_delivery=mine.append)
        wait_until(lambda: len(every) == 2, 5, message="reports served by the poller thread")
        assert [r.uuid for r in mine] == [first, second]
        assert [(r.distinct_id, r.event, r.ok, r.offset) for r in mine] == [("u1", "e", True, 0), ("u2", "$identify", True, 1)]
        assert {r.uuid for r in every} == {first, second}
        assert (client.delivered, client.failed, client.pending) == (2, 0, 0)
    finally:
        client.close()


def test_failed_deliveries_are_counted_and_reported_to_on_delivery_and_on_error():
    timed_out = KafkaError(KafkaError._MSG_TIMED_OUT)
    memory = MemoryProducer(fail=lambda value: timed_out if b'"doomed"' in value else None)
    errors: list[tuple[KafkaError, bytes]] = []
    client = Client(TOKEN, producer=memory, on_error=lambda error, value: errors.append((error, value)))
    reports: list[DeliveryReport] = []
    try:
        client.capture("u", "fine", on_delivery=reports.append)
        doomed = client.capture("u", "doomed", on_delivery=reports.append)
        assert client.flush() == 0
        assert (client.delivered, client.failed) == (1, 1)
        failed = [r for r in reports if not r.ok]
        assert [(r.uuid, r.error.code(), r.partition) for r in failed] == [(doomed, KafkaError._MSG_TIMED_OUT, None)]
        assert len(errors) == 1 and errors[0][0].code() == KafkaError._MSG_TIMED_OUT
        assert orjson.loads(errors[0][1])["uuid"] == doomed
    finally:
        client.close()


def test_a_callback_that_raises_does_not_stop_the_next_reports(client: Client):
    seen: list[str] = []

    def explode(report: DeliveryReport) -> None:
        seen.append(report.event)
        raise RuntimeError("callback bug")

    client.capture("u", "one", on_delivery=explode)
    client.capture("u", "two", on_delivery=explode)
    client.flush()
    assert seen == ["one", "two"] and client.delivered == 2


def test_close_flushes_is_idempotent_and_later_calls_raise(memory: MemoryProducer):
    client = Client(TOKEN, producer=memory)
    client.capture("u", "e")
    assert client.close() == 0 and client.delivered == 1
    assert client.close() == 0
    assert not client.kafka._poller.is_alive()
    with pytest.raises(RuntimeError, match="the client is closed"):
        client.capture("u", "e")


def test_the_client_is_a_context_manager(memory: MemoryProducer):
    with Client(TOKEN, producer=memory) as client:
        client.capture("u", "e")
    assert client.kafka.closed and client.delivered == 1


# -- asyncio -----------------------------------------------------------------------------------------
def test_async_client_returns_each_delivery_report_and_raises_for_failures():
    memory = MemoryProducer(fail=lambda value: KafkaError(KafkaError._MSG_TIMED_OUT) if b"doomed" in value else None)

    async def scenario():
        async with AsyncClient(Client(TOKEN, producer=memory)) as client:
            reports = await asyncio.gather(*(client.capture(f"u{i}", "clicked", {"i": i}) for i in range(20)))
            identify = await client.identify("u1", {"email": "a@b.c"}, anon_distinct_id="anon")
            group = await client.group_identify("company", "acme", {"name": "Acme"})
            with pytest.raises(DeliveryFailed) as failed:
                await client.capture("u", "doomed")
            with pytest.raises(InvalidCall):
                await client.capture("u", "")
            return reports, identify, group, failed.value, client.client

    reports, identify, group, failed, sync_client = asyncio.run(scenario())
    assert [r.distinct_id for r in reports] == [f"u{i}" for i in range(20)] and all(r.ok for r in reports)
    assert identify.event == "$identify" and group.distinct_id == "$company_acme"
    assert failed.report.event == "doomed" and failed.report.error.code() == KafkaError._MSG_TIMED_OUT
    assert sync_client.kafka.closed and (sync_client.delivered, sync_client.failed) == (22, 1)


# -- through the embedded broker -----------------------------------------------------------------------
def _read(settings: Settings, count: int, timeout: float = 30) -> list:
    topic = TopicNames(settings.topic_prefix).events_raw
    consumer = Consumer(settings.consumer_config(f"reader-{uuid.uuid4()}"))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
    found: list = []

    def more() -> bool:
        found.extend(m for m in consumer.consume(1000, 0.2) if not m.error())
        return len(found) >= count

    try:
        wait_until(more, timeout, message=f"{count} messages on {topic}")
    finally:
        consumer.close()
    return found


@pytest.fixture
def broker_settings(kafka_bootstrap: str) -> Settings:
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=f"bc{uuid.uuid4().hex[:10]}_", teams=f"{TOKEN}:7")
    ensure_topics(settings)
    return settings


@pytest.mark.pipeline
def test_sync_and_async_clients_deliver_through_the_embedded_broker(broker_settings: Settings):
    reports: list[DeliveryReport] = []
    client = Client.from_settings(broker_settings, TOKEN, on_delivery=reports.append)
    sent = {client.capture(f"user-{i % 7}", "clicked", {"i": i}) for i in range(50)}
    assert client.flush() == 0 and (client.delivered, client.failed) == (50, 0)
    assert {r.uuid for r in reports} == sent
    assert all(r.ok and r.partition is not None and r.offset is not None for r in reports)

    async def one_awaited() -> DeliveryReport:
        return await AsyncClient(client).identify("user-1", {"plan": "pro"}, anon_distinct_id="anon-1")

    awaited = asyncio.run(one_awaited())
    assert awaited.ok and awaited.offset is not None
    client.close()

    messages = _read(broker_settings, 51)
    by_uuid = {orjson.loads(m.value())["uuid"]: m for m in messages}
    assert set(by_uuid) == sent | {awaited.uuid}
    for report in [*reports, awaited]:
        message = by_uuid[report.uuid]
        assert message.key() == f"{TOKEN}:{report.distinct_id}".encode()
        assert (message.partition(), message.offset()) == (report.partition, report.offset)
    # one key, one partition: the identity stage finds each distinct id's events in one place
    partitions_of = {}
    for message in messages:
        partitions_of.setdefault(message.key(), set()).add(message.partition())
    assert all(len(p) == 1 for p in partitions_of.values())


@pytest.mark.pipeline
def test_a_missing_topic_is_a_failed_delivery_never_an_auto_created_topic(kafka_bootstrap: str):
    topic = f"missing_{uuid.uuid4().hex[:10]}"
    failures: list[DeliveryReport] = []
    client = Client(TOKEN, bootstrap=kafka_bootstrap, topic=topic, delivery_timeout_s=2, on_delivery=failures.append)
    client.capture("u", "lost?")
    assert client.flush(15) == 0
    assert client.failed == 1 and client.delivered == 0
    assert failures[0].error is not None and failures[0].event == "lost?"
    assert client.kafka.list_topic_partitions() is None
    client.close()
