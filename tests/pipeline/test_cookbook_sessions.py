"""The sessions cookbook (docs/sql/sessions/*.sql) against chDB, on a dataset built here.

The dataset is plain Python (seeded RNG): three teams, a week of sessions, of these kinds:
- web visits entering from several utm sources, each source with its own bounce odds;
- visits whose first event is a backend call with its own URL and utm_source (not the entry);
- later page views with other UTMs (not the entry);
- clicks ($autocapture) that save a one-page visit from being a bounce;
- durations on both sides of 10 s, with sub-second starts (dateDiff counts second boundaries);
- mobile sessions of $screen events (entry URL = screen name);
- backend-only sessions (no page view: in the durations, not in bounces or entry URLs);
- sessions that cross midnight, and sessions that start outside the reported range.

Events go in shuffled, over several inserts, and a tenth of them a second time (same uuids). The
session states are not merged. Every number the queries return is compared with the one computed
here from the inserted events, by plain loops.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache

import pytest

from headwater.rows import EVENT_COLUMNS
from tests import cookbook

pytestmark = pytest.mark.pipeline

DAY0 = datetime(2024, 3, 1, tzinfo=UTC)  # the dataset runs 2024-03-01 .. 2024-03-07
DAYS = 7
DATE_FROM, DATE_TO = date(2024, 3, 2), date(2024, 3, 6)  # the range the tests report
TEAMS = (1, 2, 3)
PAGES = ("https://shop.example/", "https://shop.example/pricing", "https://shop.example/blog/launch",
         "https://shop.example/docs", "https://shop.example/signup?ref=ad", "https://shop.example/careers",
         "https://shop.example/blog/tips", "https://shop.example/about")
# utm_source of the entry page → the odds that the visit is a single quick page view
SOURCES = {"google": 0.35, "newsletter": 0.1, "twitter": 0.75, "": 0.5, "bing": 0.4}
SCREENS = ("Home", "Search", "Cart", "Settings")
PAGE_OR_SCREEN = ("$pageview", "$screen")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Event:
    team_id: int
    session_id: str
    event: str
    at: datetime
    properties: tuple[tuple[str, str], ...]
    distinct_id: str
    uuid: uuid.UUID

    def prop(self, key: str) -> str:
        return dict(self.properties).get(key, "")


class Builder:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.events: list[Event] = []

    def uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def add(self, team: int, sid: str, event: str, at: datetime, user: str, **props: str) -> None:
        self.events.append(Event(team, sid, event, at, tuple(props.items()), user, self.uuid()))

    def moment(self, day: int) -> datetime:
        """A random instant of dataset day ``day``, to the microsecond; a few in its last minute."""
        if self.rng.random() < 0.06:
            return DAY0 + timedelta(days=day + 1, microseconds=-self.rng.randrange(1, 60 * 10**6))
        return DAY0 + timedelta(days=day, microseconds=self.rng.randrange(86_400 * 10**6))

    def seconds(self, low: float, high: float) -> timedelta:
        return timedelta(microseconds=self.rng.randrange(int(low * 10**6), int(high * 10**6)))

    def web_visit(self, team: int, day: int, n: int) -> None:
        rng, user = self.rng, f"t{team}-v{n}"
        sid = str(self.uuid())
        source = rng.choice(list(SOURCES))
        entry = rng.choice(PAGES[: 4 + team])  # teams see different sets of pages
        at = self.moment(day)
        if rng.random() < 0.15:  # the backend saw the visitor first: not the entry event
            self.add(team, sid, "api_called", at - self.seconds(0.1, 5), user,
                     **{"$current_url": "https://api.example/v1/session", "utm_source": "backend"})
        utm = {"utm_source": source, "utm_medium": "cpc", "utm_campaign": "spring"} if source else {}
        self.add(team, sid, "$pageview", at, user, **{"$current_url": entry, "$referring_domain": "x.com"}, **utm)
        if rng.random() < SOURCES[source]:  # a single page view: a bounce unless clicked or long
            if rng.random() < 0.25:
                self.add(team, sid, "$autocapture", at + self.seconds(0.5, 8), user, **{"$current_url": entry})
            if rng.random() < 0.8:
                self.add(team, sid, "$pageleave", at + self.seconds(0.2, 14), user, **{"$current_url": entry})
            return
        for _ in range(rng.randint(1, 5)):
            at += self.seconds(1, 240)
            later_utm = {"utm_source": "internal"} if rng.random() < 0.3 else {}
            self.add(team, sid, "$pageview", at, user, **{"$current_url": rng.choice(PAGES)}, **later_utm)
            if rng.random() < 0.4:
                self.add(team, sid, "$autocapture", at + self.seconds(0.1, 3), user, **{"$current_url": entry})
        if rng.random() < 0.3:  # a purchase recorded by the backend after the last page view
            self.add(team, sid, "order_placed", at + self.seconds(1, 30), user,
                     **{"$current_url": "https://api.example/v1/orders"})

    def app_session(self, team: int, day: int, n: int) -> None:
        sid, user, at = f"ios-{team}-{n}", f"t{team}-m{n}", self.moment(day)
        for _ in range(self.rng.randint(1, 4)):
            self.add(team, sid, "$screen", at, user, **{"$screen_name": self.rng.choice(SCREENS)})
            at += self.seconds(0.5, 90)

    def backend_session(self, team: int, day: int, n: int) -> None:
        sid, at = f"srv-{team}-{n}", self.moment(day)
        for _ in range(self.rng.randint(1, 6)):
            self.add(team, sid, "invoice_synced", at, f"t{team}-svc", **{"$current_url": "https://api.example/v1/invoices"})
            at += self.seconds(0, 400)


@cache
def dataset() -> tuple[list[list[Event]], list[Event]]:
    """(the inserts, each a list of events; the distinct events inserted)."""
    rng = random.Random(20240301)
    build = Builder(rng)
    n = 0
    for team in TEAMS:
        per_day = {1: 40, 2: 22, 3: 4}[team]
        for day in range(DAYS):
            for _ in range(rng.randint(per_day // 2, per_day)):
                n += 1
                kind = rng.random()
                if kind < 0.75:
                    build.web_visit(team, day, n)
                elif kind < 0.87:
                    build.app_session(team, day, n)
                else:
                    build.backend_session(team, day, n)
    build.add(1, "", "$pageview", DAY0 + timedelta(days=3), "no-session", **{"$current_url": PAGES[0]})  # no session
    shuffled = build.events[:]
    rng.shuffle(shuffled)
    inserts = [shuffled[i::4] for i in range(4)]
    inserts.append(rng.sample(shuffled, len(shuffled) // 10))  # a tenth again, same uuids
    return inserts, build.events


# ---------------------------------------------------------------- loading into ClickHouse


def event_row(e: Event) -> list:
    values = {
        "uuid": e.uuid, "team_id": e.team_id, "event": e.event, "distinct_id": e.distinct_id,
        "person_id": uuid.uuid5(uuid.NAMESPACE_OID, f"{e.team_id}:{e.distinct_id}"), "timestamp": e.at,
        "properties": json.dumps(dict(e.properties)), "person_properties": "{}", "person_created_at": DAY0,
        "$session_id": e.session_id, "$window_id": "", "created_at": e.at,
    }
    for i in range(5):
        values |= {f"$group_{i}": "", f"group{i}_properties": "", f"group{i}_created_at": EPOCH}
    return [values[c] for c in EVENT_COLUMNS]


@pytest.fixture
def loaded(settings, clickhouse) -> str:
    """The dataset in this test's migrated database, session states unmerged; the database name."""
    db = settings.clickhouse.database
    clickhouse.command(f"SYSTEM STOP MERGES {db}.sessions_agg")
    inserts, _ = dataset()
    for batch in inserts:
        clickhouse.insert(f"{db}.events", [event_row(e) for e in batch], column_names=list(EVENT_COLUMNS))
    return db


