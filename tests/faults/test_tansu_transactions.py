"""What the embedded broker (Tansu 0.6) does with transactions, which exactly-once relies on
(ADR 0002): read_committed consumers must not see a transaction's records before it commits, nor
ever if it aborts, whether the producer aborts it or a new owner of its transactional id fences
it (a worker killed mid-batch).

Two things do not hold on Tansu 0.6. First, it moves the last stable offset past an aborted
transaction, but read_committed consumers still get its records. librdkafka drops aborted
records only when the fetch response lists the aborted transactions, so Tansu's evidently list
none. Second, a transaction is never timed out (``transaction.timeout.ms``): a dead producer's stays
open, and holds back read_committed readers of each partition it wrote, until its transactional
id is initialized again. Both are behind the stalls and wrong states after a worker's kill -9
(docs/adr/0011-fault-tests.md).
"""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

pytestmark = [pytest.mark.faults, pytest.mark.pipeline]


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = f"txn_probe_{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})  # kept until the result: its handle serves it
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(10)
    return name


def transactional(bootstrap: str, tid: str) -> Producer:
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": tid, "linger.ms": 0})
    producer.init_transactions(30)
    return producer


def read(bootstrap: str, topic: str, isolation: str) -> list[str]:
    """Every value a reader of ``isolation`` gets from the start, up to where it sees the end."""
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:8]}",
                       "isolation.level": isolation, "enable.partition.eof": True})
    reader.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    values: list[str] = []
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            m = reader.poll(0.5)
            if m is None:
                continue
            if m.error() is not None:
                if m.error().code() == -191:  # _PARTITION_EOF
                    break
                continue
            values.append(m.value().decode())
    finally:
        reader.close()
    return values


def test_a_transaction_in_progress_is_invisible_to_read_committed_consumers(kafka_bootstrap, topic) -> None:
    producer = transactional(kafka_bootstrap, f"{topic}-open")
    producer.begin_transaction()
    producer.produce(topic, b"pending", partition=0)
    producer.flush(10)
    assert read(kafka_bootstrap, topic, "read_uncommitted") == ["pending"]
    assert read(kafka_bootstrap, topic, "read_committed") == []
    producer.commit_transaction(30)
    assert read(kafka_bootstrap, topic, "read_committed") == ["pending"]


@pytest.mark.xfail(strict=True, reason="Tansu 0.6 lists no aborted transactions in its fetch responses: "
                                       "read_committed consumers get aborted records (ADR 0011)")
def test_an_aborted_transaction_is_invisible_to_read_committed_consumers(kafka_bootstrap, topic) -> None:
    producer = transactional(kafka_bootstrap, f"{topic}-a")
    for values, commit in ((["committed-1"], True), (["aborted-1", "aborted-2"], False), (["committed-2"], True)):
        producer.begin_transaction()
        for value in values:
            producer.produce(topic, value.encode(), partition=0)
        producer.flush(10)
        (producer.commit_transaction if commit else producer.abort_transaction)(30)
    # a worker killed mid-batch: its transaction is left open, then aborted by the next owner's fencing
    killed = transactional(kafka_bootstrap, f"{topic}-b")
    killed.begin_transaction()
    killed.produce(topic, b"left-open-then-fenced", partition=0)
    killed.flush(10)
    transactional(kafka_bootstrap, f"{topic}-b")
    producer.begin_transaction()
    producer.produce(topic, b"committed-3", partition=0)
    producer.commit_transaction(30)
    assert read(kafka_bootstrap, topic, "read_committed") == ["committed-1", "committed-2", "committed-3"]


@pytest.mark.xfail(strict=True, reason="Tansu 0.6 does not enforce transaction.timeout.ms: a dead producer's "
                                       "transaction stays open until its transactional id is initialized again")
def test_a_dead_producers_transaction_times_out(kafka_bootstrap, topic) -> None:
    dead = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"{topic}-dead",
                     "transaction.timeout.ms": 1000})
    dead.init_transactions(30)
    dead.begin_transaction()
    dead.produce(topic, b"never-committed", partition=0)
    dead.flush(10)  # and never heard from again: a worker killed mid-batch whose partition nobody takes
    live = transactional(kafka_bootstrap, f"{topic}-live")
    live.begin_transaction()
    live.produce(topic, b"committed-after", partition=0)
    live.commit_transaction(30)
    time.sleep(4)  # four times the dead one's timeout
    assert read(kafka_bootstrap, topic, "read_committed") == ["committed-after"]

