"""The stage runtime's commits on the real broker: a batch that produces nothing still commits its
input offsets, and a restore rebuilds exactly the state of committed batches.

Tansu 0.6 drops the offsets of a transaction that produced no record (``send_offsets_to_transaction``
then ``commit_transaction`` answers success, and the group's offsets stay where they were; ADR
0015). A stage that consumes messages without output (duplicates it drops, messages that only
confirm) would then be read again after every restart, and its lag would never reach 0.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from processors.outputs import Record
from processors.runtime import StageRunner
from processors.state import PartitionState
from tests.conftest import running, wait_until

pytestmark = [pytest.mark.pipeline, pytest.mark.timeout(180)]


class Counter:
    """Counts ``count`` messages in its state and produces nothing for the others."""

    def process_partition(self, partition: int, messages: Sequence, state: PartitionState) -> list:
        for m in messages:
            if m.value() == b"count":
                state.put("n", (state.get("n") or 0) + 1)
        return []


def committed(settings, group: str, topic: str) -> int:
    reader = Consumer(settings.consumer_config(group))
    try:
        return reader.committed([TopicPartition(topic, 0)], timeout=10)[0].offset
    finally:
        reader.close()


def run_until(runner: StageRunner, condition, message: str) -> None:
    with running(runner.run, runner.name) as errors:
        wait_until(lambda: errors or condition(), 90, interval=0.5, message=message)


def test_batches_without_output_commit_their_offsets_and_restores_skip_their_records(settings) -> None:
    settings = settings.model_copy(update={"processor_batch_size": 5})
    source, changelog = f"{settings.topic_prefix}counted", f"{settings.topic_prefix}counted_changelog"
    admin = AdminClient(settings.kafka_config())
    for future in admin.create_topics([NewTopic(source, 1, 1), NewTopic(changelog, 1, 1)]).values():
        future.result(10)
    producer = Producer(settings.kafka_config())
    values = [b"count", b"count", b"count"] + [b"skip"] * 17  # batches 2 to 4 produce nothing at all
    for value in values:
        producer.produce(source, value, partition=0)
    assert producer.flush(10) == 0

    runner = StageRunner(settings, name="counter", input_topics=[source], stage=Counter(), changelog_topic=changelog)
    run_until(runner, lambda: committed(settings, runner.group_id, source) == len(values),
              "every input offset committed, those of batches without output too")

    # a new owner restores the count, and nothing from the records of batches without output
    runner = StageRunner(settings, name="counter", input_topics=[source], stage=Counter(), changelog_topic=changelog)
    restored: list = []
    run_until(runner, lambda: 0 in runner.tasks and restored.append(runner.tasks[0].state.get("n")) is None,
              "the partition restored")
    assert restored[0] == 3
    assert runner.restored == 1  # one changelog record of state (n = 3, the first batch's), the rest skipped


class Echo:
    """Copies every message to ``out`` partition 0."""

    def __init__(self, out: str) -> None:
        self.out = out

    def process_partition(self, partition: int, messages: Sequence, state: PartitionState) -> list:
        return [Record(self.out, None, m.value(), None, 0) for m in messages]


def open_transaction(settings, name: str, topic: str, partition: int) -> Producer:
    """A transactional producer of another client, with one record on ``topic[partition]`` in an
    open transaction."""
    producer = Producer(settings.kafka_config(**{"transactional.id": f"{settings.topic_prefix}{name}"}))
    producer.init_transactions(10)
    producer.begin_transaction()
    producer.produce(topic, f"from {name}".encode(), partition=partition)
    assert producer.flush(10) == 0
    return producer


def read_committed_values(settings, topic: str, partition: int, seconds: float) -> list[bytes]:
    reader = Consumer(settings.kafka_config(**{"group.id": f"{settings.topic_prefix}reader",
                                               "isolation.level": "read_committed", "enable.auto.commit": False}))
    reader.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
    values, deadline = [], time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            m = reader.poll(0.2)
            if m is not None and not m.error():
                values.append(m.value())
    finally:
        reader.close()
    return values


def test_a_commit_the_broker_defers_is_settled_once_the_partition_is_idle(settings) -> None:
    """Tansu 0.6 leaves a transaction prepared, not committed, when another unfinished transaction
    wrote to one of its partitions, and commits it only at a later EndTxn that overlaps it (ADR
    0015). Here the stage's commit meets X's open transaction on ``out[0]``; then X ends while Y is
    open on ``out[1]``, and Y's commit settles X but not the stage's transaction, which shares no
    partition with Y. Nothing else comes. The stage's offsets and its record on ``out[0]`` must
    still commit: the runtime sees its committed offsets behind after a second of idleness and
    settles the transaction with one more of its own."""
    source, changelog, out = (f"{settings.topic_prefix}{t}" for t in ("echoed", "echoed_changelog", "echo_out"))
    admin = AdminClient(settings.kafka_config())
    for future in admin.create_topics([NewTopic(source, 1, 1), NewTopic(changelog, 1, 1), NewTopic(out, 2, 1)]).values():
        future.result(10)
    x = open_transaction(settings, "x", out, 0)
    producer = Producer(settings.kafka_config())
    producer.produce(source, b"echo me", partition=0)
    assert producer.flush(10) == 0

    runner = StageRunner(settings, name="echo", input_topics=[source], stage=Echo(out), changelog_topic=changelog)
    with running(runner.run, runner.name) as errors:
        wait_until(lambda: errors or runner.consumed == 1, 90, interval=0.2, message="the stage's batch committed")
        y = open_transaction(settings, "y", out, 1)
        x.produce(out, b"from x, again", partition=1)
        x.commit_transaction(10)  # deferred behind y, which is open on out[1]
        y.commit_transaction(10)  # settles x; the stage's transaction is not y's to settle
        wait_until(lambda: errors or committed(settings, runner.group_id, source) == 1, 60, interval=0.5,
                   message="the stage's input offset committed")
    assert runner.settles >= 1
    assert b"echo me" in read_committed_values(settings, out, 0, 3)
