"""The stage runtime's commits on the real broker: a batch that produces nothing still commits its
input offsets, and a restore rebuilds exactly the state of committed batches.

Tansu 0.6 drops the offsets of a transaction that produced no record (``send_offsets_to_transaction``
then ``commit_transaction`` answers success, and the group's offsets stay where they were; ADR
0015). A stage that consumes messages without output (duplicates it drops, messages that only
confirm) would then be read again after every restart, and its lag would never reach 0.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
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
    """Copies every message to ``out``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def process_partition(self, partition: int, messages: Sequence, state: PartitionState) -> list:
        return [Record(self.out, None, m.value(), None, 0) for m in messages]


def test_batches_of_concurrent_producers_that_the_broker_returns_out_of_order_are_not_skipped(settings) -> None:
    """Tansu 0.6 raises the high watermark before it writes a batch; a fetch meanwhile can return
    a later batch of another producer, and a consumer tailing the partition moves past the
    earlier one for good. Six producers send small batches to one partition while the stage
    tails it; every message must come out (ADR 0015, "Skipped batches")."""
    source, changelog, out = (f"{settings.topic_prefix}{t}" for t in ("tailed", "tailed_changelog", "tailed_out"))
    admin = AdminClient(settings.kafka_config())
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in (source, changelog, out)]).values():
        future.result(10)
    runner = StageRunner(settings, name="tail", input_topics=[source], stage=Echo(out), changelog_topic=changelog,
                         gapless_topics=[source])
    sent = {f"{i}-{j}".encode() for i in range(6) for j in range(3000)}

    def produce(i: int) -> None:
        producer = Producer(settings.kafka_config(**{"linger.ms": 0, "batch.num.messages": 10}))
        for j in range(3000):
            producer.produce(source, f"{i}-{j}".encode(), partition=0)
            if j % 100 == 0:
                producer.poll(0)
        assert producer.flush(60) == 0

    with running(runner.run, runner.name) as errors:
        wait_until(lambda: errors or 0 in runner.tasks, 90, interval=0.2, message="the partition assigned")
        threads = [threading.Thread(target=produce, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_until(lambda: errors or runner.consumed >= len(sent), 120, interval=0.5,
                   message=f"{len(sent)} messages through the stage (consumed {runner.consumed}, gaps read again "
                           f"{runner.gap_guard.gaps})")
    print(f"gaps read again: {runner.gap_guard.gaps}")
    assert runner.consumed == len(sent)
