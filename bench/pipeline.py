"""E, end to end: ``events_raw`` to rows in ClickHouse, with the identity worker(s) and the sink, on
one broker and one ClickHouse, all on this machine.

Fills ``events_raw`` first with the benchmark's mix (``bench.mix``: web pageviews and clicks with a
client ``$session_id`` and ~15 properties, anonymous visitors identifying or aliased (a merge
each), ``$set``, backend events naming a company group (no session: server-side sessions),
``$groupidentify``), after its warm-up, then starts the worker(s) and the sink. As for P, the
measured window starts when the warm-up's rows are in: the rows inserted after the warm-up's last
one, over the time from its insert to the last row's (the ``inserted_at`` the table sets). CPU per
event: the worker's over its own progress (the group's committed offsets), the sink's, ClickHouse's
and the broker's over the rows, each from the warm-up's end to the last event.

    .venv/bin/python -m bench.pipeline [--events 200000] [--identify-share 0.03] [--alias-share 0.005] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import CpuMeter, GroupProgress, Phase, Stack, cpu_in_window, produce_all, rate, window_rate
from bench.processors import run_workers


def inserted_stamps(client, database: str) -> list[int]:
    """The ``inserted_at`` of every event row, in ms (one value per insert)."""
    rows = client.query(f"SELECT toUnixTimestamp64Milli(inserted_at) AS t, count() FROM {database}.events "
                        "GROUP BY t ORDER BY t").result_rows
    return [t for t, n in rows for _ in range(n)]


def measure_end_to_end(phase: Phase, messages: list[tuple[bytes, bytes]], warm: int, workers: int = 1,
                       timeout: float = 300) -> dict:
    raw = phase.topics.events_raw
    ends = produce_all(phase.settings, raw, messages)
    total = len(messages)
    client = phase.clickhouse()
    count = lambda: client.query(f"SELECT count() FROM {phase.database}.events").result_rows[0][0]  # noqa: E731
    progress = GroupProgress(phase.settings, f"{phase.settings.topic_prefix}headwater-identity", raw, ends)
    processes = run_workers(phase, workers)
    sink = phase.headwater("sink", "sink")
    meter = CpuMeter({"worker": [p.pid for p in processes], "sink": sink.pid, "clickhouse": phase.stack.clickhouse.pid,
                      "broker": phase.stack.broker.pid})
    launched = time.perf_counter()
    deadline = time.monotonic() + timeout
    samples: list[dict] = []
    try:
        while time.monotonic() < deadline:
            samples.append({"t": time.perf_counter(), "rows": count(), "done": progress.read(), "cpu": meter.read()})
            if samples[-1]["rows"] >= total:
                break
            if any(p.poll() is not None for p in (*processes, sink)):
                raise RuntimeError("a worker or the sink exited; see its log in the work folder")
            time.sleep(0.25)
    finally:
        progress.close()
    stamps = inserted_stamps(client, phase.database)
    counted, seconds = window_rate(stamps, warm)
    inserts = len(set(stamps))
    rows, unique = client.query(f"SELECT count(), uniqExact(uuid) FROM {phase.database}.events").result_rows[0]
    client.close()
    # CPU per event: the worker's over its own progress (committed input offsets), the others' over
    # the rows, each from the warm-up's end to the last event (the worker runs ahead of the sink)
    cpu, cores = {}, {}
    for name in meter.pids:
        used, events, elapsed = cpu_in_window(samples, "done" if name == "worker" else "rows", warm, total, name)
        cpu[name] = round(1e6 * used / events, 1) if events else None
        cores[name] = round(used / elapsed, 2) if elapsed else None
    first_row = next((s["t"] for s in samples if s["rows"] > 0), None)
    return {
        "events_per_s": rate(counted, seconds), "events": counted, "seconds": round(seconds, 2), "workers": workers,
        "rows": rows, "expected_rows": total, "duplicates": rows - unique, "complete": rows >= total,
        "event_inserts": inserts, "rows_per_insert": round(rows / inserts) if inserts else None,
        "startup_s": round(first_row - launched, 2) if first_row else None,
        "cpu_us_per_event": cpu, "cpu_cores": cores,
    }


def main(argv: list[str] | None = None) -> dict:
    from bench import mix

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--identify-share", type=float, default=0.03,
                        help="share of events that are $identify of an anonymous visitor (a merge each)")
    parser.add_argument("--alias-share", type=float, default=0.005,
                        help="share of events that are $create_alias of an anonymous visitor (a merge each)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300, help="give up waiting for the rows after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    messages, warm, _ = mix.messages(args.events, mix.Shares(identify=args.identify_share, alias=args.alias_share))
    with Stack("pipeline") as stack:
        phase = stack.phase("e")
        figures = measure_end_to_end(phase, messages, warm, args.workers, args.timeout)
        phase.close()
        print(f"logs: {stack.work}")
    print(f"E: {figures['events']:,} events in {figures['seconds']}s = {figures['events_per_s']:,} events/s; "
          f"CPU per event (µs): {figures['cpu_us_per_event']}; complete {figures['complete']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
