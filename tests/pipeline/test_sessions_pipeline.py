"""Sessions in the running pipeline (real Tansu, real ClickHouse, worker processes): client
sessions kept, backend events sessionized per person, and the ``sessions`` table's columns equal
to values computed here from the events sent (semantics §3, ADR 0005 and 0006)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from headwater.topics import TopicNames
from processors.identity.rules import person_uuid
from processors.identity.steps.sessions import session_uuid7
from tests.conftest import wait_until
from tests.identity_harness import token_of
from tests.pipeline.test_identity_pipeline import Sender, visible
from tests.reference.persons_model import Event

TEAM = 401
T0 = datetime(2026, 5, 4, 9, 0, tzinfo=timezone.utc)
TIMEOUT = timedelta(minutes=30)
PAGE_EVENTS = ("$pageview", "$screen")


@pytest.fixture
def test_env(test_env: dict[str, str]) -> dict[str, str]:
    return {**test_env, "HEADWATER_TEAMS": f"{token_of(TEAM)}:{TEAM},{token_of(402)}:402", "HEADWATER_SINK_BATCH_MS": "100"}


def us(dt: datetime) -> int:
    return int(dt.timestamp() * 1_000_000)


def ev(did: str, at: timedelta, event: str = "$pageview", **props) -> Event:
    return Event(TEAM, did, event, str(uuid.uuid4()), T0 + at, props)


def expected_sessions(events: list[Event], session_of: dict[str, str]) -> dict[str, dict]:
    """The sessions table, computed from the events by plain loops (DESIGN.md §5, ADR 0005)."""
    by_session: dict[str, list[Event]] = {}
    for e in events:
        by_session.setdefault(session_of[e.uuid], []).append(e)
    out = {}
    for sid, evs in by_session.items():
        evs = sorted(evs, key=lambda e: e.timestamp)
        pages = [e for e in evs if e.event in PAGE_EVENTS]
        entry = (pages or evs)[0]
        exit_ = (pages or evs)[-1]
        start, end = evs[0].timestamp, evs[-1].timestamp
        duration = int(end.timestamp()) - int(start.timestamp())  # second boundaries crossed
        bounce = None if not pages else int(len(pages) == 1 and duration < 10
                                            and not any(e.event == "$autocapture" for e in evs))
        out[sid] = {"distinct_id": evs[-1].distinct_id, "person_id": person_uuid(TEAM, evs[-1].distinct_id),
                    "start": us(start), "end": us(end), "duration_s": duration,
                    "entry_url": entry.properties.get("$current_url", ""), "exit_url": exit_.properties.get("$current_url", ""),
                    "pageviews": len(pages), "events": len(evs), "is_bounce": bounce,
                    "entry_utm_source": entry.properties.get("utm_source", ""),
                    "entry_utm_medium": entry.properties.get("utm_medium", ""),
                    "entry_utm_campaign": entry.properties.get("utm_campaign", ""),
                    "entry_referring_domain": entry.properties.get("$referring_domain", "")}
    return out


def server_sessions(did: str, events: list[Event]) -> dict[str, str]:
    """posthog-js's rule by hand, for events in time order: a gap over 30 minutes starts a session;
    its id is the UUIDv7 of (team, person, the time of its first event)."""
    person, out, last, start = person_uuid(TEAM, did), {}, None, None
    for e in sorted(events, key=lambda e: e.timestamp):
        if last is None or e.timestamp - last > TIMEOUT:
            start = e.timestamp
        last = e.timestamp
        out[e.uuid] = session_uuid7(TEAM, person, us(start))
    return out


def sessions_table(clickhouse, db: str, ids: list[str]) -> dict[str, dict]:
    result = clickhouse.query(
        f"SELECT session_id, distinct_id, toString(person_id), toUnixTimestamp64Micro(start), "
        f"toUnixTimestamp64Micro(`end`), duration_s, entry_url, exit_url, pageviews, events, is_bounce, "
        f"entry_utm_source, entry_utm_medium, entry_utm_campaign, entry_referring_domain "
        f"FROM {db}.sessions WHERE team_id = {{t:Int64}} AND session_id IN {{ids:Array(String)}}",
        parameters={"t": TEAM, "ids": ids})
    names = ["distinct_id", "person_id", "start", "end", "duration_s", "entry_url", "exit_url", "pageviews", "events",
             "is_bounce", "entry_utm_source", "entry_utm_medium", "entry_utm_campaign", "entry_referring_domain"]
    return {row[0]: dict(zip(names, row[1:])) for row in result.result_rows}


def test_client_sessions_kept_backend_events_sessionized_and_the_sessions_table(pipeline, settings, clickhouse) -> None:
    db = settings.clickhouse.database
    sender = Sender(settings.kafka_bootstrap, TopicNames(settings.topic_prefix))
    web_a = "0196A0B1-C2D3-7E4F-8A9B-0C1D2E3F4A5B"  # a client UUIDv7 in upper case: stored lower-cased
    web_b = "client-session-not-a-uuid"
    s = timedelta(seconds=1)
    web = [
        ev("visitor", 0 * s, "signup_started", **{"$session_id": web_a}),
        ev("visitor", 5 * s, **{"$session_id": web_a, "$current_url": "https://x.io/landing", "utm_source": "google",
                                "utm_medium": "cpc", "utm_campaign": "spring", "$referring_domain": "www.google.com"}),
        ev("visitor", 65 * s, **{"$session_id": web_a, "$current_url": "https://x.io/pricing", "utm_source": "later"}),
        ev("visitor", 90 * s, "$autocapture", **{"$session_id": web_a, "$current_url": "https://x.io/pricing#buy"}),
        ev("reader", 3600 * s, **{"$session_id": web_b, "$current_url": "https://x.io/blog"}),
    ]
    minutes = [0, 10, 39, 70, 71, 130]  # gaps 10, 29, 31 (new), 1, 59 (new)
    backend = [ev("billing-7", timedelta(minutes=m), "invoice_paid", amount=m) for m in minutes]
    backend += [ev("billing-9", timedelta(minutes=5), "invoice_paid")]
    events = web + backend
    sender.send(events)
    uuids = [e.uuid for e in events]
    wait_until(lambda: visible(clickhouse, db, uuids) == set(uuids), 60, message="events visible")

    session_of = {e.uuid: web_a.lower() for e in web[:4]} | {web[4].uuid: web_b}
    session_of |= server_sessions("billing-7", backend[:-1]) | server_sessions("billing-9", backend[-1:])
    stored = dict(clickhouse.query(f"SELECT toString(uuid), `$session_id` FROM {db}.events WHERE uuid IN {{u:Array(UUID)}}",
                                   parameters={"u": uuids}).result_rows)
    assert stored == session_of
    assert len(set(session_of.values())) == 2 + 3 + 1
    for sid in set(session_of.values()) - {web_a.lower(), web_b}:
        assert uuid.UUID(sid).version == 7

    want = expected_sessions(events, session_of)
    assert want[web_a.lower()]["is_bounce"] == 0 and want[web_b]["is_bounce"] == 1
    assert want[web_a.lower()]["entry_url"] == "https://x.io/landing" and want[session_of[backend[0].uuid]]["is_bounce"] is None
    got = sessions_table(clickhouse, db, sorted(want))
    assert got == want

    # the same events sent again (an SDK retry: same uuid) add no row (ADR 0007) and change no session
    sender.send([web[2], backend[1]])
    dropped = lambda: sum(int(n) for n in re.findall(r": (\d+) events dropped", pipeline.log("sink")))  # noqa: E731
    wait_until(lambda: dropped() == 2, 60, message="the resent events dropped by the sink")
    assert clickhouse.query(f"SELECT count() FROM {db}.events WHERE uuid IN {{u:Array(UUID)}}",
                            parameters={"u": [web[2].uuid, backend[1].uuid]}).result_rows == [(2,)]
    assert sessions_table(clickhouse, db, sorted(want)) == want


def test_an_identified_users_backend_events_from_two_distinct_ids_share_sessions(pipeline, settings, clickhouse) -> None:
    db = settings.clickhouse.database
    sender = Sender(settings.kafka_bootstrap, TopicNames(settings.topic_prefix))
    m = timedelta(minutes=1)
    first = [ev("svc-anon-1", 0 * m, "job_ran"), ev("user@x.io", 1 * m, "$identify", **{"$anon_distinct_id": "svc-anon-1"})]
    sender.send(first)
    wait_until(lambda: visible(clickhouse, db, [e.uuid for e in first]) == {e.uuid for e in first}, 60)
    later = [ev("svc-anon-1", 3 * m, "job_ran"), ev("user@x.io", 4 * m, "report_built")]
    sender.send(later)
    uuids = [e.uuid for e in later]
    wait_until(lambda: visible(clickhouse, db, uuids) == set(uuids), 60)
    rows = dict(clickhouse.query(f"SELECT toString(uuid), `$session_id` FROM {db}.events WHERE uuid IN {{u:Array(UUID)}}",
                                 parameters={"u": [e.uuid for e in first + later]}).result_rows)
    # user@x.io was new, so it joined the anonymous id's person (§1.2): one person, one session,
    # opened by the first job at T0, whichever distinct id the events came from
    person = person_uuid(TEAM, "svc-anon-1")
    assert set(rows.values()) == {session_uuid7(TEAM, person, us(T0))}
