"""The group-analytics cookbook (docs/sql/groups/*.sql) against chDB, on a dataset built here.

The dataset is plain Python (seeded RNG): two teams, each with two group types at different
indexes (team 1: project → $group_0, company → $group_1; team 2: company → $group_0), companies
whose keys are also used as project keys, companies that start before the reported range, churn,
skip weeks, run funnels out of order or too slowly, users without any company, `$groupidentify`
updates after churn, a merged person, and several versions of groups inserted out of order. The
queries run as an analyst runs them (server-side parameters), and every number they return is
compared with the one computed here from the same Python objects, by plain loops over events,
never by SQL.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from functools import cache

import pytest

from tests import cookbook

pytestmark = pytest.mark.pipeline

START = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday: week 0 of the dataset
WEEKS = 8  # weeks 0..7 (2024-01-01 .. 2024-02-25); some companies start in weeks -2 and -1
TEAM, OTHER_TEAM = 1, 2
GROUP_TYPES = {TEAM: {"project": 0, "company": 1}, OTHER_TEAM: {"company": 0, "workspace": 1}}
PERSON_NAMESPACE = uuid.UUID("8a7c5f3e-7d1b-4c55-9a3e-3f1d2c4b5a69")
FUNNEL = ("signed_up", "invited_teammate", "paid")
ACTIVITY = ("$pageview", "feature_used", "report_viewed")
MONDAY = date(2024, 1, 1)


@dataclass(frozen=True)
class Event:
    team_id: int
    event: str
    distinct_id: str
    timestamp: datetime
    groups: tuple[tuple[str, str], ...] = ()  # (group type name, key), as `$groups` sent them
    uuid: uuid.UUID = uuid.UUID(int=0)  # given by dataset(), from its seeded RNG

    def key(self, group_type: str) -> str:
        return dict(self.groups).get(group_type, "")


@dataclass(frozen=True)
class GroupVersion:
    team_id: int
    group_type: str
    group_key: str
    properties: str  # JSON text, as stored
    created_at: datetime
    version: int


@dataclass
class Dataset:
    events: list[Event]
    groups: list[GroupVersion]  # in insertion order: shuffled, so versions arrive out of order
    merged: dict[tuple[int, str], str]  # (team, distinct_id) → the distinct_id whose person it joined


def person_id(team_id: int, distinct_id: str) -> uuid.UUID:
    return uuid.uuid5(PERSON_NAMESPACE, f"{team_id}:{distinct_id}")


def week_of(moment: datetime | date) -> date:
    day = moment.date() if isinstance(moment, datetime) else moment
    return day - timedelta(days=day.weekday())


def at(rng: random.Random, week: int) -> datetime:
    """A random instant of dataset week ``week``, to the microsecond."""
    return START + timedelta(weeks=week, microseconds=rng.randrange(7 * 86_400 * 10**6))


def company_activity(rng: random.Random, team: int, key: str, users: list[str], first: int, last: int) -> list[Event]:
    """Usage events of company ``key`` from week ``first`` (always active) up to ``last``, skipping
    some weeks; about half of team 1's events also carry a project whose key may be a company's."""
    events = []
    for week in range(first, min(last, WEEKS - 1) + 1):
        if week != first and rng.random() < 0.3:
            continue
        for _ in range(rng.randint(1, 6)):
            groups = [("company", key)]
            if team == TEAM and rng.random() < 0.5:
                groups.append(("project", f"c{rng.randint(1, 12):02d}"))
            events.append(Event(team, rng.choice(ACTIVITY), rng.choice(users), at(rng, week), tuple(groups)))
    return events


def funnel_attempt(rng: random.Random, key: str, users: list[str]) -> list[Event]:
    """signed_up, then maybe invited_teammate and paid, by different users, after 0.1 to 6 days
    each; sometimes the invite comes before the signup."""
    group = (("company", key),)
    signed = at(rng, rng.randint(0, WEEKS - 1))
    events = [Event(TEAM, "signed_up", rng.choice(users), signed, group)]
    if rng.random() < 0.75:
        delay = timedelta(seconds=rng.randint(8_640, 6 * 86_400), microseconds=rng.randrange(10**6))
        invited = signed - delay if rng.random() < 0.15 else signed + delay
        events.append(Event(TEAM, "invited_teammate", rng.choice(users), invited, group))
        if rng.random() < 0.7:
            paid = max(signed, invited) + timedelta(seconds=rng.randint(8_640, 6 * 86_400), microseconds=rng.randrange(10**6))
            events.append(Event(TEAM, "paid", rng.choice(users), paid, group))
    return events


def group_versions(rng: random.Random, team: int, group_type: str, key: str, name: str, base_version: int) -> list[GroupVersion]:
    created = START - timedelta(days=rng.randint(1, 60), microseconds=rng.randrange(10**6))
    plans = ["free", "startup", "pro", "enterprise"]
    return [
        GroupVersion(team, group_type, key, json.dumps({"name": name, "plan": plans[v % 4], "seats": 5 * v}),
                     created, base_version + v)
        for v in range(1, rng.randint(1, 4) + 1)
    ]


@cache
def dataset() -> Dataset:
    rng = random.Random(20240101)
    events: list[Event] = []
    groups: list[GroupVersion] = []
    for i in range(1, 31):
        key = f"c{i:02d}"
        users = [f"t1-{key}-u{j}" for j in range(rng.randint(2, 5))]
        first = rng.randint(-2, WEEKS - 1)
        last = first + rng.randint(0, 9)
        events += company_activity(rng, TEAM, key, users, first, last)
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            events += funnel_attempt(rng, key, users)
        if i % 4 == 0:  # a nightly CRM sync touches the company after it churned: not activity
            events.append(Event(TEAM, "$groupidentify", "crm-sync", at(rng, min(last + 1, WEEKS - 1)), (("company", key),)))
        if i % 5 != 0:  # every fifth company was never identified: no row in `groups`
            groups += group_versions(rng, TEAM, "company", key, f"Company {i}", 0)
    for i in range(1, 13):  # team 1 projects share the companies' keys, with higher versions
        groups += group_versions(rng, TEAM, "project", f"c{i:02d}", f"Project {i}", 100)
    for i in range(1, 11):  # team 2 has its own companies with the same keys
        key = f"c{i:02d}"
        users = [f"t2-{key}-u{j}" for j in range(rng.randint(1, 4))]
        first = rng.randint(-1, WEEKS - 1)
        events += company_activity(rng, OTHER_TEAM, key, users, first, first + rng.randint(0, 7))
        groups += group_versions(rng, OTHER_TEAM, "company", key, f"Other {i}", 200)
    for j in range(40):  # visitors without any group, and events with a project only
        groups_of = (("project", f"c{rng.randint(1, 12):02d}"),) if j % 3 == 0 else ()
        events.append(Event(TEAM, "$pageview", f"anon-{j}", at(rng, rng.randint(-2, WEEKS - 1)), groups_of))
    # a company event on each side of a week boundary (Sunday 23:59:59.999999, Monday 00:00)
    events.append(Event(TEAM, "feature_used", "t1-c07-u0", START + timedelta(weeks=3, microseconds=-1), (("company", "c07"),)))
    events.append(Event(TEAM, "feature_used", "t1-c08-u0", START + timedelta(weeks=3), (("company", "c08"),)))
    events = [replace(e, uuid=uuid.UUID(int=rng.getrandbits(128), version=4)) for e in events]
    rng.shuffle(groups)
    merged = {(TEAM, "t1-c03-u1"): "t1-c03-u0", (TEAM, "t1-c11-u1"): "t1-c11-u0"}
    return Dataset(events, groups, merged)


# ---------------------------------------------------------------- loading into ClickHouse

EVENT_COLUMNS = [
    "uuid", "team_id", "event", "distinct_id", "person_id", "timestamp", "properties", "person_properties",
    "person_created_at", "$group_0", "$group_1", "$group_2", "$group_3", "$group_4",
    "$session_id", "$window_id", "created_at",
]


def event_row(e: Event) -> list:
    slots = [""] * 5
    for group_type, key in e.groups:
        slots[GROUP_TYPES[e.team_id][group_type]] = key
    properties = json.dumps({"$groups": dict(e.groups)} if e.groups else {})
    return [e.uuid, e.team_id, e.event, e.distinct_id, person_id(e.team_id, e.distinct_id), e.timestamp,
            properties, "{}", START, *slots, "", "", e.timestamp]


def insert_dataset(client, db: str, data: Dataset) -> None:
    client.insert(f"{db}.events", [event_row(e) for e in data.events], column_names=EVENT_COLUMNS)
    client.insert(
        f"{db}.group_types",
        [[team, name, index] for team, types in GROUP_TYPES.items() for name, index in types.items()],
        column_names=["team_id", "group_type", "group_type_index"],
    )
    # Versions arrive in the shuffled order of data.groups. One insert never holds two versions of
    # a group: ReplacingMergeTree collapses those within the inserted block (optimize_on_insert).
    batches: list[list[GroupVersion]] = []
    for g in data.groups:
        ident = (g.team_id, g.group_type, g.group_key)
        batch = next((b for b in batches if all((h.team_id, h.group_type, h.group_key) != ident for h in b)), None)
        if batch is None:
            batches.append(batch := [])
        batch.append(g)
    for batch in batches:
        client.insert(
            f"{db}.groups",
            [[g.team_id, GROUP_TYPES[g.team_id][g.group_type], g.group_key, g.properties, g.created_at, g.version]
             for g in batch],
            column_names=["team_id", "group_type_index", "group_key", "group_properties", "created_at", "version"],
        )
    client.insert(
        f"{db}.person_distinct_ids",
        [[team, did, person_id(team, into), 1, 0] for (team, did), into in data.merged.items()],
        column_names=["team_id", "distinct_id", "person_id", "version", "is_deleted"],
    )


@pytest.fixture
def loaded(settings, clickhouse) -> str:
    """The dataset in this test's migrated database, unmerged; returns the database name.

    chDB merges small parts within a second or so, which would hide the old versions of groups
    the queries must see past, so merges of the versioned tables are stopped first and every
    version is checked to be visible."""
    db = settings.clickhouse.database
    for table in ("groups", "group_types", "person_distinct_ids", "person_overrides"):
        clickhouse.command(f"SYSTEM STOP MERGES {db}.{table}")
    insert_dataset(clickhouse, db, dataset())
    assert clickhouse.query(f"SELECT count() FROM {db}.groups").result_rows == [(len(dataset().groups),)]
    return db


# ---------------------------------------------------------------- the expected numbers, in Python


def activity(team: int, group_type: str) -> list[tuple[str, Event]]:
    """(group key, event) of every event of ``team`` that counts as activity of a ``group_type`` group."""
    return [(e.key(group_type), e) for e in dataset().events
            if e.team_id == team and e.event != "$groupidentify" and e.key(group_type)]


def expected_weekly_active(team: int, group_type: str, date_from: date, date_to: date) -> list[tuple[date, int]]:
    active: dict[date, set[str]] = defaultdict(set)
    for key, e in activity(team, group_type):
        active[week_of(e.timestamp)].add(key)
    weeks = []
    week = week_of(date_from)
    while week <= week_of(date_to):
        weeks.append((week, len(active[week])))
        week += timedelta(weeks=1)
    return weeks


def expected_retention(team: int, group_type: str, date_from: date, date_to: date, max_offset: int) -> list[tuple]:
    last_week = week_of(date_to)
    weeks_of: dict[str, set[date]] = defaultdict(set)
    for key, e in activity(team, group_type):
        if week_of(e.timestamp) <= last_week:
            weeks_of[key].add(week_of(e.timestamp))
    cohorts: dict[date, list[set[date]]] = defaultdict(list)
    for weeks in weeks_of.values():
        if min(weeks) >= week_of(date_from):
            cohorts[min(weeks)].append(weeks)
    rows = []
    for cohort in sorted(cohorts):
        members = cohorts[cohort]
        offsets = min(max_offset, (last_week - cohort).days // 7)
        for offset in range(offsets + 1):
            active = sum(1 for weeks in members if cohort + timedelta(weeks=offset) in weeks)
            rows.append((cohort, offset, len(members), active, round(active / len(members), 4)))
    return rows


def funnel_level(events: list[Event], steps: tuple[str, ...], window: timedelta) -> int:
    """The furthest step reached: from each first-step event, take the earliest next step after the
    previous one, as long as it is within ``window`` of the first."""
    best = 0
    for start in (e for e in events if e.event == steps[0]):
        level, previous = 1, start.timestamp
        for step in steps[1:]:
            later = [e.timestamp for e in events if e.event == step and e.timestamp > previous]
            if not later or min(later) - start.timestamp > window:
                break
            level, previous = level + 1, min(later)
        best = max(best, level)
    return best


def funnel_events(team: int, group_type: str, steps: tuple[str, ...], date_from: date, date_to: date) -> dict[str, list[Event]]:
    by_group: dict[str, list[Event]] = defaultdict(list)
    for key, e in activity(team, group_type):
        if e.event in steps and date_from <= e.timestamp.date() <= date_to:
            by_group[key].append(e)
    return by_group


def expected_funnel(team: int, group_type: str, steps: tuple[str, ...], window: timedelta,
                    date_from: date, date_to: date) -> list[tuple]:
    by_group = funnel_events(team, group_type, steps, date_from, date_to)
    for events in by_group.values():  # windowFunnel's order of simultaneous events is not ours to test
        assert len({e.timestamp for e in events}) == len(events)
    levels = [funnel_level(events, steps, window) for events in by_group.values()]
    entered = sum(1 for level in levels if level >= 1)
    return [(k, steps[k - 1], n, round(n / entered, 4))
            for k in range(1, len(steps) + 1) for n in [sum(1 for level in levels if level >= k)]]


def latest_group(team: int, group_type: str, key: str) -> GroupVersion | None:
    versions = [g for g in dataset().groups if (g.team_id, g.group_type, g.group_key) == (team, group_type, key)]
    return max(versions, key=lambda g: g.version, default=None)


def expected_top_groups(team: int, group_type: str, date_from: date, date_to: date, limit: int) -> list[tuple]:
    merged = dataset().merged
    events: dict[str, list[Event]] = defaultdict(list)
    for key, e in activity(team, group_type):
        if date_from <= e.timestamp.date() <= date_to:
            events[key].append(e)
    rows = []
    for key, evs in events.items():
        persons = {person_id(team, merged.get((team, e.distinct_id), e.distinct_id)) for e in evs}
        latest = latest_group(team, group_type, key)
        rows.append((key, len(evs), len(persons), min(e.timestamp for e in evs), max(e.timestamp for e in evs),
                     latest.properties if latest else None, latest.created_at if latest else None))
    rows.sort(key=lambda row: (-row[1], row[0]))
    return rows[:limit]


def utc(value):
    """clickhouse-connect's datetimes, made comparable with ours whether or not they carry a zone."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def rows_of(result: list[tuple]) -> list[tuple]:
    return [tuple(utc(v) for v in row) for row in result]


