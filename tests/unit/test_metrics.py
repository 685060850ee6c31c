"""Metrics, status and log formatting without a broker: the per-batch hooks over fake runners and
sinks, the endpoint's port rule, the lag rule, the status table, the JSON log line, and the
README listing every metric name."""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from prometheus_client import REGISTRY

from headwater import metrics
from headwater.cli import JsonLogFormatter
from headwater.settings import Settings
from headwater.status import PartitionEnd, partition_lag, render_status
from processors.outputs import Record

ROOT = Path(__file__).resolve().parents[2]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- settings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("addr", "expected"), [
    (None, None),
    ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    (":9100", ("0.0.0.0", 9100)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("[::1]:9100", ("::1", 9100)),
], ids=["unset-off", "host-port", "every-address", "ephemeral", "ipv6"])
def test_metrics_addr_gives_host_and_port(addr, expected):
    assert Settings(metrics_addr=addr).metrics_host_port == expected


@pytest.mark.parametrize("addr", ["9100", "host:", "host:http", "host:70000"])
def test_metrics_addr_refuses_what_is_not_host_port(addr):
    with pytest.raises(ValueError, match="host:port"):
        Settings(metrics_addr=addr)


# -- the endpoint ---------------------------------------------------------------------------------------
def test_listen_takes_the_next_port_when_the_given_one_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = metrics.listen("127.0.0.1", port)
    try:
        assert port < server.server_port < port + metrics.PORT_TRIES
    finally:
        server.shutdown()
        server.server_close()


def test_serve_opens_nothing_when_the_setting_is_unset():
    assert metrics.serve(Settings(), "test") is None


# -- the stage hook ---------------------------------------------------------------------------------------
class FakeConsumer:
    def __init__(self, positions: dict[tuple[str, int], int], highs: dict[tuple[str, int], int]) -> None:
        self.positions, self.highs = positions, highs

    def position(self, partitions):
        return [SimpleNamespace(topic=tp.topic, partition=tp.partition,
                                offset=self.positions.get((tp.topic, tp.partition), -1001)) for tp in partitions]

    def get_watermark_offsets(self, tp, cached=False):
        assert cached, "the hooks must not ask the broker"
        return 0, self.highs.get((tp.topic, tp.partition), -1001)


def fake_runner(name: str, counts: dict[str, int] | None, consumer: FakeConsumer, tasks=(0, 1)):
    stage = SimpleNamespace(counts=counts) if counts is not None else SimpleNamespace()
    return SimpleNamespace(name=name, worker_id="0", stage=stage, settings=Settings(topic_prefix="u_"),
                           input_topics=["u_events_raw", "u_identity_inbox"], consumer=consumer,
                           tasks=dict.fromkeys(tasks), restored=0)


def dead(reason: str) -> Record:
    return Record("u_events_dead_letter", b"k", b"raw", [("dlq_reason", reason.encode()), ("dlq_stage", b"unit")])


def warned(kind: str) -> Record:
    return Record("u_ingestion_warnings", b"7", orjson.dumps({"type": kind, "team_id": 7}))


def test_stage_hook_counts_messages_records_outcomes_and_reasons_per_batch():
    counts = {"ok": 0, "dead_letter": 0, "dropped": 0, "warnings": 0, "merges": 0}
    consumer = FakeConsumer({("u_events_raw", 0): 90, ("u_identity_inbox", 0): 5},
                            {("u_events_raw", 0): 100, ("u_identity_inbox", 0): 5})
    hook = metrics.StageMetrics(fake_runner("unit-a", counts, consumer))
    messages = [object()] * 10
    counts.update(ok=7, dead_letter=2, dropped=1, warnings=1, merges=3)  # what the stage counted
    records = [Record("u_events_enriched", b"k", b"{}")] * 7 + [dead("invalid_json"), dead("unknown_token"),
                                                               warned("skipping_event_invalid_distinct_id")]
    hook.committed(0, messages, records)
    assert sample("headwater_stage_messages_in_total", stage="unit-a") == 10
    assert sample("headwater_stage_records_out_total", stage="unit-a") == 10
    assert sample("headwater_stage_events_total", stage="unit-a", outcome="ok") == 7
    assert sample("headwater_stage_events_total", stage="unit-a", outcome="dropped") == 1
    assert sample("headwater_stage_merges_total", stage="unit-a") == 3
    assert sample("headwater_dead_letters_total", component="unit-a", reason="invalid_json") == 1
    assert sample("headwater_dead_letters_total", component="unit-a", reason="unknown_token") == 1
    assert sample("headwater_warnings_total", component="unit-a", type="skipping_event_invalid_distinct_id") == 1
    assert sample("headwater_stage_batch_messages_sum", stage="unit-a") == 10
    assert sample("headwater_consumer_lag_offsets", component="unit-a", topic="u_events_raw", partition="0") == 10
    assert sample("headwater_consumer_lag_offsets", component="unit-a", topic="u_identity_inbox", partition="0") == 0

    # a batch that made no dead letter or warning: its records are not looked at
    counts.update(ok=12)
    hook.committed(0, [object()] * 5, [dead("would_be_counted_if_looked_at")] * 5)
    assert sample("headwater_stage_events_total", stage="unit-a", outcome="ok") == 12
    assert sample("headwater_dead_letters_total", component="unit-a", reason="would_be_counted_if_looked_at") == 0


