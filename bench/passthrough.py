"""B: the limit of a Python processor on this broker. A plain confluent-kafka loop reads the mix from
``events_raw`` and writes it to another topic, decoding and re-encoding each message's JSON and
nothing else, in one process.

Two variants on the same messages:
- ``plain`` (reported as B): ``consume(5000)`` → orjson decode/encode → ``produce``, offsets
  committed asynchronously after each batch;
- ``transactional`` (B-tx): as the stage runtime does it, one transactional producer per partition
  and one transaction per partition's share of a batch, with the input offsets in it.
Both use the consumer settings of the stage runtime (read_committed, ``fetch.wait.max.ms`` 10).
Each is run ``passes`` times over the whole topic (assigned from the beginning, no group join);
the median pass is reported.

    .venv/bin/python -m bench.passthrough [--events 200000] [--passes 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import orjson

from bench.common import CpuMeter, Phase, Stack, produce_all

BATCH = 5000


def _consumer(phase: Phase, group: str):
    from confluent_kafka import Consumer

    return Consumer(phase.settings.consumer_config(group, **{"fetch.wait.max.ms": 10, "client.id": group}))


def _producer(phase: Phase, **config):
    from confluent_kafka import Producer

    return Producer(phase.settings.kafka_config(**{"linger.ms": 5, "compression.type": "lz4", "log_level": 4,
                                                   "partitioner": "murmur2_random", **config}))


def _create_topic(phase: Phase, name: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(phase.settings.kafka_config())
    if name not in admin.list_topics(timeout=10).topics:
        admin.create_topics([NewTopic(name, partitions, 1)])[name].result(30)


def _produce(producer, topic: str, value: bytes, key: bytes, partition: int | None = None) -> None:
    while True:
        try:
            if partition is None:
                producer.produce(topic, value, key)
            else:
                producer.produce(topic, value, key, partition=partition)
            return
        except BufferError:
            producer.poll(0.05)


def one_pass(phase: Phase, source: str, total: int, transactional: bool, label: str, timeout: float) -> dict:
    """Pass ``total`` messages of ``source`` through to ``<source>_<label>``; return the figures."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    partitions = phase.settings.partitions
    target = f"{source}_{label}"
    _create_topic(phase, target, partitions)
    group = f"{phase.settings.topic_prefix}passthrough-{label}"
    consumer = _consumer(phase, group)
    consumer.assign([TopicPartition(source, p, OFFSET_BEGINNING) for p in range(partitions)])
    producers = {}
    if transactional:
        for p in range(partitions):
            producers[p] = _producer(phase, **{"transactional.id": f"{group}-p{p}", "transaction.timeout.ms": 30_000})
            producers[p].init_transactions(30)
    else:
        plain = _producer(phase)
    meter = CpuMeter({"bench": os.getpid(), "broker": phase.stack.broker.pid})
    done, started = 0, None
    deadline = time.monotonic() + timeout
    while done < total and time.monotonic() < deadline:
        batch = [m for m in consumer.consume(BATCH, 1.0) if m.error() is None]
        if not batch:
            continue
        if started is None:
            started = time.perf_counter()
            meter.start()
        if transactional:
            by_partition: dict[int, list] = {}
            for m in batch:
                by_partition.setdefault(m.partition(), []).append(m)
            for p, messages in by_partition.items():
                producer = producers[p]
                producer.begin_transaction()
                for m in messages:
                    _produce(producer, target, orjson.dumps(orjson.loads(m.value())), m.key(), p)
                producer.send_offsets_to_transaction([TopicPartition(source, p, messages[-1].offset() + 1)],
                                                     consumer.consumer_group_metadata())
                producer.commit_transaction()
        else:
            for m in batch:
                _produce(plain, target, orjson.dumps(orjson.loads(m.value())), m.key())
            plain.poll(0)
            consumer.commit(asynchronous=True)
        done += len(batch)
    for producer in (producers.values() if transactional else [plain]):
        producer.flush(60)
    elapsed = time.perf_counter() - started if started else float("nan")
    meter.stop()
    consumer.close()
    return {"events": done, "seconds": round(elapsed, 3), "events_per_s": round(done / elapsed) if done else 0,
            "cpu_us_per_event": meter.per_event_us(done), "complete": done >= total}


def measure_passthrough(phase: Phase, messages: list[tuple[bytes, bytes]], passes: int = 3, timeout: float = 120) -> dict:
    """B and B-tx over ``messages`` (filled into the phase's ``events_raw`` first)."""
    source = phase.topics.events_raw
    produce_all(phase.settings, source, messages)
    result = {}
    for transactional, label in ((False, "plain"), (True, "transactional")):
        runs = [one_pass(phase, source, len(messages), transactional, f"{label}{i}", timeout) for i in range(passes)]
        median = statistics.median_low([r["events_per_s"] for r in runs])
        chosen = next(r for r in runs if r["events_per_s"] == median)
        result[label] = {**chosen, "passes_events_per_s": [r["events_per_s"] for r in runs]}
    result["events_per_s"] = result["plain"]["events_per_s"]
    # what the loop's own CPU would allow: the rest of B's time is waiting on the broker's fetches
    bench_us = result["plain"]["cpu_us_per_event"].get("bench")
    result["cpu_limit_events_per_s"] = round(1e6 / bench_us) if bench_us else None
    result["variant"] = "plain: async commits, no transactions"
    return result


def main(argv: list[str] | None = None) -> dict:
    from bench import mix

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args(argv)
    messages, _, _ = mix.messages(args.events)
    with Stack("passthrough") as stack:
        phase = stack.phase("b")
        figures = measure_passthrough(phase, messages, args.passes)
        phase.close()
    for label in ("plain", "transactional"):
        f = figures[label]
        print(f"B {label}: {f['events_per_s']:,} events/s (passes {f['passes_events_per_s']}); CPU µs/event {f['cpu_us_per_event']}")
    return figures


if __name__ == "__main__":
    main()
