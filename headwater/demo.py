"""``headwater demo``: a simulated SaaS product, then the queries an analyst would run.

The workload (seeded, so each run looks alike): companies with plans and sizes; anonymous
visitors browsing in sessions; some sign up and are identified; their companies are described
with ``$groupidentify``; a billing backend sends events without sessions.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import typer

from producers.backend import Client

from .ids import uuid7
from .settings import Settings
from .stack import LocalStack
from .tables import render

log = logging.getLogger(__name__)

PAGES = ["/", "/pricing", "/docs", "/blog/launch", "/features", "/signup"]
SOURCES = ["google", "newsletter", "twitter", None, None]


@dataclass
class Workload:
    events: int = 0


def _send_workload(client: Client, *, users: int, companies: int, seed: int = 7) -> Workload:
    rng = random.Random(seed)
    work = Workload()
    start = datetime.now(timezone.utc) - timedelta(days=42)
    company_keys = [f"company-{i}" for i in range(companies)]
    for key in company_keys:
        client.group_identify("company", key, {"name": key.replace("-", " ").title(), "plan": rng.choice(["free", "pro", "enterprise"]), "seats": rng.randint(2, 400)})
        work.events += 1
    for u in range(users):
        anon = str(uuid.UUID(int=rng.getrandbits(128)))
        when = start + timedelta(minutes=rng.randint(0, 42 * 24 * 60))
        company = rng.choice(company_keys)
        source = rng.choice(SOURCES)
        for visit in range(rng.randint(1, 3)):
            if visit:
                when += timedelta(hours=rng.randint(2, 72))  # a new visit: a new session
            session = str(uuid7(int(when.timestamp() * 1000), rng.randbytes(10)))
            for page in rng.sample(PAGES, rng.randint(1, 4)):
                props = {"$current_url": f"https://app.example.com{page}", "$pathname": page, "$session_id": session, "$browser": rng.choice(["Chrome", "Firefox", "Safari"])}
                if source:
                    props["utm_source"] = source
                client.capture(anon, "$pageview", props, timestamp=when)
                work.events += 1
                when += timedelta(seconds=rng.randint(5, 300))
        if rng.random() < 0.4:
            user = f"user-{u}@example.com"
            client.capture(anon, "signed_up", {"$session_id": session}, timestamp=when)
            client.identify(user, {"email": user}, anon_distinct_id=anon, timestamp=when)
            client.capture(user, "project_created", groups={"company": company}, timestamp=when + timedelta(minutes=3))
            work.events += 3
            for week in range(rng.randint(0, 5)):
                paid = when + timedelta(days=7 * week + 1)
                if paid < datetime.now(timezone.utc):
                    client.capture(f"billing:{company}", "invoice_paid", {"amount": rng.choice([0, 49, 490])}, groups={"company": company}, timestamp=paid)
                    work.events += 1
    client.flush()
    return work


REPORT = [
    (
        "Weekly active companies (the $group_N column of the company type)",
        """SELECT toStartOfWeek(timestamp, 1) AS week, uniqExact({company}) AS active_companies
           FROM {db}.events WHERE {company} != '' GROUP BY week ORDER BY week""",
    ),
    (
        "Top companies, with their current properties (groups_latest)",
        """SELECT e.company, JSONExtractString(g.group_properties, 'name') AS name,
                  JSONExtractString(g.group_properties, 'plan') AS plan, g.version, e.events
           FROM (SELECT {company} AS company, count() AS events FROM {db}.events
                 WHERE company != '' AND event != '$groupidentify' GROUP BY company) AS e
           LEFT JOIN (SELECT group_key, group_properties, version FROM {db}.groups_latest
                      WHERE group_type_index = {company_index}) AS g ON g.group_key = e.company
           ORDER BY e.events DESC, e.company LIMIT 5""",
    ),
    (
        "Signup funnel (visitors who viewed a page → viewed pricing → signed up, within 14 days)",
        """SELECT countIf(level >= 1) AS viewed_page, countIf(level >= 2) AS viewed_pricing, countIf(level >= 3) AS signed_up
           FROM (SELECT distinct_id,
                        windowFunnel(14 * 86400)(toDateTime(timestamp), event = '$pageview',
                            event = '$pageview' AND JSONExtractString(properties, '$pathname') = '/pricing',
                            event = 'signed_up') AS level
                 FROM {db}.events GROUP BY distinct_id)""",
    ),
    (
        "Sessions (the sessions table: client sessions, and server-side ones for backend events)",
        """SELECT count() AS sessions, toUInt32(avg(duration_s)) AS avg_duration_s,
                  round(avg(pageviews), 2) AS pageviews_per_session,
                  round(100 * avgIf(is_bounce, is_bounce IS NOT NULL), 1) AS bounce_rate_pct,
                  countIf(pageviews = 0) AS backend_only_sessions
           FROM {db}.sessions""",
    ),
    (
        "Top events",
        "SELECT event, count() AS events, uniqExact(distinct_id) AS distinct_ids FROM {db}.events GROUP BY event ORDER BY events DESC",
    ),
]


def run_demo(settings: Settings, stack: LocalStack, *, users: int, companies: int, stop: threading.Event) -> None:
    from sinks.clickhouse.client import connect

    token = next(iter(settings.team_by_token))
    client = Client.from_settings(settings, token)
    db = settings.clickhouse.database
    ch = connect(settings.clickhouse)
    counts_sql = f"SELECT (SELECT count() FROM {db}.events), (SELECT count() FROM {db}.events_dead_letter)"
    rows_before, dead_before = ch.query(counts_sql).result_rows[0]
    typer.echo(f"demo: sending a simulated SaaS workload ({users} visitors, {companies} companies)...", err=True)
    work = _send_workload(client, users=users, companies=companies)
    client.close()
    typer.echo(f"demo: {work.events:,} events acknowledged by Kafka; waiting for them in ClickHouse...", err=True)
    deadline = time.monotonic() + 180
    while not stop.is_set():
        stack.check()
        rows_now, dead_now = ch.query(counts_sql).result_rows[0]
        rows, dead = rows_now - rows_before, dead_now - dead_before
        if rows + dead >= work.events:
            break
        if time.monotonic() > deadline:
            typer.echo(f"demo: only {rows:,} of {work.events:,} events arrived in 180 s; see {stack.data_dir}/logs", err=True)
            raise typer.Exit(1)
        time.sleep(0.5)
    index = f"(SELECT any(group_type_index) FROM {db}.group_types WHERE group_type = 'company')"
    company = f"[`$group_0`, `$group_1`, `$group_2`, `$group_3`, `$group_4`][{index} + 1]"
    for title, query in REPORT:
        result = ch.query(query.format(db=db, company=company, company_index=index))
        typer.echo(f"\n== {title}\n{render(result.column_names, result.result_rows)}")
    typer.echo(f"\nRun your own: headwater sql \"SELECT ... FROM {db}.events\" (while `headwater up` runs)")
    ch.close()
