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

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from headwater.settings import Settings
from tests.conftest import Pipeline
from tests.faults import diagnostics
from tests.faults.load import TEAM, Message
from tests.identity_harness import TOPICS, LocalCluster, Tables, group_tables_from_records, tables_from_records


ROW_TOPICS = {TOPICS.events_enriched, TOPICS.persons, TOPICS.person_distinct_ids, TOPICS.ingestion_warnings,
              TOPICS.groups, TOPICS.group_types}


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
    rows = [r for r in cluster.records if r.topic in ROW_TOPICS]  # dead letters keep the poison's bytes
    tables = tables_from_records(rows)
    group_tables = group_tables_from_records(rows)
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


# -- latency: from produce to visible in ClickHouse ------------------------------------------
class InsertTimes(threading.Thread):
    """Notes when each insert into ``events`` is first seen. Every insert has one ``inserted_at``
    (``DEFAULT now64(6)``), so polling the distinct values every ``interval`` tells, per event,
    when it became queryable (an upper bound, by at most the interval and the query's time)."""

    def __init__(self, settings: Settings, interval: float = 0.1) -> None:
        super().__init__(name="insert-times", daemon=True)
        from sinks.clickhouse.client import connect

        self.client = connect(settings.clickhouse)
        self.db = settings.clickhouse.database
        self.interval = interval
        self.seen: dict[int, float] = {}  # inserted_at (µs) -> time.time() first seen
        self.done = threading.Event()

    def poll(self) -> None:
        since = max(self.seen, default=0) - 30_000_000
        rows = self.client.query(
            f"SELECT DISTINCT toUnixTimestamp64Micro(inserted_at) FROM {self.db}.events "
            f"WHERE inserted_at >= fromUnixTimestamp64Micro(toInt64({max(since, 0)}))").result_rows
        now = time.time()
        for (t,) in rows:
            self.seen.setdefault(t, now)

    def run(self) -> None:
        while not self.done.is_set():
            started = time.monotonic()
            try:
                self.poll()
            except Exception:  # ClickHouse busy or away: the next poll sees it
                pass
            self.done.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self) -> None:
        self.done.set()
        self.join(10)
        self.poll()
        self.client.close()


