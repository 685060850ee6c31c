"""The Tansu workarounds on the real broker (ADR 0015, "One EndTxn at a time" and "The settler").
Tansu 0.6 leaves a committed transaction prepared when another unfinished transaction shared one
of its partitions at its EndTxn, and only a later EndTxn over that partition commits it. When
nothing more comes, the settler's transaction is that EndTxn. Concurrent EndTxns can leave a
committed transaction with ranges that block every later one: the lock keeps them apart."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from confluent_kafka import IsolationLevel

from headwater.tansu import SETTLE_KEY, TransactionSettler, TxnLock
from processors.runtime import StageRunner
from tests.conftest import running, wait_until
from tests.pipeline.test_runtime_commits import Echo, committed

pytestmark = [pytest.mark.pipeline, pytest.mark.timeout(180)]


def open_transaction(settings, name: str, topic: str, partition: int) -> Producer:
    """A transactional producer of another client, with one record on ``topic[partition]`` in an
    open transaction."""
    producer = Producer(settings.kafka_config(**{"transactional.id": f"{settings.topic_prefix}{name}"}))
    producer.init_transactions(10)
    producer.begin_transaction()
    producer.produce(topic, f"from {name}".encode(), partition=partition)
    assert producer.flush(10) == 0
    return producer


def read_committed(settings, topic: str, partition: int, seconds: float) -> list[tuple[bytes | None, bytes | None]]:
    reader = Consumer(settings.kafka_config(**{"group.id": f"{settings.topic_prefix}reader",
                                               "isolation.level": "read_committed", "enable.auto.commit": False}))
    reader.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
    found, deadline = [], time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            m = reader.poll(0.2)
            if m is not None and not m.error():
                found.append((m.key(), m.value()))
    finally:
        reader.close()
    return found


def test_a_commit_the_broker_leaves_prepared_is_settled_once_its_partition_stands_still(settings) -> None:
    """The stage's commit meets X's open transaction on ``out[0]``; X then ends while Y is open on
    ``out[1]``, and Y's commit settles X but not the stage's transaction, which shares no partition
    with Y. Nothing else comes: the stage's offset and its record stay uncommitted. The settler
    sees ``out[0]`` stand still below its end and commits over it, which commits the stage's."""
    source, changelog, out = (f"{settings.topic_prefix}{t}" for t in ("echoed", "echoed_changelog", "echo_out"))
    admin = AdminClient(settings.kafka_config())
    for future in admin.create_topics([NewTopic(source, 1, 1), NewTopic(changelog, 1, 1), NewTopic(out, 2, 1)]).values():
        future.result(10)
    x = open_transaction(settings, "x", out, 0)
    producer = Producer(settings.kafka_config())
    producer.produce(source, b"echo me", partition=0)
    assert producer.flush(10) == 0

    runner = StageRunner(settings, name="echo", input_topics=[source], stage=Echo(out), changelog_topic=changelog)
    settler = TransactionSettler(settings, [out, changelog], "test", idle_s=1.0)
    with running(runner.run, runner.name) as errors:
        wait_until(lambda: errors or runner.consumed == 1, 90, interval=0.2, message="the stage's batch sent")
        y = open_transaction(settings, "y", out, 1)
        x.produce(out, b"from x, again", partition=1)
        x.commit_transaction(10)  # deferred behind y, which is open on out[1]
        y.commit_transaction(10)  # settles x; the stage's transaction is not y's to settle
        time.sleep(5)
        assert committed(settings, runner.group_id, source) < 1, "the broker committed the stage's batch by itself"
        assert b"echo me" not in [v for _, v in read_committed(settings, out, 0, 2)]
        with running(settler.run, "settler"):
            wait_until(lambda: errors or committed(settings, runner.group_id, source) == 1, 60, interval=0.5,
                       message="the stage's input offset committed")
    assert settler.settles >= 1
    records = read_committed(settings, out, 0, 3)
    assert (None, b"echo me") in records
    assert (SETTLE_KEY, None) in records  # what readers of these topics skip
    assert not settler.stuck(time.monotonic()), "still a partition behind an unfinished transaction"


def test_a_partition_whose_transactions_all_ended_is_left_alone(settings) -> None:
    out = f"{settings.topic_prefix}settled_out"
    admin = AdminClient(settings.kafka_config())
    for future in admin.create_topics([NewTopic(out, 2, 1)]).values():
        future.result(10)
    done = open_transaction(settings, "done", out, 0)
    done.commit_transaction(10)
    settler = TransactionSettler(settings, [out], "idle", idle_s=0.5)
    for _ in range(4):
        assert settler.tick(time.monotonic()) == []
        time.sleep(0.5)
    assert settler.settles == 0
    assert read_committed(settings, out, 0, 2) == [(None, b"from done")]


def unstable(settler: TransactionSettler, topic: str, partitions: int) -> list[int]:
    """The partitions whose last stable offset is below their end."""
    keys = [(topic, p) for p in range(partitions)]
    stable = settler._latest(keys, IsolationLevel.READ_COMMITTED)
    ends = settler._latest(keys, IsolationLevel.READ_UNCOMMITTED)
    return [p for t, p in keys if stable[(t, p)] < ends[(t, p)]]


def test_commits_at_the_same_moment_leave_nothing_that_blocks_later_ones(settings) -> None:
    """Three producers, each with a lock of its own as separate processes have, commit transactions
    over the same four partitions at the same moment (a barrier), five times; then they are gone
    (new producers, new epochs, as after a kill or a rebalance) and the settler commits over every
    partition; ten rounds. Without the lock, Tansu lets one EndTxn commit another between that
    one's two steps, whose markers then leave ranges on a committed transaction that block the
    settler's and every later EndTxn for good: 7 of 8 runs of this test failed."""
    out = f"{settings.topic_prefix}committed_together"
    admin = AdminClient(settings.kafka_config())
    for future in admin.create_topics([NewTopic(out, 4, 1)]).values():
        future.result(10)
    settler = TransactionSettler(settings, [out], "together")
    assert settler.txn_lock.enabled  # the tests run on Tansu's setting

    def producer(name: str) -> tuple[Producer, TxnLock]:
        made, lock = Producer(settings.kafka_config(**{"transactional.id": f"{settings.topic_prefix}{name}",
                                                       "linger.ms": 0})), TxnLock(settings)
        with lock():
            made.init_transactions(10)
        return made, lock

    for round_ in range(10):
        producers = [producer(f"together-{i}") for i in range(3)]
        barrier, errors = threading.Barrier(3), []

        def commit_five(made: Producer, lock: TxnLock) -> None:
            try:
                for _ in range(5):
                    made.begin_transaction()
                    for partition in range(4):
                        made.produce(out, b"x", partition=partition)
                    made.flush(10)
                    barrier.wait(30)
                    with lock():
                        made.commit_transaction(10)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=commit_five, args=pair) for pair in producers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        settler.settle([(out, p) for p in range(4)])
        assert unstable(settler, out, 4) == [], f"round {round_}: a transaction blocks the settler's"
