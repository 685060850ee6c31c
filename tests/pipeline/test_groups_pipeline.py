"""Groups in the running pipeline (real Tansu, real ClickHouse, worker processes): every rule of
semantics §2 as ClickHouse shows it, concurrent first use of types from two workers, and a
restart of every worker (ADR 0004)."""

from __future__ import annotations

import signal
import uuid
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from headwater.topics import TopicNames
from tests.conftest import wait_until
from tests.identity_harness import token_of
from tests.pipeline.test_identity_pipeline import Sender, visible
from tests.reference.persons_model import Event

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
TEAMS = (301, 302, 303, 304)
TYPES = ["company", "project", "team", "org", "workspace", "sixth", "seventh"]


@pytest.fixture
def test_env(test_env: dict[str, str]) -> dict[str, str]:
    return {**test_env, "HEADWATER_TEAMS": ",".join(f"{token_of(t)}:{t}" for t in TEAMS),
            "HEADWATER_PERSONLESS_TEAMS": "304", "HEADWATER_SINK_BATCH_MS": "100"}


def us(dt: datetime) -> int:
    return int(dt.timestamp() * 1_000_000)


def ev(team: int, did: str, event: str = "$pageview", at: datetime = T0, **props) -> Event:
    return Event(team, did, event, str(uuid.uuid4()), at, props)


def gi(team: int, did: str, group_type, key, group_set=None, at: datetime = T0, **extra) -> Event:
    props = {"$group_type": group_type, "$group_key": key, **extra}
    if group_set is not None:
        props["$group_set"] = group_set
    return ev(team, did, "$groupidentify", at, **props)


class Groups:
    """What ClickHouse shows of groups, read the way the cookbook says (argMax, no FINAL)."""

    def __init__(self, clickhouse, db: str) -> None:
        self.ch, self.db = clickhouse, db

    def types(self, team: int) -> dict[str, list[int]]:
        rows = self.ch.query(f"SELECT group_type, group_type_index FROM {self.db}.group_types WHERE team_id = {{t:Int64}}",
                             parameters={"t": team}).result_rows
        out: dict[str, list[int]] = {}
        for group_type, index in rows:
            out.setdefault(group_type, []).append(index)
        return out

    def groups(self, team: int) -> dict[tuple[int, str], dict]:
        rows = self.ch.query(
            f"SELECT group_type_index, group_key, argMax(group_properties, version), "
            f"toUnixTimestamp64Micro(argMax(created_at, version)), max(version), groupArray(version) "
            f"FROM {self.db}.groups WHERE team_id = {{t:Int64}} GROUP BY group_type_index, group_key",
            parameters={"t": team}).result_rows
        return {(i, k): {"properties": orjson.loads(p), "created_at": c, "version": v, "versions": sorted(vs)}
                for i, k, p, c, v, vs in rows}

    def events(self, uuids: list[str]) -> dict[str, dict]:
        cols = ", ".join([*(f"`$group_{i}`" for i in range(5)), *(f"group{i}_properties" for i in range(5)),
                          *(f"toUnixTimestamp64Micro(group{i}_created_at)" for i in range(5))])
        rows = self.ch.query(f"SELECT toString(uuid), properties, {cols} FROM {self.db}.events "
                             f"WHERE uuid IN {{u:Array(UUID)}}", parameters={"u": uuids}).result_rows
        out = {}
        for uid, props, *values in rows:
            keys, gprops, created = values[:5], values[5:10], values[10:]
            out[uid] = {"properties": orjson.loads(props), "keys": keys,
                        "group_properties": [orjson.loads(p) if p else None for p in gprops], "created_at": created}
        return out

    def warnings(self, team: int, kind: str) -> list[tuple[str, str, str]]:
        return [tuple(r) for r in self.ch.query(
            f"SELECT event_uuid, distinct_id, details FROM {self.db}.ingestion_warnings "
            f"WHERE team_id = {{t:Int64}} AND type = {{k:String}}", parameters={"t": team, "k": kind}).result_rows]