# ---------------------------------------------------------------- the expected numbers, in Python


@dataclass(frozen=True)
class Session:
    team_id: int
    start: datetime
    end: datetime
    duration_s: int
    pageviews: int
    is_bounce: bool | None
    entry_url: str
    entry_utm_source: str


def whole_seconds(t: datetime) -> int:
    return (t - EPOCH) // timedelta(seconds=1)


def url(e: Event) -> str:
    return e.prop("$current_url") or (e.prop("$screen_name") if e.event == "$screen" else "")


@cache
def sessions() -> list[Session]:
    by_session: dict[tuple[int, str], list[Event]] = defaultdict(list)
    for e in dataset()[1]:
        if e.session_id:
            by_session[(e.team_id, e.session_id)].append(e)
    out = []
    for (team, _), evs in by_session.items():
        start, end = min(e.at for e in evs), max(e.at for e in evs)
        duration = whole_seconds(end) - whole_seconds(start)
        views = [e for e in evs if e.event in PAGE_OR_SCREEN]
        first = min(views or evs, key=lambda e: e.at)
        clicked = any(e.event == "$autocapture" for e in evs)
        bounce = None if not views else (len(views) == 1 and not clicked and duration < 10)
        out.append(Session(team, start, end, duration, len(views), bounce, url(first), first.prop("utm_source")))
    return out


def in_range(team: int) -> list[Session]:
    return [s for s in sessions() if s.team_id == team and DATE_FROM <= s.start.date() <= DATE_TO]


def mean(values: list[int]) -> float:
    return sum(values) / len(values)


def expected_durations(team: int) -> list[tuple]:
    by_day: dict[date, list[int]] = defaultdict(list)
    for s in in_range(team):
        by_day[s.start.date()].append(s.duration_s)
    rows = [(day, len(d), mean(d)) for day, d in sorted(by_day.items())]
    everything = [s.duration_s for s in in_range(team)]
    return rows + [(None, len(everything), mean(everything))]


