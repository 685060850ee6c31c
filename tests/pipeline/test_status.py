"""``headwater status --json`` against the real broker and ClickHouse: the identity stage's lag is
exactly the events produced while no worker ran (events_raw is written outside transactions, so
every offset is an event, even though Tansu's watermark points at the start of the last batch);
once the worker and the sink ran, every lag is 0 (markers after the last record are not counted)
and the dead letters appear by reason; throughput is committed offsets per second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from headwater import status as status_module
from headwater.kafka_admin import ensure_topics
from headwater.settings import Settings
from headwater.topics import TopicNames
from tests.conftest import ROOT, Pipeline, wait_until

pytestmark = pytest.mark.pipeline

EVENTS = 240
INVALID_JSON = 3
UNKNOWN_TOKEN = 2


def run_status(env: dict[str, str], interval: float = 0) -> tuple[dict, int]:
    done = subprocess.run(
        [sys.executable, "-m", "headwater.cli", "status", "--json", "--interval", str(interval)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.stdout, done.stderr
    return json.loads(done.stdout), done.returncode


def stage(report: dict, name: str) -> dict:
    return next(s for s in report["stages"] if s["stage"] == name)


def produce_raw(settings: Settings, events: int, *, invalid_json: int = 0, unknown_token: int = 0) -> None:
    """Events of 40 distinct ids in producer batches (linger), as any Kafka client would send them."""
    topic = TopicNames(settings.topic_prefix).events_raw
    producer = Producer(settings.kafka_config(**{"partitioner": "murmur2_random", "linger.ms": 20}))
    for i in range(events):
        did = f"user-{i % 40}"
        doc = {"token": "phc_test", "distinct_id": did, "event": "page_viewed", "uuid": str(uuid.uuid4()),
               "properties": {"n": i}}
        producer.produce(topic, orjson.dumps(doc), f"phc_test:{did}".encode())
    for i in range(invalid_json):
        producer.produce(topic, b"{not json", f"phc_test:broken-{i}".encode())
    for i in range(unknown_token):
        doc = {"token": "phc_nobody", "distinct_id": f"x-{i}", "event": "e", "uuid": str(uuid.uuid4())}
        producer.produce(topic, orjson.dumps(doc), f"phc_nobody:x-{i}".encode())
    assert producer.flush(30) == 0


def test_status_json_reports_lag_while_the_worker_is_stopped_then_zero_lag_and_dead_letters_by_reason(
    settings: Settings, test_env: dict[str, str], clickhouse, tmp_path
):
    ensure_topics(settings)
    produce_raw(settings, EVENTS, invalid_json=INVALID_JSON, unknown_token=UNKNOWN_TOKEN)
    names = TopicNames(settings.topic_prefix)
    sent = EVENTS + INVALID_JSON + UNKNOWN_TOKEN

    report, code = run_status(test_env)
    assert code == 0
    assert report["broker"]["reachable"] and report["clickhouse"]["reachable"]
    identity = stage(report, "identity")
    assert identity["group"] == f"{settings.topic_prefix}headwater-identity"
    assert identity["lag"] == sent
    raw = [p for p in identity["partitions"] if p["topic"] == names.events_raw]
    assert len(raw) == settings.partitions
    assert all(p["committed"] is None and p["lag"] == p["end"] for p in raw)
    assert stage(report, "sink")["lag"] == 0
    assert report["tables"]["events"] == 0
    assert report["dead_letters"] == {"window_s": 3600, "total": 0, "by_reason": {}}

    pipeline = Pipeline(test_env, tmp_path)
    try:
        pipeline.start("identity-0", "worker", "identity", "--worker-id", "0")
        pipeline.start("sink", "sink")
        rows = f"SELECT (SELECT count() FROM {settings.clickhouse.database}.events), " \
               f"(SELECT count() FROM {settings.clickhouse.database}.events_dead_letter)"
        wait_until(lambda: clickhouse.query(rows).result_rows[0] == (EVENTS, INVALID_JSON + UNKNOWN_TOKEN), 120,
                   message="events and dead letters in ClickHouse")

        def caught_up() -> dict | None:
            report, _ = run_status(test_env)
            return report if all(s["lag"] == 0 for s in report["stages"]) else None

        report = wait_until(caught_up, 60, interval=0.5, message="every stage caught up (lag 0)")
    finally:
        pipeline.stop()
    identity = stage(report, "identity")
    raw = [p for p in identity["partitions"] if p["topic"] == names.events_raw]
    assert sum(p["committed"] for p in raw) == sent  # events_raw has no markers: offsets are messages
    sink = stage(report, "sink")
    enriched = [p for p in sink["partitions"] if p["topic"] == names.events_enriched]
    assert sum(p["end"] for p in enriched) > EVENTS  # commit markers occupy offsets, and lag is still 0
    assert report["dead_letters"] == {"window_s": 3600, "total": INVALID_JSON + UNKNOWN_TOKEN,
                                      "by_reason": {"invalid_json": INVALID_JSON, "unknown_token": UNKNOWN_TOKEN}}
    assert report["tables"]["events"] == EVENTS
    assert report["tables"]["events_dead_letter"] == INVALID_JSON + UNKNOWN_TOKEN
    assert report["tables"]["persons"] >= 40


def test_throughput_is_committed_offsets_per_second_over_the_interval(settings: Settings):
    """The clock of status is replaced so that its wait commits 10 offsets on one partition as the
    identity group and lasts exactly 2 s: throughput 5/s there, 0 elsewhere, lag down by 10."""
    ensure_topics(settings)
    produce_raw(settings, 100)
    names = TopicNames(settings.topic_prefix)
    partition = 0
    while status_module.read_ends(settings, [(names.events_raw, partition)])[(names.events_raw, partition)][1].end < 10:
        partition += 1
    committer = Consumer(settings.kafka_config(**{"group.id": f"{settings.topic_prefix}headwater-identity",
                                                 "enable.auto.commit": False}))
    clock = {"now": 1000.0}

    def sleep(seconds: float) -> None:
        committer.commit(offsets=[TopicPartition(names.events_raw, partition, 10)], asynchronous=False)
        clock["now"] += seconds

    try:
        broker, stages = status_module.kafka_status(settings, interval=2.0, clock=lambda: clock["now"], sleep=sleep)
    finally:
        committer.close()
    assert broker["reachable"]
    identity = next(s for s in stages if s["stage"] == "identity")
    by_partition = {(p["topic"], p["partition"]): p for p in identity["partitions"]}
    moved = by_partition[(names.events_raw, partition)]
    assert (moved["committed"], moved["throughput"], moved["lag"]) == (10, 5.0, moved["end"] - 10)
    assert all(p["throughput"] == 0 for key, p in by_partition.items() if key != (names.events_raw, partition))
    assert identity["throughput"] == 5.0
    assert identity["lag"] == 100 - 10
