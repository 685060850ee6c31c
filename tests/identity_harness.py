"""Drive the identity stage like the deployment does, and read its results as tables.

``LocalCluster`` runs ``IdentityPipeline`` over N partitions in one process: raw events land on
the partition a murmur2 producer would choose, inbox records go to the partition they name, and
a scheduler (in order, or seeded random) picks which partition processes its next batch. No
broker, so protocol interleavings can be explored by the hundred; the tests with Kafka and
ClickHouse use the same table shapes (``Tables``) to compare against the reference model.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from headwater.topics import TopicNames
from processors.identity.group_table import GroupTable
from processors.identity.homes import kafka_partition
from processors.identity.pipeline import IdentityPipeline
from processors.outputs import Record
from processors.state import PartitionState
from tests.factories import FakeMessage
from tests.reference.persons_model import Event, EventResult, PersonsModel
from tests.reference.scenarios import SCENARIOS

TOPICS = TopicNames("")


def token_of(team_id: int) -> str:
    return f"phc_team{team_id}"


def raw_envelope(event: Event) -> dict[str, Any]:
    return {"token": token_of(event.team_id), "distinct_id": event.distinct_id, "event": event.event,
            "uuid": event.uuid, "timestamp": event.timestamp.isoformat(), "properties": event.properties}


def us(dt) -> int:
    return int(round(dt.timestamp() * 1_000_000))


@dataclass
class Tables:
    """Final state in the shape of the ClickHouse tables (latest version per key)."""

    persons: dict[tuple[int, str], dict] = field(default_factory=dict)  # (team, id) -> row
    distinct_ids: dict[tuple[int, str], dict] = field(default_factory=dict)  # (team, did) -> row
    events: dict[str, dict] = field(default_factory=dict)  # uuid -> {person_id, person_properties, person_created_at}
    warnings: list[tuple[int, str, str, str]] = field(default_factory=list)  # (team, type, event uuid, did)

    def live_persons(self) -> dict[tuple[int, str], dict]:
        return {k: r for k, r in self.persons.items() if not r["is_deleted"]}

    def overrides(self) -> dict[tuple[int, str], str]:
        return {k: r["person_id"] for k, r in self.distinct_ids.items() if r["version"] > 0}


def _keep_latest(table: dict, key: Any, row: dict) -> None:
    old = table.get(key)
    if old is None or row["version"] >= old["version"]:
        table[key] = row


def tables_from_records(records: list[Record]) -> Tables:
    t = Tables()
    for r in records:
        if r.value is None:
            continue
        row = orjson.loads(r.value)
        if r.topic == TOPICS.persons:
            row = {**row, "properties": orjson.loads(row["properties"])}
            _keep_latest(t.persons, (row["team_id"], row["id"]), row)
        elif r.topic == TOPICS.person_distinct_ids:
            _keep_latest(t.distinct_ids, (row["team_id"], row["distinct_id"]), row)
        elif r.topic == TOPICS.events_enriched:
            assert row["uuid"] not in t.events, f"event {row['uuid']} written twice"
            t.events[row["uuid"]] = {"person_id": row["person_id"], "distinct_id": row["distinct_id"],
                                     "team_id": row["team_id"],
                                     "person_properties": orjson.loads(row["person_properties"]),
                                     "person_created_at": row["person_created_at"]}
        elif r.topic == TOPICS.ingestion_warnings:
            t.warnings.append((row["team_id"], row["type"], row["event_uuid"], row["distinct_id"]))
    return t


def tables_from_model(model: PersonsModel, results: list[EventResult], events: list[Event]) -> Tables:
    t = Tables()
    for p in model.persons():
        t.persons[(p.team_id, p.id)] = {"id": p.id, "team_id": p.team_id, "properties": p.properties,
                                        "is_identified": int(p.is_identified), "created_at": us(p.created_at),
                                        "version": p.version, "is_deleted": int(p.is_deleted)}
    for (team, did), r in model.distinct_ids().items():
        t.distinct_ids[(team, did)] = {"team_id": team, "distinct_id": did, "person_id": r.person_id,
                                       "version": r.version, "is_deleted": 0}
    for event, result in zip(events, results):
        if result.dropped:
            continue
        created = 0 if result.person_created_at is None else us(result.person_created_at)
        t.events[result.uuid] = {"person_id": result.person_id, "distinct_id": event.distinct_id,
                                 "team_id": event.team_id, "person_properties": result.person_properties,
                                 "person_created_at": created}
    t.warnings = [(w.team_id, w.type, w.event_uuid, w.distinct_id) for w in model.warnings]
    return t


class LocalCluster:
    """The identity stage over ``partitions`` partitions, in one process, without a broker."""

    def __init__(self, teams: list[int], partitions: int = 4, batch: int = 50,
                 max_message_bytes: int = 10_000_000, personless_teams: tuple[int, ...] = (), workers: int = 1) -> None:
        self.partitions = partitions
        self.batch = batch
        # one pipeline (and group table) per worker; partition p belongs to worker p % workers.
        # No broker here: a message may be bigger than Kafka's default (the 700 KB scenarios).
        self.pipelines = [IdentityPipeline(TOPICS, {token_of(t): t for t in teams}, partitions, max_message_bytes,
                                           frozenset(personless_teams), GroupTable(TOPICS.group_types, TOPICS.groups))
                          for _ in range(workers)]
        self.pipeline = self.pipelines[0]
        self.table_feed: list[Record] = []  # group records not yet read by the workers' group tables
        self.feed_while_running = True  # False: the group tables read the topics only once all is done
        self.states = [PartitionState() for _ in range(partitions)]
        self.queues: list[deque[FakeMessage]] = [deque() for _ in range(partitions)]
        self.offsets = [0] * partitions
        self.records: list[Record] = []
        #: deliver every inbox message twice, as Tansu does with an aborted transaction's records
        #: followed by the replay's (ADR 0011)
        self.duplicate_inbox = False

    def send(self, event: Event) -> None:
        key = f"{token_of(event.team_id)}:{event.distinct_id}".encode()
        self._enqueue(TOPICS.events_raw, kafka_partition(key, self.partitions), key, orjson.dumps(raw_envelope(event)))

    def send_raw(self, partition: int, value: bytes) -> None:
        """A message some other producer put on ``partition`` (not necessarily its home)."""
        self._enqueue(TOPICS.events_raw, partition, b"k", value)

    def _enqueue(self, topic: str, partition: int, key: bytes | None, value: bytes) -> None:
        self.queues[partition].append(FakeMessage(value, key, topic, partition, self.offsets[partition]))
        self.offsets[partition] += 1

    def step(self, partition: int) -> int:
        queue = self.queues[partition]
        batch = [queue.popleft() for _ in range(min(self.batch, len(queue)))]
        if not batch:
            return 0
        state = self.states[partition]
        out = self.pipelines[partition % len(self.pipelines)].process_partition(partition, batch, state)
        state.commit(state.pending())
        for record in out:
            if record.topic == TOPICS.identity_inbox:
                for _ in range(2 if self.duplicate_inbox else 1):
                    self._enqueue(record.topic, record.partition, record.key, record.value)
            else:
                self.records.append(record)
                if record.topic in (TOPICS.groups, TOPICS.group_types):
                    self.table_feed.append(record)
        return len(batch)

    def feed_group_tables(self) -> None:
        """Every worker reads the group topics (as TopicFollower does, with some delay)."""
        for record in self.table_feed:
            for pipeline in self.pipelines:
                pipeline.groups.apply(record.topic, record.value)
        self.table_feed.clear()

    def run(self, rng: random.Random | None = None, max_steps: int = 100_000) -> None:
        """Process until every queue is empty: partitions in turn, or in a seeded random order
        with random batch sizes (``rng``)."""
        for _ in range(max_steps):
            busy = [p for p in range(self.partitions) if self.queues[p]]
            if not busy:
                self.feed_group_tables()
                return
            if rng is None:
                for p in busy:
                    self.step(p)
                if self.feed_while_running:
                    self.feed_group_tables()
            else:
                self.batch = rng.randint(1, 8)
                self.step(rng.choice(busy))
                if self.feed_while_running and rng.random() < 0.3:
                    self.feed_group_tables()
        raise AssertionError("the identity protocol did not settle")

    def tables(self) -> Tables:
        return tables_from_records(self.records)


#: Scenarios the stage runs: all but the one for capture's force-disable header (a capture
#: endpoint concern that does not reach the stage through events_raw yet).
PIPELINE_SCENARIOS = [s for s in SCENARIOS if not any(e.force_disable_person_processing for e in s.events)]


def teams_of(events) -> list[int]:
    return sorted({e.team_id for e in events})


def assert_same_tables(got: Tables, want: Tables) -> None:
    assert got.live_persons() == want.live_persons()
    assert got.persons == want.persons
    assert got.distinct_ids == want.distinct_ids
    assert got.events == want.events
    assert sorted(got.warnings) == sorted(want.warnings)


def check_invariants(tables: Tables) -> None:
    """Every distinct id on one live person, every live person with an id, every event's person
    after overrides its distinct id's person."""
    live = tables.live_persons()
    owners: dict[tuple[int, str], set[str]] = {}
    for (team, did), row in tables.distinct_ids.items():
        assert (team, row["person_id"]) in live, f"{did} maps to a dead or missing person"
        owners.setdefault((team, row["person_id"]), set()).add(did)
    assert set(owners) == set(live), "a live person without distinct ids"
    overrides = tables.overrides()
    for uuid, row in tables.events.items():
        did_row = tables.distinct_ids.get((row["team_id"], row["distinct_id"]))
        if did_row is None:
            continue  # personless id, or a refused creation: the deterministic id stays
        final = overrides.get((row["team_id"], row["distinct_id"]), row["person_id"])
        assert final == did_row["person_id"], f"event {uuid}: person after overrides is not its distinct id's"


