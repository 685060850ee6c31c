"""Run the real ClickHouse sink in a thread of the test process, and read what it committed; for
the pipeline tests of the sink's routes (identity, groups)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from confluent_kafka import Consumer, TopicPartition

from headwater.settings import Settings
from sinks.clickhouse.client import connect
from sinks.clickhouse.sink import ClickHouseSink
from tests.conftest import running


@contextmanager
def running_sink(settings: Settings) -> Iterator[ClickHouseSink]:
    """The real sink, in a thread of this process, with its own ClickHouse client; stopped on exit."""
    client = connect(settings.clickhouse, form_encode_query_params=True)
    sink = ClickHouseSink(settings, client, worker_id="test")
    try:
        with running(sink.run, "sink"):
            yield sink
    finally:
        client.close()


def committed(settings: Settings, group_id: str, partitions: list[TopicPartition]) -> dict[tuple[str, int], int]:
    """The consumer group's committed offsets of ``partitions``."""
    reader = Consumer(settings.consumer_config(group_id))
    try:
        return {(tp.topic, tp.partition): tp.offset for tp in reader.committed(partitions, timeout=10)}
    finally:
        reader.close()
