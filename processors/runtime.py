"""The stage runtime: consume a batch, run the stage per partition, and commit each partition's
outputs, state changes (changelog records) and input offsets in one Kafka transaction.

A stage is anything with ``process_partition(partition, messages, state) -> list[Record]``; it
receives the messages of every input topic for that partition number (input topics have equal
partition counts and are co-assigned by the range assignor). The runtime owns every Kafka call;
stages stay pure. Decisions (docs/adr/0002-stage-runtime.md, docs/adr/0001-identity.md):
- confluent-kafka (librdkafka) rather than Faust/aiokafka, for throughput per core;
- one transactional producer per partition, ``transactional.id = {group}-p{partition}``: whoever
  takes a partition over (after a rebalance, a crash, a restart) fences the previous owner and
  aborts its open transaction at once, instead of blocking readers until a timeout;
- state changes are applied to the local store only after the transaction commits; a new owner
  restores a partition's state from the changelog up to a marker it wrote itself (Tansu's end
  offsets cannot be trusted, ADR 0002);
- every transaction produces at least one record: Tansu commits no offsets for one that did not
  (ADR 0015).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from headwater import allocator, metrics
from headwater.settings import Settings
from headwater.tansu import SETTLE_KEY, TxnLock

from .outputs import Record
from .state import PROGRESS_KEY, RESTORE_MARKER_KEY, PartitionState

log = logging.getLogger(__name__)

#: Header of changelog records: the input offsets (``{topic: next offset}``) their batch commits.
BATCH_HEADER = "hw-batch"

#: Longest wait on any transactional call (the transaction timeout is the same): a broker that does
#: not answer costs the partition a retry, never the worker's life (ADR 0002, "Bounded waits").
TXN_TIMEOUT_S = 30.0

#: How long a restore on Tansu waits behind a transaction before it takes it for one that never
#: ends and reads on uncommitted (ADR 0015): deferred ones land within a few commits of others.
RESTORE_STALL_S = 10.0


def batch_committed(headers: list[tuple[str, bytes]] | None, committed: dict[str, int]) -> bool:
    """Whether the batch a changelog record came from committed: its input offsets are at or below
    the group's committed offsets. Records without the header (older ones) count as committed."""
    for name, value in headers or ():
        if name == BATCH_HEADER:
            return all(offset <= committed.get(topic, 0) for topic, offset in orjson.loads(value).items())
    return True


class GapGuard:
    """Catches batches the broker skipped on topics whose offsets have no gaps (``events_raw``:
    plain producers, not compacted). Tansu 0.6 raises a partition's high watermark before it has
    written the batch, so a fetch that runs meanwhile can return a later batch of a producer that
    wrote faster, and the consumer moves past the missing one for good (ADR 0015, "Skipped
    batches"). A message past the next expected offset is such a skip: the partition's messages
    from there on are put aside and the consumer reads again from the expected offset, up to
    ``retries`` times for one gap; a gap still there after that is taken as real (a transaction
    marker of a transactional producer, on another broker)."""

    def __init__(self, topics: Sequence[str], retries: int = 3) -> None:
        self.topics = set(topics)
        self.retries = retries
        self.expected: dict[tuple[str, int], int] = {}
        self.tried: dict[tuple[str, int], tuple[int, int]] = {}  # (topic, partition) -> (offset, tries)
        self.gaps = 0  # times a gap was read again

    def forget(self, keys: Iterable[tuple[str, int]]) -> None:
        """After an assignment change or a seek, the next offset is whatever comes."""
        for key in keys:
            self.expected.pop(key, None)
            self.tried.pop(key, None)

    def check(self, messages: list[Message]) -> tuple[list[Message], list[TopicPartition]]:
        """The messages to process now (in order) and where to read again."""
        if not self.topics:
            return messages, []
        kept: list[Message] = []
        cut: set[tuple[str, int]] = set()
        again: list[TopicPartition] = []
        for m in messages:
            key = (m.topic(), m.partition())
            if key[0] not in self.topics:
                kept.append(m)
                continue
            if key in cut:
                continue
            expected = self.expected.get(key)
            if expected is not None and m.offset() > expected:
                offset, tries = self.tried.get(key, (expected, 0))
                tries = tries + 1 if offset == expected else 1
                if tries <= self.retries:
                    self.tried[key] = (expected, tries)
                    cut.add(key)
                    again.append(TopicPartition(key[0], key[1], expected))
                    self.gaps += 1
                    continue
            self.expected[key] = m.offset() + 1
            kept.append(m)
        return kept, again


class Follower(Protocol):
    """A global table the stage reads (processors/follower.py): caught up before the first batch,
    then polled before every batch."""

    def start(self) -> None: ...
    def poll(self) -> None: ...
    def close(self) -> None: ...