# ---------------------------------------------------------------- the tests


def test_the_dataset_has_what_the_queries_must_get_right():
    data = dataset()
    assert len({e.uuid for e in data.events}) == len(data.events) > 500
    companies = {e.key("company") for e in data.events if e.team_id == TEAM} - {""}
    assert len(companies) == 30
    assert any(not e.groups for e in data.events) and any(e.event == "$groupidentify" for e in data.events)
    # versions inserted out of order: some group gets a lower version after a higher one
    seen: dict[tuple, int] = {}
    out_of_order = 0
    for g in data.groups:
        ident = (g.team_id, g.group_type, g.group_key)
        out_of_order += g.version < seen.get(ident, 0)
        seen[ident] = max(seen.get(ident, 0), g.version)
    assert out_of_order >= 3


QUERIES = {"weekly_active_groups", "group_retention", "group_funnel", "top_groups"}
PLACEHOLDER = re.compile(r"\{(\w+):([^}]+)\}")


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_each_query_documents_its_parameters_and_how_to_run_it(name):
    assert {p.stem for p in (cookbook.COOKBOOK / "groups").glob("*.sql")} == QUERIES  # all tested here
    text = cookbook.path(f"groups/{name}").read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("--"))
    code = "".join(line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("--"))
    assert text.startswith("-- ") and f"--queries-file docs/sql/groups/{name}.sql" in header
    assert set(PLACEHOLDER.findall(code)) <= set(PLACEHOLDER.findall(header)) and PLACEHOLDER.findall(code)
    assert f"groups/{name}.sql" in (cookbook.COOKBOOK / "README.md").read_text()
    assert "FINAL" not in code and "headwater." not in cookbook.load(f"groups/{name}", "test_db")


