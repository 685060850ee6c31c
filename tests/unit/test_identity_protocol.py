"""The identity stage's merge protocol over several partitions, without a broker (ADR 0001).

Step at a time, every scenario must end exactly where the reference model ends; with all events
in flight at once and partitions scheduled at random, the invariants must hold and the result
must equal the model run over *some* serial order (checked through what does not depend on it).
"""

from __future__ import annotations

import random

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
from tests.reference.scenarios import Scenario
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
