"""Produce a request's messages and wait for Kafka to acknowledge every one of them.

One idempotent confluent-kafka producer per process (acks=all, lz4, a few ms of linger). A thread
serves its delivery reports (``poll``); each request has a :class:`_Acks` counter that the reports
count down, and the request's future is resolved once, from that thread, when the last report
is in. A request succeeds only if every one of its messages was acknowledged: anything else
(delivery error, message timeout, a queue that stays full, the producer failing) is
:class:`KafkaUnavailable`, which the server answers with 503 so the client retries.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

log = logging.getLogger(__name__)

#: librdkafka settings of the capture producer; the deployment's own settings override them
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
    "partitioner": "murmur2_random",  # Java's default, as producers.backend: keys land where the identity stage expects
    "queue.buffering.max.messages": 500_000,
    "batch.num.messages": 10_000,
    # a missing events_raw is an error (503), not a topic for the broker to create with its own
    # partition count: the identity stage needs events_raw co-partitioned with its state topics
    "allow.auto.create.topics": False,
}


class KafkaUnavailable(Exception):
    """Kafka did not acknowledge every message of a request (retryable: 503)."""


class _Acks:
    """Delivery reports of one request. ``on_delivery`` runs on the poll thread and only counts;
    ``seal`` runs on the event loop once every message is queued. Whichever of the two sees the
    last report and the seal resolves the future (both may: resolving is idempotent)."""

    __slots__ = ("acked", "expected", "error", "future", "loop")

    def __init__(self, future: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        self.acked = 0
        self.expected = -1  # not sealed yet
        self.error: KafkaError | None = None
        self.future = future
        self.loop = loop

    def on_delivery(self, error: KafkaError | None, _message: Any) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.acked += 1
        if self.acked == self.expected:
            self.loop.call_soon_threadsafe(_resolve, self.future, self)

    def seal(self, expected: int) -> None:
        self.expected = expected
        if self.acked == expected:
            _resolve(self.future, self)


def _resolve(future: asyncio.Future, acks: _Acks) -> None:
    if not future.done():
        future.set_result(acks.error)


class AckingProducer:
    """``await send(topic, [(key, value), ...])`` returns once Kafka acknowledged them all."""

    def __init__(self, config: Mapping[str, Any], *, delivery_timeout_s: float) -> None:
        self.config = {**PRODUCER_DEFAULTS, **config, "message.timeout.ms": int(delivery_timeout_s * 1000)}
        self.delivery_timeout_s = delivery_timeout_s
        self.fatal: KafkaError | None = None
        self._producer = Producer({**self.config, "error_cb": self._on_error})
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve_reports, name="capture-delivery", daemon=True)
        self._thread.start()

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self.fatal = error
            log.error("capture: the Kafka producer failed: %s", error)
        elif error.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("capture: no Kafka broker reachable: %s", error)

    def _serve_reports(self) -> None:
        while not self._stopping.is_set():
            try:
                self._producer.poll(0.1)
            except Exception:  # a callback must never stop delivery reports
                log.exception("capture: delivery report handling failed")

    async def send(self, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> None:
        """Queue every message (``produce_batch``; a full queue is retried until the deadline),
        then wait for every delivery report. Raise KafkaUnavailable unless all were acknowledged."""
        if self.fatal is not None:
            raise KafkaUnavailable(f"producer failed: {self.fatal.str()}")
        if not messages:
            return
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        acks = _Acks(future, loop)
        deadline = time.monotonic() + self.delivery_timeout_s + 5.0
        pending = [{"key": key, "value": value} for key, value in messages]
        queued = 0
        while True:
            count = self._producer.produce_batch(topic, pending, on_delivery=acks.on_delivery)
            queued += count
            if count == len(pending):
                break
            failed = pending[count:]
            # the refused must be the tail (librdkafka queues in order until the queue is full), so
            # that queueing them again keeps each distinct id's order; anything else is a 503
            if not all("_error" in m for m in failed) or any("_error" in m for m in pending[:count]):
                raise KafkaUnavailable("produce failed: refused messages are not the batch's tail")
            error = failed[0]["_error"]
            if not all(_queue_full(m["_error"]) for m in failed) or time.monotonic() > deadline:
                raise KafkaUnavailable(f"produce failed: {error}")
            pending = [{"key": m["key"], "value": m["value"]} for m in failed]
            await asyncio.sleep(0.005)  # let librdkafka drain its queue, then queue the rest
        acks.seal(queued)
        try:
            error = await asyncio.wait_for(future, max(deadline - time.monotonic(), 0.1))
        except asyncio.TimeoutError:
            raise KafkaUnavailable("no delivery report before the deadline") from None
        if error is not None:
            raise KafkaUnavailable(f"delivery failed: {error.str()}")

    def reachable(self, topic: str, timeout: float = 1.0) -> bool:
        """Whether the cluster answers a metadata request for ``topic`` (blocking; use a thread)."""
        if self.fatal is not None:
            return False
        try:
            metadata = self._producer.list_topics(topic, timeout=timeout)
        except KafkaException:
            return False
        found = metadata.topics.get(topic)
        return found is not None and found.error is None

    def close(self, timeout: float = 30.0) -> int:
        """Flush what is queued; stop the report thread. Returns the messages left undelivered."""
        left = self._producer.flush(timeout)
        self._stopping.set()
        self._thread.join(5)
        return left


def _queue_full(error: Any) -> bool:
    return isinstance(error, KafkaError) and error.code() == KafkaError._QUEUE_FULL
