"""Groups (semantics §2, ADR 0004): the pure steps, then the identity stage over several
partitions and workers without a broker (``LocalCluster``), in order and at random."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from processors.identity.rules import js_loose_equals
from processors.identity.steps.groups import assign_types, group_identify_of, named_groups, update_group
from tests.identity_harness import LocalCluster, check_invariants, group_tables_from_records, tables_from_records
from tests.reference.persons_model import Event

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
NOW_US = 1_793_600_000_000 * 1000  # the harness' broker timestamp, later than every event here


def us(dt: datetime) -> int:
    return int(dt.timestamp() * 1_000_000)


def ev(did: str, event: str = "$pageview", team: int = 1, at: datetime = T0, **props) -> Event:
    return Event(team, did, event, str(uuid.uuid4()), at, props)


def group_identify(did: str, group_type, key, group_set=None, team: int = 1, at: datetime = T0, **extra) -> Event:
    props = {"$group_type": group_type, "$group_key": key, **extra}
    if group_set is not None:
        props["$group_set"] = group_set
    return ev(did, "$groupidentify", team, at, **props)


def run(events: list[Event], *, partitions: int = 4, workers: int = 1, rng=None, step_at_a_time=True,
        personless_teams=(), feed_while_running=True) -> LocalCluster:
    cluster = LocalCluster(sorted({e.team_id for e in events}), partitions=partitions, workers=workers,
                           personless_teams=personless_teams)
    cluster.feed_while_running = feed_while_running
    for e in events:
        cluster.send(e)
        if step_at_a_time:
            cluster.run(rng)
    cluster.run(rng)
    return cluster


# -- pure steps ---------------------------------------------------------------------------------
def test_loose_equality_is_javascripts_for_scalars_and_by_value_for_objects() -> None:
    assert js_loose_equals(1, "1") and js_loose_equals("1.0", 1) and js_loose_equals(True, 1)
    assert js_loose_equals("", 0) and js_loose_equals(" 2 ", 2) and js_loose_equals(None, None)
    assert not js_loose_equals("true", True) and not js_loose_equals(None, 0) and not js_loose_equals("a", "b")
    assert not js_loose_equals("1_0", 10) and not js_loose_equals("nan", float("nan"))
    assert js_loose_equals({"a": [1]}, {"a": [1]}) and not js_loose_equals({"a": 1}, {"a": 2})
    assert not js_loose_equals([1], 1)


def test_a_new_group_is_version_1_created_at_the_earlier_of_now_and_the_event() -> None:
    assert update_group(None, {"a": 1}, timestamp_us=50, now_us=100) == {"props": {"a": 1}, "created": 50, "v": 1}
    assert update_group(None, {}, timestamp_us=500, now_us=100) == {"props": {}, "created": 100, "v": 1}


def test_an_update_is_a_shallow_merge_bumping_the_version_only_on_change() -> None:
    g = {"props": {"a": 1, "n": {"x": 1}}, "created": 100, "v": 3}
    assert update_group(g, {"a": "1", "n": {"x": 1}}, timestamp_us=10, now_us=1_000) is None
    changed = update_group(g, {"b": 2, "n": {"x": 2}}, timestamp_us=10, now_us=1_000)
    assert changed == {"props": {"a": 1, "n": {"x": 2}, "b": 2}, "created": 10, "v": 4}
    assert update_group(g, {"b": 2}, timestamp_us=500, now_us=1_000)["created"] == 100


def test_types_take_the_smallest_free_index_and_a_sixth_is_refused_once() -> None:
    registry: dict = {}
    assert assign_types(registry, ["a", "b", "a"]) == ({"a": 0, "b": 1}, [])
    assert assign_types(registry, ["c", "d", "e", "f", "g"]) == ({"c": 2, "d": 3, "e": 4}, ["f", "g"])
    assert assign_types(registry, ["f", "a", "h"]) == ({}, ["h"])
    assert registry == {"types": {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}, "refused": ["f", "g", "h"]}


def test_groupidentify_needs_a_type_and_a_key_to_update_and_a_set_to_register_without_key() -> None:
    assert group_identify_of({"$group_type": "company", "$group_key": 42, "$group_set": {"a": 1}}).group_key == "42"
    assert group_identify_of({"$group_type": "company", "$group_key": 4.0}).group_set == {}
    only_type = group_identify_of({"$group_type": "company", "$group_set": {"a": 1}})
    assert only_type is not None and only_type.group_key is None
    assert group_identify_of({"$group_type": "company"}) is None
    assert group_identify_of({"$group_type": "", "$group_key": "k", "$group_set": {}}) is None
    assert group_identify_of({"$group_type": "company", "$group_key": 0, "$group_set": {}}).group_key is None


def test_named_groups_stringify_numeric_keys_and_warn_about_unusable_ones() -> None:
    pairs, warnings = named_groups({"$groups": {"company": 7, "project": "p", "team": None, "org": {"x": 1}}})
    assert pairs == [("company", "7"), ("project", "p")]
    assert [w.type for w in warnings] == ["invalid_group_key", "invalid_group_key"]
    assert named_groups({"$groups": "acme"})[1][0].type == "invalid_groups"
    assert named_groups({}) == ([], [])


# -- the stage ----------------------------------------------------------------------------------
def test_groupidentify_updates_the_group_and_versions_only_on_change() -> None:
    events = [
        group_identify("u1", "company", "acme", {"name": "Acme", "seats": 5}, at=T0),
        group_identify("u2", "company", "acme", {"name": "Acme", "seats": "5"}, at=T0 - timedelta(days=1)),
        group_identify("u1", "company", "acme", {"plan": "pro"}, at=T0 - timedelta(days=2)),
    ]
    cluster = run(events)
    g = group_tables_from_records(cluster.records)
    assert g.types == {(1, "company"): 0}
    assert [v for *_, v in g.group_versions] == [1, 2]  # the second changed nothing: no write
    row = g.groups[(1, 0, "acme")]
    assert row["group_properties"] == {"name": "Acme", "seats": 5, "plan": "pro"}
    assert row["version"] == 2 and row["created_at"] == us(T0 - timedelta(days=2))
    assert all(e["event"] == "$groupidentify" for e in g.events.values()) and len(g.events) == 3
    keys = {(r.topic, r.key) for r in cluster.records if r.topic in ("groups", "group_types")}
    assert keys == {("groups", b"1:0:acme"), ("group_types", b"1:company")}  # the compacted topics' keys


def test_events_get_group_columns_and_the_groups_current_properties() -> None:
    events = [
        group_identify("u1", "company", 42, {"name": "Acme"}),
        ev("u1", "login", **{"$groups": {"company": 42}}),
        ev("u2", "login", **{"$groups": {"company": "other"}}),
        ev("u3", "login"),
    ]
    cluster = run(events)
    g = group_tables_from_records(cluster.records)
    got = {e.distinct_id: g.events[e.uuid] for e in events[1:]}
    assert got["u1"]["$group_0"] == "42" and got["u1"]["properties"]["$group_0"] == "42"
    assert got["u1"]["group0_properties"] == {"name": "Acme"} and got["u1"]["group0_created_at"] == us(T0)
    assert got["u2"]["$group_0"] == "other" and got["u2"]["group0_properties"] == {}  # never identified
    assert got["u3"]["$group_0"] == "" and got["u3"]["group0_properties"] is None and "$group_0" not in got["u3"]["properties"]


def test_the_sixth_type_is_ignored_with_one_warning_and_the_others_still_fill() -> None:
    types = ["company", "project", "team", "org", "workspace", "sixth"]
    events = [ev(f"u{i}", "x", **{"$groups": {t: f"k-{t}"}}) for i, t in enumerate(types)]
    events += [ev("u9", "both", **{"$groups": {"sixth": "k", "project": "p1"}}),
               ev("u8", "again", **{"$groups": {"sixth": "k2"}})]
    cluster = run(events, workers=2)
    g = group_tables_from_records(cluster.records)
    assert g.types == {(1, t): i for i, t in enumerate(types[:5])}
    both = g.events[events[6].uuid]
    assert both["$group_1"] == "p1" and [both[f"$group_{i}"] for i in (0, 2, 3, 4)] == ["", "", "", ""]
    warnings = [w for w in tables_from_records(cluster.records).warnings if w[1] == "group_type_limit_reached"]
    assert warnings == [(1, "group_type_limit_reached", events[5].uuid, "u5")]


def test_groupidentify_without_a_key_registers_the_type_but_writes_no_group() -> None:
    cluster = run([group_identify("u1", "company", None, {"name": "x"}), group_identify("u1", "project", "", None)])
    g = group_tables_from_records(cluster.records)
    assert g.types == {(1, "company"): 0} and g.groups == {}


def test_personless_events_carry_no_groups_and_do_not_update_them() -> None:
    events = [
        group_identify("u1", "company", "acme", {"name": "Acme"}),
        ev("anon", "view", **{"$process_person_profile": False, "$groups": {"company": "acme"}, "$group_0": "acme"}),
        group_identify("anon", "company", "acme", {"name": "Changed"}, **{"$process_person_profile": False}),
        ev("t2", "view", team=2, **{"$groups": {"company": "acme"}}),
    ]
    cluster = run(events, personless_teams=(2,))
    g = group_tables_from_records(cluster.records)
    view = g.events[events[1].uuid]
    assert view["$group_0"] == "" and "$group_0" not in view["properties"]
    assert events[2].uuid not in g.events  # dropped with its warning (§1.8), the group unchanged
    assert g.groups[(1, 0, "acme")]["group_properties"] == {"name": "Acme"}
    assert g.events[events[3].uuid]["$group_0"] == "" and (2, "company") not in g.types


def test_an_event_after_its_distinct_ids_groupidentify_sees_the_update_at_once() -> None:
    """Even when the event arrives in the same batch as the update and nobody has read the
    groups topic yet: the answer to the distinct id's own question carries the group."""
    events = [group_identify("u1", "company", "acme", {"plan": "free"}),
              ev("u1", "a", **{"$groups": {"company": "acme"}}),
              group_identify("u1", "company", "acme", {"plan": "pro"}),
              ev("u1", "b", **{"$groups": {"company": "acme"}})]
    cluster = run(events, step_at_a_time=False, workers=2, feed_while_running=False)
    g = group_tables_from_records(cluster.records)
    assert g.events[events[1].uuid]["group0_properties"] == {"plan": "free"}
    assert g.events[events[3].uuid]["group0_properties"] == {"plan": "pro"}
    assert [u for team, did, u in g.order if did == "u1"] == [e.uuid for e in events]


