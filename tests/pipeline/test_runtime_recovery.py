"""The stage runtime when a transaction's commit does not answer in time, against the real broker.

A commit that times out may have landed or not; the worker cannot tell. It must neither crash nor
lose the batch's state changes nor write the batch twice: it takes the partition over again, as a
new owner would (new producer, state restored from the changelog, input rewound to the committed
offsets), and goes on. The producer here is the real transactional producer; only its answer to one
``commit_transaction`` is replaced by a timeout, after or before the commit itself.
"""

from __future__ import annotations

import logging
from collections import Counter

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from headwater.kafka_admin import ensure_topics
from headwater.topics import TopicNames
from processors.identity.worker import identity_runner
from processors.runtime import BATCH_HEADER
from producers.backend import Client
from tests.conftest import running, wait_until

pytestmark = [pytest.mark.pipeline, pytest.mark.timeout(240)]

USERS = 30


class CommitTimesOut(Producer):
    """A real transactional producer whose ``fail_at``-th commit raises a timeout, once per test
    (``failures`` is shared by the producers): after committing (the broker's answer was lost) when
    ``landed``, or instead of committing (the transaction stays open)."""

    def __init__(self, config: dict, *, fail_at: int, landed: bool, failures: list[int]) -> None:
        super().__init__(config)
        self.calls = 0
        self.fail_at, self.landed, self.failures = fail_at, landed, failures

    def commit_transaction(self, *args):
        self.calls += 1
        if self.failures or self.calls != self.fail_at:
            return super().commit_transaction(*args)
        if self.landed:
            super().commit_transaction(*args)
        self.failures.append(self.calls)
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "commit timed out (test)", retriable=True))


def enriched(settings, names: TopicNames, isolation: str = "read_committed") -> list[dict]:
    reader = Consumer(settings.kafka_config(**{"group.id": "test-reader", "enable.auto.commit": False,
                                                "isolation.level": isolation, "enable.partition.eof": True}))
    reader.assign([TopicPartition(names.events_enriched, 0, 0)])
    rows, eof = [], False
    try:
        while not eof:
            for m in reader.consume(1000, 2.0) or [None]:
                if m is None or (m.error() and m.error().code() == KafkaError._PARTITION_EOF):
                    eof = True
                    break
                if m.error() is None:
                    rows.append(orjson.loads(m.value()))
    finally:
        reader.close()
    return rows


@pytest.mark.parametrize("landed", [True, False], ids=["commit-landed-answer-lost", "commit-never-sent"])
def test_a_commit_that_times_out_costs_a_takeover_not_the_batch(settings, caplog, landed: bool) -> None:
    settings = settings.model_copy(update={"partitions": 1, "processor_batch_size": 20})
    names = TopicNames(settings.topic_prefix)
    ensure_topics(settings)
    client = Client.from_settings(settings, "phc_test")
    sent = []
    for i in range(USERS):  # anonymous visits, then the login that merges them, then more visits
        sent += [client.capture(f"anon-{i}", "$pageview", {"n": n}) for n in range(3)]
        sent.append(client.identify(f"user-{i}", {"plan": "pro", "i": i}, anon_distinct_id=f"anon-{i}"))
        sent += [client.capture(f"anon-{i}", "$pageview", {"n": n}) for n in range(3, 5)]
    assert client.flush() == 0

    failures: list[int] = []
    runner = identity_runner(settings)
    runner._producer = lambda number: CommitTimesOut(  # type: ignore[method-assign]
        runner._producer_config(number), fail_at=4, landed=landed, failures=failures)
    caplog.set_level(logging.WARNING, logger="processors.runtime")
    try:
        with running(runner.run, "identity-0") as errors:
            wait_until(lambda: errors or failures, 120, message="the fourth commit")
            wait_until(lambda: errors or {r["uuid"] for r in enriched(settings, names)} >= set(sent), 120,
                       interval=1, message="every event enriched")
            # after the takeover: the merged persons are still merged (the state survived it)
            later = [(i, client.capture(f"anon-{i}", "after"), client.capture(f"user-{i}", "after"))
                     for i in range(USERS)]
            assert client.flush() == 0
            wait_until(lambda: errors or {r["uuid"] for r in enriched(settings, names)}
                       >= {u for _, a, b in later for u in (a, b)}, 120, interval=1,
                       message="the events after the takeover")
    finally:
        client.close()
    assert failures == [4]
    assert any("taking the partition over again" in r.getMessage() for r in caplog.records)
    rows = enriched(settings, names)
    copies = Counter(r["uuid"] for r in rows)
    twice = {u for u, n in copies.items() if n > 1}
    if landed:
        assert twice == set(), "an event was written twice"
    else:
        # the open transaction was aborted by the takeover; Tansu still hands an aborted batch's
        # records to read_committed readers (test_tansu_transactions.py), and the sink keeps one
        # copy per uuid. So: at most that one batch again, once
        assert len(twice) <= settings.processor_batch_size and max(copies.values()) <= 2, copies.most_common(3)
    person = {r["uuid"]: r["person_id"] for r in rows}
    for i, anon, user in later:
        assert person[anon] == person[user], f"anon-{i} and user-{i} are no longer one person"
    assert len({person[user] for _, _, user in later}) == USERS