def send_and_wait(sender: Sender, clickhouse, db: str, events: list[Event], timeout: float = 60) -> None:
    sender.send(events)
    uuids = [e.uuid for e in events]
    wait_until(lambda: visible(clickhouse, db, uuids) == set(uuids), timeout, message=f"{len(uuids)} events visible")


def test_every_group_rule_end_to_end(pipeline, settings, clickhouse) -> None:
    db, team = settings.clickhouse.database, 301
    sender = Sender(settings.kafka_bootstrap, TopicNames(settings.topic_prefix))
    g = Groups(clickhouse, db)
    later = T0 + timedelta(hours=1)
    steps = [
        [gi(team, "u1", "company", "acme", {"name": "Acme", "seats": 5}, at=later)],
        [gi(team, "u2", "company", "acme", {"name": "Acme", "seats": "5"})],           # loosely equal: no write
        [gi(team, "u1", "company", "acme", {"plan": "pro"}, at=T0)],                  # v2, created_at moves back
        [gi(team, "u3", "project", 42, {"title": "Answer"})],                         # numeric key -> "42"
        [gi(team, "u3", "team", None, {"ignored": True})],                             # no key: type only
        [ev(team, "u4", "login", **{"$groups": {"company": "acme", "project": 42}})],
        [ev(team, "u5", "login", **{"$groups": {"company": "never-identified"}})],
        [ev(team, "u6", "a", **{"$groups": {"org": "o"}}), ev(team, "u7", "b", **{"$groups": {"workspace": "w"}})],
        [ev(team, "u8", "c", **{"$groups": {"sixth": "s", "company": "acme"}})],        # 6th type: ignored, warned
        [ev(team, "u9", "d", **{"$groups": {"sixth": "s2"}})],                          # not warned again
        [ev(team, "anon", "e", **{"$process_person_profile": False, "$groups": {"company": "acme"}}),
         ev(304, "u1", "f", **{"$groups": {"company": "acme"}}),                         # personless team
         gi(team, "anon", "company", "acme", {"name": "Evil"}, **{"$process_person_profile": False})],
    ]
    for step in steps:
        sender.send(step)
        wanted = [e.uuid for e in step if not (e.event == "$groupidentify" and e.distinct_id == "anon")]
        wait_until(lambda: visible(clickhouse, db, wanted) == set(wanted), 60, message=f"step {step[0].event}")

    types = g.types(team)
    assert types == {"company": [0], "project": [1], "team": [2], "org": [3], "workspace": [4]}
    wait_until(lambda: len(g.groups(team)) == 2, 30, message="two groups")
    groups = g.groups(team)
    assert groups[(0, "acme")] == {"properties": {"name": "Acme", "seats": 5, "plan": "pro"}, "created_at": us(T0),
                                   "version": 2, "versions": [1, 2]}
    assert groups[(1, "42")]["properties"] == {"title": "Answer"} and groups[(1, "42")]["version"] == 1

    events = g.events([e.uuid for step in steps for e in step])
    u4 = events[steps[5][0].uuid]
    assert u4["keys"] == ["acme", "42", "", "", ""]
    assert u4["properties"]["$group_0"] == "acme" and u4["properties"]["$group_1"] == "42"
    assert u4["group_properties"][:2] == [{"name": "Acme", "seats": 5, "plan": "pro"}, {"title": "Answer"}]
    assert u4["created_at"][:3] == [us(T0), us(T0), 0]
    assert events[steps[6][0].uuid]["keys"][0] == "never-identified"
    assert events[steps[6][0].uuid]["group_properties"][0] == {}
    assert events[steps[7][0].uuid]["keys"][3] == "o" and events[steps[7][1].uuid]["keys"][4] == "w"
    assert events[steps[8][0].uuid]["keys"] == ["acme", "", "", "", ""]
    assert events[steps[9][0].uuid]["keys"] == ["", "", "", "", ""]
    personless, other_team = events[steps[10][0].uuid], events[steps[10][1].uuid]
    for row in (personless, other_team):
        assert row["keys"] == ["", "", "", "", ""] and "$group_0" not in row["properties"]
    assert g.types(304) == {}
    assert g.groups(team)[(0, "acme")]["properties"]["name"] == "Acme"  # the personless update changed nothing
    limit = g.warnings(team, "group_type_limit_reached")
    assert [(u, d) for u, d, _ in limit] == [(steps[8][0].uuid, "u8")]
    assert orjson.loads(limit[0][2])["groupType"] == "sixth"
    dropped = g.warnings(team, "invalid_event_when_process_person_profile_is_false")
    assert [u for u, _, _ in dropped] == [steps[10][2].uuid]