def latencies(clickhouse, db: str, team: int, messages: list[Message], times: InsertTimes | None = None) -> dict[str, float]:
    """uuid -> seconds from produce to visible in ClickHouse, for ``messages`` found: first seen by
    ``times`` if given (an upper bound), else the row's ``inserted_at`` (the insert's start, a
    lower bound by the insert's duration; it needs no polling, so it adds no load)."""
    sent = {m.uuid: m.sent for m in messages}
    out = {}
    for event_uuid, inserted in clickhouse.query(
            f"SELECT toString(uuid), toUnixTimestamp64Micro(inserted_at) FROM {db}.events WHERE team_id = {{t:Int64}}",
            parameters={"t": team}).result_rows:
        if event_uuid not in sent:
            continue
        if times is None:
            out[event_uuid] = inserted / 1e6 - sent[event_uuid]
        elif inserted in times.seen:
            out[event_uuid] = times.seen[inserted] - sent[event_uuid]
    return out


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each named process, and by the whole machine
    (``machine``, all cores, from /proc/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            out[name] = float("nan")
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    out["machine"] = (sum(map(int, cpu)) - int(cpu[3]) - int(cpu[4])) / tick  # all but idle and iowait
    return out


def enriched_times(settings: Settings, timeout: float = 20, isolation: str = "read_committed") -> dict[str, float]:
    """uuid -> when the identity stage produced its ``events_enriched`` row (the message's
    create time, seconds), the whole topic."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from headwater.topics import TopicNames

    topic = TopicNames(settings.topic_prefix).events_enriched
    reader = Consumer(settings.kafka_config(**{"group.id": "faults-hops", "enable.auto.commit": False,
                                               "isolation.level": isolation, "enable.partition.eof": True}))
    out: dict[str, float] = {}
    try:
        partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
        reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(partitions) and time.monotonic() < deadline:
            for m in reader.consume(10_000, 0.5):
                if m.error() is not None:
                    at_end.add(m.partition())
                    continue
                at_end.discard(m.partition())
                value = m.value() or b""
                start = value.find(b'"uuid":"')
                if start >= 0:
                    out[value[start + 8:start + 44].decode()] = m.timestamp()[1] / 1000
    finally:
        reader.close()
    return out


def hops(clickhouse, db: str, team: int, messages: list[Message], enriched: dict[str, float]) -> dict[str, tuple[float, float]]:
    """p50 and p95 (s) of each hop: produce → enriched row produced (processors) → inserted_at (sink)."""
    sent = {m.uuid: m.sent for m in messages}
    split: dict[str, list[float]] = {"processors": [], "sink": []}
    for event_uuid, inserted in clickhouse.query(
            f"SELECT toString(uuid), toUnixTimestamp64Micro(inserted_at) FROM {db}.events WHERE team_id = {{t:Int64}}",
            parameters={"t": team}).result_rows:
        if event_uuid in sent and event_uuid in enriched:
            split["processors"].append(enriched[event_uuid] - sent[event_uuid])
            split["sink"].append(inserted / 1e6 - enriched[event_uuid])
    return {hop: (percentile(v, 50), percentile(v, 95)) for hop, v in split.items()}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered))) - 1))]


def warm_up(deployment: "Deployment", load, mix, clickhouse, db: str, *, wait_s: float, flush_s: float = 30) -> None:
    """Send the mix's warm-up (it names the group types, so the load's final state does not
    depend on which worker named them first) and wait for its rows."""
    warm = mix.warmup()
    load.send(warm)
    load.flush(flush_s)
    deployment.wait_or_diagnose(lambda: counts(clickhouse, db, TEAM)[0] >= len(warm), wait_s, "the warm-up's rows")


def wait_for_rows(deployment: "Deployment", clickhouse, db: str, team: int, messages: list[Message], timeout: float) -> None:
    """Wait until every one of ``messages`` is a row; on timeout, the diagnostics name the missing
    events by kind and distinct id (held by a merge? one partition?)."""
    wanted = {m.uuid for m in messages}
    seen: set[str] = set()

    def done() -> bool:
        nonlocal seen
        if counts(clickhouse, db, team)[0] < len(wanted):
            return False
        seen = event_uuids(clickhouse, db, team)
        return wanted <= seen

    def missing() -> str:
        got = event_uuids(clickhouse, db, team)
        lost = [m for m in messages if m.uuid not in got]
        by_kind: dict[str, int] = {}
        for m in lost:
            by_kind[m.kind] = by_kind.get(m.kind, 0) + 1
        sample = "\n".join(f"  {m.kind} key={m.key.decode(errors='replace')} partition={m.partition} offset={m.offset} "
                           f"uuid={m.uuid}" for m in lost[:40])
        # did the identity stage emit them (the sink lost them), or not (held, or dropped)?
        settings = deployment.settings
        emitted = {isolation: len({m.uuid for m in lost} & set(enriched_times(settings, isolation=isolation)))
                   for isolation in ("read_committed", "read_uncommitted")}
        warned = clickhouse.query(
            f"SELECT type, count() FROM {db}.ingestion_warnings WHERE event_uuid IN {{u:Array(String)}} GROUP BY type",
            parameters={"u": [m.uuid for m in lost]}).result_rows
        return (f"{len(lost)} of {len(messages)} events missing in ClickHouse, by kind {by_kind}; on events_enriched: "
                f"{emitted}; their warnings: {warned}; the first:\n{sample}")

    deployment.wait_or_diagnose(done, timeout, f"{len(wanted)} acknowledged events in ClickHouse", extra=missing)


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

    def sink(self, *args: str) -> None:
        self.start("sink", "sink", *args)
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
