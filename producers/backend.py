"""Backend client for other Python services: stateless, every call names its distinct_id.

    client = Client(token="phc_local", bootstrap="127.0.0.1:9092")
    client.capture("user-1", "signed_up", {"plan": "pro"}, groups={"company": "acme"})
    client.flush()

Messages go to ``events_raw`` keyed ``token:distinct_id`` (``headwater.wire.partition_key``)
through one idempotent producer (acks=all, lz4, batched by a few ms of linger, retried inside
librdkafka until ``delivery_timeout_s``). The layers, each usable alone:

- ``build_event`` and the ``check_*`` functions: a call → its ``OutgoingEvent`` (key and JSON
  value). Pure; every argument is checked, and a wrong one raises ``InvalidCall`` at once.
- ``EventsProducer``: the Kafka side. Each message's ``DeliveryReport`` reaches the callbacks
  without the caller polling; it counts ``delivered`` and ``failed``; ``flush()``,
  ``await aflush()``; closes at exit.
- ``Client``: the PostHog backend API on top (``capture``, ``identify``, ``set``, ``set_once``,
  ``alias``, ``group_identify``); each call returns the event's uuid and takes an optional
  ``on_delivery`` callback.
- ``AsyncClient``: the same calls for asyncio services; each ``await`` returns the event's
  ``DeliveryReport`` once Kafka acknowledged it (``DeliveryFailed`` otherwise).

Where callbacks run: each ``send`` serves the reports already in, in the sending thread (as
``flush`` does); when nothing was sent for 5 ms, a poller thread serves them. So a callback may
run in any thread that uses the client, or the poller: keep callbacks short and thread-safe, and
do not call the client from one. An exception in a callback is logged; reports go on.
ADR 0010 (``docs/adr/0010-python-clients.md``) gives the reasons.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import signal
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any, NamedTuple

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from headwater.ids import uuid7
from headwater.settings import Settings
from headwater.topics import EVENTS_RAW
from headwater.wire import MAX_DISTINCT_ID_CHARS, MAX_EVENT_NAME_CHARS, partition_key

log = logging.getLogger(__name__)

#: librdkafka settings of the clients' producer; ``producer_config`` (and the settings) override them
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,  # retries neither duplicate nor reorder a key's messages
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
    "partitioner": "murmur2_random",  # Java's default, so keys land as with any other client
    # a missing events_raw is reported as failed deliveries, never created by the broker with its
    # own partition count (the identity stage needs events_raw co-partitioned with its state)
    "allow.auto.create.topics": False,
}


class InvalidCall(TypeError, ValueError):
    """A call the client refuses before queueing anything. Both a TypeError (wrong type) and a
    ValueError (wrong value), so that either ``except`` catches it."""


# -- argument checks ------------------------------------------------------------------------------
def check_distinct_id(value: Any, name: str = "distinct_id") -> str:
    if not isinstance(value, str):
        raise InvalidCall(f"{name} must be a str, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise InvalidCall(f"{name} must not be empty or only whitespace, got {value!r}")
    if len(value) > MAX_DISTINCT_ID_CHARS:
        raise InvalidCall(f"{name} is {len(value)} characters long; the limit is {MAX_DISTINCT_ID_CHARS}")
    return value


def check_event(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidCall(f"event must be a str, got {type(value).__name__} {value!r}")
    if not value:
        raise InvalidCall("event must not be empty")
    if len(value) > MAX_EVENT_NAME_CHARS:
        raise InvalidCall(f"event is {len(value)} characters long; the limit is {MAX_EVENT_NAME_CHARS}")
    return value


def check_properties(value: Any, name: str = "properties", *, required: bool = False) -> dict[str, Any]:
    """A copy of a mapping with str keys (None → {} unless ``required``). Values are checked
    when the event is encoded: they must be JSON-serializable."""
    if value is None and not required:
        return {}
    if type(value) is dict and all(type(k) is str for k in value):  # the common case, fast
        return value.copy()
    if not isinstance(value, Mapping):
        raise InvalidCall(f"{name} must be a dict, got {type(value).__name__} {value!r}")
    for key in value:
        if not isinstance(key, str):
            raise InvalidCall(f"{name} keys must be str, got {type(key).__name__} {key!r}")
    return dict(value)


def check_group_type(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidCall(f"group_type must be a non-empty str, got {value!r}")
    return value


def check_group_key(value: Any, name: str = "group_key") -> str:
    """A group key: a non-empty str, or an int (PostHog keys are text; ``42`` becomes ``"42"``)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidCall(f"{name} must be a str (or int), got {type(value).__name__} {value!r}")
    text = str(value)
    if not text:
        raise InvalidCall(f"{name} must not be empty")
    return text


