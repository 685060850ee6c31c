"""The `sessions` view (migration 0005, ADR 0005) against chDB: events inserted straight into
`events`, every column of `sessions` compared with the same session computed here in plain Python
from the inserted events. Merges of `sessions_agg` are stopped, so the view is checked on unmerged
parts (several rows per session); then merged, the answer must not change.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pytest

from headwater.rows import EVENT_COLUMNS
from sinks.clickhouse.migrate import load_migrations

pytestmark = pytest.mark.pipeline

ROOT = Path(__file__).resolve().parents[2]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T0 = datetime(2024, 3, 4, 10, 0, tzinfo=UTC)
PAGE_OR_SCREEN = ("$pageview", "$screen")
SESSION_COLUMNS = [
    ("session_id", "String"), ("team_id", "Int64"), ("distinct_id", "String"), ("person_id", "UUID"),
    ("start", "DateTime64(6, 'UTC')"), ("end", "DateTime64(6, 'UTC')"), ("duration_s", "Int64"),
    ("entry_url", "String"), ("exit_url", "String"), ("pageviews", "UInt64"), ("events", "UInt64"),
    ("is_bounce", "Nullable(UInt8)"), ("entry_utm_source", "String"), ("entry_utm_medium", "String"),
    ("entry_utm_campaign", "String"), ("entry_referring_domain", "String"),
]
NAMES = [name for name, _ in SESSION_COLUMNS]
_uuids = random.Random(20240304)


def new_uuid() -> uuid.UUID:
    return uuid.UUID(int=_uuids.getrandbits(128), version=4)


@dataclass(frozen=True)
class Event:
    session_id: str
    event: str
    at: datetime
    properties: dict = field(default_factory=dict)
    distinct_id: str = "user"
    team_id: int = 7
    uuid: uuid.UUID = field(default_factory=new_uuid)

    @property
    def person_id(self) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"{self.team_id}:{self.distinct_id}")


def page(session_id: str, at: datetime, url: str, *, distinct_id: str = "user", team_id: int = 7, **props) -> Event:
    return Event(session_id, "$pageview", at, {"$current_url": url, **props}, distinct_id, team_id)


def ms(n: int) -> timedelta:
    return timedelta(milliseconds=n)


# ---------------------------------------------------------------- the expected sessions, in Python


def url_of(e: Event) -> str:
    url = e.properties.get("$current_url", "")
    return e.properties.get("$screen_name", "") if url == "" and e.event == "$screen" else url


def uuid_order(u: uuid.UUID) -> tuple[int, int]:
    """ClickHouse compares UUIDs by their last 64 bits first, then the first 64 (checked below)."""
    return u.int & (2**64 - 1), u.int >> 64


def whole_seconds(t: datetime) -> int:
    return (t - EPOCH) // timedelta(seconds=1)


def expected_sessions(events: list[Event]) -> list[tuple]:
    """One row per (team, session id), in the view's column order, sorted by (team, session id)."""
    unique: dict[tuple, Event] = {}
    for e in events:  # the same event inserted twice is one event
        unique.setdefault((e.team_id, e.session_id, e.uuid), e)
    sessions: dict[tuple[int, str], list[Event]] = defaultdict(list)
    for e in unique.values():
        if e.session_id:
            sessions[(e.team_id, e.session_id)].append(e)
    rows = []
    for (team, sid), evs in sorted(sessions.items()):
        last = max(evs, key=lambda e: (e.at, uuid_order(e.uuid)))
        entry = min(evs, key=lambda e: (e.event not in PAGE_OR_SCREEN, e.at, uuid_order(e.uuid)))
        exit_ = max(evs, key=lambda e: (e.event in PAGE_OR_SCREEN, e.at, uuid_order(e.uuid)))
        start, end = min(e.at for e in evs), max(e.at for e in evs)
        duration = whole_seconds(end) - whole_seconds(start)
        pageviews = sum(1 for e in evs if e.event in PAGE_OR_SCREEN)
        autocaptured = any(e.event == "$autocapture" for e in evs)
        bounce = None if pageviews == 0 else int(not (pageviews > 1 or autocaptured or duration >= 10))
        props = entry.properties
        rows.append((
            sid, team, last.distinct_id, last.person_id, start, end, duration, url_of(entry), url_of(exit_),
            pageviews, len(evs), bounce, props.get("utm_source", ""), props.get("utm_medium", ""),
            props.get("utm_campaign", ""), props.get("$referring_domain", ""),
        ))
    return rows


