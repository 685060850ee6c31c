"""The identity stage's merge protocol over several partitions, without a broker (ADR 0001).

Step at a time, every scenario must end exactly where the reference model ends; with all events
in flight at once and partitions scheduled at random, the invariants must hold and the result
must equal the model run over *some* serial order (checked through what does not depend on it).
"""

from __future__ import annotations

import dataclasses
import random
import uuid

import orjson
import pytest

from processors.identity.homes import kafka_partition
from tests.identity_harness import (
    PIPELINE_SCENARIOS,
    LocalCluster,
    assert_same_tables,
    check_invariants,
    raw_envelope,
    tables_from_model,
    teams_of,
)
from tests.reference.persons_model import PersonsModel
from tests.reference.scenarios import Scenario, ev, identify, pv
from tests.reference.test_persons_model import random_events

def test_at_least_forty_scenarios_run_through_the_stage() -> None:
    assert len(PIPELINE_SCENARIOS) >= 40


@pytest.mark.parametrize("scenario", PIPELINE_SCENARIOS, ids=lambda s: s.name)
def test_step_at_a_time_equals_the_model(scenario: Scenario) -> None:
    cluster = LocalCluster(teams_of(scenario.events), partitions=4, personless_teams=scenario.opted_out_teams)
    for event in scenario.events:
        cluster.send(event)
        cluster.run()
    model = PersonsModel(opted_out_teams=scenario.opted_out_teams)
    results = [model.process(e) for e in scenario.events]
    assert_same_tables(cluster.tables(), tables_from_model(model, results, scenario.events))


def test_a_misrouted_event_is_forwarded_to_its_home() -> None:
    scenario = next(s for s in PIPELINE_SCENARIOS if s.name == "create_first_event_makes_anonymous_person")
    event = scenario.events[0]
    cluster = LocalCluster([event.team_id], partitions=4)
    home = kafka_partition(f"phc_team{event.team_id}:{event.distinct_id}".encode(), 4)
    cluster.send_raw((home + 1) % 4, orjson.dumps(raw_envelope(event)))
    cluster.run()
    model = PersonsModel()
    results = [model.process(event)]
    assert_same_tables(cluster.tables(), tables_from_model(model, results, [event]))
    assert len(cluster.states[home]) > 0 and len(cluster.states[(home + 1) % 4]) == 0


@pytest.mark.parametrize("seed", range(40))
def test_concurrent_random_sequences_keep_the_invariants(seed: int) -> None:
    events = random_events(seed, n=80)
    cluster = LocalCluster(teams_of(events), partitions=4)
    for event in events:
        cluster.send(event)
    cluster.run(random.Random(seed))
    tables = cluster.tables()
    check_invariants(tables)
    # no event lost: each is a row, or (personless merge events) a warning of its drop
    dropped = {w[2] for w in tables.warnings if w[1] == "invalid_event_when_process_person_profile_is_false"}
    assert {e.uuid for e in events} == set(tables.events) | dropped
    # merges allowed by the rules are never lost (and nothing splits persons): every identify or
    # alias that was neither refused nor illegal leaves its two ids on one person
    refusals = {w[2] for w in tables.warnings
                if w[1] in ("cannot_merge_already_identified", "cannot_merge_with_illegal_distinct_id")}
    for event in events:
        other = event.properties.get("$anon_distinct_id") if event.event == "$identify" else event.properties.get("alias")
        if not other or event.uuid in refusals or event.uuid in dropped:
            continue
        if event.properties.get("$process_person_profile") is not None:
            continue
        a = tables.distinct_ids.get((event.team_id, event.distinct_id))
        b = tables.distinct_ids.get((event.team_id, str(other)))
        assert a is not None and b is not None and a["person_id"] == b["person_id"], (event.distinct_id, other)


