"""Prometheus metrics of the identity workers, the sink and capture, and their ``/metrics`` endpoint.

Every name is listed in the README ("Status and metrics") and in docs/adr/0012-observability.md.
Counting costs nothing per event: the stage runtime, the sink and capture call one hook per batch
(or per request), which adds ``len(batch)``; the stage's per-event ``counts`` are read as deltas
once per batch, and its records are looked at only in a batch that made dead letters or warnings.

The endpoint is off unless ``HEADWATER_METRICS_ADDR`` is set (:func:`serve`): one HTTP server per
process, started by the first component that registers.
"""

from __future__ import annotations

import errno
import logging
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from confluent_kafka import TopicPartition
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .settings import Settings
from .topics import TopicNames

if TYPE_CHECKING:
    from processors.outputs import Record
    from processors.runtime import StageRunner
    from sinks.clickhouse.sink import Batch, ClickHouseSink

log = logging.getLogger(__name__)

PORT_TRIES = 64
"""A taken port: the next ones are tried, so the processes of one machine can share one setting."""

SIZE_BUCKETS = (1, 10, 50, 100, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# -- stage workers (processors/runtime.py) ---------------------------------------------------------
STAGE_MESSAGES_IN = Counter(
    "headwater_stage_messages_in", "Messages a stage consumed, counted when their transaction committed "
    "(all input topics: events_raw and identity_inbox for identity).", ["stage"])
STAGE_RECORDS_OUT = Counter(
    "headwater_stage_records_out", "Records a stage produced in committed transactions (every output topic; "
    "changelog records not included).", ["stage"])
STAGE_EVENTS = Counter(
    "headwater_stage_events", "Events a stage finished, by outcome: ok (sent to events_enriched) or dropped "
    "(on purpose, each with a warning naming why).", ["stage", "outcome"])
STAGE_MERGES = Counter("headwater_stage_merges", "Person merges the identity stage carried out.", ["stage"])
STAGE_RESTORED = Counter(
    "headwater_stage_restored_records", "Changelog records read back into state when partitions were assigned.",
    ["stage"])
STAGE_BATCH = Histogram(
    "headwater_stage_batch_messages", "Messages per partition batch (one Kafka transaction).", ["stage"],
    buckets=SIZE_BUCKETS)

# -- shared by stages and sink ------------------------------------------------------------------------
DEAD_LETTERS = Counter(
    "headwater_dead_letters", "Messages sent to events_dead_letter (identity) or kept as dead-letter rows "
    "(sink), by component and reason (the dlq_reason header).", ["component", "reason"])
WARNINGS = Counter(
    "headwater_warnings", "Ingestion warnings sent, by component and warning type.", ["component", "type"])
CONSUMER_LAG = Gauge(
    "headwater_consumer_lag_offsets", "High watermark minus the consumer's position after its last batch, per "
    "partition it owns (offsets, transaction markers included: see docs/adr/0012-observability.md).",
    ["component", "topic", "partition"])

# -- sink (sinks/clickhouse/sink.py) ----------------------------------------------------------------
SINK_MESSAGES_IN = Counter(
    "headwater_sink_messages_in", "Messages the sink wrote to ClickHouse (as rows, dead letters or dropped "
    "duplicates), by topic.", ["topic"])
SINK_ROWS = Counter("headwater_sink_rows_written", "Rows the sink inserted, by table.", ["table"])
SINK_DUPLICATES = Counter(
    "headwater_sink_duplicates_dropped", "Events dropped because their uuid was ingested before.")
SINK_REPLAYED = Counter(
    "headwater_sink_batches_replayed", "Batches written again from the range a previous owner recorded.")
SINK_BATCH = Histogram(
    "headwater_sink_batch_messages", "Messages per sink batch, by topic.", ["topic"], buckets=SIZE_BUCKETS)
SINK_WRITE_SECONDS = Histogram(
    "headwater_sink_batch_write_seconds", "Time to write one batch to ClickHouse (uuid check, inserts, and "
    "retries while ClickHouse fails), by topic.", ["topic"], buckets=SECONDS_BUCKETS)

# -- capture (producers/capture/server.py) ------------------------------------------------------------
CAPTURE_EVENTS = Counter("headwater_capture_events_accepted", "Events acknowledged by Kafka and answered 200.")
CAPTURE_REQUEST_EVENTS = Histogram(
    "headwater_capture_request_events", "Events per accepted capture request.", buckets=SIZE_BUCKETS)
CAPTURE_REFUSED = Counter(
    "headwater_capture_requests_refused", "Capture requests answered with an error, by error code.", ["code"])


# -- the endpoint ----------------------------------------------------------------------------------------
_server_lock = threading.Lock()
_server_address: tuple[str, int] | None = None


def listen(host: str, port: int) -> Any:
    """A started ``/metrics`` HTTP server on ``port``, or on the next free one of the following
    ``PORT_TRIES - 1`` (port 0: an ephemeral one); OSError when none is free."""
    candidates = range(port, min(port + PORT_TRIES, 65536)) if port else range(0, 1)
    for candidate in candidates:
        try:
            server, _ = start_http_server(candidate, host)
            return server
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or candidate == candidates[-1]:
                raise
    raise OSError(errno.EADDRINUSE, f"no free port from {port}")


def serve(settings: Settings, component: str) -> tuple[str, int] | None:
    """Start this process's ``/metrics`` endpoint on ``HEADWATER_METRICS_ADDR`` unless it is unset
    or already running; returns its ``(host, port)``. A port that cannot be had is logged, not
    raised: metrics never stop a component."""
    global _server_address
    where = settings.metrics_host_port
    if where is None:
        return None
    with _server_lock:
        if _server_address is None:
            host, port = where
            try:
                server = listen(host, port)
            except OSError as exc:
                log.error("metrics: cannot listen on %s (%s); %s runs without a metrics endpoint",
                          settings.metrics_addr, exc, component)
                return None
            _server_address = (host, server.server_port)
            log.info("metrics: %s serves http://%s:%d/metrics", component, host, server.server_port)
        return _server_address


def _lag_to(gauge_labels: dict[tuple[str, int], Any], component: str, topic: str, partition: int) -> Any:
    child = gauge_labels.get((topic, partition))
    if child is None:
        child = gauge_labels[(topic, partition)] = CONSUMER_LAG.labels(component, topic, str(partition))
    return child


def _forget_lags(gauge_labels: dict[tuple[str, int], Any], component: str, keep: set[tuple[str, int]]) -> None:
    """Drop the lag of partitions this process no longer owns (their new owner reports them)."""
    for key in [k for k in gauge_labels if k not in keep]:
        del gauge_labels[key]
        try:
            CONSUMER_LAG.remove(component, key[0], str(key[1]))
        except KeyError:
            pass


# -- stage workers ------------------------------------------------------------------------------------
_COUNTED_OUTCOMES = {"ok": "ok", "dropped": "dropped"}


class StageMetrics:
    """The runtime's per-batch hook: ``committed(partition, messages, records)`` after each commit."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner
        name = runner.name
        self.name = name
        self.messages_in = STAGE_MESSAGES_IN.labels(name)
        self.records_out = STAGE_RECORDS_OUT.labels(name)
        self.batch = STAGE_BATCH.labels(name)
        self.outcomes = {key: STAGE_EVENTS.labels(name, outcome) for key, outcome in _COUNTED_OUTCOMES.items()}
        self.merges = STAGE_MERGES.labels(name)
        self.restored = STAGE_RESTORED.labels(name)
        self.restored_seen = 0
        # the stage's own per-event counts (IdentityPipeline.counts), read as deltas once per batch
        self.counts: dict[str, int] | None = getattr(runner.stage, "counts", None)
        self.seen: dict[str, int] = dict(self.counts or {})
        self.warnings_topic = TopicNames(runner.settings.topic_prefix).ingestion_warnings
        self.lags: dict[tuple[str, int], Any] = {}
        serve(runner.settings, f"stage {name} worker {runner.worker_id}")

    def committed(self, partition: int, messages: Sequence[Any], records: Sequence[Record]) -> None:
        self.messages_in.inc(len(messages))
        self.records_out.inc(len(records))
        self.batch.observe(len(messages))
        scan = self.counts is None  # a stage without counts: look at every batch's records
        if self.counts is not None:
            for key, value in self.counts.items():
                delta = value - self.seen.get(key, 0)
                if not delta:
                    continue
                self.seen[key] = value
                if key in _COUNTED_OUTCOMES:
                    self.outcomes[key].inc(delta)
                elif key == "merges":
                    self.merges.inc(delta)
                else:  # dead_letter, warnings: counted by reason from the records themselves
                    scan = True
        if scan:
            self._count_reasons(records)
        if self.runner.restored != self.restored_seen:
            self.restored.inc(self.runner.restored - self.restored_seen)
            self.restored_seen = self.runner.restored
        self._lag(partition)

    def _count_reasons(self, records: Sequence[Record]) -> None:
        for record in records:
            if record.headers:
                reason = dict(record.headers).get("dlq_reason")
                if reason is not None:
                    DEAD_LETTERS.labels(self.name, reason.decode(errors="replace")).inc()
            elif record.topic == self.warnings_topic and record.value:
                WARNINGS.labels(self.name, str(orjson.loads(record.value).get("type", "unknown"))).inc()

    def _lag(self, partition: int) -> None:
        consumer = self.runner.consumer
        positions = consumer.position([TopicPartition(t, partition) for t in self.runner.input_topics])
        for tp in positions:
            if tp.offset < 0:
                continue
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high is not None and high >= 0:
                _lag_to(self.lags, self.name, tp.topic, partition).set(max(0, high - tp.offset))
        owned = self.runner.tasks.keys()
        if any(p not in owned for _, p in self.lags):
            _forget_lags(self.lags, self.name, {k for k in self.lags if k[1] in owned})


def watch_stage(runner: StageRunner) -> StageMetrics:
    """The metrics hook of one stage runner (and the process's endpoint, if configured)."""
    return StageMetrics(runner)


# -- sink -----------------------------------------------------------------------------------------------
class SinkMetrics:
    """The sink's hooks: ``written(batch, seconds)`` on the writer thread after each batch landed (it
    touches no Kafka client), ``committed(offsets)`` on the consumer thread after each commit; its
    live state (failures, buffered messages) is read at scrape time."""

    def __init__(self, sink: ClickHouseSink) -> None:
        self.sink = sink
        self.rows_seen: dict[str, int] = dict(sink.rows_written)
        self.duplicates_seen = sink.duplicates_dropped
        self.dead_seen = sink.dead_lettered
        self.replayed_seen = sink.batches_replayed
        self.lags: dict[tuple[str, int], Any] = {}
        _SINKS.add(sink)
        serve(sink.settings, "sink")

    def written(self, batch: Batch, seconds: float) -> None:
        sink = self.sink
        count = len(batch.messages)
        SINK_MESSAGES_IN.labels(batch.topic).inc(count)
        SINK_BATCH.labels(batch.topic).observe(count)
        SINK_WRITE_SECONDS.labels(batch.topic).observe(seconds)
        for table, rows in sink.rows_written.items():
            if rows != self.rows_seen.get(table, 0):
                SINK_ROWS.labels(table).inc(rows - self.rows_seen.get(table, 0))
                self.rows_seen[table] = rows
        if sink.duplicates_dropped != self.duplicates_seen:
            SINK_DUPLICATES.inc(sink.duplicates_dropped - self.duplicates_seen)
            self.duplicates_seen = sink.duplicates_dropped
        if sink.dead_lettered != self.dead_seen:
            DEAD_LETTERS.labels("sink", "sink_unreadable_row").inc(sink.dead_lettered - self.dead_seen)
            self.dead_seen = sink.dead_lettered
        if sink.batches_replayed != self.replayed_seen:
            SINK_REPLAYED.inc(sink.batches_replayed - self.replayed_seen)
            self.replayed_seen = sink.batches_replayed

    def committed(self, offsets: Sequence[TopicPartition]) -> None:
        """The lag of the partitions just committed. On the consumer's thread only: a consumer
        called from another thread while it consumes blocks (confluent-kafka 2.16, measured)."""
        sink = self.sink
        for tp in offsets:
            _, high = sink.consumer.get_watermark_offsets(tp, cached=True)
            if high is not None and high >= 0:
                _lag_to(self.lags, "sink", tp.topic, tp.partition).set(max(0, high - tp.offset))
        if any(key not in sink.assigned for key in self.lags):
            _forget_lags(self.lags, "sink", {k for k in self.lags if k in sink.assigned})


_SINKS: weakref.WeakSet[Any] = weakref.WeakSet()


class _SinkStateCollector(Collector):
    """What must be current when ClickHouse fails and no batch lands: read at scrape time."""

    def collect(self) -> Iterator[Any]:
        sinks = list(_SINKS)
        failures = CounterMetricFamily(
            "headwater_sink_insert_failures", "ClickHouse calls of the sink that failed (each is retried).")
        failures.add_metric([], sum(s.insert_failures for s in sinks))
        failing = GaugeMetricFamily(
            "headwater_sink_clickhouse_failing", "1 while the sink's last ClickHouse call failed and it retries.")
        failing.add_metric([], float(any(s.failing for s in sinks)))
        buffered = GaugeMetricFamily("headwater_sink_buffered_messages", "Messages read and not yet written.")
        buffered.add_metric([], sum(s.buffered for s in sinks))
        return iter((failures, failing, buffered))


REGISTRY.register(_SinkStateCollector())


def watch_sink(sink: ClickHouseSink) -> SinkMetrics:
    """The metrics hook of one sink (and the process's endpoint, if configured)."""
    return SinkMetrics(sink)


# -- capture ----------------------------------------------------------------------------------------------
def watch_capture(settings: Settings) -> None:
    """Capture's endpoint, if configured. Its counters are :func:`capture_accepted` and :func:`capture_refused`."""
    serve(settings, "capture")


def capture_accepted(events: int) -> None:
    """One request's events, acknowledged by Kafka."""
    CAPTURE_EVENTS.inc(events)
    CAPTURE_REQUEST_EVENTS.observe(events)


def capture_refused(code: str) -> None:
    CAPTURE_REFUSED.labels(code).inc()


def metric_names() -> list[str]:
    """Every headwater metric name as exposed (counters with ``_total``), for the docs' test."""
    names = []
    for collector in (*_OWN, _SinkStateCollector()):
        for family in collector.describe() if hasattr(collector, "describe") else collector.collect():
            names.append(family.name + ("_total" if family.type == "counter" else ""))
    return sorted(names)


_OWN = (STAGE_MESSAGES_IN, STAGE_RECORDS_OUT, STAGE_EVENTS, STAGE_MERGES, STAGE_RESTORED, STAGE_BATCH,
        DEAD_LETTERS, WARNINGS, CONSUMER_LAG, SINK_MESSAGES_IN, SINK_ROWS, SINK_DUPLICATES, SINK_REPLAYED,
        SINK_BATCH, SINK_WRITE_SECONDS, CAPTURE_EVENTS, CAPTURE_REQUEST_EVENTS, CAPTURE_REFUSED)