# ---------------------------------------------------------------- ClickHouse


def event_row(e: Event) -> list:
    values = {
        "uuid": e.uuid, "team_id": e.team_id, "event": e.event, "distinct_id": e.distinct_id,
        "person_id": e.person_id, "timestamp": e.at, "properties": json.dumps(e.properties),
        "person_properties": "{}", "person_created_at": T0, "$session_id": e.session_id,
        "$window_id": "", "created_at": e.at,
    }
    for i in range(5):
        values |= {f"$group_{i}": "", f"group{i}_properties": "", f"group{i}_created_at": EPOCH}
    return [values[c] for c in EVENT_COLUMNS]


def insert(client, db: str, events: list[Event]) -> None:
    client.insert(f"{db}.events", [event_row(e) for e in events], column_names=list(EVENT_COLUMNS))


def utc(value):
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def sessions(client, db: str, where: str = "1") -> list[tuple]:
    rows = client.query(
        f"SELECT {', '.join(f'`{n}`' for n in NAMES)} FROM {db}.sessions WHERE {where} ORDER BY team_id, session_id"
    ).result_rows
    return [tuple(utc(v) for v in row) for row in rows]


def agg_rows(client, db: str) -> int:
    return client.query(f"SELECT count() FROM {db}.sessions_agg").result_rows[0][0]


@pytest.fixture
def db(settings, clickhouse) -> str:
    """This test's migrated database, with merges of the session states stopped."""
    name = settings.clickhouse.database
    clickhouse.command(f"SYSTEM STOP MERGES {name}.sessions_agg")
    return name


# ---------------------------------------------------------------- the dataset


def web_session() -> list[Event]:
    """A backend event (with its own URL and UTM) before the first pageview, an anonymous user
    who identifies, three pageviews with different UTMs, an autocapture, a last non-page event."""
    s = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    return [
        Event(s, "api_called", T0, {"$current_url": "https://api/backend", "utm_source": "backend"}, "anon-1"),
        page(s, T0 + ms(500), "https://shop/landing", distinct_id="anon-1", utm_source="google", utm_medium="cpc",
             utm_campaign="spring", **{"$referring_domain": "www.google.com"}),
        Event(s, "$autocapture", T0 + ms(2_000), {"$current_url": "https://shop/landing"}, "anon-1"),
        page(s, T0 + ms(30_000), "https://shop/pricing", distinct_id="anon-1", utm_source="newsletter"),
        Event(s, "$identify", T0 + ms(31_000), {"$current_url": "https://shop/pricing"}, "ada@example.com"),
        page(s, T0 + ms(95_000), "https://shop/checkout", distinct_id="ada@example.com"),
        Event(s, "order_placed", T0 + ms(99_000), {"$current_url": "https://backend/orders"}, "ada@example.com"),
    ]