def test_concurrent_first_use_from_two_workers_gives_each_type_one_index(pipeline, settings, clickhouse) -> None:
    pipeline.start("identity-1", "worker", "identity", "--worker-id", "1")
    db, team = settings.clickhouse.database, 302
    sender = Sender(settings.kafka_bootstrap, TopicNames(settings.topic_prefix))
    g = Groups(clickhouse, db)
    # 7 types first named at once by 60 distinct ids spread over every partition, 3 events each
    events = [ev(team, f"user-{i}", f"e{j}", at=T0 + timedelta(seconds=j),
                 **{"$groups": {TYPES[(i + j) % 7]: f"k{i % 5}", TYPES[(i * 3 + j + 1) % 7]: f"k{j}"}})
              for i in range(60) for j in range(3)]
    send_and_wait(sender, clickhouse, db, events, timeout=90)
    types = g.types(team)
    assert all(len(indexes) == 1 for indexes in types.values()), types
    assert sorted(i for (i,) in types.values()) == [0, 1, 2, 3, 4]
    rows = g.events([e.uuid for e in events])
    for e in events:
        for group_type, key in e.properties["$groups"].items():
            if group_type in types:
                assert rows[e.uuid]["keys"][types[group_type][0]] == key, (e.distinct_id, group_type)
    refused = {orjson.loads(d)["groupType"] for _, _, d in g.warnings(team, "group_type_limit_reached")}
    assert len(g.warnings(team, "group_type_limit_reached")) == 2 and refused == set(TYPES) - set(types)


def test_restarting_every_worker_keeps_group_types_and_properties(pipeline, settings, clickhouse) -> None:
    pipeline.start("identity-1", "worker", "identity", "--worker-id", "1")
    db, team = settings.clickhouse.database, 303
    sender = Sender(settings.kafka_bootstrap, TopicNames(settings.topic_prefix))
    g = Groups(clickhouse, db)
    before = [gi(team, f"admin-{k}", "company", f"c{k}", {"name": f"C{k}", "tier": k % 3}) for k in range(12)]
    before += [gi(team, "admin-p", "project", "p1", {"title": "P"})]
    send_and_wait(sender, clickhouse, db, before)
    wait_until(lambda: len(g.groups(team)) == 13, 30, message="13 groups")
    for name in ("identity-0", "identity-1"):  # every worker dies at once, state and tables with them
        pipeline.processes[name].send_signal(signal.SIGKILL)
        pipeline.processes[name].wait(10)
    pipeline.start("identity-0", "worker", "identity", "--worker-id", "0")
    pipeline.start("identity-1", "worker", "identity", "--worker-id", "1")

    after = [ev(team, f"new-{k}", "login", **{"$groups": {"company": f"c{k}", "project": "p1"}}) for k in range(12)]
    after += [ev(team, "new-x", "x", **{"$groups": {"team": "t1"}})]
    send_and_wait(sender, clickhouse, db, after, timeout=90)
    send_and_wait(sender, clickhouse, db, [gi(team, "admin-0", "company", "c0", {"tier": 9})])
    assert g.types(team) == {"company": [0], "project": [1], "team": [2]}
    rows = g.events([e.uuid for e in after])
    for k, e in enumerate(after[:12]):
        assert rows[e.uuid]["keys"][:2] == [f"c{k}", "p1"]
        assert rows[e.uuid]["group_properties"][0] == {"name": f"C{k}", "tier": k % 3}, e.distinct_id
        assert rows[e.uuid]["group_properties"][1] == {"title": "P"}
    assert rows[after[12].uuid]["keys"][2] == "t1"
    wait_until(lambda: g.groups(team)[(0, "c0")]["version"] == 2, 30, message="c0 at version 2")
    assert g.groups(team)[(0, "c0")]["properties"] == {"name": "C0", "tier": 9}