WEEKLY_CASES = [
    pytest.param(TEAM, "company", id="team1-company-is-group_1"),
    pytest.param(TEAM, "project", id="team1-project-is-group_0"),
    pytest.param(OTHER_TEAM, "company", id="team2-company-is-group_0"),
]


@pytest.mark.parametrize("team, group_type", WEEKLY_CASES)
def test_weekly_active_groups_count_distinct_groups_per_iso_week(loaded, clickhouse, team, group_type):
    # mid-week bounds: the weeks of both ends are counted whole; weeks 8-10 have no events at all
    date_from, date_to = date(2024, 1, 3), date(2024, 3, 13)
    expected = expected_weekly_active(team, group_type, date_from, date_to)

    got = cookbook.run(clickhouse, "groups/weekly_active_groups", loaded,
                       team_id=team, group_type=group_type, date_from=date_from, date_to=date_to)

    assert rows_of(got) == expected
    assert [week for week, _ in expected][:2] == [MONDAY, date(2024, 1, 8)] and len(expected) == 11
    counts = [n for _, n in expected]
    assert len(set(counts)) >= 3 and counts[-1] == 0 and max(counts) >= 5
    if (team, group_type) == (TEAM, "company"):
        # what a wrong query would have returned differs: counting $groupidentify, another slot, another team
        with_identify: dict[date, set[str]] = defaultdict(set)
        for e in dataset().events:
            if e.team_id == team and e.key(group_type):
                with_identify[week_of(e.timestamp)].add(e.key(group_type))
        assert [len(with_identify[w]) for w, _ in expected] != counts
        assert expected != expected_weekly_active(TEAM, "project", date_from, date_to)
        assert expected != expected_weekly_active(OTHER_TEAM, "company", date_from, date_to)