@cache
def dataset() -> list[list[Event]]:
    """Events in the inserts that carry them (each list one INSERT), some sessions over several.
    Built once: every test sees the same uuids."""
    web = web_session()
    backend_only = [  # no page or screen view: entry/exit from the first/last event, bounce NULL
        Event("srv-7", "invoice_paid", T0 + ms(3_000), {"$current_url": "https://billing/2", "utm_source": "x"}, "svc"),
        Event("srv-7", "invoice_created", T0, {"$current_url": "https://billing/1", "utm_source": "crm"}, "svc"),
        Event("srv-7", "invoice_sent", T0 + ms(60_000), {"$current_url": "https://billing/3"}, "svc"),
    ]
    mobile = [  # screens: the URL is $screen_name, unless the event has a $current_url
        Event("ios-session-A", "$screen", T0 + ms(1_000), {"$screen_name": "Home", "utm_source": "appstore"}, "m1"),
        Event("ios-session-A", "app_opened", T0, {"$screen_name": "Splash"}, "m1"),
        Event("ios-session-A", "$screen", T0 + ms(4_000), {"$screen_name": "Cart", "$current_url": "app://cart"}, "m1"),
        Event("ios-session-A", "purchase", T0 + ms(8_000), {"$screen_name": "Cart"}, "m1"),
    ]
    bounce = [  # one pageview and a $pageleave 3 s later: a bounce
        page("b-1", T0, "https://blog/post", utm_source="twitter"),
        Event("b-1", "$pageleave", T0 + ms(3_000), {"$current_url": "https://blog/post"}),
    ]
    long_single = [  # one pageview, but the session lasts 12 s: not a bounce
        page("b-2", T0, "https://blog/long"), Event("b-2", "$pageleave", T0 + ms(12_000), {}),
    ]
    # dateDiff counts second boundaries: 9.1 s elapsed from .900 to :10.000 is 10 s (not a bounce),
    # 9.999 s from :00.000 to :09.999 is 9 s (a bounce)
    boundary_10 = [page("b-3", T0 + ms(900), "https://blog/a"), Event("b-3", "scrolled", T0 + ms(10_000), {})]
    boundary_9 = [page("b-4", T0, "https://blog/b"), Event("b-4", "scrolled", T0 + ms(9_999), {})]
    clicked = [page("b-5", T0, "https://blog/c"), Event("b-5", "$autocapture", T0 + ms(2_000), {})]
    two_pages = [page("b-6", T0, "https://blog/d"), page("b-6", T0 + ms(1_500), "https://blog/e")]
    # the same microsecond: the uuid decides, the same way whatever the insert order
    tie = [page("tie", T0, f"https://tie/{n}", distinct_id=f"t{n}", utm_source=f"s{n}") for n in range(4)]
    tie += [Event("tie", "$pageleave", T0 + ms(20_000), {"$current_url": "https://tie/leave"})]
    # a session over a month boundary: rows in two partitions of sessions_agg
    month_end = datetime(2024, 3, 31, 23, 59, 50, tzinfo=UTC)
    across = [page("m-1", month_end, "https://shop/late-night", utm_source="night"),
              page("m-1", month_end + ms(20_000), "https://shop/after-midnight")]
    # the same session id in another team is another session; an empty session id is none
    other_team = [
        page("b-1", T0 + ms(5_000), "https://other/home", team_id=8, distinct_id="o1", utm_source="bing"),
        page("b-1", T0 + ms(6_000), "https://other/about", team_id=8, distinct_id="o2"),
    ]
    no_session = [page("", T0, "https://nowhere"), Event("", "api_called", T0, {})]
    return [
        web[3:] + bounce[:1] + mobile[:2] + backend_only[:1] + tie[:2] + across[:1] + other_team[:1],
        backend_only[1:] + long_single + boundary_10 + boundary_9 + across[1:] + no_session + tie[3:1:-1],
        web[:3] + bounce[1:] + mobile[2:] + clicked + two_pages + other_team[1:] + tie[4:],
    ]


def all_events() -> list[Event]:
    return [e for batch in dataset() for e in batch]


# ---------------------------------------------------------------- the tests


def test_the_view_has_the_designed_columns_and_types(clickhouse, db):
    got = clickhouse.query(f"DESCRIBE TABLE {db}.sessions").result_rows
    assert [(row[0], row[1]) for row in got] == SESSION_COLUMNS


