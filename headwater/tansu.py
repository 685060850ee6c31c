"""Workarounds for the transactions of the embedded broker, Tansu 0.6 (ADR 0015).

Tansu commits a transaction at its EndTxn only if every other unfinished transaction that wrote
one of its partitions is already prepared; otherwise it stays prepared until a later EndTxn over
one of its partitions finds every transaction there prepared. Two things follow:

- **One EndTxn at a time (``TxnLock``).** An EndTxn writes its markers between two updates of the
  broker's transaction table. If another EndTxn commits the transaction meanwhile, the markers
  written after that leave the committed transaction with ranges again, which no EndTxn clears
  (only its own producer's next transaction does), and which block every later EndTxn over those
  partitions. Once its producer is gone (a kill, a rebalance), they block for good. The lock makes
  each process's InitProducerId, EndTxn and abort wait for the others' on the same broker.
- **The settler (``TransactionSettler``).** The identity workers' producers share their output
  partitions, so their commits defer each other, and when the input stops the last deferred one
  waits for good: its records sit above the last stable offset (LSO), where read_committed readers
  (the workers reading the inbox) never get them, and its input offsets are not committed. The
  settler watches the partitions the workers write. A partition whose LSO stays below its end
  while its end does not move is stuck behind such a transaction: it commits a transaction of its
  own with one record on each stuck partition, key ``SETTLE_KEY`` and no value. That EndTxn
  overlaps the stuck transactions, finds them prepared, and commits them. Every reader of these
  topics skips the record.

Both are on where ``Settings.tansu_workarounds`` says so, as the other Tansu workarounds are:
Apache Kafka resolves transactions itself. The settler runs in the sink process.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import IsolationLevel, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from headwater.settings import Settings
from headwater.topics import TopicNames

log = logging.getLogger(__name__)

SETTLE_KEY = b"__settle__"
IDLE_S = 2.0  # an LSO below the end this long, with the end still, is stuck
CHECK_EVERY_S = 1.0
MAX_WAIT_S = 60.0  # a partition still stuck after a settle is tried again after 2, 4, ... 60 s
TIMEOUT_S = 10.0


def settled_topics(topics: TopicNames) -> list[str]:
    """The topics the identity workers write in transactions."""
    return [topics.events_enriched, topics.persons, topics.person_distinct_ids, topics.groups, topics.group_types,
            topics.ingestion_warnings, topics.events_dead_letter, topics.identity_inbox, topics.identity_changelog]


class TxnLock:
    """One InitProducerId, EndTxn or abort at a time per broker, across the processes of this
    machine (an flock on a file named after the bootstrap servers) and the threads of this one.
    A no-op off Tansu. A process that dies holding it releases it with its file."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.tansu_workarounds
        name = hashlib.blake2b(settings.bootstrap_servers.encode(), digest_size=8).hexdigest()
        self.path = Path(tempfile.gettempdir()) / f"headwater-tansu-txn-{name}.lock"
        self._thread_lock = threading.Lock()
        self._file = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with self._thread_lock:
            if self._file is None:
                self._file = open(self.path, "a+b")  # noqa: SIM115 - held for the process's life
            fcntl.flock(self._file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._file, fcntl.LOCK_UN)


@dataclass
class _Watch:
    end: int  # the partition's end when the LSO was first seen below it
    since: float
    wait: float  # how long it must stand still: the settler's idle time, doubled after each try


class TransactionSettler:
    def __init__(self, settings: Settings, topics: Sequence[str], name: str, *, idle_s: float = IDLE_S) -> None:
        self.settings = settings
        self.topics = list(topics)
        self.idle_s = idle_s
        self.transactional_id = f"{settings.topic_prefix}headwater-settle-{name}"
        self.name = name
        self.admin: AdminClient | None = None
        self.producer: Producer | None = None
        self.watches: dict[tuple[str, int], _Watch] = {}
        self.partitions: list[tuple[str, int]] = []
        self.partitions_read = 0.0
        self.settles = 0  # transactions the settler committed
        self.txn_lock = TxnLock(settings)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(CHECK_EVERY_S):
            try:
                self.tick(time.monotonic())
            except KafkaException as exc:
                log.warning("settler: %s", exc)
                self._drop_producer()
        self._drop_producer()
        self.admin = None  # its connections go with it, not when the broker goes away

    def _admin(self) -> AdminClient:
        if self.admin is None:
            self.admin = AdminClient(self.settings.kafka_config(**{"client.id": f"settler-{self.name}"}))
        return self.admin

    def tick(self, now: float) -> list[tuple[str, int]]:
        """Looks at every partition once; settles the stuck ones. Returns them."""
        stuck = self.stuck(now)
        if stuck:
            self.settle(stuck)
            for key in stuck:  # its end moves with the record: looked at again from there, waiting longer
                watch = self.watches[key]
                watch.end, watch.since, watch.wait = -1, now, min(2 * watch.wait, MAX_WAIT_S)
        return stuck

    def stuck(self, now: float) -> list[tuple[str, int]]:
        partitions = self._partitions(now)
        if not partitions:
            return []
        stable = self._latest(partitions, IsolationLevel.READ_COMMITTED)
        ends = self._latest(partitions, IsolationLevel.READ_UNCOMMITTED)
        stuck = []
        for key in partitions:
            end = ends.get(key)
            if end is None or stable.get(key, end) >= end:
                self.watches.pop(key, None)
                continue
            watch = self.watches.get(key)
            if watch is None:
                self.watches[key] = _Watch(end, now, self.idle_s)
            elif watch.end != end:
                watch.end, watch.since = end, now
            elif now - watch.since >= watch.wait:
                stuck.append(key)
        return stuck

    def settle(self, keys: list[tuple[str, int]]) -> None:
        producer = self._producer()
        producer.begin_transaction()
        for topic, partition in keys:
            producer.produce(topic, None, SETTLE_KEY, partition=partition)
        producer.flush(TIMEOUT_S)
        with self.txn_lock():
            producer.commit_transaction(TIMEOUT_S)
        self.settles += 1
        log.info("settler: %s stood still above their last stable offset; committed a transaction over them",
                 ", ".join(f"{t}[{p}]" for t, p in keys))

    def _partitions(self, now: float) -> list[tuple[str, int]]:
        if now - self.partitions_read > 30 or not self.partitions:
            metadata = self._admin().list_topics(timeout=TIMEOUT_S)
            self.partitions = [(topic, partition) for topic in self.topics if topic in metadata.topics
                               for partition in sorted(metadata.topics[topic].partitions)]
            self.partitions_read = now
        return self.partitions

    def _latest(self, partitions: list[tuple[str, int]], level: IsolationLevel) -> dict[tuple[str, int], int]:
        # Tansu answers 0 for read_committed while an unfinished transaction is on the partition,
        # and its LSO otherwise: below the end either way while a transaction holds it
        futures = self._admin().list_offsets({TopicPartition(t, p): OffsetSpec.latest() for t, p in partitions},
                                          isolation_level=level, request_timeout=TIMEOUT_S)
        return {(tp.topic, tp.partition): future.result().offset for tp, future in futures.items()}

    def _producer(self) -> Producer:
        if self.producer is None:
            producer = Producer(self.settings.kafka_config(**{"transactional.id": self.transactional_id,
                                                              "client.id": self.transactional_id}))
            with self.txn_lock():
                producer.init_transactions(TIMEOUT_S)
            self.producer = producer
        return self.producer

    def _drop_producer(self) -> None:
        if self.producer is not None:
            self.producer.flush(TIMEOUT_S)
            self.producer = None
