"""The sink on its own: how many event rows per second it writes to ClickHouse.

Starts its own embedded broker and ClickHouse (child processes, ended at exit), fills
``events_enriched`` with realistic event rows (sessions of about 20 events, a person's properties,
a group on most events, ~1 KB a row), then starts ``headwater sink`` and times it from its first
row to its last, with the CPU seconds the sink and ClickHouse spent.

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

from bench.common import Stack, wait_for_rows
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--verbose-sink", action="store_true", help="the sink logs each batch (its log is in the work folder)")
    args = parser.parse_args(argv)

    with Stack("sink") as stack:
        from confluent_kafka import Producer

        from headwater.kafka_admin import ensure_topics
        from headwater.settings import Settings
        from headwater.topics import TopicNames
        from sinks.clickhouse.client import connect
        from sinks.clickhouse.migrate import apply_migrations

        settings = Settings()
        ensure_topics(settings)
        client = connect(settings.clickhouse)
        apply_migrations(client, stack.database)
        topic = TopicNames(settings.topic_prefix).events_enriched
        producer = Producer(settings.kafka_config(**{"linger.ms": 20, "batch.size": 1_000_000, "compression.type": "lz4"}))
        started = time.perf_counter()
        size = 0
        for key, value in rows(args.events):
            size += len(value)
            while True:
                try:
                    producer.produce(topic, value, key=key)
                    break
                except BufferError:
                    producer.poll(0.05)
        assert producer.flush(120) == 0
        print(f"filled {topic}: {args.events:,} rows of {size / args.events:.0f} bytes in {time.perf_counter() - started:.1f}s")

        sink = stack.headwater("sink", "sink", *(["--verbose"] if args.verbose_sink else []))
        count = lambda: client.query(f"SELECT count() FROM {stack.database}.events").result_rows[0][0]  # noqa: E731
        first, last, elapsed, cpu = wait_for_rows(count, args.events, {"sink": sink, "clickhouse": stack.clickhouse})
        total, unique = client.query(f"SELECT count(), uniqExact(uuid) FROM {stack.database}.events").result_rows[0]
        written = last - first
        figures = {
            "rows": written, "seconds": round(elapsed, 2), "rows_per_s": round(written / elapsed),
            "sink_cpu_s": round(cpu["sink"], 2), "clickhouse_cpu_s": round(cpu["clickhouse"], 2),
            "sink_us_per_row": round(1e6 * cpu["sink"] / written, 1),
            "clickhouse_us_per_row": round(1e6 * cpu["clickhouse"] / written, 1),
            "duplicates": total - unique,
        }
        print(f"sink: {written:,} rows in {elapsed:.1f}s = {figures['rows_per_s']:,} rows/s "
              f"(CPU per row: sink {figures['sink_us_per_row']} µs, ClickHouse {figures['clickhouse_us_per_row']} µs); "
              f"duplicates {figures['duplicates']}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        client.close()
        print(f"logs: {stack.work}")
        return figures


if __name__ == "__main__":
    main()
