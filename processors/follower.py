"""Follow whole topics into memory: every partition, from the beginning, read_committed, no
consumer group (every worker reads everything). Used for the group tables (ADR 0004).

``start`` reads up to the end offsets it finds (bounded by a timeout: a partition whose end
cannot be reached, for example behind an open transaction, is followed on by ``poll``), and
``poll`` takes whatever has arrived since, without waiting. A record ``apply`` cannot read is
logged and skipped: the sink dead-letters the same record from the same topic.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from headwater.settings import Settings
from headwater.tansu import SETTLE_KEY

log = logging.getLogger(__name__)


class TopicFollower:
    def __init__(self, settings: Settings, topics: list[str], apply: Callable[[str | None, bytes | None], None],
                 name: str = "follower") -> None:
        self.topics = topics
        self.apply = apply
        self.name = name
        self.applied = 0
        self.consumer = Consumer(settings.kafka_config(**{
            "group.id": f"{settings.topic_prefix}headwater-{name}-{uuid.uuid4().hex[:8]}",  # never joins: assign()
            "enable.auto.commit": False, "isolation.level": settings.isolation_level,
            "enable.partition.eof": False, "fetch.wait.max.ms": 10}))

    def start(self, timeout: float = 30.0) -> None:
        started = time.monotonic()
        partitions: list[TopicPartition] = []
        metadata = self.consumer.list_topics(timeout=10)
        for topic in self.topics:
            for number in sorted(metadata.topics[topic].partitions):
                partitions.append(TopicPartition(topic, number, OFFSET_BEGINNING))
        self.consumer.assign(partitions)
        ends = {}
        for tp in partitions:
            _low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
            if high > 0:
                ends[(tp.topic, tp.partition)] = high
        positions: dict[tuple[str, int], int] = {}
        while ends and time.monotonic() - started < timeout:
            for m in self.consumer.consume(10_000, 0.2):
                if self._take(m):
                    positions[(m.topic(), m.partition())] = m.offset() + 1
            for tp in self.consumer.position([TopicPartition(t, p) for t, p in ends]):
                positions[(tp.topic, tp.partition)] = max(positions.get((tp.topic, tp.partition), 0), tp.offset)
            ends = {k: end for k, end in ends.items() if positions.get(k, 0) < end}
        if ends:
            log.warning("%s: not caught up with %s after %.0fs; following on", self.name, sorted(ends), timeout)
        log.info("%s: read %d records of %s in %.2fs", self.name, self.applied, ",".join(self.topics),
                 time.monotonic() - started)

    def poll(self) -> None:
        for m in self.consumer.consume(10_000, 0):
            self._take(m)

    def _take(self, m: Message) -> bool:
        if m.error() is not None:
            return False
        if m.key() == SETTLE_KEY:  # the settler's record (ADR 0015)
            return True
        try:
            self.apply(m.topic(), m.value())
            self.applied += 1
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: skipped unreadable record %s[%s]@%s: %r", self.name, m.topic(), m.partition(), m.offset(), exc)
        return True

    def close(self) -> None:
        try:
            self.consumer.close()
        except RuntimeError:
            pass