def test_every_column_equals_the_session_computed_from_the_inserted_events(clickhouse, db):
    for batch in dataset():
        insert(clickhouse, db, batch)
    expected = expected_sessions(all_events())

    got = sessions(clickhouse, db)

    assert got == expected
    assert agg_rows(clickhouse, db) > len(expected)  # unmerged: several state rows for some sessions
    by_id = {(row[1], row[0]): dict(zip(NAMES, row)) for row in got}
    # what the cases are about, stated once more by hand
    web = by_id[(7, "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")]
    assert (web["entry_url"], web["exit_url"], web["entry_utm_source"], web["entry_utm_medium"]) == (
        "https://shop/landing", "https://shop/checkout", "google", "cpc")
    assert (web["entry_utm_campaign"], web["entry_referring_domain"]) == ("spring", "www.google.com")
    assert (web["distinct_id"], web["pageviews"], web["events"], web["duration_s"], web["is_bounce"]) == (
        "ada@example.com", 3, 7, 99, 0)
    assert web["start"] == T0  # the backend event starts the session, though it is not its entry
    backend = by_id[(7, "srv-7")]
    assert (backend["entry_url"], backend["exit_url"], backend["entry_utm_source"], backend["is_bounce"]) == (
        "https://billing/1", "https://billing/3", "crm", None)
    mobile = by_id[(7, "ios-session-A")]
    assert (mobile["entry_url"], mobile["exit_url"], mobile["entry_utm_source"], mobile["pageviews"]) == (
        "Home", "app://cart", "appstore", 2)
    bounces = {sid: by_id[(7, sid)]["is_bounce"] for sid in ("b-1", "b-2", "b-3", "b-4", "b-5", "b-6")}
    assert bounces == {"b-1": 1, "b-2": 0, "b-3": 0, "b-4": 1, "b-5": 0, "b-6": 0}
    assert (by_id[(7, "b-3")]["duration_s"], by_id[(7, "b-4")]["duration_s"]) == (10, 9)
    across = by_id[(7, "m-1")]
    assert (across["entry_url"], across["exit_url"], across["duration_s"]) == (
        "https://shop/late-night", "https://shop/after-midnight", 20)
    assert clickhouse.query(
        f"SELECT uniqExact(_partition_id) FROM {db}.sessions_agg WHERE session_id = 'm-1'").result_rows == [(2,)]
    assert "" not in {sid for _, sid in by_id}

    clickhouse.command(f"SYSTEM START MERGES {db}.sessions_agg")
    clickhouse.command(f"OPTIMIZE TABLE {db}.sessions_agg FINAL")
    assert sessions(clickhouse, db) == expected
    assert agg_rows(clickhouse, db) == len(expected) + 1  # one session spans two partitions


def test_a_tie_on_the_timestamp_is_decided_by_the_uuid_whatever_the_insert_order(clickhouse, db):
    # ClickHouse's UUID order, as uuid_order assumes it: the last 64 bits first
    a, b = uuid.UUID("00000000-0000-0000-0000-000000000002"), uuid.UUID("00000000-0000-0001-0000-000000000001")
    assert clickhouse.query(f"SELECT toUUID('{b}') < toUUID('{a}')").result_rows == [(1,)]
    assert uuid_order(b) < uuid_order(a)
    tied = [page("tie-a", T0, f"https://tie/{n}", distinct_id=f"t{n}", utm_source=f"s{n}") for n in range(6)]
    tied += [page("tie-a", T0 + ms(1), "https://tie/last", distinct_id="t-last"),
             Event("tie-a", "custom", T0 + ms(1), {"$current_url": "https://tie/custom"}, "t-custom")]
    # the same events (same uuids) in session tie-b, in reverse order and one per insert
    mirrored = [replace(e, session_id="tie-b") for e in tied]
    insert(clickhouse, db, tied)
    for e in reversed(mirrored):
        insert(clickhouse, db, [e])

    got = sessions(clickhouse, db)

    assert got == expected_sessions(tied + mirrored)
    a_row, b_row = got
    assert a_row[2:] == b_row[2:]  # every column but the session id
    first = min(tied[:6], key=lambda e: uuid_order(e.uuid))
    assert (a_row[7], a_row[12], a_row[8]) == (first.properties["$current_url"], first.properties["utm_source"],
                                               "https://tie/last")
    last = max(tied[6:], key=lambda e: uuid_order(e.uuid))
    assert a_row[2] == last.distinct_id  # the latest event: a page and a custom event tie


