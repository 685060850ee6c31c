"""The sink on its own: how many event rows per second it writes to ClickHouse.

Starts its own embedded broker and ClickHouse (child processes, ended at exit; in ``bench.run``
the run's), fills ``events_enriched`` with realistic event rows (sessions of about 20 events, a
person's properties, a group on most events, ~1 KB a row), then starts ``headwater sink`` and
times it from its first row to its last, with the CPU seconds the sink, ClickHouse and the broker
spent.

    .venv/bin/python -m bench.sink [--events 200000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from pathlib import Path

import orjson

from bench.common import Phase, Stack, produce_all, rate, wait_for_rows
from headwater.rows import EVENT_COLUMNS, GROUP_SLOTS

T0 = 1_790_000_000_000_000


def rows(n: int, seed: int = 1):
    """(key, value) of ``n`` event rows as the identity stage writes them."""
    rng = random.Random(seed)
    pages = [f"https://app.example.com/{p}" for p in ("", "pricing", "docs", "dashboard", "settings", "billing", "reports")]
    session, left, did, ts = "", 0, "", T0
    for i in range(n):
        if left == 0:
            did = f"user-{rng.randrange(5000)}"
            session, left = str(uuid.UUID(int=rng.getrandbits(128))), rng.randint(5, 35)
        left -= 1
        ts += rng.randint(1, 30_000_000)
        event = rng.choice(("$pageview", "$pageview", "$pageview", "$autocapture", "feature_used", "$pageleave"))
        props = {"$current_url": rng.choice(pages), "$browser": "Chrome", "$os": "Mac OS X", "$lib": "web",
                 "$lib_version": "1.200.0", "$referrer": "https://www.google.com/", "$referring_domain": "www.google.com",
                 "$screen_width": 1920, "$screen_height": 1080, "$session_id": session, "$window_id": session,
                 "utm_source": rng.choice(("google", "newsletter", "")), "plan": "pro", "$group_0": "acme"}
        row = {
            "uuid": str(uuid.UUID(int=rng.getrandbits(128))), "team_id": 1, "event": event, "distinct_id": did,
            "person_id": str(uuid.uuid5(uuid.NAMESPACE_URL, did)), "timestamp": ts,
            "properties": orjson.dumps(props).decode(),
            "person_properties": orjson.dumps({"email": f"{did}@example.com", "name": did, "plan": "pro"}).decode(),
            "person_created_at": T0 - 10**12,
        }
        for g in range(GROUP_SLOTS):
            row[f"$group_{g}"] = "acme" if g == 0 else ""
        for g in range(GROUP_SLOTS):
            row[f"group{g}_properties"] = '{"name":"Acme","plan":"enterprise"}' if g == 0 else "{}"
        for g in range(GROUP_SLOTS):
            row[f"group{g}_created_at"] = T0 - 10**11 if g == 0 else 0
        row.update({"$session_id": session, "$window_id": session, "created_at": ts})
        assert tuple(row) == EVENT_COLUMNS
        yield f"1:{did}".encode(), orjson.dumps(row)


def measure_sink(phase: Phase, events: int, verbose: bool = False, timeout: float = 300) -> dict:
    """Fills the phase's ``events_enriched`` with ``events`` rows, then times ``headwater sink``
    from its first row to its last."""
    client = phase.clickhouse()
    topic = phase.topics.events_enriched
    started = time.perf_counter()
    size = 0

    def sized():
        nonlocal size
        for key, value in rows(events):
            size += len(value)
            yield key, value

    produce_all(phase.settings, topic, sized())
    print(f"  filled {topic}: {events:,} rows of {size / events:.0f} bytes in {time.perf_counter() - started:.1f}s")
    sink = phase.headwater("sink", "sink", *(["--verbose"] if verbose else []))
    count = lambda: client.query(f"SELECT count() FROM {phase.database}.events").result_rows[0][0]  # noqa: E731
    first, last, elapsed, cpu = wait_for_rows(count, events, {"sink": sink, "clickhouse": phase.stack.clickhouse,
                                                             "broker": phase.stack.broker}, timeout)
    total, unique = client.query(f"SELECT count(), uniqExact(uuid) FROM {phase.database}.events").result_rows[0]
    client.close()
    written = last - first
    return {
        "rows": written, "seconds": round(elapsed, 2), "rows_per_s": rate(written, elapsed),
        "row_bytes": round(size / events), "complete": last >= events,
        "cpu_us_per_row": {name: round(1e6 * s / written, 1) if written else None for name, s in cpu.items()},
        "duplicates": total - unique,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--verbose-sink", action="store_true", help="the sink logs each batch (its log is in the work folder)")
    args = parser.parse_args(argv)

    with Stack("sink") as stack:
        phase = stack.phase("s")
        figures = measure_sink(phase, args.events, args.verbose_sink)
        phase.close()
        print(f"logs: {stack.work}")
    cpu = figures["cpu_us_per_row"]
    print(f"sink: {figures['rows']:,} rows in {figures['seconds']}s = {figures['rows_per_s']:,} rows/s "
          f"(CPU per row: sink {cpu['sink']} µs, ClickHouse {cpu['clickhouse']} µs, broker {cpu['broker']} µs); "
          f"duplicates {figures['duplicates']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
