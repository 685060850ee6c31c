"""Run the real ClickHouse sink in a thread of the test process, and read what it committed; for
the pipeline tests of the sink's routes (identity, groups)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from confluent_kafka import Consumer, TopicPartition

from headwater.settings import Settings
from sinks.clickhouse.client import connect
from sinks.clickhouse.sink import ClickHouseSink


@contextmanager
def running_sink(settings: Settings) -> Iterator[ClickHouseSink]:
    """The real sink, in a thread of this process, with its own ClickHouse client; stopped on exit."""
    client = connect(settings.clickhouse, form_encode_query_params=True)
    sink = ClickHouseSink(settings, client, worker_id="test")
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sink.run(stop)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="sink", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        stop.set()
        thread.join(30)
        client.close()
    assert not thread.is_alive(), "the sink did not stop"
    assert not errors, errors


def committed(settings: Settings, group_id: str, partitions: list[TopicPartition]) -> dict[tuple[str, int], int]:
    """The consumer group's committed offsets of ``partitions``."""
    reader = Consumer(settings.consumer_config(group_id))
    try:
        return {(tp.topic, tp.partition): tp.offset for tp in reader.committed(partitions, timeout=10)}
    finally:
        reader.close()