class Stage(Protocol):
    def process_partition(self, partition: int, messages: Sequence[Message], state: PartitionState) -> list[Record]: ...


@dataclass
class _Task:
    """What this worker holds for one partition number."""

    producer: Producer
    state: PartitionState


class StageRunner:
    """Runs one stage until ``stop`` is set; counts what it did in ``self.consumed``/``produced``."""

    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        input_topics: list[str],
        stage: Stage,
        changelog_topic: str | None = None,
        worker_id: str = "0",
        on_batch: Callable[[int, int], None] | None = None,
        followers: Sequence[Follower] = (),
        gapless_topics: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.name = name
        self.stage = stage
        self.input_topics = input_topics
        self.changelog_topic = changelog_topic
        self.worker_id = worker_id
        self.group_id = f"{settings.topic_prefix}headwater-{name}"
        self.on_batch = on_batch
        self.followers = list(followers)
        self.consumed = 0
        self.produced = 0
        self.restored = 0
        self.tasks: dict[int, _Task] = {}
        # a skipped batch is a Tansu race (ADR 0015): guarded where the isolation level says Tansu
        self.gap_guard = GapGuard(gapless_topics if settings.tansu_workarounds else ())
        self.trimmer = allocator.Trimmer()  # freed batch memory back to the system (ADR 0016)
        self.txn_lock = TxnLock(settings)  # Tansu: one EndTxn at a time on the broker (ADR 0015)
        self.consumer = Consumer(settings.consumer_config(
            self.group_id, **{"partition.assignment.strategy": "range", "client.id": f"{name}-{worker_id}",
                              # always: a stage must not act on an inbox request whose transaction
                              # may still abort (its reply would come before the replayed request)
                              "isolation.level": "read_committed",
                              # a merge is several inbox hops: do not let each wait for a full fetch
                              "fetch.wait.max.ms": 10}))
        self.metrics = metrics.watch_stage(self)  # per-batch counters, lag; the endpoint if configured

    def run(self, stop: threading.Event) -> None:
        for follower in self.followers:  # global tables are read up to date before the first batch
            follower.start()
        self.consumer.subscribe(self.input_topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        log.info("%s: consuming %s as group %s", self.name, ",".join(self.input_topics), self.group_id)
        batch_size = self.settings.processor_batch_size
        timeout = self.settings.processor_batch_ms / 1000
        try:
            while not stop.is_set():
                for follower in self.followers:
                    follower.poll()
                messages = self.consumer.consume(batch_size, timeout)
                kept, again = self.gap_guard.check([m for m in messages if not self._is_error(m)])
                for tp in again:
                    log.info("%s: %s[%d] skipped from offset %d on the broker; reading it again",
                             self.name, tp.topic, tp.partition, tp.offset)
                    self.consumer.seek(tp)
                by_partition: dict[int, list[Message]] = {}
                for m in kept:
                    by_partition.setdefault(m.partition(), []).append(m)
                for partition, batch in sorted(by_partition.items()):
                    if partition in self.tasks:  # else: lost to a fencing owner; the rebalance follows
                        self._process_in_transaction(partition, batch)
                self.trimmer.tick(bool(messages))
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.consumer.close()
        except RuntimeError:
            pass  # already closed
        for task in self.tasks.values():
            task.producer.flush(10)
            task.state.close()
        self.tasks.clear()
        for follower in self.followers:
            follower.close()

    # -- partitions -----------------------------------------------------------------------------
    def _producer(self, partition: int) -> Producer:
        return Producer(self._producer_config(partition))

    def _producer_config(self, partition: int) -> dict:
        return self.settings.kafka_config(**{
            "transactional.id": f"{self.group_id}-p{partition}",
            "transaction.timeout.ms": 30_000,
            "linger.ms": 5,
            "compression.type": "lz4",
            "partitioner": "murmur2_random",  # Java's default: keys land where any client puts them
            "message.max.bytes": self.settings.max_message_bytes + 65_536,
            "client.id": f"{self.name}-{self.worker_id}-p{partition}",
        })

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = sorted({tp.partition for tp in partitions})
        self.gap_guard.forget((tp.topic, tp.partition) for tp in partitions)
        log.info("%s: assigned %s", self.name, [(tp.topic, tp.partition) for tp in partitions])
        for number in numbers:
            if number not in self.tasks:
                self._open(number)

    def _open(self, number: int) -> None:
        producer = self._producer(number)
        with self.txn_lock():
            producer.init_transactions(TXN_TIMEOUT_S)  # fences the previous owner, aborts its open transaction
        state_dir = self.settings.data_dir / "state" / self.group_id / f"w{self.worker_id}" / f"p{number}"
        task = _Task(producer, PartitionState(state_dir if self.changelog_topic else None))
        if self.changelog_topic:
            for _ in range(3):  # again if a batch's commit landed during the restore (ADR 0015)
                if self._restore(number, task):
                    break
                task.state.close()
                task = _Task(producer, PartitionState(state_dir))
        self.tasks[number] = task

    def _reopen(self, number: int) -> None:
        """Take a partition over again, as a new owner would: a new producer (same transactional id,
        so the old one and its unfinished transaction are fenced) and the state restored from the
        changelog. For outcomes the worker cannot know (a commit that timed out may have landed)."""
        task = self.tasks.pop(number)
        task.state.close()
        self._open(number)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("%s: revoked %s", self.name, [(tp.topic, tp.partition) for tp in partitions])
        self.gap_guard.forget((tp.topic, tp.partition) for tp in partitions)
        for number in {tp.partition for tp in partitions}:
            task = self.tasks.pop(number, None)
            if task is not None:
                task.producer.flush(10)
                task.state.close()

    def _restore(self, partition: int, task: _Task) -> bool:
        """Rebuild the partition's state from its changelog, up to a marker written now: every
        committed record before it is applied, whatever the broker says the end offset is. False
        if the input's committed offsets moved meanwhile (a batch the broker had deferred landed;
        ADR 0015): records it skipped may have committed since, so the caller restores again."""
        assert self.changelog_topic is not None
        started = time.monotonic()
        marker: list[int] = []

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                marker.append(msg.offset())

        token = uuid.uuid4().hex.encode()
        task.producer.begin_transaction()
        task.producer.produce(self.changelog_topic, token, RESTORE_MARKER_KEY, partition=partition, on_delivery=delivered)
        task.producer.flush(TXN_TIMEOUT_S)
        with self.txn_lock():
            task.producer.commit_transaction(TXN_TIMEOUT_S)
        if not marker:
            raise RuntimeError(f"{self.name}: could not write the restore marker to {self.changelog_topic}[{partition}]")
        def reader_from(offset: int, isolation: str) -> Consumer:
            reader = Consumer(self.settings.kafka_config(**{
                "group.id": f"{self.group_id}-restore", "enable.auto.commit": False,
                "isolation.level": isolation, "enable.partition.eof": False}))
            reader.assign([TopicPartition(self.changelog_topic, partition, offset)])
            return reader

        # read_committed: a transaction the broker deferred (Tansu, ADR 0015) is waited for, so its
        # records count once it lands. On Tansu (isolation_level read_uncommitted) a wait longer
        # than RESTORE_STALL_S is a transaction that never ends: read on uncommitted past it, the
        # batch header below leaving out its records (its offsets never commit)
        reader = reader_from(OFFSET_BEGINNING, "read_committed")
        committed = self._committed(partition)
        records = skipped = 0
        position, progressed, switched = -1, time.monotonic(), False
        try:
            done = False
            while not done:
                batch = reader.consume(10_000, 0.2)
                if batch:
                    progressed = time.monotonic()
                elif (not switched and time.monotonic() - progressed > RESTORE_STALL_S
                      and self.settings.tansu_workarounds):
                    log.warning("%s: restore of partition %d gets nothing past offset %d (marker at %d): a "
                                "transaction the broker never resolves; reading on uncommitted", self.name,
                                partition, position, marker[0])
                    reader.close()
                    reader = reader_from(position + 1 if position >= 0 else OFFSET_BEGINNING, "read_uncommitted")
                    progressed, switched = time.monotonic(), True
                elif time.monotonic() - progressed > TXN_TIMEOUT_S:  # say so; the marker's commit is certain
                    log.warning("%s: restore of partition %d gets nothing past offset %d (marker at %d): an "
                                "unresolved transaction on %s?", self.name, partition, position, marker[0],
                                self.changelog_topic)
                    progressed = time.monotonic()
                applied: list[tuple[bytes, bytes | None]] = []
                for m in batch:
                    if m.error() is not None:
                        continue
                    position = m.offset()
                    if m.offset() >= marker[0]:
                        done = True
                        break
                    if m.key() in (RESTORE_MARKER_KEY, PROGRESS_KEY, SETTLE_KEY):
                        continue
                    if not batch_committed(m.headers(), committed):
                        skipped += 1
                        continue
                    applied.append((m.key(), m.value()))
                task.state.apply(applied)  # in order, one write per fetched run
                records += len(applied)
        finally:
            reader.close()
        now = self._committed(partition) if skipped else committed
        if now != committed:
            log.warning("%s: partition %d: committed offsets moved during the restore (%s -> %s); restoring "
                        "again", self.name, partition, committed, now)
            return False
        self.restored += records
        log.info("%s: restored partition %d from %d changelog records in %.2fs", self.name, partition, records,
                 time.monotonic() - started)
        if skipped:
            log.warning("%s: partition %d: skipped %d changelog records of batches that never committed "
                        "(an aborted transaction the broker delivered)", self.name, partition, skipped)
        return True

    def _committed(self, partition: int) -> dict[str, int]:
        """The group's committed offsets of the partition's input topics (0 where none)."""
        found = self.consumer.committed([TopicPartition(t, partition) for t in self.input_topics], timeout=30)
        return {tp.topic: max(tp.offset, 0) for tp in found}

    # -- batches --------------------------------------------------------------------------------
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

    def _process_in_transaction(self, partition: int, messages: list[Message]) -> None:
        task = self.tasks[partition]
        records = self.stage.process_partition(partition, messages, task.state)
        changelog = task.state.pending() if self.changelog_topic else []
        offsets: dict[tuple[str, int], int] = {}
        for m in messages:
            offsets[(m.topic(), m.partition())] = m.offset() + 1
        producer = task.producer
        # each changelog record says which input offsets its batch commits: a restore skips those
        # of batches that never committed (Tansu delivers aborted records, ADR 0011)
        tag = [(BATCH_HEADER, orjson.dumps({t: o for (t, _), o in offsets.items()}))] if changelog else None
        committing = False
        try:
            producer.begin_transaction()
            for record in records:
                self._produce(producer, record.topic, record.key, record.value, record.headers, record.partition)
            for key, value in changelog:
                self._produce(producer, self.changelog_topic, key, value, tag, partition)
            if not records and not changelog and self.changelog_topic:
                # Tansu 0.6 commits no offsets for a transaction that produced nothing (ADR 0015)
                self._produce(producer, self.changelog_topic, PROGRESS_KEY, b"", None, partition)
            producer.send_offsets_to_transaction(
                [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                self.consumer.consumer_group_metadata(),
                TXN_TIMEOUT_S,
            )
            committing = True
            producer.flush(TXN_TIMEOUT_S)
            with self.txn_lock():
                producer.commit_transaction(TXN_TIMEOUT_S)
        except KafkaException as exc:
            task.state.rollback()
            self._recover(partition, exc, offsets, committing)
            return
        task.state.commit(changelog)
        self.consumed += len(messages)
        self.produced += len(records)
        self.metrics.committed(partition, messages, records)
        if self.on_batch:
            self.on_batch(len(messages), len(records))

    @staticmethod
    def _produce(producer: Producer, topic, key, value, headers, partition: int | None) -> None:
        while True:
            try:
                if partition is None:
                    producer.produce(topic, value, key, headers=headers)
                else:
                    producer.produce(topic, value, key, partition=partition, headers=headers)
                return
            except BufferError:
                producer.poll(0.05)

    def _recover(self, partition: int, exc: KafkaException, offsets: dict[tuple[str, int], int],
                 committing: bool = False) -> None:
        error = exc.args[0]
        task = self.tasks[partition]
        requires_abort = getattr(error, "txn_requires_abort", lambda: False)()
        if getattr(error, "fatal", lambda: False)():
            # fenced: another worker owns this partition now; forget it until a rebalance says otherwise
            log.warning("%s: partition %d lost (%s); waiting for the rebalance", self.name, partition, error)
            self.tasks.pop(partition).state.close()
            return
        if committing and not requires_abort:
            # the commit's outcome is unknown (timed out, or the broker's answer was lost): whatever
            # landed is on the broker, so start over from there: the committed offsets and changelog
            log.warning("%s: commit of partition %d did not complete (%s); taking the partition over again",
                        self.name, partition, error)
            self._reopen(partition)
            self._rewind(offsets)
            return
        if requires_abort or getattr(error, "retriable", lambda: False)():
            log.warning("%s: transaction of partition %d aborted (%s); the batch will be read again", self.name, partition, error)
            time.sleep(0.2)
            try:
                with self.txn_lock():
                    task.producer.abort_transaction(TXN_TIMEOUT_S)
            except KafkaException as abort_error:
                log.warning("%s: abort of partition %d failed (%s); taking the partition over again",
                            self.name, partition, abort_error)
                self._reopen(partition)
            self._rewind(offsets)
            return
        raise exc

    def _rewind(self, offsets: dict[tuple[str, int], int]) -> None:
        """Seek back to the last committed offsets so the aborted batch is processed again."""
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        wanted = [TopicPartition(t, p) for (t, p) in offsets if (t, p) in assigned]
        if not wanted:
            return
        self.gap_guard.forget((tp.topic, tp.partition) for tp in wanted)
        for tp in self.consumer.committed(wanted, timeout=10):
            tp.offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            self.consumer.seek(tp)
