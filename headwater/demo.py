"""``headwater demo``: four weeks of a simulated SaaS product, then an HTML report and a summary.

The workload (seeded, so each run looks alike; ``_send_workload``): anonymous visitors browse the
marketing site in posthog-js-like sessions (``StatefulClient``); some sign up (identify) and come
back on other devices, where they log in (identify again: the device's anonymous person is
merged); their companies are created with ``$groupidentify`` and change plan the same way; a
billing backend sends events with ``groups`` and no session. Then the report (``report.py``):
the SQL cookbook's queries drawn in one self-contained HTML file, and a summary in the terminal.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import typer

from producers.backend import Client
from producers.stateful import StatefulClient

from .settings import Settings
from .report import FUNNEL_LABELS, ReportData, collect, write_report
from .stack import LocalStack

log = logging.getLogger(__name__)

MARKETING = ["/", "/pricing", "/features", "/docs", "/blog/launch", "/customers"]
APP = ["/app", "/app/dashboard", "/app/reports", "/app/settings", "/app/team"]
SOURCES = ["google", "newsletter", "twitter", None, None]
PLANS = ["free", "pro", "enterprise"]
PRICE = {"free": 0, "pro": 49, "enterprise": 490}
BROWSERS = ["Chrome", "Firefox", "Safari"]
DEVICES = ["Desktop", "Mobile", "Tablet"]
DAYS = 28


@dataclass(frozen=True)
class Sent:
    """One event the demo sent, as a test recounts it: ``person`` is who it belongs to once the
    identifies are merged (the user id of a visitor who signed up, else the anonymous id)."""

    timestamp: datetime
    person: str
    event: str
    company: str  # '' without a company


@dataclass
class Workload:
    start: datetime
    end: datetime
    sent: list[Sent] = field(default_factory=list)
    visitors: int = 0
    signups: int = 0
    merged_ids: list[str] = field(default_factory=list)  # anonymous ids of devices logged in after the signup: merged
    plans: dict[str, str] = field(default_factory=dict)  # company -> its plan at the end
    plan_changes: int = 0

    @property
    def logins(self) -> int:
        """Identifies on another device than the signup's: each a merge of two persons."""
        return len(self.merged_ids)

    @property
    def events(self) -> int:
        return len(self.sent)


