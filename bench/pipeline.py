"""E, end to end: ``events_raw`` to rows in ClickHouse, with the identity worker(s) and the sink, on
one broker and one ClickHouse, all on this machine.

Fills ``events_raw`` first with the benchmark's mix (``bench.mix``: web pageviews and clicks with a
client ``$session_id`` and ~15 properties, anonymous visitors identifying or aliased (a merge
each), ``$set``, backend events naming a company group (no session: server-side sessions),
``$groupidentify``), after its warm-up, then starts the worker(s) and the sink. As for P, the
measured window starts when the warm-up's rows are in: the rows inserted after the warm-up's last
one, over the time from its insert to the last row's (the ``inserted_at`` the table sets).

    .venv/bin/python -m bench.pipeline [--events 200000] [--identify-share 0.03] [--alias-share 0.005] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import CpuMeter, Phase, Stack, produce_all, rate, window_rate
from bench.processors import run_workers


def inserted_stamps(client, database: str) -> list[int]:
    """The ``inserted_at`` of every event row, in ms (one value per insert)."""
    rows = client.query(f"SELECT toUnixTimestamp64Milli(inserted_at) AS t, count() FROM {database}.events "
                        "GROUP BY t ORDER BY t").result_rows
    return [t for t, n in rows for _ in range(n)]


def measure_end_to_end(phase: Phase, messages: list[tuple[bytes, bytes]], warm: int, workers: int = 1,
                       timeout: float = 300) -> dict:
    produce_all(phase.settings, phase.topics.events_raw, messages)
    client = phase.clickhouse()
    count = lambda: client.query(f"SELECT count() FROM {phase.database}.events").result_rows[0][0]  # noqa: E731
    processes = run_workers(phase, workers)
    sink = phase.headwater("sink", "sink")
    meter = CpuMeter({"worker": [p.pid for p in processes], "sink": sink.pid, "clickhouse": phase.stack.clickhouse.pid,
                      "broker": phase.stack.broker.pid})
    launched = time.perf_counter()
    deadline = time.monotonic() + timeout
    first = window_start = None
    rows = start_rows = 0
    while time.monotonic() < deadline:
        rows = count()
        now = time.perf_counter()
        if first is None and rows > 0:
            first = now
        if window_start is None and rows >= warm:
            window_start, start_rows = now, rows
            meter.start()
        if rows >= len(messages):
            break
        if any(p.poll() is not None for p in (*processes, sink)):
            raise RuntimeError("a worker or the sink exited; see its log in the work folder")
        time.sleep(0.25)
    end = time.perf_counter()
    if window_start is None:
        window_start, start_rows = end, rows
        meter.start()
    meter.stop()
    counted, seconds = window_rate(inserted_stamps(client, phase.database), warm)
    total, unique = client.query(f"SELECT count(), uniqExact(uuid) FROM {phase.database}.events").result_rows[0]
    client.close()
    window_rows = rows - start_rows
    return {
        "events_per_s": rate(counted, seconds), "events": counted, "seconds": round(seconds, 2), "workers": workers,
        "rows": total, "expected_rows": len(messages), "duplicates": total - unique, "complete": total >= len(messages),
        "startup_s": round(first - launched, 2) if first else None,
        "cpu_us_per_event": meter.per_event_us(window_rows), "cpu_cores": meter.cores(end - window_start),
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