def check_groups(value: Any) -> dict[str, str]:
    """``{group_type: group_key}`` (None → {})."""
    if value is None:
        return {}
    if type(value) is dict and all(type(k) is str and k and type(v) is str and v for k, v in value.items()):
        return value.copy()  # the common case, fast
    if not isinstance(value, Mapping):
        raise InvalidCall(f"groups must be a dict of group_type -> group_key, got {type(value).__name__} {value!r}")
    return {check_group_type(k): check_group_key(v, f"groups[{k!r}]") for k, v in value.items()}


def check_timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidCall(f"timestamp must be a timezone-aware datetime, got {type(value).__name__} {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidCall(f"timestamp must be timezone-aware (e.g. tzinfo=timezone.utc), got naive {value!r}")
    return value


def check_uuid(value: Any) -> str | None:
    """The canonical text of a uuid given as ``uuid.UUID`` or str; None stays None."""
    if value is None:
        return None
    if isinstance(value, uuid_mod.UUID):
        return str(value)
    if not isinstance(value, str):
        raise InvalidCall(f"uuid must be a uuid.UUID or str, got {type(value).__name__} {value!r}")
    try:
        return str(uuid_mod.UUID(value))
    except ValueError:
        raise InvalidCall(f"uuid {value!r} is not a valid UUID") from None


def iso_utc(ts: datetime) -> str:
    """ISO 8601 text of an aware datetime, in UTC."""
    return ts.isoformat() if ts.tzinfo is timezone.utc else ts.astimezone(timezone.utc).isoformat()


# -- messages ------------------------------------------------------------------------------------
class OutgoingEvent(NamedTuple):  # a tuple: made once per event, it must be cheap
    """One message for ``events_raw``: key ``token:distinct_id`` and the JSON envelope."""

    uuid: str
    distinct_id: str
    event: str
    key: bytes
    value: bytes


def encode_event(token: str, distinct_id: str, event: str, envelope: Mapping[str, Any]) -> OutgoingEvent:
    """Encode a checked envelope; a value that is not JSON-serializable is an ``InvalidCall``."""
    try:
        value = orjson.dumps(envelope)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise InvalidCall(f"event {event!r} is not JSON-serializable: {exc}") from None
    return OutgoingEvent(envelope["uuid"], distinct_id, event, partition_key(token, distinct_id).encode(), value)


def build_event(
    token: str,
    distinct_id: Any,
    event: Any,
    properties: Any = None,
    *,
    groups: Any = None,
    timestamp: Any = None,
    uuid: Any = None,
    now: datetime | None = None,
) -> OutgoingEvent:
    """Check a capture call and build its message. ``groups`` become ``properties.$groups``
    (merged over a ``$groups`` already in ``properties``); without ``uuid`` a UUIDv7 is made;
    without ``timestamp`` the event happened ``now``. Raises ``InvalidCall``."""
    distinct_id = check_distinct_id(distinct_id)
    event = check_event(event)
    props = check_properties(properties)
    groups = check_groups(groups)
    timestamp = check_timestamp(timestamp)
    event_uuid = check_uuid(uuid)
    if groups:
        existing = props.get("$groups", {})
        if not isinstance(existing, Mapping):
            raise InvalidCall(f"properties['$groups'] must be a dict, got {type(existing).__name__}")
        props["$groups"] = {**existing, **groups}
    now = now or datetime.now(timezone.utc)
    now_iso = iso_utc(now)
    envelope = {
        "token": token,
        "distinct_id": distinct_id,
        "event": event,
        "uuid": event_uuid or str(uuid7(int(now.timestamp() * 1000))),
        "timestamp": iso_utc(timestamp) if timestamp is not None else now_iso,
        "properties": props,
        "now": now_iso,
    }
    return encode_event(token, distinct_id, event, envelope)


# -- the Kafka side ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What became of one message: acknowledged at ``partition``/``offset``, or ``error``."""

    uuid: str
    distinct_id: str
    event: str
    topic: str
    partition: int | None
    offset: int | None
    error: KafkaError | None
    value: bytes | None

    @property
    def ok(self) -> bool:
        return self.error is None


class DeliveryFailed(Exception):
    """Kafka did not take the event (``AsyncClient``); ``report`` says why."""

    def __init__(self, report: DeliveryReport) -> None:
        super().__init__(f"event {report.event!r} ({report.uuid}) was not delivered: {report.error}")
        self.report = report


ReportCallback = Callable[[DeliveryReport], None]

#: the poller serves delivery reports once nothing was sent for this long (the sender serves them before)
QUIET_S = 0.005


class _ClosedProducer:
    """Stands for the producer of a closed client, whose librdkafka handle is released."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("the client is closed")

    def __len__(self) -> int:
        return 0


_CLOSED = _ClosedProducer()


class EventsProducer:
    """One idempotent producer to ``topic``; delivery reports served by ``send`` and, while
    nothing is sent, by a poller thread.

    ``send`` queues a message (it only waits while librdkafka's local queue is full); each
    report goes to that call's ``on_delivery``, then to the producer-wide ``on_delivery``
    (without either, the report is only counted: no object is made for it).
    ``producer`` replaces the confluent-kafka Producer (tests use an in-memory one).
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        producer_config: Mapping[str, Any] | None = None,
        on_delivery: ReportCallback | None = None,
        delivery_timeout_s: float | None = None,
        producer: Any = None,
        poll_interval_s: float = 0.05,
    ) -> None:
        config = {**PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap, **(producer_config or {})}
        if delivery_timeout_s is not None:
            config["message.timeout.ms"] = int(delivery_timeout_s * 1000)
        self.config = config
        self.topic = topic
        self.on_delivery = on_delivery
        self.max_queued = int(config.get("queue.buffering.max.messages", 100_000))
        self.delivered = self.failed = 0  # changed only by delivery reports, under _counts
        self.fatal: KafkaError | None = None
        self._counts = threading.Lock()
        self._producer = producer if producer is not None else Producer({**config, "error_cb": self._on_kafka_error})
        self._closed = False
        self._stopping = threading.Event()
        self._poll_interval_s = poll_interval_s
        self._last_send = 0.0
        self._poller = threading.Thread(target=self._serve_reports, name=f"headwater-delivery-{topic}", daemon=True)
        self._poller.start()
        atexit.register(self.close)

    @property
    def pending(self) -> int:
        """librdkafka's out-queue: messages not yet acknowledged or whose report is not served,
        plus any client event (an error) not served yet."""
        return len(self._producer)

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, message: OutgoingEvent, on_delivery: ReportCallback | None = None) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self.fatal is not None:
            raise RuntimeError(f"the Kafka producer failed and cannot send: {self.fatal.str()}")
        # a report object only for those who asked for one: counting alone is the hot path
        callback = self._count if on_delivery is None and self.on_delivery is None else partial(
            self._report, message, on_delivery)
        while True:
            try:
                self._producer.produce(self.topic, message.value, message.key, on_delivery=callback)
                break
            except BufferError:  # local queue full: let delivery reports free room
                self._producer.poll(0.01)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if isinstance(error, KafkaError) and error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    raise InvalidCall(
                        f"event {message.event!r} is {len(message.value) + len(message.key)} bytes, more than "
                        f"the producer's message.max.bytes ({self.config.get('message.max.bytes', 1_000_000)})"
                    ) from None
                raise
        self._last_send = time.monotonic()
        self._producer.poll(0)  # serve the reports that are in, here: no thread switch per report

    def _count(self, error: KafkaError | None, _message: Message) -> None:
        with self._counts:
            if error is None:
                self.delivered += 1
            else:
                self.failed += 1

    def _report(self, message: OutgoingEvent, on_delivery: ReportCallback | None, error: KafkaError | None,
                kafka_message: Message) -> None:
        ok = error is None
        report = DeliveryReport(
            message.uuid, message.distinct_id, message.event, self.topic,
            kafka_message.partition() if ok else None, kafka_message.offset() if ok else None, error, message.value,
        )
        with self._counts:
            if ok:
                self.delivered += 1
            else:
                self.failed += 1
        for callback in (on_delivery, self.on_delivery):
            if callback is not None:
                try:
                    callback(report)
                except Exception:  # a callback must never stop delivery reports
                    log.exception("headwater client: a delivery callback raised")

    def _on_kafka_error(self, error: KafkaError) -> None:
        if error.fatal():
            self.fatal = error
            log.error("headwater client: the Kafka producer failed: %s", error)
        elif error.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("headwater client: no Kafka broker reachable: %s", error.str())
        else:  # librdkafka retries these itself, and logs them
            log.debug("headwater client: Kafka: %s", error)

    def _serve_reports(self) -> None:
        """The poller: serves the reports whenever nobody has sent for ``QUIET_S``, waiting in
        ``poll`` so that a report is served as soon as it comes. While the client is sending,
        ``send`` serves them in the caller's thread: a report served here while a thread sends
        costs a GIL hand-over per message (measured: up to 3x the CPU per event)."""
        if hasattr(signal, "pthread_sigmask"):  # signals are the main thread's (Ctrl-C must interrupt it)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        while not self._stopping.is_set():
            if time.monotonic() - self._last_send < QUIET_S:
                self._stopping.wait(QUIET_S)
                continue
            try:
                self._producer.poll(self._poll_interval_s)
            except Exception:
                log.exception("headwater client: polling for delivery reports failed")

    def flush(self, timeout: float = 30.0) -> int:
        """Wait up to ``timeout`` s for every queued message's delivery report; return how many
        are still without one (0: every report is in, see ``failed`` for the outcome)."""
        if self._closed:
            return 0  # close flushed; what was left then is gone
        return self._producer.flush(timeout)

    async def aflush(self, timeout: float = 30.0) -> int:
        """``flush`` for asyncio: waits in a worker thread, the event loop runs on."""
        return await asyncio.get_running_loop().run_in_executor(None, self.flush, timeout)

    def list_topic_partitions(self, timeout: float = 5.0) -> int | None:
        """Partitions of ``topic`` per the cluster, None if it does not exist. Raises
        ``KafkaException`` if the cluster does not answer within ``timeout``."""
        metadata = self._producer.list_topics(self.topic, timeout=timeout)
        found = metadata.topics.get(self.topic)
        if found is None or found.error is not None:
            return None
        return len(found.partitions)

    def close(self, timeout: float = 30.0) -> int:
        """Flush (up to ``timeout`` s), stop the poller. Idempotent; also runs at exit.
        Returns how many messages are left without a delivery report."""
        if self._closed:
            return 0
        self._closed = True
        atexit.unregister(self.close)
        left = self._producer.flush(timeout)
        self._stopping.set()
        self._poller.join(5)
        self._producer = _CLOSED  # librdkafka's handle goes with it: no connections left behind
        if left:
            log.warning("headwater client: closed with %d events still undelivered", left)
        return left