@dataclass
class GroupTables:
    """The group side of the stage's output, shaped like the ClickHouse tables: each group's
    latest row, each team's type indexes, and each event's group columns (uuid -> row subset)."""

    types: dict[tuple[int, str], int] = field(default_factory=dict)
    type_records: list[tuple[int, str, int]] = field(default_factory=list)
    groups: dict[tuple[int, int, str], dict] = field(default_factory=dict)
    group_versions: list[tuple[int, int, str, int]] = field(default_factory=list)
    events: dict[str, dict] = field(default_factory=dict)
    order: list[tuple[int, str, str]] = field(default_factory=list)  # (team, did, uuid) in output order


def group_tables_from_records(records: list[Record]) -> GroupTables:
    t = GroupTables()
    for r in records:
        if r.value is None:
            continue
        row = orjson.loads(r.value)
        if r.topic == TOPICS.group_types:
            t.type_records.append((row["team_id"], row["group_type"], row["group_type_index"]))
            t.types[(row["team_id"], row["group_type"])] = row["group_type_index"]
        elif r.topic == TOPICS.groups:
            key = (row["team_id"], row["group_type_index"], row["group_key"])
            t.group_versions.append((*key, row["version"]))
            row = {**row, "group_properties": orjson.loads(row["group_properties"])}
            _keep_latest(t.groups, key, row)
        elif r.topic == TOPICS.events_enriched:
            t.order.append((row["team_id"], row["distinct_id"], row["uuid"]))
            t.events[row["uuid"]] = {
                "event": row["event"], "distinct_id": row["distinct_id"], "team_id": row["team_id"],
                "properties": orjson.loads(row["properties"]),
                **{f"$group_{i}": row[f"$group_{i}"] for i in range(5)},
                **{f"group{i}_properties": orjson.loads(row[f"group{i}_properties"] or "null") for i in range(5)},
                **{f"group{i}_created_at": row[f"group{i}_created_at"] for i in range(5)},
            }
    return t