class _Story:
    """The simulation: one seeded random source, the backend client, and what was sent."""

    def __init__(self, client: Client, work: Workload, rng: random.Random, companies: int) -> None:
        self.client, self.work, self.rng = client, work, rng
        self.company_keys = [f"company-{i}" for i in range(companies)]
        self.owner: dict[str, tuple[str, datetime]] = {}  # company -> (first user to sign up, when)
        self.now = work.start  # the simulated clock of the visitor being simulated

    def record(self, person: str, event: str, company: str = "", when: datetime | None = None) -> None:
        self.work.sent.append(Sent(when or self.now, person, event, company))

    # -- a visitor, on their devices (posthog-js-like clients sharing the visitor's clock) --
    def device(self, source: str | None, kind: str) -> StatefulClient:
        user = StatefulClient(self.client, clock=lambda: self.now)
        user.register({"$browser": self.rng.choice(BROWSERS), "$device_type": kind, **({"utm_source": source} if source else {})})
        return user

    def page(self, device: StatefulClient, person: str, path: str) -> None:
        device.capture("$pageview", {"$current_url": f"https://app.example.com{path}", "$pathname": path})
        self.record(person, "$pageview", device.groups.get("company", ""))
        self.now += timedelta(seconds=self.rng.randint(8, 240))

    def event(self, device: StatefulClient, person: str, event: str, props: dict | None = None) -> None:
        device.capture(event, props)
        self.record(person, event, device.groups.get("company", ""))
        self.now += timedelta(seconds=self.rng.randint(5, 90))

    def log_in(self, device: StatefulClient, user: str, company: str, props: dict | None = None) -> None:
        device.identify(user, set=props)  # $identify with this device's anonymous id: a merge
        self.record(user, "$identify")
        device.group("company", company)  # every later event carries $groups.company

    def visitor(self, index: int) -> None:
        rng, end = self.rng, self.work.end
        self.work.visitors += 1
        signs_up = rng.random() < 0.45
        self.now = self.work.start + timedelta(days=rng.uniform(0, DAYS * 0.85))
        source = rng.choice(SOURCES)
        devices = [self.device(source, "Desktop")]
        anon = devices[0].distinct_id
        user = f"user-{index}@example.com"
        person = user if signs_up else anon
        for page in rng.sample(MARKETING, rng.randint(1, 4)):
            self.page(devices[0], person, page)
        if not signs_up:  # a visitor who comes back once or twice, and never signs up
            for _ in range(rng.choice([0, 0, 1, 2])):
                self.now += timedelta(hours=rng.randint(6, 96))
                if self.now < end:
                    for page in rng.sample(MARKETING, rng.randint(1, 3)):
                        self.page(devices[0], person, page)
            return
        if rng.random() < 0.4:  # signs up on a later visit
            self.now += timedelta(hours=rng.randint(4, 72))
            for page in rng.sample(MARKETING, rng.randint(1, 2)):
                self.page(devices[0], person, page)
        self.page(devices[0], person, "/signup")
        company = rng.choice(self.company_keys)
        self.log_in(devices[0], user, company, {"email": user, "company": company})
        self.event(devices[0], user, "signed_up", {"plan": "free"})
        self.work.signups += 1
        if company not in self.owner or self.now < self.owner[company][1]:  # its first user
            self.owner[company] = (user, self.now)
        devices += [self.device(None, kind) for kind in rng.sample(DEVICES[1:], rng.choice([0, 0, 1, 1, 2]))]
        logged_in = {0}
        project_day = rng.choice([0, 0, 1, 2, 5, 9, None])
        engagement = rng.uniform(0.2, 0.8)
        lifetime = rng.expovariate(1 / 12)  # days until they stop coming back: retention decays
        signup_day = self.now.date()
        day = 0
        while True:
            if day == project_day:
                self.event(devices[rng.choice(sorted(logged_in))], user, "project_created")
            day += 1
            visit = datetime.combine(signup_day + timedelta(days=day), datetime.min.time(), timezone.utc)
            visit += timedelta(hours=rng.randint(7, 21), minutes=rng.randint(0, 59))
            if visit >= end:
                break
            if day > lifetime or rng.random() > engagement:
                if day == project_day:
                    project_day += 1
                continue
            self.now = visit
            d = rng.randrange(len(devices))
            if d not in logged_in:  # a new device: browses anonymously, then logs in (a merge)
                self.page(devices[d], user, "/")
                self.work.merged_ids.append(devices[d].distinct_id)
                self.log_in(devices[d], user, company)
                logged_in.add(d)
            for page in rng.sample(APP, rng.randint(1, 4)):
                self.page(devices[d], user, page)
            if rng.random() < 0.5:
                self.event(devices[d], user, "report_viewed", {"report": rng.choice(["funnel", "retention", "trends"])})

    # -- the companies' lifecycle, from the billing backend (no sessions, groups on every event) --
    def company(self, key: str, owner: str, created: datetime) -> None:
        rng, end = self.rng, self.work.end
        plan = rng.choices(PLANS, weights=[5, 3, 2])[0]
        self.client.group_identify("company", key, {"name": key.replace("-", " ").title(), "plan": plan,
                                                     "seats": rng.randint(2, 400)}, timestamp=created)
        self.record(f"$company_{key}", "$groupidentify", key, created)
        change = created + timedelta(days=rng.uniform(2, 14)) if rng.random() < 0.5 else None
        when = created + timedelta(days=1)
        while when < end:
            if change is not None and change <= when:
                new = {"free": "pro", "pro": "enterprise", "enterprise": "pro"}[plan]  # upgrades, or a downgrade
                self.client.group_identify("company", key, {"plan": new}, timestamp=change)
                self.record(f"$company_{key}", "$groupidentify", key, change)
                self.client.capture(owner, "plan_changed", {"from": plan, "to": new}, groups={"company": key}, timestamp=change)
                self.record(owner, "plan_changed", key, change)
                self.work.plan_changes += 1
                plan, change = new, None
            if PRICE[plan]:
                self.client.capture(owner, "invoice_paid", {"amount": PRICE[plan], "plan": plan}, groups={"company": key}, timestamp=when)
                self.record(owner, "invoice_paid", key, when)
            when += timedelta(days=7)
        self.work.plans[key] = plan


