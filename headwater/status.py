"""The live status line of ``headwater up``: rows in ClickHouse, rates, and the children."""

from __future__ import annotations

import logging
import sys
import threading
import time

from .settings import Settings
from .stack import LocalStack

log = logging.getLogger(__name__)

COUNTS_SQL = (
    "SELECT (SELECT count() FROM {db}.events), (SELECT count() FROM {db}.events_dead_letter), "
    "(SELECT count() FROM {db}.ingestion_warnings)"
)


def run_until_stopped(stack: LocalStack, settings: Settings, stop: threading.Event, interval: float = 1.0) -> None:
    from sinks.clickhouse.client import connect

    client = connect(settings.clickhouse)
    tty = sys.stderr.isatty()
    last_rows, last_time, last_log = None, time.monotonic(), 0.0
    while not stop.wait(interval):
        for event in stack.check():
            sys.stderr.write(("\n" if tty else "") + f"headwater: {event}\n")
        try:
            rows, dead, warnings = client.query(COUNTS_SQL.format(db=settings.clickhouse.database)).result_rows[0]
        except Exception as exc:  # the status line must never take the stack down
            line = f"ClickHouse not answering ({str(exc).splitlines()[0][:80]})"
        else:
            now = time.monotonic()
            rate = 0.0 if last_rows is None else (rows - last_rows) / (now - last_time)
            last_rows, last_time = rows, now
            alive = sum(c.alive for c in stack.supervisor.children)
            line = f"events {rows:,} ({rate:,.0f}/s) | dead letters {dead:,} | warnings {warnings:,} | processes {alive}/{len(stack.supervisor.children)}"
        if tty:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
        elif time.monotonic() - last_log >= 10:
            last_log = time.monotonic()
            log.info(line)
    client.close()