def test_a_transaction_the_broker_never_resolves_does_not_stall_the_restore(settings, caplog) -> None:
    """Tansu can leave a transaction unresolved for good: seen after a kill -9 of a worker, when the
    next owner's restore waited forever behind it (ADR 0015). Here a producer with another
    transactional id, left open, stands in for it: it wrote to the changelog and to the outputs, as
    a killed worker's batch does, and is never committed, aborted or fenced. A new owner must
    restore past it, without its record (its batch never committed), and go on processing."""
    settings = settings.model_copy(update={"partitions": 1, "processor_batch_size": 50})
    names = TopicNames(settings.topic_prefix)
    ensure_topics(settings)
    client = Client.from_settings(settings, "phc_test")
    first = []
    for i in range(10):
        first.append(client.capture(f"anon-{i}", "$pageview"))
        first.append(client.identify(f"user-{i}", {"i": i}, anon_distinct_id=f"anon-{i}"))
    assert client.flush() == 0

    with running(identity_runner(settings).run, "identity") as errors:
        wait_until(lambda: errors or {r["uuid"] for r in enriched(settings, names)} >= set(first), 120,
                   interval=1, message="the first events enriched")

    zombie = Producer(settings.kafka_config(**{"transactional.id": f"{settings.topic_prefix}zombie", "linger.ms": 0}))
    zombie.init_transactions(30)
    zombie.begin_transaction()
    never = orjson.dumps({names.events_raw: 10**9, names.identity_inbox: 10**9})  # a batch that never committed
    zombie.produce(names.identity_changelog, b'{"zombie": true}', b"zombie-key", partition=0, headers=[(BATCH_HEADER, never)])
    zombie.produce(names.events_enriched, orjson.dumps({"uuid": "zombie", "person_id": "zombie"}), b"7:zombie", partition=0)
    assert zombie.flush(10) == 0  # and nothing more: open for good on Tansu
    later = [(i, client.capture(f"anon-{i}", "after"), client.capture(f"user-{i}", "after")) for i in range(10)]
    assert client.flush() == 0

    caplog.set_level(logging.INFO, logger="processors.runtime")
    runner = identity_runner(settings)  # the next owner: restores the changelog, then reads on
    isolation = settings.isolation_level
    try:
        with running(runner.run, "identity") as errors:
            wait_until(lambda: errors or {r["uuid"] for r in enriched(settings, names, isolation)}
                       >= {u for _, a, b in later for u in (a, b)}, 90, interval=1,
                       message="the events after the restart")
            assert runner.tasks[0].state.get("zombie-key") is None, "the open transaction's changelog record was restored"
    finally:
        client.close()
        zombie.abort_transaction(30)
    assert any("restored partition 0" in r.getMessage() for r in caplog.records)
    person = {r["uuid"]: r["person_id"] for r in enriched(settings, names, isolation)}
    for i, anon, user in later:
        assert person[anon] == person[user], f"anon-{i} and user-{i} are no longer one person after the restore"