def _send_workload(client: Client, *, users: int, companies: int, seed: int = 7, end: datetime | None = None) -> Workload:
    """The story, over the ``DAYS`` days before ``end`` (default: now): ``users`` anonymous visitors
    browse the marketing site; 45 % sign up (identify, then join one of ``companies`` companies),
    come back on some later days until they churn, on up to 3 devices, logging in on each
    (an identify with the same user id: the device's anonymous person is merged); a company is
    created with ``$groupidentify`` (name, plan, seats) by its first user's signup, half change plan
    later (``$groupidentify`` again and ``plan_changed``), and paid plans get a weekly
    ``invoice_paid`` from the billing backend, sent for the owner with ``groups``."""
    end = (end or datetime.now(timezone.utc)) - timedelta(minutes=1)
    work = Workload(start=end - timedelta(days=DAYS), end=end)
    story = _Story(client, work, random.Random(seed), companies)
    for index in range(users):
        story.visitor(index)
    for key, (owner, created) in sorted(story.owner.items()):
        story.company(key, owner, created)
    client.flush()
    return work


def send_demo_events(settings: Settings, *, users: int, companies: int) -> int:
    """``headwater demo --send-only``: the simulated weeks sent to the configured Kafka, as the
    first token of HEADWATER_TEAMS, for a pipeline that runs elsewhere (docker compose's demo
    service). Returns the exit status: 0 when Kafka acknowledged every event, else 1."""
    token = next(iter(settings.team_by_token))
    typer.echo(f"demo: sending {DAYS} simulated days ({users} visitors, {companies} companies) to "
               f"{settings.bootstrap_servers} as {token}...", err=True)
    client = Client.from_settings(settings, token)
    work = _send_workload(client, users=users, companies=companies)
    unacknowledged = client.close()
    failed = client.failed
    typer.echo(f"demo: sent {work.events:,} events ({work.visitors:,} visitors, {work.signups:,} signups, "
               f"{work.logins:,} logins on another device, {work.plan_changes:,} plan changes); "
               f"failed {failed:,}, unacknowledged {unacknowledged:,}")
    return 0 if failed == 0 and unacknowledged == 0 else 1


def landed(ch, db: str, team_id: int, work: Workload, rows_before: int, dead_before: int) -> tuple[int, bool]:
    """How many of the workload's events are in ``db`` (rows or dead letters since the counts
    before it), and whether its merges and plans are too: every merged device's distinct id has
    its override, every company its last plan in groups_latest. Those rows come through other
    topics than the events, in other batches of the sink, so they may land a moment later."""
    rows, dead = ch.query(f"SELECT (SELECT count() FROM {db}.events), (SELECT count() FROM {db}.events_dead_letter)").result_rows[0]
    arrived = rows - rows_before + dead - dead_before
    if arrived < work.events:
        return arrived, False
    [(overrides, plans)] = ch.query(
        f"""SELECT (SELECT uniqExact(distinct_id) FROM {db}.person_overrides
                    WHERE team_id = {{team:Int64}} AND has({{ids:Array(String)}}, distinct_id)),
                   (SELECT countIf(JSONExtractString(group_properties, 'plan')
                                   = {{plans:Array(String)}}[indexOf({{keys:Array(String)}}, group_key)])
                    FROM {db}.groups_latest WHERE team_id = {{team:Int64}} AND has({{keys:Array(String)}}, group_key)
                        AND group_type_index = (SELECT any(group_type_index) FROM {db}.group_types
                                                WHERE team_id = {{team:Int64}} AND group_type = 'company'))""",
        parameters={"team": team_id, "ids": work.merged_ids, "keys": list(work.plans), "plans": list(work.plans.values())}).result_rows
    return arrived, overrides == len(set(work.merged_ids)) and plans == len(work.plans)