@pytest.mark.parametrize("seed", range(30))
def test_concurrent_first_use_never_gives_one_type_two_indexes(seed: int) -> None:
    """Types first used at once from many distinct ids (so many partitions) and two workers,
    scheduled at random, with merges among them: each type is published once, indexes are 0..4
    without gaps, every event names the index its type got, each distinct id's events keep their
    order, and the identity invariants hold."""
    rng = random.Random(seed)
    types = [f"type{i}" for i in range(7)]
    events = []
    for i in range(60):
        named = rng.sample(types, rng.randint(1, 3))
        team = rng.choice([1, 2])
        roll = rng.random()
        if roll < 0.2:
            events.append(group_identify(f"u{i % 13}", rng.choice(types), f"k{i % 4}", {"n": i}, team=team))
        elif roll < 0.35:  # merges interleave with group questions on the same distinct ids
            events.append(ev(f"u{i % 13}", "$identify", team=team, **{"$anon_distinct_id": f"u{rng.randrange(13)}",
                                                                      "$groups": {t: f"k{i % 4}" for t in named}}))
        else:
            events.append(ev(f"u{i % 13}", "e", team=team, **{"$groups": {t: f"k{i % 4}" for t in named}}))
    cluster = run(events, partitions=5, workers=2, rng=rng, step_at_a_time=False)
    g = group_tables_from_records(cluster.records)
    assert len(g.type_records) == len(set(g.type_records)) == len(g.types)
    for team in (1, 2):
        indexes = sorted(i for (t, _), i in g.types.items() if t == team)
        assert indexes == list(range(len(indexes))) and len(indexes) <= 5
    for e in events:
        row = g.events[e.uuid]
        for group_type, key in e.properties.get("$groups", {}).items():
            index = g.types.get((e.team_id, group_type))
            if index is not None:
                assert row[f"$group_{index}"] == key, (e.uuid, group_type)
    for team in (1, 2):
        for did in {e.distinct_id for e in events if e.team_id == team}:
            sent = [e.uuid for e in events if (e.team_id, e.distinct_id) == (team, did)]
            assert [u for t, d, u in g.order if (t, d) == (team, did)] == sent
    check_invariants(tables_from_records(cluster.records))
    versions: dict = {}
    for team, index, key, version in g.group_versions:
        assert version == versions.get((team, index, key), 0) + 1  # one writer: versions never skip or repeat
        versions[(team, index, key)] = version
