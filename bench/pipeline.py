"""End to end (E): events_raw to rows in ClickHouse, one identity worker and the sink, on one broker
and one ClickHouse, all on this machine.

Fills ``events_raw`` first with a realistic mix, then starts the worker and the sink, and times the
first row to the last. The mix: web pageviews and clicks with a client ``$session_id`` and ~15
properties, anonymous visitors identifying (a merge each), ``$set``, backend events naming a
company group (no session: server-side sessions), and ``$groupidentify``.

    .venv/bin/python -m bench.pipeline [--events 200000] [--identify-share 0.03] [--json FILE]

A first measurement ahead of the full benchmark of the performance issue, which adds the
pass-through limit, latency and memory.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import Stack, wait_for_rows

TOKEN = "phc_bench"


def send(client, n: int, identify_share: float, seed: int = 2) -> int:
    """Queues ``n`` events on ``client``; returns how many become rows (all but none: every kind here
    is an event row)."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 1, tzinfo=UTC)
    pages = [f"https://app.example.com/{p}" for p in ("", "pricing", "docs", "dashboard", "settings", "billing")]
    visitors = [f"anon-{i}" for i in range(20_000)]
    sessions: dict[str, str] = {}
    for i in range(n):
        ts = start + timedelta(milliseconds=i * 37)
        r = rng.random()
        anon = rng.choice(visitors)
        user = f"user-{int(anon[5:]) % 8000}"
        company = f"company-{int(anon[5:]) % 500}"
        if r < identify_share:
            client.identify(user, {"email": f"{user}@example.com"}, anon_distinct_id=anon, timestamp=ts)
        elif r < identify_share + 0.02:
            client.set(user, {"plan": rng.choice(("free", "pro", "enterprise"))}, timestamp=ts)
        elif r < identify_share + 0.12:
            client.capture(user, rng.choice(("invoice_paid", "api_call", "export_done")), {"amount": rng.randint(1, 500)},
                           groups={"company": company}, timestamp=ts)
        elif r < identify_share + 0.125:
            client.group_identify("company", company, {"name": company.title(), "plan": rng.choice(("pro", "enterprise"))},
                                  timestamp=ts)
        else:
            if anon not in sessions or rng.random() < 0.05:
                sessions[anon] = str(uuid.UUID(int=rng.getrandbits(128)))
            props = {"$current_url": rng.choice(pages), "$browser": "Chrome", "$os": "Mac OS X", "$lib": "web",
                     "$lib_version": "1.200.0", "$referrer": "https://www.google.com/", "$referring_domain": "www.google.com",
                     "$screen_width": 1920, "$screen_height": 1080, "$session_id": sessions[anon],
                     "$window_id": sessions[anon], "utm_source": rng.choice(("google", "newsletter", "")),
                     "$device_type": "Desktop", "$pathname": "/"}
            client.capture(anon, rng.choice(("$pageview", "$pageview", "$autocapture")), props, timestamp=ts)
    return n


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--identify-share", type=float, default=0.03,
                        help="share of events that are $identify of an anonymous visitor (a merge each)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    with Stack("pipeline") as stack:
        import os

        os.environ["HEADWATER_TEAMS"] = stack.env["HEADWATER_TEAMS"] = f"{TOKEN}:1"
        from headwater.kafka_admin import ensure_topics
        from headwater.settings import Settings
        from producers.backend import Client
        from sinks.clickhouse.client import connect
        from sinks.clickhouse.migrate import apply_migrations

        settings = Settings()
        ensure_topics(settings)
        client = connect(settings.clickhouse)
        apply_migrations(client, stack.database)
        producer = Client.from_settings(settings, TOKEN)
        started = time.perf_counter()
        expected = send(producer, args.events, args.identify_share)
        assert producer.flush(120) == 0 and producer.failed == 0
        producer.close()
        print(f"filled events_raw: {args.events:,} events in {time.perf_counter() - started:.1f}s")

        worker = stack.headwater("identity-0", "worker", "identity", "--worker-id", "0")
        sink = stack.headwater("sink", "sink")
        count = lambda: client.query(f"SELECT count() FROM {stack.database}.events").result_rows[0][0]  # noqa: E731
        first, last, elapsed, cpu = wait_for_rows(count, expected, {"worker": worker, "sink": sink,
                                                                   "clickhouse": stack.clickhouse})
        written = last - first
        figures = {"events": written, "seconds": round(elapsed, 2), "events_per_s": round(written / elapsed),
                   **{f"{name}_us_per_event": round(1e6 * s / written, 1) for name, s in cpu.items()}}
        print(f"E: {written:,} events in {elapsed:.1f}s = {figures['events_per_s']:,} events/s; CPU per event: "
              + ", ".join(f"{name} {1e6 * s / written:.1f} µs" for name, s in cpu.items()))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        client.close()
        return figures


if __name__ == "__main__":
    main()