def summary(work: Workload, data: ReportData, report: Path) -> str:
    """The terminal's short story of the run: what was sent, what ClickHouse counts, where the report is."""
    funnel = {event: (persons, conversion) for _, event, persons, conversion, _ in data.funnel}
    steps = []
    for i, (event, label) in enumerate(FUNNEL_LABELS.items()):
        persons, conversion = funnel.get(event, (0, float("nan")))
        steps.append(f"{label.lower()} {persons:,}" + (f" ({conversion * 100:.0f}%)" if i and conversion == conversion else ""))
    sessions, avg = data.sessions_overall
    bounce = data.bounce_rate
    plans = ", ".join(f"{n} {plan}" for plan, n in sorted(data.plans().items()))
    dau = [n for _, n in data.dau]
    return "\n".join([
        f"headwater demo: {DAYS} days of a SaaS product, {data.date_from} to {data.date_to} (UTC)",
        f"  sent        {work.events:,} events: {work.visitors:,} visitors, {work.signups:,} signups, "
        f"{work.logins:,} logins on another device, {work.plan_changes:,} plan changes",
        f"  events      {data.events:,} in ClickHouse",
        f"  persons     {data.persons:,} (from {data.distinct_ids:,} distinct ids, merged by identify)",
        f"  active      {max(dau, default=0):,} users on the busiest day, {dau[-1] if dau else 0:,} today",
        f"  companies   {len(data.companies):,} ({plans or 'none'})",
        f"  funnel      {' → '.join(steps)}",
        f"  sessions    {sessions:,}, average {avg / 60:.1f} min, bounce rate "
        f"{'-' if bounce is None else f'{bounce * 100:.1f}%'}, {data.backend_sessions:,} from backend events only",
        f"  report      {report}",
    ])


def run_demo(settings: Settings, stack: LocalStack, *, users: int, companies: int, stop: threading.Event,
             report_path: Path) -> None:
    from sinks.clickhouse.client import connect

    token = next(iter(settings.team_by_token))
    team_id = settings.team_by_token[token]
    client = Client.from_settings(settings, token)
    db = settings.clickhouse.database
    ch = connect(settings.clickhouse)
    counts_sql = f"SELECT (SELECT count() FROM {db}.events), (SELECT count() FROM {db}.events_dead_letter)"
    rows_before, dead_before = ch.query(counts_sql).result_rows[0]
    earlier = ch.query(f"SELECT count() FROM {db}.events WHERE team_id = {{team:Int64}} AND timestamp >= now() - INTERVAL {DAYS + 1} DAY",
                       parameters={"team": team_id}).result_rows[0][0]
    typer.echo(f"demo: simulating {DAYS} days of a SaaS product ({users} visitors, {companies} companies)...", err=True)
    work = _send_workload(client, users=users, companies=companies)
    client.close()
    typer.echo(f"demo: {work.events:,} events acknowledged by Kafka; waiting for them in ClickHouse...", err=True)
    deadline = time.monotonic() + 180
    while not stop.is_set():
        stack.check()
        arrived, done = landed(ch, db, team_id, work, rows_before, dead_before)
        if done:
            break
        if time.monotonic() > deadline:
            typer.echo(f"demo: only {arrived:,} of {work.events:,} events (and their merges and plans) arrived in 180 s; "
                       f"see {stack.data_dir}/logs", err=True)
            raise typer.Exit(1)
        time.sleep(0.5)
    data = collect(ch, db, team_id=team_id, date_from=work.start.date(), date_to=work.end.date())
    ch.close()
    path = write_report(data, report_path)
    typer.echo(summary(work, data, path))
    if earlier:
        typer.echo(f"  note        ClickHouse already held {earlier:,} events of team {team_id} in these days (an earlier demo, "
                   f"or yours): the report counts them too. For a clean run: stop, `rm -rf {settings.data_dir}`, run again.")
    typer.echo(f"\nOpen it in a browser: file://{path}\n"
               f"Run your own: headwater sql --file docs/sql/trends/daily_active_users.sql -p team_id={team_id} "
               f"-p date_from={data.date_from} -p date_to={data.date_to}  (while `headwater up` runs)")