def test_inserting_the_same_events_again_changes_no_count(clickhouse, db):
    clickhouse.command(f"SYSTEM STOP MERGES {db}.events")  # so that the duplicate rows stay countable
    for batch in dataset():
        insert(clickhouse, db, batch)
    first = sessions(clickhouse, db)
    events = all_events()

    # the same rows twice more (same uuids), in other inserts: a replayed batch, a retry without a token
    insert(clickhouse, db, events[::2])
    insert(clickhouse, db, events[1::2])
    insert(clickhouse, db, list(reversed(events)))

    assert clickhouse.query(f"SELECT count() FROM {db}.events").result_rows == [(3 * len(events),)]
    again = sessions(clickhouse, db)
    assert again == first == expected_sessions(events)
    assert sum(row[10] for row in again) == len({e.uuid for e in events if e.session_id})
    clickhouse.command(f"SYSTEM START MERGES {db}.sessions_agg")
    clickhouse.command(f"OPTIMIZE TABLE {db}.sessions_agg FINAL")
    assert sessions(clickhouse, db) == first


def test_a_retried_batch_that_events_drops_still_reaches_the_view_and_counts_once(clickhouse, db):
    """The sink retries a batch with the same insert_deduplication_token: `events` drops the block,
    but (ClickHouse 26.9) the materialized view runs on it again. Hence states that ignore
    duplicates (ADR 0005)."""
    batch = dataset()[0]
    token = {"insert_deduplication_token": "events_enriched:0:100-111"}
    clickhouse.insert(f"{db}.events", [event_row(e) for e in batch], column_names=list(EVENT_COLUMNS), settings=token)
    once, state_rows = sessions(clickhouse, db), agg_rows(clickhouse, db)

    clickhouse.insert(f"{db}.events", [event_row(e) for e in batch], column_names=list(EVENT_COLUMNS), settings=token)

    assert clickhouse.query(f"SELECT count() FROM {db}.events").result_rows == [(len(batch),)]
    assert agg_rows(clickhouse, db) == 2 * state_rows  # the view saw the dropped block
    assert sessions(clickhouse, db) == once == expected_sessions(batch)


def test_sessions_of_different_teams_are_separate(clickhouse, db):
    for batch in dataset():
        insert(clickhouse, db, batch)

    team7 = sessions(clickhouse, db, "team_id = 7")
    team8 = sessions(clickhouse, db, "team_id = 8")

    assert [row for row in expected_sessions(all_events()) if row[1] == 8] == team8
    assert [(row[0], row[2], row[7], row[9], row[4]) for row in team8] == [
        ("b-1", "o2", "https://other/home", 2, T0 + ms(5_000))]
    b1 = next(row for row in team7 if row[0] == "b-1")
    assert (b1[7], b1[9], b1[12], b1[11]) == ("https://blog/post", 1, "twitter", 1)
    # a team filter reaches the primary key of sessions_agg through the view
    plan = "\n".join(row[0] for row in clickhouse.query(
        f"EXPLAIN indexes = 1 SELECT count() FROM {db}.sessions WHERE team_id = 8").result_rows)
    assert re.search(r"Keys:\s+team_id\s+Condition: \(team_id in \[8, 8\]\)", plan), plan


