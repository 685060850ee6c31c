"""The stage runtime: consume a batch, run the stage's pipeline, produce its records and commit
the input offsets in one Kafka transaction (exactly-once from input topic to output topics).

A stage is anything with ``process_batch(messages) -> list[Record]``. The runtime owns every
Kafka call; stages stay pure. Decisions (docs/adr/0002-stage-runtime.md):
- confluent-kafka (librdkafka) rather than Faust/aiokafka, for throughput per core;
- one transaction per batch: outputs and the consumer offsets commit together, so a crash
  anywhere leaves either the whole batch or none of it visible to ``read_committed`` readers;
- a stable ``transactional.id`` per (stage, worker id): a restarted worker fences its previous
  incarnation and aborts its open transaction at once, instead of blocking readers until a timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from headwater.settings import Settings

from .outputs import Record

log = logging.getLogger(__name__)


class Stage(Protocol):
    def process_batch(self, messages: Sequence[Message]) -> list[Record]: ...


class StageRunner:
    """Runs one stage until ``stop`` is set; counts what it did in ``self.consumed``/``produced``."""

    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        input_topics: list[str],
        stage: Stage,
        worker_id: str = "0",
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.stage = stage
        self.input_topics = input_topics
        self.group_id = f"{settings.topic_prefix}headwater-{name}"
        self.on_batch = on_batch
        self.consumed = 0
        self.produced = 0
        self.consumer = Consumer(settings.consumer_config(self.group_id))
        self.producer = Producer(
            settings.kafka_config(
                **{
                    "transactional.id": f"{self.group_id}-{worker_id}",
                    "transaction.timeout.ms": 30_000,
                    "linger.ms": 5,
                    "compression.type": "lz4",
                    "partitioner": "murmur2_random",  # Java's default: keys land where any client puts them
                    "message.max.bytes": settings.max_message_bytes + 65_536,
                }
            )
        )

    def run(self, stop: threading.Event) -> None:
        self.producer.init_transactions(30)
        self.consumer.subscribe(self.input_topics, on_revoke=self._on_revoke)
        log.info("%s: consuming %s as group %s", self.name, ",".join(self.input_topics), self.group_id)
        batch_size = self.settings.processor_batch_size
        timeout = self.settings.processor_batch_ms / 1000
        try:
            while not stop.is_set():
                messages = self.consumer.consume(batch_size, timeout)
                if not messages:
                    continue
                good = [m for m in messages if not self._is_error(m)]
                if good:
                    self._process_in_transaction(good)
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.consumer.close()
        except RuntimeError:
            pass  # already closed
        self.producer.flush(10)

    # -- internals ------------------------------------------------------------------------------
    def _is_error(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return False
        if error.code() == KafkaError._PARTITION_EOF:
            return True
        if error.fatal():
            raise KafkaException(error)
        log.warning("%s: consumer error: %s", self.name, error)
        return True

    def _process_in_transaction(self, messages: list[Message]) -> None:
        records = self.stage.process_batch(messages)
        offsets: dict[tuple[str, int], int] = {}
        for m in messages:
            offsets[(m.topic(), m.partition())] = m.offset() + 1
        try:
            self.producer.begin_transaction()
            produce = self.producer.produce
            for record in records:
                while True:
                    try:
                        produce(record.topic, record.value, record.key, headers=record.headers)
                        break
                    except BufferError:
                        self.producer.poll(0.05)
            self.producer.send_offsets_to_transaction(
                [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                self.consumer.consumer_group_metadata(),
            )
            self.producer.commit_transaction()
        except KafkaException as exc:
            self._recover(exc, offsets)
            return
        self.consumed += len(messages)
        self.produced += len(records)
        if self.on_batch:
            self.on_batch(len(messages), len(records))

    def _recover(self, exc: KafkaException, offsets: dict[tuple[str, int], int]) -> None:
        error = exc.args[0]
        if getattr(error, "txn_requires_abort", lambda: False)():
            log.warning("%s: transaction aborted (%s); the batch will be read again", self.name, error)
            self.producer.abort_transaction()
            self._rewind(offsets)
            return
        if getattr(error, "retriable", lambda: False)():
            log.warning("%s: retriable error committing the batch (%s); reading it again", self.name, error)
            time.sleep(0.2)
            self.producer.abort_transaction()
            self._rewind(offsets)
            return
        raise exc

    def _rewind(self, offsets: dict[tuple[str, int], int]) -> None:
        """Seek back to the last committed offsets so the aborted batch is processed again."""
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        wanted = [TopicPartition(t, p) for (t, p) in offsets if (t, p) in assigned]
        if not wanted:
            return
        for tp in self.consumer.committed(wanted, timeout=10):
            tp.offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            self.consumer.seek(tp)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("%s: partitions revoked: %s", self.name, [(p.topic, p.partition) for p in partitions])
