"""The Prometheus endpoints of a real identity worker, sink and capture (child processes with
``HEADWATER_METRICS_ADDR``), scraped before and after events flow: the counters move by exactly
the number of events, dead letters are counted by reason, and lag ends at 0.
"""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from headwater.kafka_admin import ensure_topics
from headwater.settings import Settings
from headwater.topics import TopicNames
from tests.conftest import Pipeline, free_port, wait_until
from tests.pipeline.test_status import produce_raw

pytestmark = pytest.mark.pipeline

EVENTS = 300
INVALID_JSON = 2

Samples = dict[tuple[str, frozenset], float]


def scrape(port: int) -> Samples | None:
    """Every sample of the endpoint as ``{(name, labels): value}``; None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def labelled(samples: Samples, name: str) -> Iterable[tuple[dict[str, str], float]]:
    return ((dict(labels), v) for (n, labels), v in samples.items() if n == name)


def test_worker_and_sink_counters_move_by_the_events_that_flowed(
    settings: Settings, test_env: dict[str, str], clickhouse, tmp_path
):
    ensure_topics(settings)
    names = TopicNames(settings.topic_prefix)
    db = settings.clickhouse.database
    worker_port, sink_port = free_port(), free_port()
    pipeline = Pipeline(test_env, tmp_path)
    try:
        pipeline.env["HEADWATER_METRICS_ADDR"] = f"127.0.0.1:{worker_port}"
        pipeline.start("identity-0", "worker", "identity", "--worker-id", "0")
        pipeline.env["HEADWATER_METRICS_ADDR"] = f"127.0.0.1:{sink_port}"
        pipeline.start("sink", "sink")
        worker_before = wait_until(lambda: scrape(worker_port), 60, message="the worker's /metrics")
        sink_before = wait_until(lambda: scrape(sink_port), 60, message="the sink's /metrics")
        assert value(worker_before, "headwater_stage_messages_in_total", stage="identity") == 0

        produce_raw(settings, EVENTS, invalid_json=INVALID_JSON)
        rows = f"SELECT (SELECT count() FROM {db}.events), (SELECT count() FROM {db}.events_dead_letter)"
        wait_until(lambda: clickhouse.query(rows).result_rows[0] == (EVENTS, INVALID_JSON), 120,
                   message="events and dead letters in ClickHouse")

        def settled(port: int, name: str, expected: float, **labels: str) -> Samples | None:
            samples = scrape(port)
            return samples if samples and value(samples, name, **labels) == expected else None

        worker = wait_until(lambda: settled(worker_port, "headwater_stage_messages_in_total", EVENTS + INVALID_JSON,
                                            stage="identity"), 30, message="the worker's messages in")
        sink = wait_until(lambda: settled(sink_port, "headwater_sink_rows_written_total", INVALID_JSON,
                                          table=f"{db}.events_dead_letter"), 30, message="the sink's dead-letter rows")
        sink = wait_until(lambda: settled(sink_port, "headwater_sink_rows_written_total", EVENTS,
                                          table=f"{db}.events"), 30, message="the sink's event rows")
        def enriched_lags(samples: Samples) -> list[float]:
            return [v for labels, v in labelled(samples, "headwater_consumer_lag_offsets")
                    if labels["topic"] == names.events_enriched]

        sink = wait_until(lambda: (s := scrape(sink_port)) and len(enriched_lags(s)) == settings.partitions
                          and all(v <= 1 for v in enriched_lags(s)) and s, 30,
                          message="the sink's lag of every events_enriched partition after its last commit")
    finally:
        pipeline.stop()

    # the identity worker: in, out, outcomes, dead letters by reason, batch sizes, lag
    assert moved(worker_before, worker, "headwater_stage_events_total", stage="identity", outcome="ok") == EVENTS
    assert moved(worker_before, worker, "headwater_dead_letters_total", component="identity",
                 reason="invalid_json") == INVALID_JSON
    assert moved(worker_before, worker, "headwater_stage_batch_messages_sum", stage="identity") == EVENTS + INVALID_JSON
    assert moved(worker_before, worker, "headwater_stage_batch_messages_count", stage="identity") >= 1
    # events, dead letters, and each new person's person and distinct-id rows
    assert moved(worker_before, worker, "headwater_stage_records_out_total", stage="identity") >= EVENTS + INVALID_JSON + 2 * 40
    assert value(worker, "headwater_stage_events_total", stage="identity", outcome="dropped") == 0
    raw_lags = [v for labels, v in labelled(worker, "headwater_consumer_lag_offsets") if labels["topic"] == names.events_raw]
    assert raw_lags and all(v == 0 for v in raw_lags)

    # the sink: messages in per topic, rows per table, batch sizes and write times
    assert moved(sink_before, sink, "headwater_sink_messages_in_total", topic=names.events_enriched) == EVENTS
    assert moved(sink_before, sink, "headwater_sink_messages_in_total", topic=names.events_dead_letter) == INVALID_JSON
    assert moved(sink_before, sink, "headwater_sink_batch_messages_sum", topic=names.events_enriched) == EVENTS
    assert moved(sink_before, sink, "headwater_sink_batch_write_seconds_count", topic=names.events_enriched) >= 1
    assert moved(sink_before, sink, "headwater_sink_batch_write_seconds_sum", topic=names.events_enriched) > 0
    assert value(sink, "headwater_sink_duplicates_dropped_total") == 0
    assert value(sink, "headwater_sink_insert_failures_total") == 0
    assert value(sink, "headwater_sink_clickhouse_failing") == 0
    # every partition of events_enriched was committed; the lag left is its last commit marker
    assert enriched_lags(sink) == [1.0] * settings.partitions


def test_capture_counts_accepted_events_and_refused_requests_by_code(
    settings: Settings, test_env: dict[str, str], tmp_path
):
    ensure_topics(settings)
    capture_port, metrics_port = free_port(), free_port()
    pipeline = Pipeline({**test_env, "HEADWATER_CAPTURE_ADDR": f"127.0.0.1:{capture_port}",
                         "HEADWATER_METRICS_ADDR": f"127.0.0.1:{metrics_port}"}, tmp_path)

    def post(body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{capture_port}/batch/", data=orjson.dumps(body),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, orjson.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, orjson.loads(error.read())

    try:
        pipeline.start("capture", "capture")
        before = wait_until(lambda: scrape(metrics_port), 60, message="capture's /metrics")
        batch = [{"event": "signed_up", "distinct_id": f"u{i}", "uuid": str(uuid.uuid4())} for i in range(7)]
        assert post({"api_key": "phc_test", "batch": batch})[0] == 200
        assert post({"api_key": "phc_test", "batch": batch[:3]})[0] == 200
        status, refused = post({"api_key": "phc_nobody", "batch": batch})
        assert status == 401
        after = scrape(metrics_port)
    finally:
        pipeline.stop()
    assert after is not None
    assert moved(before, after, "headwater_capture_events_accepted_total") == 10
    assert moved(before, after, "headwater_capture_request_events_count") == 2
    assert moved(before, after, "headwater_capture_request_events_sum") == 10
    assert moved(before, after, "headwater_capture_requests_refused_total", code=refused["code"]) == 1
    assert f"metrics: capture serves http://127.0.0.1:{metrics_port}/metrics" in pipeline.log("capture")