def test_stage_hook_forgets_the_lag_of_a_partition_it_lost():
    consumer = FakeConsumer({("u_events_raw", 0): 1, ("u_events_raw", 1): 1}, {("u_events_raw", 0): 3, ("u_events_raw", 1): 4})
    runner = fake_runner("unit-b", {}, consumer)
    hook = metrics.StageMetrics(runner)
    hook.committed(0, [], [])
    hook.committed(1, [], [])
    assert sample("headwater_consumer_lag_offsets", component="unit-b", topic="u_events_raw", partition="1") == 3
    del runner.tasks[1]  # revoked
    hook.committed(0, [], [])
    assert REGISTRY.get_sample_value("headwater_consumer_lag_offsets",
                                     {"component": "unit-b", "topic": "u_events_raw", "partition": "1"}) is None
    assert sample("headwater_consumer_lag_offsets", component="unit-b", topic="u_events_raw", partition="0") == 2


def test_a_stage_without_counts_has_its_records_looked_at_every_batch():
    hook = metrics.StageMetrics(fake_runner("unit-c", None, FakeConsumer({}, {})))
    hook.committed(0, [object()], [dead("bad")])
    hook.committed(0, [object()], [dead("bad")])
    assert sample("headwater_dead_letters_total", component="unit-c", reason="bad") == 2


# -- the sink hook ----------------------------------------------------------------------------------------
class FakeSink(SimpleNamespace):
    """The attributes of ClickHouseSink the hook reads (weakly referenced, as a real sink)."""

    __slots__ = ("__weakref__",)
    __hash__ = object.__hash__


def test_sink_hook_adds_the_sinks_own_counters_as_deltas_and_reads_its_state_at_scrape():
    sink = FakeSink(settings=Settings(), rows_written={"unitdb.events": 0}, duplicates_dropped=0, dead_lettered=0,
                    batches_replayed=0, insert_failures=0, failing=False, buffered=0,
                    assigned={("unit_enriched", 0)}, consumer=FakeConsumer({}, {("unit_enriched", 0): 51}))
    hook = metrics.SinkMetrics(sink)
    failures_before = sample("headwater_sink_insert_failures_total")
    batch = SimpleNamespace(topic="unit_enriched", partition=0, first=0, last=49, messages=[object()] * 50)
    sink.rows_written["unitdb.events"] = 48
    sink.duplicates_dropped, sink.dead_lettered = 1, 1
    hook.written(batch, 0.25)
    assert sample("headwater_sink_messages_in_total", topic="unit_enriched") == 50
    assert sample("headwater_sink_rows_written_total", table="unitdb.events") == 48
    assert sample("headwater_sink_batch_write_seconds_sum", topic="unit_enriched") == 0.25
    assert sample("headwater_dead_letters_total", component="sink", reason="sink_unreadable_row") >= 1
    hook.committed([SimpleNamespace(topic="unit_enriched", partition=0, offset=50)])
    assert sample("headwater_consumer_lag_offsets", component="sink", topic="unit_enriched", partition="0") == 1
    sink.insert_failures, sink.failing = 3, True  # ClickHouse down: no batch lands, the scrape still sees it
    assert sample("headwater_sink_insert_failures_total") == failures_before + 3
    assert sample("headwater_sink_clickhouse_failing") == 1
    sink.failing = False


# -- status -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("committed", "low", "end", "lag"), [
    (None, 0, PartitionEnd(245, 245), 245),   # nothing committed: from the log start
    (None, 100, PartitionEnd(245, 245), 145),  # ... which retention moved
    (245, 0, PartitionEnd(245, 245), 0),       # events_raw caught up
    (32, 0, PartitionEnd(33, 32), 0),          # caught up; the trailing commit marker is not counted
    (20, 0, PartitionEnd(33, 32), 12),         # a backlog counts the markers between its records
    (40, 0, PartitionEnd(33, 32), 0),          # committed past what was read: never negative
], ids=["none-committed", "log-start-moved", "caught-up", "trailing-marker", "backlog", "ahead"])
def test_partition_lag(committed, low, end, lag):
    assert partition_lag(committed, low, end) == lag


def test_status_table_names_every_part_of_the_report():
    report = {
        "broker": {"bootstrap": "k:9092", "reachable": True, "error": None},
        "clickhouse": {"url": "http://default@c:8123/headwater", "reachable": False, "error": "refused"},
        "stages": [{"stage": "identity", "group": "headwater-identity", "state": "stable", "members": 1, "lag": 7,
                    "throughput": 12.5, "missing_topics": ["identity_inbox"],
                    "partitions": [{"topic": "events_raw", "partition": 0, "committed": 3, "end": 8, "lag": 5, "throughput": 10.0},
                                   {"topic": "events_raw", "partition": 1, "committed": 2, "end": 4, "lag": 2, "throughput": 2.5}]}],
        "dead_letters": {"window_s": 3600, "total": 3, "by_reason": {"invalid_json": 3}},
        "warnings": None, "tables": None,
    }
    text = render_status(report)
    assert "Kafka k:9092: reachable" in text and "NOT reachable (refused)" in text
    assert re.search(r"identity \| stable, 1 +\| events_raw +\| +7 \| 0:5 1:2 +\| +12\.5", text)
    assert "identity_inbox" in text and "topic missing" in text
    assert "Dead letters in the last 60 minutes: 3" in text and "invalid_json" in text


# -- logs -------------------------------------------------------------------------------------------------
def test_json_log_line_is_one_object_with_the_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("sink", logging.ERROR, __file__, 1, "insert %s failed", ("t:0:1-2",), sys.exc_info())
    line = JsonLogFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert (doc["level"], doc["logger"], doc["message"]) == ("ERROR", "sink", "insert t:0:1-2 failed")
    assert doc["ts"].endswith("+00:00") and "ValueError: boom" in doc["exc"]


# -- docs -------------------------------------------------------------------------------------------------
def test_the_readme_lists_every_metric_name():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Status and metrics"):]
    section = section[:section.index("\n## ", 5)]
    listed = sorted(set(re.findall(r"^\| `(headwater_[a-z_]+)` \|", section, flags=re.M)))
    assert listed == metrics.metric_names()