def test_late_events_aggregate_into_their_session(clickhouse, db):
    on_time = [page("late", T0 + ms(5_000), "https://a/second", utm_source="mail"),
               page("late", T0 + ms(9_000), "https://a/third")]
    insert(clickhouse, db, on_time)
    before = sessions(clickhouse, db)
    # an event from before the start and one after the end arrive later, each in its own insert
    late = [page("late", T0, "https://a/first", distinct_id="early", utm_source="ads"),
            Event("late", "$pageleave", T0 + ms(40_000), {"$current_url": "https://a/leave"}, "latest")]
    for e in late:
        insert(clickhouse, db, [e])

    got = sessions(clickhouse, db)

    assert [(r[6], r[7], r[11], r[12]) for r in before] == [(4, "https://a/second", 0, "mail")]
    assert got == expected_sessions(on_time + late)
    assert [(r[2], r[6], r[7], r[8], r[9], r[12]) for r in got] == [
        ("latest", 40, "https://a/first", "https://a/third", 3, "ads")]


BACKFILL = re.compile(r"```sql\n(-- backfill.*?)```", re.S)


def test_the_backfill_of_the_adr_rebuilds_the_sessions_of_earlier_events_and_can_run_twice(clickhouse, db):
    """Events inserted before migration 0005 (simulated: states emptied) get their sessions from the
    backfill statement given in ADR 0005; running it again changes nothing."""
    (statement,) = BACKFILL.findall((ROOT / "docs/adr/0005-sessions-table.md").read_text())
    statement = re.sub(r"(?<![\w.`])headwater\.", f"{db}.", statement)
    for batch in dataset():
        insert(clickhouse, db, batch)
    expected = sessions(clickhouse, db)
    clickhouse.command(f"TRUNCATE TABLE {db}.sessions_agg")
    assert sessions(clickhouse, db) == []

    clickhouse.command(statement)
    assert sessions(clickhouse, db) == expected == expected_sessions(all_events())
    clickhouse.command(statement)
    assert sessions(clickhouse, db) == expected


def test_migration_0005_runs_again_harmlessly(clickhouse, db):
    """Two processes starting together may both run it: nothing changes, no second view feeds."""
    (migration,) = [m for m in load_migrations() if m.version == 5]
    insert(clickhouse, db, dataset()[0])
    before = sessions(clickhouse, db)

    for statement in migration.statements(db):
        clickhouse.command(statement)
    insert(clickhouse, db, dataset()[1])

    assert clickhouse.query(
        f"SELECT name FROM system.tables WHERE database = '{db}' AND name LIKE 'sessions%' ORDER BY name"
    ).result_rows == [("sessions",), ("sessions_agg",), ("sessions_mv",)]
    assert before == expected_sessions(dataset()[0])
    assert sessions(clickhouse, db) == expected_sessions(dataset()[0] + dataset()[1])


def test_the_cluster_rendering_of_migration_0005_parses(clickhouse, db):
    """The server parses every statement as rendered for a cluster (formatQuery runs nothing)."""
    (migration,) = [m for m in load_migrations() if m.version == 5]
    formatted = [
        clickhouse.query("SELECT formatQuery({sql:String})", parameters={"sql": statement}).result_rows[0][0]
        for statement in migration.statements("hw", "main")
    ]
    local, distributed, mv, view = formatted
    assert local.startswith("CREATE TABLE IF NOT EXISTS hw.sessions_agg_local ON CLUSTER main\n")
    assert "ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/hw.sessions_agg_local', '{replica}')" in local
    assert distributed.startswith("CREATE TABLE IF NOT EXISTS hw.sessions_agg ON CLUSTER main AS hw.sessions_agg_local")
    assert "ENGINE = Distributed('main', 'hw', 'sessions_agg_local', cityHash64(team_id, session_id))" in distributed
    # ADR 0008: the materialized view fires on each shard's local events and writes its local states
    assert mv.startswith("CREATE MATERIALIZED VIEW IF NOT EXISTS hw.sessions_mv ON CLUSTER main TO hw.sessions_agg_local")
    assert "FROM hw.events_local" in mv and "ENGINE" not in mv
    assert view.startswith("CREATE VIEW IF NOT EXISTS hw.sessions ON CLUSTER main\nAS SELECT")
    assert "FROM hw.sessions_agg\n" in view and "_local" not in view
