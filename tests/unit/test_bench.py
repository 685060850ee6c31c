"""The benchmark's pure helpers: percentiles, windows, the event mix, targets and the report's shape.
No broker, no timing."""

from __future__ import annotations

import json
import math
from collections import Counter

import orjson
import pytest

from bench import mix
from bench.common import TOKEN, cpu_in_window, percentile, window_rate
from bench.latency import stage_split
from bench.run import PHASES, SECTIONS, add_ratios, parse_args, table_rows, targets
from headwater.wire import RawEvent


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5], 50, 5),
        ([1, 2, 3, 4], 50, 2.5),
        ([4, 1, 3, 2], 0, 1),
        ([4, 1, 3, 2], 100, 4),
        (list(range(1, 101)), 99, 99.01),
        (list(range(1, 101)), 95, 95.05),
        ([10, 20], 25, 12.5),
    ],
    ids=["one", "median-even", "min-unsorted", "max", "p99-of-100", "p95-of-100", "interpolated"],
)
def test_percentile_interpolates_between_ranks_like_numpy(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan_and_out_of_range_is_refused():
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_window_rate_counts_events_after_the_skipped_ones_over_their_time():
    stamps = [1000] * 10 + [2000] * 10 + [3000] * 10  # ms: three batches of ten
    assert window_rate(stamps, 10) == (20, 2.0)  # after the first batch: 20 events in 2 s
    assert window_rate(list(reversed(stamps)), 10) == (20, 2.0)  # order does not matter
    assert window_rate(stamps, 30) == (0, 0.0)  # nothing after the skipped ones
    assert window_rate([1000] * 5, 0) == (0, 0.0)  # no time elapsed


def test_cpu_in_window_takes_the_samples_where_the_counter_crosses_start_and_end():
    samples = [{"t": t, "rows": rows, "cpu": {"sink": cpu}} for t, rows, cpu in
               [(0, 0, 1.0), (1, 50, 1.5), (2, 100, 2.0), (3, 200, 3.0), (4, 300, 4.0), (5, 300, 4.2)]]
    assert cpu_in_window(samples, "rows", 100, 300, "sink") == (2.0, 200, 2)
    assert cpu_in_window(samples, "rows", 100, 999, "sink") == pytest.approx((2.2, 200, 3))  # never reached: last sample
    assert cpu_in_window(samples, "rows", 999, 1000, "sink") == (0.0, 0, 0.0)


def test_stage_split_gives_each_hop_of_the_events_found_everywhere():
    ms = 1000  # µs
    rows = [("a", 1000 * ms, 0), ("b", 1000 * ms, 100 * ms), ("lost", 2000 * ms, 0)]
    raw = {"a": 2 * ms, "b": 110 * ms, "lost": 5 * ms}
    enriched = {"a": 300 * ms, "b": 400 * ms}  # "lost" never came out of the processors
    seen = {1000 * ms: 1100 * ms, 2000 * ms: 2050 * ms}
    split = stage_split(rows, raw, enriched, seen)
    assert split["capture"] == {"p50": 6.0, "p99": 9.9}
    assert split["processors"] == {"p50": 294.0, "p99": 297.9}
    assert split["sink"] == {"p50": 650.0, "p99": 699.0}
    assert split["visible"] == {"p50": 100.0, "p99": 100.0}
    assert stage_split([], {}, {}, {}) == {"capture": {}, "processors": {}, "sink": {}, "visible": {}}


# -- the mix -------------------------------------------------------------------------------------
def test_mix_kinds_come_in_their_shares():
    shares = mix.Shares()
    recorder = mix.Recorder()
    kinds = mix.send(recorder, 20_000, shares)
    assert sum(kinds.values()) == len(recorder.messages) == 20_000
    for kind, share in shares.as_dict().items():
        assert kinds[kind] / 20_000 == pytest.approx(share, abs=0.01), kind
    assert Counter(mix.kind_of(value) for _, value in recorder.messages) == kinds


def test_mix_without_merges_has_no_identify_or_alias():
    recorder = mix.Recorder()
    kinds = mix.send(recorder, 5_000, mix.Shares(identify=0, alias=0))
    assert kinds["identify"] == kinds["alias"] == 0
    assert kinds["pageview"] / 5_000 == pytest.approx(0.875, abs=0.02)


def test_shares_that_add_up_to_more_than_one_are_refused():
    with pytest.raises(ValueError):
        mix.Shares(identify=0.9, backend=0.2)


def test_mix_messages_follow_the_published_envelope_and_keying_rule():
    messages, warm, kinds = mix.messages(2_000)
    assert warm == 500 + 8_000 + 20_000  # one per company, user and visitor
    assert len(messages) == warm + 2_000 and sum(kinds.values()) == 2_000
    for key, value in messages[:50] + messages[warm:warm + 500]:
        event = RawEvent.model_validate_json(value)
        assert key == f"{TOKEN}:{event.distinct_id}".encode()
        assert event.token == TOKEN


def test_the_same_seed_gives_the_same_events():
    def bodies():
        recorder = mix.Recorder(seed=9)
        mix.send(recorder, 300, seed=9)
        return [{k: v for k, v in orjson.loads(value).items() if k != "now"} for _, value in recorder.messages]

    assert bodies() == bodies()


def test_unique_ids_gives_each_event_a_new_distinct_id():
    recorder = mix.Recorder()
    assert mix.unique_ids(recorder, 1_000, first=5) == 1_000
    ids = [orjson.loads(value)["distinct_id"] for _, value in recorder.messages]
    assert len(set(ids)) == 1_000 and ids[0] == "visitor-5"


def test_capture_event_is_a_posthog_batch_event_with_the_extra_properties():
    recorder = mix.Recorder()
    recorder.capture("anon-1", "$pageview", {"$current_url": "https://x"})
    event = mix.capture_event(recorder.messages[0][1], bench_sent_us=42)
    assert set(event) == {"event", "distinct_id", "uuid", "timestamp", "properties"}
    assert event["properties"] == {"$current_url": "https://x", "bench_sent_us": 42}


# -- the report ----------------------------------------------------------------------------------
def results_of_a_run() -> dict:
    return {
        "run": {"started_at": "2026-11-22T00:00:00+00:00", "commit": "abc", "machine": {"cpus": 2, "loadavg_1m": 0.1}},
        "mix": {"events": 1000, "warmup_events": 10, "shares": mix.Shares().as_dict(), "kinds": {}},
        "passthrough": {"events_per_s": 200_000, "variant": "plain",
                        "plain": {"events_per_s": 200_000, "cpu_us_per_event": {"bench": 5.0}, "passes_events_per_s": [200_000]},
                        "transactional": {"events_per_s": 150_000}},
        "processors": {"events_per_s": 80_000, "workers": 1, "cpu_us_per_event": {"worker": 20.0}, "complete": True},
        "end_to_end": {"events_per_s": 21_000, "rows": 1000, "duplicates": 0, "cpu_us_per_event": {"sink": 10.0}, "complete": True},
        "latency": {"rate": 10_500, "queryable_ms": {"p50": 900.0, "p95": 2000.0, "p99": 3100.0, "max": 4000.0},
                    "insert_ms": {"p50": 800.0, "p95": 1900.0, "p99": 3000.0, "max": 3900.0}, "poll_ms": 100.0,
                    "sent_per_s": 10_500, "complete": True,
                    "stages_ms": {"capture": {"p50": 1.0, "p99": 10.0}, "processors": {"p50": 300.0, "p99": 900.0},
                                  "sink": {"p50": 500.0, "p99": 1900.0}, "visible": {"p50": 80.0, "p99": 150.0}}},
        "memory": {"distinct_ids": 1_000_000, "bytes_per_id": 150, "marginal_bytes_per_id": 120, "rss_start_mb": 80,
                   "rss_end_mb": 230, "rss_end_busy_mb": 300, "busy_bytes_per_id": 220, "rss_peak_mb": 400, "rocksdb_mb": 700, "complete": True},
        "capture": {"events_per_s": 70_000, "connections": 8, "batch": 100, "errors": 0, "cpu_us_per_event": {"capture": 12.0}},
        "sink": {"error": "RuntimeError: boom"},
    }


def test_ratios_and_targets_are_computed_from_the_figures():
    results = results_of_a_run()
    add_ratios(results)
    assert results["processors"]["p_over_b"] == 0.4 and results["processors"]["p_over_b_tx"] == pytest.approx(0.533)
    checks = targets(results)
    assert {name: c["met"] for name, c in checks.items()} == {
        "end_to_end_events_per_s": True, "p_over_b": True, "latency_p50_ms": True, "latency_p99_ms": False,
        "memory_bytes_per_id": True}
    assert set(checks["p_over_b"]) == {"target", "value", "met"}


def test_memory_below_a_million_ids_is_not_judged_against_the_target():
    results = results_of_a_run()
    results["memory"]["distinct_ids"] = 200_000
    check = targets(results)["memory_bytes_per_id"]
    assert check["met"] is None and "200,000" in check["note"]
    results["targets"] = targets(results)
    assert "✓" not in table_rows(results)[4][1] and "✗" not in table_rows(results)[4][1]


def test_targets_leave_out_what_the_run_did_not_measure():
    assert targets({"run": {}, "end_to_end": {"error": "x"}}) == {}


def test_the_table_has_a_row_per_phase_run_and_the_report_is_json():
    results = results_of_a_run()
    add_ratios(results)
    results["targets"] = targets(results)
    rows = table_rows(results)
    assert len(rows) == len(PHASES) and all(len(row) == 5 for row in rows)
    results["processors_profile"] = {"events_per_s": 5_000, "cpu_us_per_event": {"worker": 180.0},
                                     "profile_top": [{"function": "x", "calls": 1, "self_share": 0.5, "cumulative_share": 0.5}]}
    assert [row[0] for row in table_rows(results)][2] == "P under cProfile"
    assert rows[-1][1] == "failed"
    assert "P/B 0.40 ✓" in rows[1][1]
    assert "processors 300/900" in rows[3][4]
    assert json.loads(json.dumps(results)) == results
    assert set(PHASES) <= set(SECTIONS)


def test_arguments_quick_full_and_only():
    assert parse_args(["--full"]).distinct_ids == 1_000_000
    quick = parse_args(["--quick", "--only", "b, p"])
    assert quick.events == 20_000 and quick.only == ["b", "p"]
    with pytest.raises(SystemExit):
        parse_args(["--only", "x"])
