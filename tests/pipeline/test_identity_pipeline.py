"""Identity in the running pipeline (real Tansu, real ClickHouse, worker processes): the final
ClickHouse state equals the reference model step at a time, keeps the invariants under
concurrency, and survives kill -9 of a worker."""

from __future__ import annotations

import itertools
import signal
import time
import uuid
from datetime import timedelta

import orjson
import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from headwater.topics import TopicNames
from tests.conftest import wait_until
from tests.identity_harness import PIPELINE_SCENARIOS as ALL_PIPELINE_SCENARIOS
from tests.identity_harness import Tables, assert_same_tables, check_invariants, raw_envelope, tables_from_model, token_of
from tests.reference.persons_model import Event, PersonsModel
from tests.reference.scenarios import BASE_TS, identify, pv

#: Without the two 700 KB size-cap scenarios: their event rows (properties plus person
#: properties) exceed a Kafka message, a path test_identity_protocol covers without a broker.
PIPELINE_SCENARIOS = [s for s in ALL_PIPELINE_SCENARIOS if not s.name.startswith("oversized_")]

#: Team ids every test deployment here knows: scenarios move to 10*i + {1,2,3}; others use 900+.
TEAMS = sorted({10 * (i + 1) + t for i in range(len(PIPELINE_SCENARIOS)) for t in (1, 2, 3)} | set(range(900, 961)))


@pytest.fixture
def test_env(test_env: dict[str, str]) -> dict[str, str]:
    opted_out = {t for i, s in enumerate(PIPELINE_SCENARIOS) for t in s.with_team_offset(10 * (i + 1)).opted_out_teams}
    return {**test_env, "HEADWATER_TEAMS": ",".join(f"{token_of(t)}:{t}" for t in TEAMS),
            "HEADWATER_PERSONLESS_TEAMS": ",".join(map(str, sorted(opted_out))),
            "HEADWATER_SINK_BATCH_MS": "100"}


class Sender:
    def __init__(self, bootstrap: str, topics: TopicNames) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 5})
        self.topic = topics.events_raw

    def send(self, events: list[Event]) -> None:
        for e in events:
            self.producer.produce(self.topic, orjson.dumps(raw_envelope(e)), f"{token_of(e.team_id)}:{e.distinct_id}")
        assert self.producer.flush(10) == 0


def visible(clickhouse, db: str, uuids: list[str]) -> set[str]:
    if not uuids:
        return set()
    rows = clickhouse.query(
        f"SELECT toString(uuid) FROM {db}.events WHERE uuid IN {{u:Array(UUID)}} "
        f"UNION ALL SELECT event_uuid FROM {db}.ingestion_warnings WHERE event_uuid IN {{s:Array(String)}} "
        "AND type = 'invalid_event_when_process_person_profile_is_false'",
        parameters={"u": uuids, "s": uuids}).result_rows
    return {r[0] for r in rows}


def wait_visible(clickhouse, db: str, uuids: list[str], timeout: float = 60) -> None:
    wait_until(lambda: visible(clickhouse, db, uuids) == set(uuids), timeout,
               message=f"{len(uuids)} events visible in ClickHouse")