def _with_uuids(events: list, name: str) -> list:
    return [dataclasses.replace(e, uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{name}#{i}"))) for i, e in enumerate(events)]


def _keys(cluster: LocalCluster, prefix: str) -> list[str]:
    return [k.decode() for state in cluster.states for k in state._store if k.decode().startswith(prefix)]


def test_disjoint_merges_of_one_team_run_concurrently_and_equal_the_model() -> None:
    """60 visitors identify at once (a merge each, nothing shared): the merger has many in flight
    at the same time, and the result is the model's (disjoint merges commute)."""
    events = []
    for i in range(60):
        events.append(pv(f"anon-{i}", {"$set": {"seen": i}}, ts_offset_s=i))
        events.append(pv(f"user-{i}", {"$set": {"plan": "pro"}}, ts_offset_s=i) if i % 3 == 0 else
                      pv(f"anon-{i}", ts_offset_s=i + 0.5))
    for i in range(60):
        events.append(identify(f"user-{i}", f"anon-{i}", {"$set": {"email": f"u{i}@x.io"}}, ts_offset_s=100 + i))
    events = _with_uuids(events, "disjoint")
    cluster = LocalCluster([1], partitions=4)
    for event in events:
        cluster.send(event)
    most_in_flight = 0
    while any(cluster.queues):
        for p in range(cluster.partitions):
            cluster.step(p)
        most_in_flight = max(most_in_flight, len(_keys(cluster, "mf:")))
    assert most_in_flight >= 20, most_in_flight  # one at a time before (ADR 0001)
    assert _keys(cluster, "mf:") == [] and _keys(cluster, "ml:") == [] and _keys(cluster, "m:") == []
    model = PersonsModel()
    results = [model.process(e) for e in events]
    assert_same_tables(cluster.tables(), tables_from_model(model, results, events))


def _merge_heavy_events(seed: int, n: int = 150) -> list:
    """Identifies, aliases and dangerous merges over a small pool: persons shared between
    concurrent merges all the time."""
    rng = random.Random(seed)
    pool = [f"d{i}" for i in range(16)]
    events = []
    for i in range(n):
        did, other = rng.sample(pool, 2)
        kind = rng.choice(["$pageview", "$identify", "$identify", "$create_alias", "$merge_dangerously"])
        props: dict = {"$set": {"k": rng.randint(0, 3)}}
        if kind == "$identify":
            props["$anon_distinct_id"] = other
        elif kind != "$pageview":
            props["alias"] = other
        events.append(ev(did, kind, props, ts_offset_s=i))
    return _with_uuids(events, f"heavy{seed}")


@pytest.mark.parametrize("seed", range(30))
def test_concurrent_merges_sharing_persons_wait_or_ask_again_and_keep_the_invariants(seed: int) -> None:
    events = _merge_heavy_events(seed)
    cluster = LocalCluster([1], partitions=4)
    for event in events:
        cluster.send(event)
    cluster.run(random.Random(seed))
    tables = cluster.tables()
    check_invariants(tables)
    assert {e.uuid for e in events} == set(tables.events)
    refused = {w[2] for w in tables.warnings if w[1] == "cannot_merge_already_identified"}
    for event in events:  # every merge the rules allow leaves both ids on one person
        other = event.properties.get("$anon_distinct_id") or event.properties.get("alias")
        if other is None or event.uuid in refused:
            continue
        a = tables.distinct_ids[(1, event.distinct_id)]
        b = tables.distinct_ids[(1, other)]
        assert a["person_id"] == b["person_id"], (event.distinct_id, other)
    # nothing of the merger is left behind but the per-person counts
    assert _keys(cluster, "mf:") == [] and _keys(cluster, "ml:") == [] and _keys(cluster, "m:") == []
    assert all(not orjson.loads(state._store[k]).get("m") for state in cluster.states for k in state._store
               if k.startswith(b"mr:"))


@pytest.mark.parametrize("scenario", PIPELINE_SCENARIOS, ids=lambda s: s.name)
def test_inbox_messages_delivered_twice_change_nothing(scenario: Scenario) -> None:
    """Tansu delivers an aborted transaction's records to read_committed readers, then the replay
    sends the same messages again (ADR 0011): every copy after the first is dropped."""
    cluster = LocalCluster(teams_of(scenario.events), partitions=4, personless_teams=scenario.opted_out_teams)
    cluster.duplicate_inbox = True
    for event in scenario.events:
        cluster.send(event)
        cluster.run()
    model = PersonsModel(opted_out_teams=scenario.opted_out_teams)
    results = [model.process(e) for e in scenario.events]
    assert_same_tables(cluster.tables(), tables_from_model(model, results, scenario.events))


@pytest.mark.parametrize("seed", range(10))
def test_concurrent_merges_with_every_inbox_message_twice_keep_the_invariants(seed: int) -> None:
    events = _merge_heavy_events(seed)
    cluster = LocalCluster([1], partitions=4)
    cluster.duplicate_inbox = True
    for event in events:
        cluster.send(event)
    cluster.run(random.Random(seed), max_steps=20_000)
    tables = cluster.tables()
    check_invariants(tables)
    assert sorted(tables.events) == sorted(e.uuid for e in events)
    assert cluster.pipeline.counts["duplicates"] > 0
