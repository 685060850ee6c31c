"""Sessions in the identity stage, without a broker (``LocalCluster``): client ids kept, backend
events sessionized per person at the person's home, the same ids on a replay (semantics §3)."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from processors.identity.rules import person_uuid
from processors.identity.steps.sessions import session_uuid7
from tests.identity_harness import TOPICS, LocalCluster
from tests.reference.persons_model import Event

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def us(dt: datetime) -> int:
    return int(dt.timestamp() * 1_000_000)


def ev(did: str, minutes: float, event: str = "invoice_paid", team: int = 1, **props) -> Event:
    return Event(team, did, event, str(uuid.uuid4()), T0 + timedelta(minutes=minutes), props)


def rows(cluster: LocalCluster) -> dict[str, dict]:
    out = {}
    for r in cluster.records:
        if r.topic == TOPICS.events_enriched:
            row = orjson.loads(r.value)
            out[row["uuid"]] = {"sid": row["$session_id"], "props": orjson.loads(row["properties"]),
                                "person_id": row["person_id"]}
    return out


def run(events: list[Event], rng: random.Random | None = None, partitions: int = 4, in_order: bool = True) -> dict[str, dict]:
    cluster = LocalCluster(sorted({e.team_id for e in events}), partitions=partitions)
    for e in events:
        cluster.send(e)
        if in_order:
            cluster.run(rng)
    cluster.run(rng)
    return rows(cluster)


def test_client_session_ids_are_kept_and_uuids_lower_cased() -> None:
    upper = "0192F0E4-AAAA-7000-8000-00000000ABCD"
    events = [ev("u1", 0, "$pageview", **{"$session_id": upper}), ev("u1", 1, "$pageview", **{"$session_id": "my-session"})]
    got = run(events)
    assert got[events[0].uuid]["sid"] == upper.lower() == got[events[0].uuid]["props"]["$session_id"]
    assert got[events[1].uuid]["sid"] == "my-session"


def test_backend_events_get_their_persons_session_by_event_time() -> None:
    minutes = [0, 10, 39.99, 70, 100.01, 100.5]  # gaps: 10, 29.99, 30.01 (new), 30.01 (new), 0.49
    events = [ev("billing", m) for m in minutes]
    got = run(events)
    person = person_uuid(1, "billing")
    starts = [0, 0, 0, 70, 100.01, 100.01]
    for e, start in zip(events, starts):
        assert got[e.uuid]["sid"] == session_uuid7(1, person, us(T0 + timedelta(minutes=start)))
        assert got[e.uuid]["props"]["$session_id"] == got[e.uuid]["sid"]
    assert len({got[e.uuid]["sid"] for e in events}) == 3


def test_a_non_string_session_id_gets_a_server_session() -> None:
    events = [ev("u1", 0, **{"$session_id": 12345})]
    assert run(events)[events[0].uuid]["sid"] == session_uuid7(1, person_uuid(1, "u1"), us(T0))


def test_distinct_ids_of_one_person_share_its_sessions_after_a_merge() -> None:
    """Events are sessionized where the person lives, so after ``$identify`` the anonymous and
    the known id's backend events fall into the same session of the merged person."""
    events = [ev("anon", 0), ev("user", 1), ev("user", 2, "$identify", **{"$anon_distinct_id": "anon"}),
              ev("anon", 5), ev("user", 6)]
    got = run(events)
    person = got[events[-1].uuid]["person_id"]
    assert got[events[3].uuid]["person_id"] == person
    assert got[events[3].uuid]["sid"] == got[events[4].uuid]["sid"] == got[events[2].uuid]["sid"]
    assert got[events[4].uuid]["sid"] == session_uuid7(1, person, us(T0 + timedelta(minutes=1)))


def test_a_late_event_joins_the_session_it_belongs_to() -> None:
    events = [ev("u1", 0), ev("u1", 20), ev("u1", 100), ev("u1", 10)]  # the last is 90 min late: joins 0..20
    got = run(events)
    assert got[events[3].uuid]["sid"] == got[events[0].uuid]["sid"] != got[events[2].uuid]["sid"]


@pytest.mark.parametrize("seed", range(10))
def test_a_replay_gives_the_same_session_ids(seed: int) -> None:
    """The same events (with merges) in the same order, run again on fresh state, with other
    scheduling and another partition count: every event gets the same session id."""
    rng = random.Random(seed)
    events = []
    for i in range(120):
        did = f"d{rng.randrange(8)}"
        if rng.random() < 0.1:
            events.append(ev(did, i * 3, "$identify", **{"$anon_distinct_id": f"d{rng.randrange(8)}"}))
        elif rng.random() < 0.3:
            events.append(ev(did, i * 3, "$pageview", **{"$session_id": str(uuid.UUID(int=rng.getrandbits(128)))}))
        else:
            events.append(ev(did, i * rng.choice([1, 3, 20]), "backend"))
    first = run(events, random.Random(seed), partitions=4)
    second = run(events, random.Random(seed + 1000), partitions=3)
    assert {u: r["sid"] for u, r in first.items()} == {u: r["sid"] for u, r in second.items()}
    assert all(r["sid"] for r in first.values()) and len(first) == len(events)