# -- the PostHog backend API ---------------------------------------------------------------------
class Client:
    """Stateless PostHog-style client for one project token (see the module docstring).

    Every method checks its arguments (``InvalidCall`` at once), queues one event and returns its
    uuid; pass ``on_delivery`` to learn that event's ``DeliveryReport``. ``on_delivery`` given
    here receives every report; ``on_error(error, value)`` only the failed ones.
    """

    def __init__(
        self,
        token: str,
        *,
        bootstrap: str = "127.0.0.1:9092",
        topic: str = EVENTS_RAW.base,
        producer_config: Mapping[str, Any] | None = None,
        on_error: Callable[[KafkaError, bytes], None] | None = None,
        on_delivery: ReportCallback | None = None,
        delivery_timeout_s: float | None = None,
        producer: Any = None,
    ) -> None:
        if not isinstance(token, str) or not token:
            raise InvalidCall(f"token must be a non-empty str, got {token!r}")
        if not isinstance(topic, str) or not topic:
            raise InvalidCall(f"topic must be a non-empty str, got {topic!r}")
        self.token = token
        self.topic = topic
        self.on_error = on_error
        self._on_delivery = on_delivery
        self.kafka = EventsProducer(
            bootstrap=bootstrap, topic=topic, producer_config=producer_config,
            on_delivery=self._every_report if on_error is not None or on_delivery is not None else None,
            delivery_timeout_s=delivery_timeout_s, producer=producer,
        )

    @classmethod
    def from_settings(cls, settings: Settings, token: str, **kwargs: Any) -> "Client":
        return cls(
            token,
            bootstrap=settings.bootstrap_servers,
            topic=EVENTS_RAW.name(settings.topic_prefix),
            producer_config={k: v for k, v in settings.kafka_config().items() if k != "bootstrap.servers"},
            **kwargs,
        )

    # counts and lifecycle, from the producer
    @property
    def delivered(self) -> int:
        return self.kafka.delivered

    @property
    def failed(self) -> int:
        return self.kafka.failed

    @property
    def pending(self) -> int:
        return self.kafka.pending

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for every queued event's delivery report; return how many are still queued."""
        return self.kafka.flush(timeout)

    async def aflush(self, timeout: float = 30.0) -> int:
        return await self.kafka.aflush(timeout)

    def close(self, timeout: float = 30.0) -> int:
        return self.kafka.close(timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _every_report(self, report: DeliveryReport) -> None:
        if report.error is not None and self.on_error is not None:
            self.on_error(report.error, report.value or b"")
        if self._on_delivery is not None:
            self._on_delivery(report)

    def _send(self, message: OutgoingEvent, on_delivery: ReportCallback | None) -> str:
        self.kafka.send(message, on_delivery)
        return message.uuid

    # the calls
    def capture(
        self,
        distinct_id: str,
        event: str,
        properties: Mapping[str, Any] | None = None,
        groups: Mapping[str, str | int] | None = None,
        timestamp: datetime | None = None,
        uuid: str | uuid_mod.UUID | None = None,
        *,
        on_delivery: ReportCallback | None = None,
    ) -> str:
        """Queue one event; return its uuid (send the same uuid again to retry it: the sink keeps
        one copy). ``groups={"company": "acme"}`` becomes ``properties.$groups``."""
        message = build_event(self.token, distinct_id, event, properties, groups=groups, timestamp=timestamp, uuid=uuid)
        return self._send(message, on_delivery)

    def identify(
        self,
        distinct_id: str,
        properties: Mapping[str, Any] | None = None,
        *,
        set_once: Mapping[str, Any] | None = None,
        anon_distinct_id: str | None = None,
        timestamp: datetime | None = None,
        uuid: str | uuid_mod.UUID | None = None,
        on_delivery: ReportCallback | None = None,
    ) -> str:
        """``$identify``: set person properties; with ``anon_distinct_id``, merge that anonymous
        user into ``distinct_id`` (as a browser SDK does on login)."""
        props: dict[str, Any] = {"$set": check_properties(properties)}
        if set_once is not None:
            props["$set_once"] = check_properties(set_once, "set_once")
        if anon_distinct_id is not None:
            props["$anon_distinct_id"] = check_distinct_id(anon_distinct_id, "anon_distinct_id")
        return self.capture(distinct_id, "$identify", props, timestamp=timestamp, uuid=uuid, on_delivery=on_delivery)

    def set(self, distinct_id: str, properties: Mapping[str, Any], timestamp: datetime | None = None, *,
            uuid: str | uuid_mod.UUID | None = None, on_delivery: ReportCallback | None = None) -> str:
        """``$set``: set person properties (overwrite)."""
        props = {"$set": check_properties(properties, required=True)}
        return self.capture(distinct_id, "$set", props, timestamp=timestamp, uuid=uuid, on_delivery=on_delivery)

    def set_once(self, distinct_id: str, properties: Mapping[str, Any], timestamp: datetime | None = None, *,
                 uuid: str | uuid_mod.UUID | None = None, on_delivery: ReportCallback | None = None) -> str:
        """``$set`` with ``$set_once``: set person properties only where they are absent."""
        props = {"$set_once": check_properties(properties, required=True)}
        return self.capture(distinct_id, "$set", props, timestamp=timestamp, uuid=uuid, on_delivery=on_delivery)

    def alias(self, previous_id: str, distinct_id: str, timestamp: datetime | None = None, *,
              uuid: str | uuid_mod.UUID | None = None, on_delivery: ReportCallback | None = None) -> str:
        """``$create_alias``: make ``previous_id`` another id of ``distinct_id``'s person."""
        previous_id = check_distinct_id(previous_id, "previous_id")
        if previous_id == distinct_id:
            raise InvalidCall(f"alias of {distinct_id!r} to itself: previous_id and distinct_id must differ")
        return self.capture(distinct_id, "$create_alias", {"alias": previous_id}, timestamp=timestamp, uuid=uuid,
                            on_delivery=on_delivery)

    def group_identify(
        self,
        group_type: str,
        group_key: str | int,
        properties: Mapping[str, Any] | None = None,
        timestamp: datetime | None = None,
        *,
        uuid: str | uuid_mod.UUID | None = None,
        on_delivery: ReportCallback | None = None,
    ) -> str:
        """``$groupidentify``: set a group's properties (shallow merge). Sent, as posthog-python
        does, under the distinct id ``$<group_type>_<group_key>``."""
        group_type = check_group_type(group_type)
        group_key = check_group_key(group_key)
        props = {"$group_type": group_type, "$group_key": group_key, "$group_set": check_properties(properties)}
        return self.capture(f"${group_type}_{group_key}", "$groupidentify", props, timestamp=timestamp, uuid=uuid,
                            on_delivery=on_delivery)


# -- asyncio ---------------------------------------------------------------------------------------
def _settle(future: asyncio.Future, report: DeliveryReport) -> None:
    if not future.done():
        future.set_result(report)


class AsyncClient:
    """The ``Client`` calls for asyncio services: ``await`` returns the event's ``DeliveryReport``
    once Kafka acknowledged it, or raises ``DeliveryFailed``. Invalid calls raise ``InvalidCall``
    before anything is queued. Many calls can be in flight at once (``asyncio.gather``); for
    fire-and-forget volume use ``client.capture`` and ``await client.aflush()`` instead.

    Queueing never blocks the event loop: while librdkafka's local queue is nearly full, the call
    waits with ``asyncio.sleep``.
    """

    def __init__(self, client: Client) -> None:
        self.client = client

    @classmethod
    def from_settings(cls, settings: Settings, token: str, **kwargs: Any) -> "AsyncClient":
        return cls(Client.from_settings(settings, token, **kwargs))

    async def _deliver(self, call: Callable[..., str], *args: Any, **kwargs: Any) -> DeliveryReport:
        loop = asyncio.get_running_loop()
        kafka = self.client.kafka
        while kafka.pending >= kafka.max_queued * 0.9:
            await asyncio.sleep(0.005)
        future: asyncio.Future[DeliveryReport] = loop.create_future()
        call(*args, on_delivery=lambda report: loop.call_soon_threadsafe(_settle, future, report), **kwargs)
        report = await future
        if report.error is not None:
            raise DeliveryFailed(report)
        return report

    async def capture(self, distinct_id: str, event: str, properties: Mapping[str, Any] | None = None,
                      groups: Mapping[str, str | int] | None = None, timestamp: datetime | None = None,
                      uuid: str | uuid_mod.UUID | None = None) -> DeliveryReport:
        return await self._deliver(self.client.capture, distinct_id, event, properties, groups, timestamp, uuid)

    async def identify(self, distinct_id: str, properties: Mapping[str, Any] | None = None, **kwargs: Any) -> DeliveryReport:
        return await self._deliver(self.client.identify, distinct_id, properties, **kwargs)

    async def set(self, distinct_id: str, properties: Mapping[str, Any], **kwargs: Any) -> DeliveryReport:
        return await self._deliver(self.client.set, distinct_id, properties, **kwargs)

    async def set_once(self, distinct_id: str, properties: Mapping[str, Any], **kwargs: Any) -> DeliveryReport:
        return await self._deliver(self.client.set_once, distinct_id, properties, **kwargs)

    async def alias(self, previous_id: str, distinct_id: str, **kwargs: Any) -> DeliveryReport:
        return await self._deliver(self.client.alias, previous_id, distinct_id, **kwargs)

    async def group_identify(self, group_type: str, group_key: str | int, properties: Mapping[str, Any] | None = None,
                             **kwargs: Any) -> DeliveryReport:
        return await self._deliver(self.client.group_identify, group_type, group_key, properties, **kwargs)

    async def flush(self, timeout: float = 30.0) -> int:
        return await self.client.aflush(timeout)

    async def close(self, timeout: float = 30.0) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self.client.close, timeout)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
