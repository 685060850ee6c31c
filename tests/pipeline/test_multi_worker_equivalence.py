"""Scaling out changes nothing (issue 10): 3 identity worker processes against the embedded
broker with 8 partitions reach the same ClickHouse state as 1 worker on the same input.

Two stacks as ``headwater up --workers N`` starts them (``LocalStack``: embedded Tansu, embedded
chDB, topics, migrations, N workers with ids 0..N-1, one sink; no capture), each on its own broker,
ClickHouse and data folder, one after the other (2 cores). Every worker holds its partitions (the
workers' logs: Tansu describes groups without members) before the first event. The same messages
(same keys, so the same partitions and offsets) go to both; afterwards both stages' committed
offsets are at the end of their inputs, and the two ClickHouse states must be equal:
- ``events``: every column but ``inserted_at``, per uuid (person_id, person and group properties,
  ``$group_N``, ``$session_id``, created_at, ...), one row per uuid;
- ``persons`` (latest version per person), ``person_distinct_ids`` and ``person_overrides``
  (latest version per distinct id): person ids are compared as they are, since they are uuid5 of
  the person's root distinct id (ADR 0001);
- ``groups`` (latest version), ``group_types``, ``sessions``, ``ingestion_warnings`` and
  ``events_dead_letter``.

The input is seeded (``HEADWATER_EQUIVALENCE_SEED`` replays another one): two teams, anonymous
visitors with ``$set_once``/``$set`` and client sessions, known users with backend events
(server-side sessions), personless bots, ``$groupidentify`` and events with ``$groups``,
``$identify`` merging one or two anonymous persons into a new or an existing user,
``$create_alias`` into a new id, merges refused because both persons are identified, and a group
type first named by several distinct ids at once. Its final state depends on the input alone, not
on how the partitions interleave (so one worker and three must agree), because it is sent in
phases, each once the previous one's events are all rows in ClickHouse:
0. the group types, in a fixed order, from one distinct id per team;
1. groups updated (each by one admin id), visitors and known users browse (no ``$groups`` yet);
2. merges: each user's merges come from one distinct id, so they are ordered by its hold; the ids
   merged away send nothing afterwards (their events would race with the merge);
3. users browse with ``$groups`` (group properties all written in phase 1) and a few refused
   merges; a person's events come from one distinct id only, and the other side of a refused
   merge sends nothing in this phase.

A timeout fails with its diagnostics, and so does any difference between the states. The hang
this test used to report as an xfail (every worker idle, transactions left open on
identity_inbox/identity_changelog) was Tansu's concurrent EndTxns; the runtime now ends its
transactions one at a time and the sink's settler commits over what stands still (ADR 0015).
"""

from __future__ import annotations

import ast
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest

from headwater.settings import Settings
from headwater.stack import LocalStack
from headwater.status import STAGES
from headwater.topics import TopicNames
from tests.conftest import free_port
from tests.faults.checks import Deployment, groups_in_clickhouse, types_in_clickhouse, wait_for_rows
from tests.faults.load import Load, event_message
from tests.identity_harness import token_of
from tests.pipeline.test_identity_pipeline import tables_from_clickhouse
from tests.reference.persons_model import Event

pytestmark = [pytest.mark.pipeline, pytest.mark.timeout(300)]

SEED = int(os.environ.get("HEADWATER_EQUIVALENCE_SEED") or 20261122)
PARTITIONS = 8
TEAM_A, TEAM_B = 7200, 7201
USERS = {TEAM_A: 48, TEAM_B: 24}
COMPANIES, PROJECTS = 6, 3
BASE_TS = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
PHASE_WAIT_S = 90


# -- the input --------------------------------------------------------------------------------
Step = tuple[str, str, dict]  # (distinct id, event, properties)


class Workload:
    """The seeded input: per phase, per team, one sequence of steps per distinct id; the
    sequences are interleaved at random (each keeps its order) and stamped by a clock that
    advances 1..40 s per event of the team."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.phases: list[list[Event]] = []

    def uid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def url(self, path: str) -> str:
        return f"https://app.example{path}"

    def emit(self, phase: int, sequences: dict[int, list[list[Step]]]) -> None:
        out: list[Event] = []
        for team, seqs in sequences.items():
            clock = BASE_TS + timedelta(hours=6 * phase)
            pending = [list(s) for s in seqs if s]
            while pending:
                seq = self.rng.choices(pending, weights=[len(s) for s in pending])[0]
                did, name, props = seq.pop(0)
                if not seq:
                    pending.remove(seq)
                clock += timedelta(seconds=self.rng.uniform(1, 40), microseconds=self.rng.randrange(1_000_000))
                out.append(Event(team, did, name, self.uid(), clock, props))
        self.phases.append(out)

    def pageview(self, path: str, session: str, extra: dict | None = None) -> dict:
        return {"$current_url": self.url(path), "$pathname": path, "$session_id": session,
                "$window_id": f"w-{session[:8]}", **(extra or {})}

    def build(self) -> list[list[Event]]:
        rng = self.rng
        p0, p1, p2, p3 = {}, {}, {}, {}
        for team, users in USERS.items():
            # phase 0: the group types, in order, from one distinct id
            p0[team] = [[("admin-warmup", "$groupidentify", {"$group_type": t, "$group_key": "warm",
                                                              "$group_set": {"warm": True}})
                         for t in ("company", "project")]]
            # phase 1: groups, visitors, known users, bots
            seqs: list[list[Step]] = []
            for g in range(COMPANIES):
                seqs.append([(f"admin-c{g}", "$groupidentify", {
                    "$group_type": "company", "$group_key": f"c{g}",
                    "$group_set": {"name": f"Company {g}", "plan": rng.choice(["free", "team", "enterprise"]),
                                   "seats": n * 5, f"field_{n}": True}}) for n in range(rng.randint(1, 3))])
            for p in range(PROJECTS):
                seqs.append([(f"admin-p{p}", "$groupidentify", {
                    "$group_type": "project", "$group_key": f"p{p}",
                    "$group_set": {"name": f"Project {p}", "revision": n}}) for n in range(rng.randint(1, 2))])
            for k in range(users):
                for anon in [f"anon-{k}"] + ([f"anon-{k}b"] if k % 3 == 0 else []):
                    session = self.uid()
                    if rng.random() < 0.3:
                        session = session.upper()  # a UUID session id is lower-cased
                    steps = [(anon, "$pageview", self.pageview(f"/landing/{k}", session, {
                        "utm_source": rng.choice(["google", "newsletter", "twitter"]), "utm_medium": "cpc",
                        "$referring_domain": rng.choice(["google.com", "news.example", "t.co"]),
                        "$set_once": {"first_url": f"/landing/{k}", "first_seen_k": k}}))]
                    for i in range(rng.randint(0, 3)):
                        extra = {"$set": {"theme": rng.choice(["dark", "light"])}} if rng.random() < 0.5 else {}
                        if rng.random() < 0.2:
                            session = self.uid()
                        steps.append((anon, rng.choice(["$pageview", "$autocapture"]),
                                      self.pageview(f"/pricing/{i}", session, extra)))
                    seqs.append(steps)
                if k % 2 == 0:
                    steps = [(f"user-{k}", "$pageview", self.pageview("/login", self.uid(), {
                        "$set": {"plan": "free", "name": f"User {k}"}}))]
                    steps += [(f"user-{k}", "api_call", {"endpoint": f"/v1/items/{i}", "$set_once": {"api_user": True}})
                              for i in range(rng.randint(1, 3))]
                    seqs.append(steps)
            for b in range(3):
                seqs.append([(f"bot-{b}", "$pageview", {"$process_person_profile": False,
                                                        "$current_url": self.url(f"/robots/{i}")})
                             for i in range(2)])
            p1[team] = seqs
            # phase 2: merges; every user's merges from one distinct id
            seqs = []
            for k in range(users):
                email = {"$set": {"email": f"u{k}@team{team}.example"}}
                if k % 4 == 3:  # alias from the anonymous id: the user's id joins its person
                    seqs.append([(f"anon-{k}", "$create_alias", {"alias": f"user-{k}", **email}),
                                 (f"anon-{k}", "$pageview", self.pageview("/welcome", self.uid(), {
                                     "$set": {"plan": "trial"}, "$groups": {"company": f"c{k % COMPANIES}"}}))])
                    continue
                # k even: user-k exists (phase 1), two persons merge; k % 4 == 1: user-k is new
                steps = [(f"user-{k}", "$identify", {"$anon_distinct_id": f"anon-{k}", **email})]
                if k % 3 == 0:
                    steps.append((f"user-{k}", "$identify", {"$anon_distinct_id": f"anon-{k}b"}))
                if k % 5 == 0:
                    steps.append((f"user-{k}", "$create_alias", {"alias": f"email-{k}"}))
                steps.append((f"user-{k}", "$pageview", self.pageview("/billing", self.uid(), {
                    "$set": {"plan": "pro"}, "$groups": {"company": f"c{k % COMPANIES}", "project": f"p{k % PROJECTS}"}})))
                seqs.append(steps)
            p2[team] = seqs
            # phase 3: known users with groups; refused merges (both identified)
            seqs = []
            refused_other = {k + 4 for k in range(0, users - 4, 8)}
            for k in range(users):
                if k in refused_other:
                    continue
                did = f"anon-{k}" if k % 4 == 3 else f"user-{k}"
                groups = {"company": f"c{k % COMPANIES}", "project": f"p{k % PROJECTS}"}
                if k % 5 == 1:
                    groups["company"] = "c-never-identified"
                if k % 7 == 2:
                    groups["workspace"] = f"ws{k % 2}"  # a third type, first named by several ids at once
                steps = []
                if k % 8 == 0 and k + 4 in refused_other:
                    steps.append((did, "$identify", {"$anon_distinct_id": f"user-{k + 4}", "$set": {"tried": k + 4}}))
                session = self.uid()
                for i in range(rng.randint(2, 6)):
                    if rng.random() < 0.35:  # a backend event: server-side session
                        steps.append((did, rng.choice(["api_call", "invoice_paid"]), {
                            "amount": rng.randrange(1, 500), "$groups": groups}))
                    else:
                        extra: dict = {"$groups": groups}
                        if rng.random() < 0.4:
                            extra["$set"] = {"score": rng.randrange(100), "plan": rng.choice(["pro", "team"])}
                        if rng.random() < 0.2:
                            extra["$set_once"] = {"first_feature": f"f{i}"}
                        steps.append((did, "$pageview", self.pageview(f"/app/{rng.randrange(20)}", session, extra)))
                seqs.append(steps)
            p3[team] = seqs
        for phase, sequences in enumerate((p0, p1, p2, p3)):
            self.emit(phase, sequences)
        return self.phases


# -- the two deployments ----------------------------------------------------------------------
@dataclass
class Run:
    name: str
    workers: int
    settings: Settings
    stack: LocalStack
    deployment: Deployment

    @property
    def db(self) -> str:
        return self.settings.clickhouse.database

    def client(self):
        from sinks.clickhouse.client import connect

        return connect(self.settings.clickhouse)


COMMON_ENV = {
    "HEADWATER_PARTITIONS": str(PARTITIONS),
    "HEADWATER_TEAMS": f"{token_of(TEAM_A)}:{TEAM_A},{token_of(TEAM_B)}:{TEAM_B}",
    "HEADWATER_KAFKA_SESSION_TIMEOUT_MS": "1000",
    "HEADWATER_PROCESSOR_BATCH_MS": "50",
    "HEADWATER_SINK_BATCH_MS": "200",
}


def start_run(name: str, workers: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: list[Run]) -> Run:
    """``headwater up --workers N`` without capture, on its own ports and data folder, added to
    ``started`` before it starts (to be stopped whatever happens). Children inherit the
    environment as it is when they start, so it is set before each stack starts."""
    data_dir = tmp_path / name
    env = {**COMMON_ENV, "HEADWATER_DATA_DIR": str(data_dir),
           "HEADWATER_EMBEDDED_KAFKA_PORT": str(free_port()), "HEADWATER_EMBEDDED_CLICKHOUSE_PORT": str(free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    stack = LocalStack(settings, workers=workers, capture=False)
    deployment = Deployment(env, data_dir / "logs", settings)
    run = Run(name, workers, settings, stack, deployment)
    started.append(run)
    try:
        stack.start()
    finally:  # whatever started is stopped by the fixture, and diagnosed by the waits
        deployment.processes = {c.name: c.process for c in stack.supervisor.children
                                if c.process is not None and c.name.startswith(("identity-", "sink"))}
    for i in range(workers):
        deployment.note(f"started identity-{i} (pid {deployment.processes[f'identity-{i}'].pid})")
    return run


@pytest.fixture
def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, int], Run]]:
    """Starts a stack; every stack started is stopped at the end, whatever happened."""
    for key in [k for k in os.environ if k.startswith("HEADWATER_")]:
        monkeypatch.delenv(key)  # embedded broker and ClickHouse, whatever the caller's shell says
    started: list[Run] = []

    def starter(name: str, workers: int) -> Run:
        return start_run(name, workers, tmp_path, monkeypatch, started)

    try:
        yield starter
    finally:
        for run in reversed(started):
            run.stack.stop()
        print(f"logs: {tmp_path}/*/logs")


ASSIGNMENT_LINE = re.compile(r"identity: (assigned|revoked|restored partition) (\[.*\]|\d+)")


def assignment(run: Run) -> dict[str, tuple[int, list[int]]]:
    """Per identity worker, from its log (Tansu describes a group without its members): how many
    assignments it has had, and the ``events_raw`` partitions it holds and has restored."""
    topic = TopicNames(run.settings.topic_prefix).events_raw
    out = {}
    for i in range(run.workers):
        name = f"identity-{i}"
        count, held, restored = 0, [], set()
        for kind, value in ASSIGNMENT_LINE.findall(run.deployment.log(name)):
            if kind == "assigned":
                count += 1
                held = sorted(p for t, p in ast.literal_eval(value) if t == topic)
                restored = set()
            elif kind == "revoked":
                held, restored = [], set()
            else:
                restored.add(int(value))
        out[name] = (count, [p for p in held if p in restored])
    return out


def wait_for_assignment(run: Run) -> dict[str, tuple[int, list[int]]]:
    """Every worker holds (and has restored) partitions, and together they hold the 8."""

    def assigned() -> dict[str, tuple[int, list[int]]]:
        got = assignment(run)
        covered = sorted(p for _, parts in got.values() for p in parts)
        return got if all(parts for _, parts in got.values()) and covered == list(range(PARTITIONS)) else {}

    got = run.deployment.wait_or_diagnose(assigned, 90, f"{run.workers} identity worker(s) holding all partitions")
    run.deployment.note(f"assignment {got}")
    return got


def unread(settings: Settings, group: str, topics: list[str], timeout: float = 10.0) -> int | None:
    """How many records a read_committed reader gets after ``group``'s committed offsets (from
    the log start where it committed nothing), to the end of every partition; None if the ends
    were not all reached within ``timeout``. Not ``headwater status``'s lag: that reads only from
    the last batch (Tansu's watermark), so two trailing commit markers, which concurrent
    transactions of several workers leave on a partition, show as lag 1 for good."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    config = {"enable.partition.eof": True, "fetch.wait.max.ms": 10, "log_level": 2}
    owner = Consumer(settings.consumer_config(group, **config))  # never subscribes: reads the commits only
    reader = Consumer(settings.consumer_config(f"{group}-equivalence-check", **config))
    try:
        metadata = owner.list_topics(timeout=5).topics
        partitions = [TopicPartition(t, p) for t in topics for p in sorted(metadata[t].partitions)]
        committed = owner.committed(partitions, timeout=5)
        reader.assign([TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                       for tp in committed])
        at_end: set[tuple[str, int]] = set()
        got = 0
        deadline = time.monotonic() + timeout
        while len(at_end) < len(partitions):
            if time.monotonic() > deadline:
                return None
            for m in reader.consume(10_000, 0.1):
                if m.error() is None:
                    got += 1
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add((m.topic(), m.partition()))
        return got
    except Exception:  # noqa: BLE001 - the broker is busy: ask again
        return None
    finally:
        owner.close()
        reader.close()


def caught_up(run: Run) -> bool:
    """The identity stage, then the sink, has nothing left to read after its committed offsets.
    In that order: once the identity stage's inputs are all consumed and committed, its outputs
    are committed (one transaction with the offsets) and no batch is open (its input would be
    unread), so the sink's check that follows sees every output."""
    prefix = run.settings.topic_prefix
    return all(unread(run.settings, f"{prefix}{stage.group}", [spec.name(prefix) for spec in stage.inputs]) == 0
               for stage in STAGES)  # identity first


# -- the ClickHouse state ---------------------------------------------------------------------
JSON_COLUMNS = ("properties", "person_properties", *(f"group{i}_properties" for i in range(5)))


def _json(text: str):
    return orjson.loads(text) if text else text


def clickhouse_state(run: Run) -> dict[str, dict]:
    client = run.client()
    db = run.db
    try:
        tables = tables_from_clickhouse(client, db, set(USERS))  # latest versions; one row per event uuid
        events = {}
        for row in client.query(f"SELECT * EXCEPT (inserted_at) FROM {db}.events").named_results():
            key = str(row.pop("uuid"))
            assert key not in events, f"{run.name}: event {key} is in ClickHouse twice"
            events[key] = {c: _json(v) if c in JSON_COLUMNS else (str(v) if c == "person_id" else v)
                           for c, v in row.items()}
        overrides = {(t, d): (str(p), v, x) for t, d, p, v, x in client.query(
            f"SELECT team_id, distinct_id, argMax(person_id, version), max(version), argMax(is_deleted, version) "
            f"FROM {db}.person_overrides GROUP BY team_id, distinct_id").result_rows}
        sessions = {(r["team_id"], r["session_id"]): {**r, "person_id": str(r["person_id"])}
                    for r in client.query(f"SELECT * FROM {db}.sessions").named_results()}
        warnings: dict[tuple, int] = {}
        for t, kind, event_uuid, did, details, ts in client.query(
                f"SELECT team_id, type, event_uuid, distinct_id, details, timestamp FROM {db}.ingestion_warnings"
                ).result_rows:
            key = (t, kind, event_uuid, did, orjson.dumps(_json(details), option=orjson.OPT_SORT_KEYS).decode(), ts)
            warnings[key] = warnings.get(key, 0) + 1
        dead = {}
        for reason, key, raw in client.query(f"SELECT reason, key, raw FROM {db}.events_dead_letter").result_rows:
            dead[(reason, key, raw)] = dead.get((reason, key, raw), 0) + 1
        groups, types = {}, {}
        for team in USERS:
            groups.update(groups_in_clickhouse(client, db, team))
            types.update(types_in_clickhouse(client, db, team))
    finally:
        client.close()
    return {"events": events, "persons": tables.persons, "person_distinct_ids": tables.distinct_ids,
            "person_overrides": overrides, "groups": groups, "group_types": types, "sessions": sessions,
            "ingestion_warnings": warnings, "events_dead_letter": dead}


def person_partition(state: dict[str, dict]) -> set[frozenset]:
    """The live persons as sets of distinct ids (ids aside): equal up to a renaming of person ids?"""
    members: dict[tuple, set] = {}
    for (team, did), row in state["person_distinct_ids"].items():
        if not row["is_deleted"]:
            members.setdefault((team, row["person_id"]), set()).add((team, did))
    return {frozenset(m) for m in members.values()}


def differences(one: dict[str, dict], three: dict[str, dict], limit: int = 6) -> list[str]:
    out = []
    for table in one:
        a, b = one[table], three[table]
        keys = sorted(set(a) | set(b), key=repr)
        diff = [k for k in keys if a.get(k) != b.get(k)]
        if not diff:
            continue
        out.append(f"{table}: {len(diff)} of {len(keys)} keys differ "
                   f"({sum(k not in b for k in diff)} only with 1 worker, {sum(k not in a for k in diff)} only with 3)")
        for k in diff[:limit]:
            x, y = a.get(k), b.get(k)
            if isinstance(x, dict) and isinstance(y, dict):
                fields = sorted(set(x) | set(y))
                x = {f: x.get(f) for f in fields if x.get(f) != y.get(f)}
                y = {f: y.get(f) for f in fields if f in x}
            out.append(f"  {k!r}:\n    1 worker:  {x!r}\n    3 workers: {y!r}")
    return out


# -- the test ---------------------------------------------------------------------------------
def drive(run: Run, phases: list[list[Event]]) -> list[tuple[int, int]]:
    """Every worker holds its partitions, then the phases go in, each once the previous one's
    events are rows; then both stages' committed offsets reach the end of their inputs. Returns
    where each message landed (partition, offset)."""
    assigned = wait_for_assignment(run)
    load = Load(run.settings, 1, lambda ready: [], name=f"equivalence-{run.name}")
    landed: list[tuple[int, int]] = []
    client = run.client()
    try:
        for number, events in enumerate(phases):
            messages = [event_message(e, f"phase{number}") for e in events]
            load.send(messages)
            load.flush()
            run.deployment.note(f"phase {number}: {len(messages)} events sent")
            for team in USERS:
                wait_for_rows(run.deployment, client, run.db, team,
                              [m for m in messages if m.key.startswith(f"{token_of(team)}:".encode())], PHASE_WAIT_S)
            run.deployment.note(f"phase {number}: all rows in ClickHouse")
            landed += [(m.partition, m.offset) for m in messages]
        run.deployment.wait_or_diagnose(lambda: caught_up(run), PHASE_WAIT_S,
                                        "both stages' committed offsets at the end of their inputs")
        run.deployment.note("caught up")
    finally:
        client.close()
        load.producer = None  # let go of the broker before the stack stops
    dead = {n: code for n, code in run.deployment.alive().items() if code is not None}
    assert not dead, f"{run.name}: processes exited: {dead}"
    restarts = {c.name: c.restarts for c in run.stack.supervisor.children if c.restarts}
    assert not restarts, f"{run.name}: processes restarted: {restarts}"
    assert assignment(run) == assigned, f"{run.name}: the group's assignment changed during the run"
    print(f"{run.name}: " + "; ".join(run.deployment.events))
    return landed


def test_three_workers_reach_the_same_clickhouse_state_as_one(start: Callable[[str, int], Run]) -> None:
    phases = Workload(SEED).build()
    total = sum(len(p) for p in phases)
    print(f"HEADWATER_EQUIVALENCE_SEED={SEED}: {[len(p) for p in phases]} events per phase")
    states, landed = {}, {}
    for name, workers in (("one-worker", 1), ("three-workers", 3)):  # one at a time: 2 cores
        run = start(name, workers)
        landed[name] = drive(run, phases)
        states[name] = clickhouse_state(run)
        run.stack.stop()
    assert landed["one-worker"] == landed["three-workers"], "the same messages landed elsewhere"
    one, three = states["one-worker"], states["three-workers"]
    print(f"{total} events; rows per table (1 worker): { {t: len(r) for t, r in one.items()} }; "
          f"(3 workers): { {t: len(r) for t, r in three.items()} }")

    # the input did what it claims (on the one-worker run; the comparison covers the other)
    assert len(one["events"]) == total
    merged = [m for m in person_partition(one) if len(m) > 1]
    assert len(merged) == sum(USERS.values()), "every user's anonymous ids are merged into its person"
    assert sum(1 for m in merged if len(m) >= 3) > 10
    assert sum(1 for e in one["events"].values() if e["group0_properties"] not in ("", {})) > 100
    assert sorted(one["group_types"].values()) == [0, 0, 1, 1, 2, 2]
    assert "cannot_merge_already_identified" in {k[1] for k in one["ingestion_warnings"]}
    assert sum(1 for e in one["events"].values() if e["event"] == "api_call" and e["$session_id"]) > 20

    problems = differences(one, three)
    if problems:
        same_partition = person_partition(one) == person_partition(three)
        pytest.fail("3 workers end in a different ClickHouse state than 1 worker "
                    f"(seed {SEED}; the partition of distinct ids into persons is "
                    f"{'equal' if same_partition else 'different'}):\n" + "\n".join(problems))
