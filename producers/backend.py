"""Backend client for other Python services: stateless, every call names its distinct_id.

    client = Client(token="phc_local", bootstrap="127.0.0.1:9092")
    client.capture("user-1", "signed_up", {"plan": "pro"}, groups={"company": "acme"})
    client.flush()

Messages go to ``events_raw`` keyed ``token:distinct_id`` through an idempotent producer
(acks=all, retries inside librdkafka). Invalid calls raise ``ValueError`` at once. Delivery
failures are counted in ``failed`` and passed to ``on_error``.
"""

from __future__ import annotations

import atexit
import uuid as uuid_mod
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message, Producer

from headwater.ids import uuid7
from headwater.settings import Settings
from headwater.topics import EVENTS_RAW
from headwater.wire import MAX_DISTINCT_ID_CHARS, partition_key


def _check_distinct_id(distinct_id: Any) -> str:
    if not isinstance(distinct_id, str) or not distinct_id.strip():
        raise ValueError(f"distinct_id must be a non-empty string, got {distinct_id!r}")
    if len(distinct_id) > MAX_DISTINCT_ID_CHARS:
        raise ValueError(f"distinct_id is longer than {MAX_DISTINCT_ID_CHARS} characters")
    return distinct_id


def _iso(ts: datetime) -> str:
    if ts.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware (UTC)")
    return ts.astimezone(timezone.utc).isoformat()


class Client:
    def __init__(
        self,
        token: str,
        *,
        bootstrap: str = "127.0.0.1:9092",
        topic: str = EVENTS_RAW.base,
        producer_config: Mapping[str, Any] | None = None,
        on_error: Callable[[KafkaError, bytes], None] | None = None,
    ) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError("token must be a non-empty string")
        self.token = token
        self.topic = topic
        self.on_error = on_error
        self.delivered = 0
        self.failed = 0
        config = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "partitioner": "murmur2_random",  # Java's default, so keys land as with any other client
            **(producer_config or {}),
        }
        self._producer = Producer(config)
        self._closed = False
        atexit.register(self.close)

    @classmethod
    def from_settings(cls, settings: Settings, token: str, **kwargs: Any) -> "Client":
        return cls(
            token,
            bootstrap=settings.bootstrap_servers,
            topic=EVENTS_RAW.name(settings.topic_prefix),
            producer_config={k: v for k, v in settings.kafka_config().items() if k != "bootstrap.servers"},
            **kwargs,
        )

    def capture(
        self,
        distinct_id: str,
        event: str,
        properties: Mapping[str, Any] | None = None,
        groups: Mapping[str, str | int] | None = None,
        timestamp: datetime | None = None,
        uuid: str | uuid_mod.UUID | None = None,
    ) -> str:
        """Queue one event; return its uuid. Raises ValueError for an invalid call."""
        distinct_id = _check_distinct_id(distinct_id)
        if not isinstance(event, str) or not event:
            raise ValueError("event must be a non-empty string")
        props = dict(properties or {})
        if groups:
            if not all(isinstance(k, str) and k for k in groups):
                raise ValueError("group types must be non-empty strings")
            props["$groups"] = {**props.get("$groups", {}), **{k: str(v) for k, v in groups.items()}}
        event_uuid = str(uuid_mod.UUID(str(uuid))) if uuid is not None else str(uuid7())
        now = datetime.now(timezone.utc)
        body = {
            "token": self.token,
            "distinct_id": distinct_id,
            "event": event,
            "uuid": event_uuid,
            "timestamp": _iso(timestamp) if timestamp is not None else now.isoformat(),
            "properties": props,
            "now": now.isoformat(),
        }
        self._send(distinct_id, orjson.dumps(body))
        return event_uuid

    def identify(
        self,
        distinct_id: str,
        properties: Mapping[str, Any] | None = None,
        *,
        set_once: Mapping[str, Any] | None = None,
        anon_distinct_id: str | None = None,
        timestamp: datetime | None = None,
    ) -> str:
        """``$identify``: set person properties; with ``anon_distinct_id``, merge that anonymous
        user into ``distinct_id`` (as a browser SDK does on login)."""
        props: dict[str, Any] = {"$set": dict(properties or {})}
        if set_once:
            props["$set_once"] = dict(set_once)
        if anon_distinct_id is not None:
            props["$anon_distinct_id"] = _check_distinct_id(anon_distinct_id)
        return self.capture(distinct_id, "$identify", props, timestamp=timestamp)

    def set(self, distinct_id: str, properties: Mapping[str, Any], timestamp: datetime | None = None) -> str:
        """``$set``: set person properties (overwrite)."""
        return self.capture(distinct_id, "$set", {"$set": dict(properties)}, timestamp=timestamp)

    def set_once(self, distinct_id: str, properties: Mapping[str, Any], timestamp: datetime | None = None) -> str:
        """``$set`` with ``$set_once``: set person properties only where they are absent."""
        return self.capture(distinct_id, "$set", {"$set_once": dict(properties)}, timestamp=timestamp)

    def alias(self, previous_id: str, distinct_id: str, timestamp: datetime | None = None) -> str:
        """``$create_alias``: make ``previous_id`` another id of ``distinct_id``'s person."""
        return self.capture(distinct_id, "$create_alias", {"alias": _check_distinct_id(previous_id)}, timestamp=timestamp)

    def group_identify(
        self, group_type: str, group_key: str | int, properties: Mapping[str, Any] | None = None, timestamp: datetime | None = None
    ) -> str:
        """``$groupidentify``: set a group's properties (shallow merge)."""
        if not isinstance(group_type, str) or not group_type:
            raise ValueError("group_type must be a non-empty string")
        if group_key is None or str(group_key) == "":
            raise ValueError("group_key must not be empty")
        props = {"$group_type": group_type, "$group_key": str(group_key), "$group_set": dict(properties or {})}
        return self.capture(f"${group_type}_{group_key}", "$groupidentify", props, timestamp=timestamp)

    def _send(self, distinct_id: str, value: bytes) -> None:
        if self._closed:
            raise RuntimeError("client is closed")
        key = partition_key(self.token, distinct_id).encode()
        while True:
            try:
                self._producer.produce(self.topic, value, key, on_delivery=self._on_delivery)
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.delivered += 1
            return
        self.failed += 1
        if self.on_error:
            self.on_error(error, message.value())

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for every queued event's delivery report; return how many are still queued."""
        return self._producer.flush(timeout)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            atexit.unregister(self.close)
            self._producer.flush(30)