def tables_from_clickhouse(clickhouse, db: str, teams: set[int]) -> Tables:
    t = Tables()
    q = {"teams": sorted(teams)}
    for row in clickhouse.query(
            f"SELECT toString(id), team_id, argMax(properties, version), argMax(is_identified, version), "
            f"argMax(toUnixTimestamp64Micro(created_at), version), max(version), argMax(is_deleted, version) "
            f"FROM {db}.persons WHERE team_id IN {{teams:Array(Int64)}} GROUP BY team_id, id",
            parameters=q).result_rows:
        pid, team, props, ident, created, version, deleted = row
        t.persons[(team, pid)] = {"id": pid, "team_id": team, "properties": orjson.loads(props),
                                  "is_identified": ident, "created_at": created, "version": version,
                                  "is_deleted": deleted}
    for team, did, pid, version, deleted in clickhouse.query(
            f"SELECT team_id, distinct_id, toString(argMax(person_id, version)), max(version), argMax(is_deleted, version) "
            f"FROM {db}.person_distinct_ids WHERE team_id IN {{teams:Array(Int64)}} GROUP BY team_id, distinct_id",
            parameters=q).result_rows:
        t.distinct_ids[(team, did)] = {"team_id": team, "distinct_id": did, "person_id": pid, "version": version,
                                       "is_deleted": deleted}
    for uid, team, did, pid, props, created, copies in clickhouse.query(
            f"SELECT toString(uuid), team_id, distinct_id, toString(any(person_id)), any(person_properties), "
            f"toUnixTimestamp64Micro(any(person_created_at)), count() "
            f"FROM {db}.events WHERE team_id IN {{teams:Array(Int64)}} GROUP BY uuid, team_id, distinct_id",
            parameters=q).result_rows:
        assert copies == 1, f"event {uid} is in ClickHouse {copies} times"
        t.events[uid] = {"person_id": pid, "distinct_id": did, "team_id": team,
                         "person_properties": orjson.loads(props), "person_created_at": created}
    t.warnings = [tuple(r) for r in clickhouse.query(
        f"SELECT team_id, type, event_uuid, distinct_id FROM {db}.ingestion_warnings "
        f"WHERE team_id IN {{teams:Array(Int64)}}", parameters=q).result_rows]
    return t


def settled_equal(clickhouse, db: str, want: Tables, timeout: float = 60) -> Tables:
    """Wait until ClickHouse shows ``want`` (person and id rows trail event rows by a sink batch)."""
    teams = {k[0] for k in want.persons} | {e["team_id"] for e in want.events.values()} | {w[0] for w in want.warnings}
    got = Tables()

    def same() -> bool:
        nonlocal got
        got = tables_from_clickhouse(clickhouse, db, teams)
        return (got.persons, got.distinct_ids, got.events, sorted(got.warnings)) == \
            (want.persons, want.distinct_ids, want.events, sorted(want.warnings))

    try:
        wait_until(same, timeout, message="ClickHouse state equals the model")
    except pytest.fail.Exception:
        assert_same_tables(got, want)  # the precise difference
        raise
    return got


def test_scenarios_fed_step_at_a_time_end_as_the_model(pipeline, settings, clickhouse) -> None:
    db = settings.clickhouse.database
    scenarios = [s.with_team_offset(10 * (i + 1)) for i, s in enumerate(PIPELINE_SCENARIOS)]
    assert len(scenarios) >= 40
    sender = Sender(settings.kafka_bootstrap, TopicNames(settings.topic_prefix))
    # all scenarios at once (they are on different teams), one step of each per round
    for step in range(max(len(s.events) for s in scenarios)):
        batch = [s.events[step] for s in scenarios if step < len(s.events)]
        sender.send(batch)
        wait_visible(clickhouse, db, [e.uuid for e in batch])
    want = Tables()
    for s in scenarios:
        model = PersonsModel(opted_out_teams=s.opted_out_teams)
        part = tables_from_model(model, [model.process(e) for e in s.events], s.events)
        want.persons.update(part.persons)
        want.distinct_ids.update(part.distinct_ids)
        want.events.update(part.events)
        want.warnings += part.warnings
    settled_equal(clickhouse, db, want)


_team_ids = itertools.count(900)
KINDS = ["$pageview", "$set", "$identify", "$create_alias", "$merge_dangerously", "personless"]


@st.composite
def concurrent_sequences(draw) -> list[Event]:
    team = next(_team_ids)
    steps = draw(st.lists(st.tuples(st.integers(0, 7), st.sampled_from(KINDS), st.integers(0, 7),
                                    st.sampled_from([None, 1, 2, "x"])), min_size=5, max_size=40))
    events = []
    for i, (a, kind, b, value) in enumerate(steps):
        props: dict = {} if value is None else {"$set": {"k": value}}
        name = kind
        if kind == "$identify":
            props["$anon_distinct_id"] = f"d{b}"
        elif kind in ("$create_alias", "$merge_dangerously"):
            props["alias"] = f"d{b}"
        elif kind == "personless":
            name, props = "$pageview", {"$process_person_profile": False}
        events.append(Event(team, f"d{a}", name, str(uuid.uuid4()), BASE_TS + timedelta(seconds=i), props))
    return events


@pytest.fixture
def two_workers(pipeline):
    pipeline.start("identity-1", "worker", "identity", "--worker-id", "1")
    return pipeline


@hsettings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=concurrent_sequences())
def test_concurrent_sequences_with_two_workers_keep_the_invariants(two_workers, settings, clickhouse, events) -> None:
    db = settings.clickhouse.database
    Sender(settings.kafka_bootstrap, TopicNames(settings.topic_prefix)).send(events)  # all at once
    wait_visible(clickhouse, db, [e.uuid for e in events], timeout=90)
    team = events[0].team_id
    dids = {e.distinct_id for e in events if e.properties.get("$process_person_profile") is not False}

    def settled() -> bool:
        t = tables_from_clickhouse(clickhouse, db, {team})
        try:
            check_invariants(t)
        except AssertionError:
            return False
        return dids <= {d for (_, d) in t.distinct_ids}

    wait_until(settled, 60, message="invariants after the sink caught up")
    tables = tables_from_clickhouse(clickhouse, db, {team})
    check_invariants(tables)
    assert {e.uuid for e in events} == set(tables.events), "every event is one row"
    # merges allowed by the rules are never lost: ids named together by a merge that was not
    # refused end on one person
    refused = {w[2] for w in tables.warnings if w[1] == "cannot_merge_already_identified"}
    for e in events:
        other = e.properties.get("$anon_distinct_id") or e.properties.get("alias")
        if other and e.uuid not in refused:
            a, b = tables.distinct_ids[(team, e.distinct_id)], tables.distinct_ids[(team, other)]
            assert a["person_id"] == b["person_id"], f"merge of {other} into {e.distinct_id} lost"


def merge_stream(team: int, users: int) -> tuple[list[Event], list[Event]]:
    """Phase 1: anonymous and some known users browse. Phase 2: every user identifies (a stream
    of merges of every kind: into a new id, into an existing person) and sets a property."""
    first, second = [], []
    for k in range(users):
        first.append(pv(f"anon{k}", {"$set_once": {"first_url": f"/u{k}"}}, k, team))
        if k % 2 == 0:
            first.append(pv(f"user{k}", {"$set": {"plan": "free"}}, k, team))
    for k in range(users):
        second.append(identify(f"user{k}", f"anon{k}", {"$set": {"email": f"u{k}@x.io"}}, 1000 + k, team))
        second.append(pv(f"user{k}", {"$set": {"plan": "pro"}}, 2000 + k, team))
    for events, tag in ((first, "a"), (second, "b")):
        for i, e in enumerate(events):
            e.uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"kill-{team}-{tag}{i}"))
    return first, second


def test_kill_9_of_a_worker_mid_merges_then_restart_ends_as_without_the_crash(two_workers, settings, clickhouse) -> None:
    db = settings.clickhouse.database
    team = 960
    first, second = merge_stream(team, users=150)
    sender = Sender(settings.kafka_bootstrap, TopicNames(settings.topic_prefix))
    sender.send(first)
    wait_visible(clickhouse, db, [e.uuid for e in first], timeout=90)
    sender.send(second[: len(second) // 3])
    time.sleep(0.3)
    victim = two_workers.processes["identity-0"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    sender.send(second[len(second) // 3:])
    time.sleep(1.5)
    two_workers.start("identity-0", "worker", "identity", "--worker-id", "0")
    wait_visible(clickhouse, db, [e.uuid for e in second], timeout=120)
    model = PersonsModel()
    events = first + second
    settled_equal(clickhouse, db, tables_from_model(model, [model.process(e) for e in events], events), timeout=90)