def test_weekly_active_groups_of_an_unknown_group_type_are_all_zero(loaded, clickhouse):
    got = cookbook.run(clickhouse, "groups/weekly_active_groups", loaded,
                       team_id=OTHER_TEAM, group_type="project", date_from=MONDAY, date_to=date(2024, 1, 21))
    assert got == [(MONDAY, 0), (date(2024, 1, 8), 0), (date(2024, 1, 15), 0)]


@pytest.mark.parametrize("date_from, date_to, max_offset", [
    pytest.param(MONDAY, date(2024, 2, 25), 8, id="all-8-weeks"),
    pytest.param(date(2024, 1, 10), date(2024, 2, 14), 3, id="mid-week-bounds-3-offsets"),
])
def test_group_retention_follows_weekly_cohorts_of_first_activity(loaded, clickhouse, date_from, date_to, max_offset):
    expected = expected_retention(TEAM, "company", date_from, date_to, max_offset)

    got = cookbook.run(clickhouse, "groups/group_retention", loaded, team_id=TEAM, group_type="company",
                       date_from=date_from, date_to=date_to, weeks=max_offset)

    assert rows_of(got) == expected
    # non-trivial: several cohorts, groups lost and groups back after a gap, offsets capped
    cohorts = {row[0] for row in expected}
    assert len(cohorts) >= 4
    assert all(row[3] == row[2] for row in expected if row[1] == 0)
    assert any(0 < row[3] < row[2] for row in expected if row[1] > 0)
    assert any(row[3] == 0 for row in expected if row[1] > 0)
    assert max(row[1] for row in expected) == min(max_offset, (week_of(date_to) - min(cohorts)).days // 7)
    # companies active in the range whose first event was earlier are in no cohort
    early = {key for key, e in activity(TEAM, "company") if week_of(e.timestamp) < week_of(date_from)}
    assert early and sum(row[2] for row in expected if row[1] == 0) + len(early) == len(
        {key for key, e in activity(TEAM, "company") if week_of(e.timestamp) <= week_of(date_to)})


def test_group_retention_of_the_other_team(loaded, clickhouse):
    expected = expected_retention(OTHER_TEAM, "company", MONDAY, date(2024, 2, 25), 8)
    got = cookbook.run(clickhouse, "groups/group_retention", loaded, team_id=OTHER_TEAM, group_type="company",
                       date_from=MONDAY, date_to=date(2024, 2, 25), weeks=8)
    assert rows_of(got) == expected and len(expected) >= 10
    assert expected != expected_retention(TEAM, "company", MONDAY, date(2024, 2, 25), 8)


@pytest.mark.parametrize("steps, window, date_from, date_to", [
    pytest.param(FUNNEL, timedelta(days=7), MONDAY, date(2024, 3, 31), id="3-steps-7-days"),
    pytest.param(FUNNEL, timedelta(days=3), MONDAY, date(2024, 3, 31), id="3-steps-3-days"),
    pytest.param(FUNNEL[:2], timedelta(days=2), MONDAY, date(2024, 3, 31), id="2-steps-2-days"),
    pytest.param(FUNNEL, timedelta(days=14), date(2024, 1, 15), date(2024, 2, 11), id="3-steps-4-weeks-range"),
])
def test_group_funnel_counts_groups_converting_in_order_within_the_window(loaded, clickhouse, steps, window, date_from, date_to):
    expected = expected_funnel(TEAM, "company", steps, window, date_from, date_to)

    got = cookbook.run(clickhouse, "groups/group_funnel", loaded, team_id=TEAM, group_type="company",
                       steps=list(steps), window_seconds=int(window.total_seconds()), date_from=date_from, date_to=date_to)

    assert got == expected
    # non-trivial: drop-off at every step, and the window and the order matter
    groups = [row[2] for row in expected]
    assert groups[0] >= 10 and all(a > b > 0 for a, b in zip(groups, groups[1:]))
    by_group = funnel_events(TEAM, "company", steps, date_from, date_to)
    in_any_order = sum(1 for evs in by_group.values() if {e.event for e in evs} == set(steps))
    in_order = sum(1 for evs in by_group.values() if funnel_level(evs, steps, timedelta(days=365)) == len(steps))
    assert in_any_order > in_order >= groups[-1]
    if window < timedelta(days=12):  # the generator's slowest funnel takes 12 days
        assert in_order > groups[-1]
    # several users of one group make one conversion
    assert any(len({e.distinct_id for e in evs}) > 1 and funnel_level(evs, steps, window) == len(steps)
               for evs in by_group.values())


def test_group_funnel_refuses_a_single_step(loaded, clickhouse):
    with pytest.raises(Exception, match="2 to 5 steps"):
        cookbook.run(clickhouse, "groups/group_funnel", loaded, team_id=TEAM, group_type="company",
                     steps=["signed_up"], window_seconds=86_400, date_from=MONDAY, date_to=date(2024, 3, 31))


@pytest.mark.parametrize("team, group_type, limit", [
    pytest.param(TEAM, "company", 12, id="team1-company"),
    pytest.param(TEAM, "project", 5, id="team1-project"),
    pytest.param(OTHER_TEAM, "company", 100, id="team2-company-all"),
])
def test_top_groups_with_latest_properties(loaded, clickhouse, team, group_type, limit):
    date_from, date_to = date(2024, 1, 8), date(2024, 2, 18)
    expected = expected_top_groups(team, group_type, date_from, date_to, limit)

    got = cookbook.run(clickhouse, "groups/top_groups", loaded, team_id=team, group_type=group_type,
                       date_from=date_from, date_to=date_to, limit=limit)

    assert rows_of(got) == expected
    assert len(expected) == min(limit, len({key for key, e in activity(team, group_type)
                                            if date_from <= e.timestamp.date() <= date_to}))
    # for some of these groups the latest version was not the last one inserted
    inserted = [[g.version for g in dataset().groups if (g.team_id, g.group_type, g.group_key) == (team, group_type, row[0])]
                for row in expected]
    assert any(versions and versions[-1] != max(versions) for versions in inserted)
    if (team, group_type) == (TEAM, "company"):
        assert any(row[5] is None for row in expected)  # never identified
        assert len({row[1] for row in expected}) >= 5
        # a merged person counts once: fewer persons than distinct ids for some company
        distinct_ids: dict[str, set[str]] = defaultdict(set)
        for key, e in activity(team, group_type):
            if date_from <= e.timestamp.date() <= date_to:
                distinct_ids[key].add(e.distinct_id)
        assert any(row[2] < len(distinct_ids[row[0]]) for row in expected)


def test_headwater_sql_runs_a_cookbook_file_with_array_and_date_parameters(loaded, clickhouse, test_env):
    """What docs/sql/README.md tells analysts: ``headwater sql --file ... -p name=value``; the
    file's ``headwater.`` becomes the configured database, ``['a','b']`` an Array(String)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    expected = cookbook.run(clickhouse, "groups/group_funnel", loaded, team_id=TEAM, group_type="company",
                            steps=list(FUNNEL), window_seconds=7 * 86400, date_from=MONDAY, date_to=date(2024, 3, 31))
    out = subprocess.run(
        [sys.executable, "-m", "headwater.cli", "sql", "--file", str(cookbook.path("groups/group_funnel")),
         "-p", f"team_id={TEAM}", "-p", "group_type=company", "-p", "steps=['signed_up','invited_teammate','paid']",
         "-p", "window_seconds=604800", "-p", "date_from=2024-01-01", "-p", "date_to=2024-03-31", "--format", "json"],
        env={**os.environ, **test_env}, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["step"], r["step_event"], r["groups"]) for r in got] == [(s, e, g) for s, e, g, _ in expected]
    bad = subprocess.run([sys.executable, "-m", "headwater.cli", "sql", "SELECT 1", "-p", "oops"],
                         env={**os.environ, **test_env}, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr
