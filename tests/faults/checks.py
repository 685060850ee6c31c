"""What every fault scenario checks afterwards, and the run without faults it compares with.

- ``reference``: the identity stage's own code (``IdentityPipeline`` through the broker-less
  ``LocalCluster``) fed the acknowledged messages in send order, one at a time to quiescence:
  "the same run without faults". Its persons, distinct ids and groups are what ClickHouse must
  show after the faults.
- ``assert_exactly_once``: ``count() = uniqExact(uuid) =`` the acknowledged events, without FINAL,
  and the uuid sets equal.
- ``Deployment``: the workers and the sink as child processes (``tests.conftest.Pipeline``), with
  kill -9 and restarts, and ``wait_or_diagnose``: a wait that, on timeout, writes
  ``diagnostics.txt`` (``diagnostics.dump``) before failing.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from headwater.settings import Settings
from tests.conftest import Pipeline
from tests.faults import diagnostics
from tests.faults.load import Message
from tests.identity_harness import TOPICS, LocalCluster, Tables, group_tables_from_records, tables_from_records


# -- the run without faults -------------------------------------------------------------------
@dataclass
class Reference:
    tables: Tables
    groups: dict[tuple[int, int, str], dict]  # (team, index, key) -> {properties, created_at, version}
    types: dict[tuple[int, str], int]
    events: int  # event rows
    dead_letters: list[tuple[str, str]]  # (reason, uuid or source offset)


def reference(messages: list[Message], teams: list[int], partitions: int, max_message_bytes: int = 1_000_000) -> Reference:
    """The acknowledged messages, byte for byte on the partitions they were acknowledged on,
    through the stage's code without a broker, each to quiescence before the next."""
    cluster = LocalCluster(teams, partitions=partitions, max_message_bytes=max_message_bytes)
    for m in messages:
        if m.acked:
            cluster._enqueue(TOPICS.events_raw, m.partition, m.key, m.value)
            cluster.run()
    tables = tables_from_records(cluster.records)
    group_tables = group_tables_from_records(cluster.records)
    groups = {k: {"properties": r["group_properties"], "created_at": r["created_at"], "version": r["version"]}
              for k, r in group_tables.groups.items()}
    dead = [(dict(r.headers or []).get("dlq_reason", b"").decode(), "") for r in cluster.records
            if r.topic == TOPICS.events_dead_letter]
    return Reference(tables, groups, group_tables.types, len(tables.events), dead)


# -- ClickHouse -------------------------------------------------------------------------------
def counts(clickhouse, db: str, team: int | None = None) -> tuple[int, int]:
    where = f" WHERE team_id = {int(team)}" if team is not None else ""
    return tuple(clickhouse.query(f"SELECT count(), uniqExact(uuid) FROM {db}.events{where}").result_rows[0])


def event_uuids(clickhouse, db: str, team: int) -> set[str]:
    return {r[0] for r in clickhouse.query(
        f"SELECT toString(uuid) FROM {db}.events WHERE team_id = {{t:Int64}}", parameters={"t": team}).result_rows}


def assert_exactly_once(clickhouse, db: str, team: int, expected_uuids: set[str]) -> None:
    """Without FINAL: one row per acknowledged event, nothing else."""
    total, unique = counts(clickhouse, db, team)
    assert (total, unique) == (len(expected_uuids), len(expected_uuids)), \
        f"events: count() {total}, uniqExact(uuid) {unique}, acknowledged {len(expected_uuids)}"
    got = event_uuids(clickhouse, db, team)
    assert got == expected_uuids, f"missing {len(expected_uuids - got)}, unexpected {len(got - expected_uuids)}"


def groups_in_clickhouse(clickhouse, db: str, team: int) -> dict[tuple[int, int, str], dict]:
    rows = clickhouse.query(
        f"SELECT group_type_index, group_key, argMax(group_properties, version), "
        f"toUnixTimestamp64Micro(argMax(created_at, version)), max(version) "
        f"FROM {db}.groups WHERE team_id = {{t:Int64}} GROUP BY group_type_index, group_key",
        parameters={"t": team}).result_rows
    return {(team, i, k): {"properties": orjson.loads(p), "created_at": c, "version": v} for i, k, p, c, v in rows}


def types_in_clickhouse(clickhouse, db: str, team: int) -> dict[tuple[int, str], int]:
    rows = clickhouse.query(f"SELECT group_type, group_type_index FROM {db}.group_types WHERE team_id = {{t:Int64}}",
                            parameters={"t": team}).result_rows
    return {(team, t): i for t, i in rows}


def persons_state(clickhouse, db: str, team: int) -> Tables:
    from tests.pipeline.test_identity_pipeline import tables_from_clickhouse

    return tables_from_clickhouse(clickhouse, db, {team})


def assert_same_persons_and_groups(clickhouse, db: str, team: int, want: Reference, timeout: float = 60) -> Tables:
    """Persons, distinct ids, groups and group types equal the run without faults (they trail the
    event rows by a sink batch: polled until equal, then compared for the message)."""
    got: Tables = Tables()
    got_groups: dict = {}
    got_types: dict = {}
    want_persons = {k: v for k, v in want.tables.persons.items() if k[0] == team}
    want_dids = {k: v for k, v in want.tables.distinct_ids.items() if k[0] == team}
    want_groups = {k: v for k, v in want.groups.items() if k[0] == team}
    want_types = {k: v for k, v in want.types.items() if k[0] == team}

    def same() -> bool:
        nonlocal got, got_groups, got_types
        got = persons_state(clickhouse, db, team)
        got_groups = groups_in_clickhouse(clickhouse, db, team)
        got_types = types_in_clickhouse(clickhouse, db, team)
        return (got.persons, got.distinct_ids, got_groups, got_types) == (want_persons, want_dids, want_groups, want_types)

    deadline = time.monotonic() + timeout
    while not same() and time.monotonic() < deadline:
        time.sleep(0.5)
    diff_persons = {k for k in set(got.persons) | set(want_persons) if got.persons.get(k) != want_persons.get(k)}
    diff_dids = {k for k in set(got.distinct_ids) | set(want_dids) if got.distinct_ids.get(k) != want_dids.get(k)}
    diff_groups = {k for k in set(got_groups) | set(want_groups) if got_groups.get(k) != want_groups.get(k)}
    assert not diff_persons, "persons differ from the run without faults: " + "; ".join(
        f"{k}: got {got.persons.get(k)} want {want_persons.get(k)}" for k in sorted(diff_persons)[:5])
    assert not diff_dids, "distinct ids differ from the run without faults: " + "; ".join(
        f"{k}: got {got.distinct_ids.get(k)} want {want_dids.get(k)}" for k in sorted(diff_dids)[:5])
    assert not diff_groups, "groups differ from the run without faults: " + "; ".join(
        f"{k}: got {got_groups.get(k)} want {want_groups.get(k)}" for k in sorted(diff_groups)[:5])
    assert got_types == want_types
    return got


# -- processes --------------------------------------------------------------------------------
class Deployment(Pipeline):
    """Workers and sink as child processes, with kill -9, and waits that dump diagnostics."""

    def __init__(self, env: dict[str, str], log_dir: Path, settings: Settings) -> None:
        super().__init__(env, log_dir)
        self.settings = settings
        self.events: list[str] = []  # what was done to the processes, with times
        self.t0 = time.monotonic()

    def note(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.t0:7.2f}s {what}")

    def worker(self, n: int) -> None:
        self.start(f"identity-{n}", "worker", "identity", "--worker-id", str(n))
        self.note(f"started identity-{n} (pid {self.processes[f'identity-{n}'].pid})")

    def sink(self) -> None:
        self.start("sink", "sink")
        self.note(f"started sink (pid {self.processes['sink'].pid})")

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        self.note(f"kill -9 {name} (pid {process.pid})")

    def terminate(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except Exception:
            process.kill()
            process.wait()
        self.note(f"stopped {name} (SIGTERM, exit {process.returncode})")

    def restart(self, name: str) -> None:
        if name == "sink":
            self.sink()
        else:
            self.worker(int(name.rsplit("-", 1)[1]))

    def alive(self) -> dict[str, int | None]:
        return {name: p.poll() for name, p in self.processes.items()}

    def wait_or_diagnose(self, condition: Callable[[], object], timeout: float, message: str,
                         extra: Callable[[], str] | None = None) -> object:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            last = condition()
            if last:
                return last
            time.sleep(0.25)
        report = diagnostics.dump(self.settings, self, reason=f"timed out after {timeout:.0f}s waiting for {message}",
                                  extra=extra() if extra else "")
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {message} (last {last!r}); "
                    f"diagnostics in {self.log_dir / 'diagnostics.txt'}:\n{report[-6000:]}")