def bounce_table(groups: dict[str, list[Session]]) -> dict[str, tuple[int, int, float]]:
    out = {}
    for key, group in groups.items():
        bounces = sum(1 for s in group if s.is_bounce)
        out[key] = (len(group), bounces, round(bounces / len(group), 4))
    return out


def expected_bounce_by_source(team: int) -> list[tuple]:
    groups: dict[str, list[Session]] = defaultdict(list)
    for s in in_range(team):
        if s.is_bounce is not None:
            groups[s.entry_utm_source].append(s)
    table = bounce_table(groups)
    return sorted(((k, *v) for k, v in table.items()), key=lambda row: (-row[1], row[0]))


def expected_top_entry_urls(team: int, limit: int) -> list[tuple]:
    groups: dict[str, list[Session]] = defaultdict(list)
    for s in in_range(team):
        if s.pageviews:
            groups[s.entry_url].append(s)
    table = bounce_table(groups)
    rows = [(k, *table[k], mean([s.duration_s for s in g])) for k, g in groups.items()]
    rows.sort(key=lambda row: (-row[1], row[0]))
    return rows[:limit]


# ---------------------------------------------------------------- the tests


def test_the_dataset_has_what_the_queries_must_get_right():
    inserts, events = dataset()
    assert sum(len(batch) for batch in inserts) > len(events) > 1000  # some inserted twice
    team1 = in_range(1)
    assert len(team1) > 100 and len(in_range(2)) > 50 and len(in_range(3)) > 5
    assert len(team1) < len([s for s in sessions() if s.team_id == 1])  # the range excludes some
    assert {s.is_bounce for s in team1} == {True, False, None}
    assert any(s.start.date() != s.end.date() for s in team1)  # across midnight: on the day it starts
    # entries that a wrong rule would get wrong: a backend event first, later pages with other UTMs
    assert any(e.prop("utm_source") == "backend" for e in events) and any(e.prop("utm_source") == "internal" for e in events)
    assert "backend" not in {s.entry_utm_source for s in sessions()}
    # dateDiff counts second boundaries: one-page sessions under 10 s elapsed that last 10 s, not bounces
    assert any(s.pageviews == 1 and s.duration_s == 10 and s.end - s.start < timedelta(seconds=10) and s.is_bounce is False
               for s in sessions())


def test_session_duration_averages_per_day_and_overall(loaded, clickhouse):
    for team in TEAMS:
        expected = expected_durations(team)

        got = cookbook.run(clickhouse, "sessions/session_duration", loaded,
                           team_id=team, date_from=DATE_FROM, date_to=DATE_TO)

        assert got == expected, team
    team1 = expected_durations(1)
    daily = [row[2] for row in team1[:-1]]
    assert [row[0] for row in team1[:-1]] == [DATE_FROM + timedelta(days=i) for i in range(5)]
    assert len(set(daily)) == 5 and min(daily) > 10
    assert team1[-1][2] != mean(daily)  # the overall average is over sessions, not over days
    assert team1 != expected_durations(2)


def test_session_duration_of_a_range_without_sessions_is_one_empty_overall_row(loaded, clickhouse):
    got = cookbook.run(clickhouse, "sessions/session_duration", loaded,
                       team_id=1, date_from=date(2024, 4, 1), date_to=date(2024, 4, 30))
    assert len(got) == 1 and got[0][:2] == (None, 0)


@pytest.mark.parametrize("team", [1, 2])
def test_bounce_rate_by_entry_utm_source(loaded, clickhouse, team):
    expected = expected_bounce_by_source(team)

    got = cookbook.run(clickhouse, "sessions/bounce_rate_by_utm_source", loaded,
                       team_id=team, date_from=DATE_FROM, date_to=DATE_TO)

    assert got == expected
    assert {row[0] for row in expected} == set(SOURCES)  # "" is the sessions entered without one
    rates = {row[0]: row[3] for row in expected}
    assert rates["twitter"] > rates["google"] > rates["newsletter"] > 0
    assert sum(row[1] for row in expected) < len(in_range(team))  # sessions without a page view left out


def test_top_entry_urls_with_bounce_rate_and_average_duration(loaded, clickhouse):
    expected = expected_top_entry_urls(1, 6)

    got = cookbook.run(clickhouse, "sessions/top_entry_urls", loaded,
                       team_id=1, date_from=DATE_FROM, date_to=DATE_TO, limit=6)

    assert got == expected
    every = expected_top_entry_urls(1, 100)
    assert len(every) > 6  # the limit cuts
    assert len(set(SCREENS) & {row[0] for row in every}) >= 2  # app sessions enter on a screen name
    assert "https://api.example/v1/session" not in {row[0] for row in every}
    assert len({row[3] for row in expected}) > 3 and len({row[4] for row in expected}) == 6
    assert cookbook.run(clickhouse, "sessions/top_entry_urls", loaded,
                        team_id=3, date_from=DATE_FROM, date_to=DATE_TO, limit=100) == expected_top_entry_urls(3, 100)
