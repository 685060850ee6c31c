"""The reference model of person identity (semantics §1) against hand-written scenarios, plus
invariants over random sequences. Pure and fast: no broker, no ClickHouse."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from tests.reference.persons_model import (
    BARE_CASE_INSENSITIVE_ILLEGAL_IDS,
    BARE_CASE_SENSITIVE_ILLEGAL_IDS,
    FILTERED_PERSON_UPDATE_PROPERTIES,
    NAMESPACE,
    PERSONLESS_CREATED_AT,
    Event,
    PersonsModel,
    add_initial_and_campaign_properties,
    is_distinct_id_illegal,
    js_differs,
    js_string,
    js_truthy,
    person_uuid,
)
from tests.reference.scenarios import BASE_TS, PERSONLESS, SCENARIOS, Scenario, ev, identify, pv, resolve_uuids


def run(scenario: Scenario) -> tuple[PersonsModel, list]:
    model = PersonsModel(opted_out_teams=scenario.opted_out_teams)
    return model, [model.process(e) for e in scenario.events]


def check(scenario: Scenario) -> None:
    model, results = run(scenario)
    x, events = scenario.expect, scenario.events

    live = model.live_persons()
    expected = {(p.team_id, person_uuid(p.team_id, p.owner)): p for p in x.persons}
    assert set(live) == set(expected), "live persons"
    for key, p in expected.items():
        row = live[key]
        assert row.properties == resolve_uuids(p.properties, events), f"properties of {p.owner}"
        assert (row.is_identified, row.version) == (p.is_identified, p.version), f"is_identified/version of {p.owner}"
        assert row.created_at == BASE_TS + timedelta(seconds=p.created_at_s), f"created_at of {p.owner}"

    expected_ids = {(p.team_id, did): (person_uuid(p.team_id, p.owner), version)
                    for p in x.persons for did, version in p.distinct_ids.items()}
    rows = model.distinct_ids()
    assert {k: (r.person_id, r.version) for k, r in rows.items()} == expected_ids, "person_distinct_ids"
    assert not any(r.is_deleted for r in rows.values())
    assert set(model.person_overrides()) == {k for k, (_, v) in expected_ids.items() if v > 0}, "person_overrides"

    deleted = {(r.team_id, r.id): r.version for r in model.persons() if r.is_deleted}
    assert deleted == {(d.team_id, person_uuid(d.team_id, d.owner)): d.version for d in x.deleted}, "deleted"

    got = [(w.type, w.team_id, w.distinct_id) for w in model.warnings]
    assert got == [(w.type, w.team_id, w.distinct_id) for w in x.warnings], "warnings"
    for warning, want in zip(model.warnings, x.warnings):
        for key, value in want.details.items():
            assert warning.details[key] == value, f"{want.type} details[{key}]"
        if want.event is not None:
            assert warning.event_uuid == events[want.event].uuid

    assert {i for i, r in enumerate(results) if r.dropped} == {i for i, e in x.events.items() if e.dropped}
    for i, want in x.events.items():
        result, event = results[i], events[i]
        assert result.uuid == event.uuid
        assert (result.dropped, result.drop_reason, result.person_mode) == (want.dropped, want.drop_reason, want.mode)
        if want.person is not None:
            assert result.person_id == person_uuid(event.team_id, want.person), f"person of event {i}"
        if want.properties is not None:
            assert result.person_properties == resolve_uuids(want.properties, events), f"person_properties of {i}"
        if want.created_at_s == PERSONLESS:
            assert result.person_created_at == PERSONLESS_CREATED_AT
        elif want.created_at_s is not None:
            assert result.person_created_at == BASE_TS + timedelta(seconds=want.created_at_s)
    if x.personless is not None:
        assert model.personless_distinct_ids() == x.personless


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_scenario(scenario: Scenario) -> None:
    check(scenario)


@pytest.mark.parametrize("scenario", SCENARIOS[::7], ids=lambda s: s.name)
def test_scenarios_survive_a_team_offset(scenario: Scenario) -> None:
    moved = scenario.with_team_offset(100)
    assert {e.uuid for e in moved.events}.isdisjoint({e.uuid for e in scenario.events})
    check(moved)


def test_scenarios_are_many_and_uniquely_named() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(names) >= 40 and len(set(names)) == len(names)
    assert len({e.uuid for s in SCENARIOS for e in s.events}) == sum(len(s.events) for s in SCENARIOS)


def test_rejected_creation_keeps_event_without_person_created_at() -> None:
    (scenario,) = [s for s in SCENARIOS if s.name == "oversized_creation_is_rejected_and_event_kept"]
    _, results = run(scenario)
    assert results[0].person_created_at is None and results[0].person_id == person_uuid(1, "u")


# ---- §1.4 illegal ids ---------------------------------------------------------------------------

ILLEGAL_EXAMPLES = ["Anonymous", "GUEST", '"email"', "'0'", "NaN", "None", "none", "null", "UNDEFINED",
                    "[object Object]", "", "   ", "\t", "'anonymous'", '"NaN"', "DISTINCT_ID", "Not_Authenticated",
                    "'TRUE'", "\"False\"", "id", "Id"]
LEGAL_EXAMPLES = ["nan", "NULL", "NONE", "Null", "00", " guest", "guest ", "'nan'", "[object object]", "0.0",
                  "anonymous1", "user@example.com"]


@pytest.mark.parametrize("distinct_id", ILLEGAL_EXAMPLES)
def test_illegal_distinct_ids(distinct_id: str) -> None:
    assert is_distinct_id_illegal(distinct_id)


@pytest.mark.parametrize("distinct_id", LEGAL_EXAMPLES)
def test_legal_distinct_ids(distinct_id: str) -> None:
    assert not is_distinct_id_illegal(distinct_id)


def test_every_listed_id_and_its_quoted_variants_are_illegal() -> None:
    for bare in BARE_CASE_INSENSITIVE_ILLEGAL_IDS:
        for variant in (bare, bare.upper(), f"'{bare.upper()}'", f'"{bare.title()}"'):
            assert is_distinct_id_illegal(variant), variant
    for bare in BARE_CASE_SENSITIVE_ILLEGAL_IDS:
        for variant in (bare, f"'{bare}'", f'"{bare}"'):
            assert is_distinct_id_illegal(variant), variant


# ---- JS value semantics and constants -----------------------------------------------------------


@pytest.mark.parametrize("old,new,differs", [
    (1, 1, False), (1, 1.0, False), (1, "1", True), (1, True, True), (True, True, False), (None, None, False),
    (None, False, True), ("a", "a", False), ({}, {}, True), ([1], [1], True), (float("nan"), float("nan"), True),
    (0, False, True), ("", None, True),
])
def test_js_strict_inequality(old, new, differs) -> None:
    assert js_differs(old, new) is differs


@pytest.mark.parametrize("value,text,truthy", [
    ("abc", "abc", True), ("", "", False), (42, "42", True), (0, "0", False), (1.0, "1", True), (1.5, "1.5", True),
    (True, "true", True), (False, "false", False), (None, "null", False), ([], "", True),
    (["a", None, 1], "a,,1", True),
    ({}, "[object Object]", True), (float("nan"), "NaN", False),
])
def test_js_string_and_truthiness(value, text, truthy) -> None:
    assert js_string(value) == text
    assert js_truthy(value) is truthy


def test_filtered_properties_are_exactly_posthogs_list() -> None:
    assert len(FILTERED_PERSON_UPDATE_PROPERTIES) == 31  # 4 url + 4 screen + 7 device + 16 geoip
    assert {"$geoip_country_name", "$geoip_city_name", "utm_source", "$app_version"}.isdisjoint(
        FILTERED_PERSON_UPDATE_PROPERTIES)
    assert {"$current_url", "$os_name", "$raw_user_agent", "$geoip_subdivision_3_name",
            "$geoip_subdivision_2_confidence"} <= FILTERED_PERSON_UPDATE_PROPERTIES


@pytest.mark.parametrize("key,initial", [
    ("$browser", "$initial_browser"), ("utm_source", "$initial_utm_source"), ("$referrer", "$initial_referrer"),
    ("$referring_domain", "$initial_referring_domain"), ("$current_url", "$initial_current_url"),
    ("$pathname", "$initial_pathname"), ("gclid", "$initial_gclid"), ("_kx", "$initial__kx"),
    ("$raw_user_agent", "$initial_raw_user_agent"),
])
def test_initial_property_names(key: str, initial: str) -> None:
    props = {key: "v"}
    add_initial_and_campaign_properties(props)
    assert props["$set"] == {key: "v"} and props["$set_once"] == {initial: "v"}


def test_non_object_set_is_replaced_by_an_empty_object() -> None:
    props = {"$browser": "b", "$set": "oops", "$set_once": ["x"]}
    add_initial_and_campaign_properties(props)
    assert props["$set"] == {"$browser": "b"} and props["$set_once"] == {"$initial_browser": "b"}


def test_person_uuid_is_uuid5_of_team_and_distinct_id() -> None:
    assert person_uuid(1, "anon") == str(uuid.uuid5(uuid.UUID("932979b4-65c3-4424-8467-0b66ec27bc22"), "1:anon"))
    assert NAMESPACE == uuid.UUID("932979b4-65c3-4424-8467-0b66ec27bc22")


# ---- last_seen_at and the tables' shape -----------------------------------------------------------


def test_last_seen_at_is_tracked_but_never_bumps_the_version() -> None:
    model = PersonsModel()
    for offset in (0, 125 * 60, 30, 5 * 3600 + 59):
        model.process(ev("u", "$pageview", None, offset))
    model.process(ev("u", "$pageview", {"$update_person_last_seen_at": False}, 9 * 3600))
    (row,) = model.live_persons().values()
    assert row.version == 0
    assert row.last_seen_at == datetime(2024, 1, 1, 17, 0, tzinfo=timezone.utc)


def test_persons_lists_deleted_rows_and_live_persons_does_not() -> None:
    model = PersonsModel()
    for event in (pv("anon"), pv("user", None, 5), identify("user", "anon", None, 10)):
        model.process(event)
    rows = {r.id: r for r in model.persons()}
    assert rows[person_uuid(1, "anon")].is_deleted and rows[person_uuid(1, "anon")].version == 100
    assert list(model.live_persons()) == [(1, person_uuid(1, "user"))]
    assert model.person_of(1, "anon") == person_uuid(1, "user") and model.person_of(1, "nobody") is None


def test_model_uses_event_timestamps_only() -> None:
    old = Event(1, "u", "$pageview", str(uuid.uuid4()), datetime(2001, 2, 3, 4, 5, 6, tzinfo=timezone.utc), {})
    model = PersonsModel()
    result = model.process(old)
    assert result.person_created_at == old.timestamp
    assert model.live_persons()[(1, person_uuid(1, "u"))].created_at == old.timestamp


# ---- invariants over random sequences --------------------------------------------------------------

EVENT_KINDS = ["$pageview", "$pageview", "$set", "$identify", "$create_alias", "$merge_dangerously",
               "personless", "$exception", "$groupidentify", "bad_ppp"]


def random_events(seed: int, n: int = 120) -> list[Event]:
    rng = random.Random(seed)
    pool = [f"d{i}" for i in range(10)] + ["anonymous", " x"]
    events, ts = [], 0.0
    for i in range(n):
        ts += rng.choice([0, 1, 30, 61, 3600])
        team, did, kind = rng.choice([1, 1, 1, 2]), rng.choice(pool), rng.choice(EVENT_KINDS)
        props: dict = {}
        if rng.random() < 0.5:
            props["$set"] = {rng.choice("abc"): rng.choice([1, 2, "x", None, [1], {"k": 1}])}
        if rng.random() < 0.3:
            props["$set_once"] = {rng.choice("abc"): rng.randint(0, 3)}
        if rng.random() < 0.15:
            props["$unset"] = [rng.choice("abc")]
        if rng.random() < 0.3:
            props["$current_url"] = rng.choice(["/a", "/b"])
        name = kind
        if kind == "personless":
            name, props["$process_person_profile"] = rng.choice(["$pageview", "$identify"]), False
        elif kind == "bad_ppp":
            name, props["$process_person_profile"] = "$pageview", "no"
        elif kind == "$identify":
            props["$anon_distinct_id"] = rng.choice(pool)
        elif kind in ("$create_alias", "$merge_dangerously"):
            props["alias"] = rng.choice(pool + [""])
        events.append(Event(team, did, name, str(uuid.UUID(int=rng.getrandbits(128))),
                            BASE_TS + timedelta(seconds=ts), props))
    return events


def snapshot(model: PersonsModel) -> tuple[dict, dict]:
    return ({(r.team_id, r.id): r.version for r in model.persons()},
            {k: r.version for k, r in model.distinct_ids().items()})


@pytest.mark.parametrize("seed", range(25))
def test_random_sequences_keep_the_invariants(seed: int) -> None:
    model = PersonsModel()
    versions, id_versions = {}, {}
    for event in random_events(seed):
        result = model.process(event)
        live = model.live_persons()
        rows = model.distinct_ids()
        # every distinct id maps to exactly one live person; deleted persons own no distinct id
        owners: dict[tuple[int, str], set[str]] = {}
        for (team, did), row in rows.items():
            assert (team, row.person_id) in live, f"{did} points at a dead or missing person"
            owners.setdefault((team, row.person_id), set()).add(did)
        assert set(owners) == set(live), "a live person without distinct ids"
        # versions never decrease
        new_versions, new_id_versions = snapshot(model)
        for key, version in versions.items():
            assert new_versions[key] >= version
        for key, version in id_versions.items():
            assert new_id_versions[key] >= version
        versions, id_versions = new_versions, new_id_versions
        assert set(model.person_overrides()) == {k for k, v in new_id_versions.items() if v > 0}
        # the event row's person is the distinct id's person (full mode)
        if not result.dropped and result.person_mode == "full" and result.person_created_at is not None:
            assert result.person_id == model.person_of(event.team_id, event.distinct_id)
        if result.person_mode == "propertyless" and not result.dropped:
            assert result.person_properties == {}
            owner = model.person_of(event.team_id, event.distinct_id)
            assert result.person_id == (owner or person_uuid(event.team_id, event.distinct_id))
    assert {w.type for w in model.warnings} <= {
        "cannot_merge_with_illegal_distinct_id", "cannot_merge_already_identified",
        "invalid_event_when_process_person_profile_is_false", "invalid_process_person_profile"}


@pytest.mark.parametrize("seed", range(5))
def test_model_is_deterministic(seed: int) -> None:
    a, b = PersonsModel(), PersonsModel()
    results_a = [a.process(e) for e in random_events(seed)]
    results_b = [b.process(e) for e in random_events(seed)]
    assert results_a == results_b
    assert a.persons() == b.persons() and a.distinct_ids() == b.distinct_ids() and a.warnings == b.warnings
