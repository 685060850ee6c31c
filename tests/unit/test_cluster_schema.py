"""Cluster mode (ADR 0008): every data table a Replicated ``X_local`` behind a Distributed ``X``,
materialized views on the locals, GLOBAL joins in views, the sink's bookkeeping tables, and
``headwater migrate --print``.

chDB runs in a child process (one chDB per process, and none in the test process): it parses every
statement with ``formatQuery`` and, with a configuration that gives it a one-shard cluster and an
in-memory Keeper, applies the cluster schema for real, minus what a single chDB cannot do (ON
CLUSTER, Replicated engines: see ``_for_one_chdb``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from headwater.cli import app
from sinks.clickhouse.migrate import (
    KEEPER_MAPS,
    RECENT_KEYS,
    SHARDED,
    ClusterRenderError,
    Migration,
    load_migrations,
    render,
    script,
)

DB, CLUSTER = "hw", "main"
_CREATE = re.compile(
    r"^CREATE\s+(?:OR\s+REPLACE\s+)?(TABLE|MATERIALIZED VIEW|VIEW)\s+(?:IF\s+NOT\s+EXISTS\s+)?hw\.(\w+)", re.M
)

# ------------------------------------------------------------------------------------- helpers

_RUNNER = r"""
import json, sys
import chdb
job = json.load(sys.stdin)
conn = chdb.connect(":memory:" + (f"?config-file={job['config']}" if job["config"] else ""))
cur = conn.cursor()
out = []
for sql in job["queries"]:
    try:
        cur.execute(sql)
        out.append({"rows": [[str(v) for v in row] for row in (cur.fetchall() or [])]})
    except Exception as exc:
        out.append({"error": str(exc)[:2000], "sql": sql[:300]})
json.dump(out, sys.stdout)
"""


def run_chdb(queries: list[str], config: Path | None = None) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps({"queries": queries, "config": str(config) if config else ""}),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def literal(sql: str) -> str:
    return "'" + sql.replace("\\", "\\\\").replace("'", "\\'") + "'"


def code(statement: str) -> str:
    return "\n".join(line for line in statement.splitlines() if not line.strip().startswith("--")).strip()


def by_name(statements: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (kind, statement) of the CREATE statements."""
    out = {}
    for statement in statements:
        if m := _CREATE.search(code(statement)):
            out[m.group(2)] = (m.group(1), code(statement))
    return out


def single_server_tables() -> list[str]:
    return [name for name, (kind, _) in by_name(all_statements(None)).items() if kind == "TABLE"]


def all_statements(cluster: str | None) -> list[str]:
    return [s for m in load_migrations() for s in m.statements(DB, cluster)]


# ------------------------------------------------------------------------------ the layout


def test_every_table_is_a_replicated_local_table_behind_a_distributed_one():
    """Fails for a new table without its Distributed twin: the renderer refuses a table that has
    no sharding key (SHARDED) or other rule (KEEPER_MAPS)."""
    clustered = by_name(all_statements(CLUSTER))
    tables = single_server_tables()
    assert {"events", "persons", "person_overrides", "sessions_agg", "event_uuids", "sink_batches"} <= set(tables)
    assert set(tables) == set(SHARDED) | set(KEEPER_MAPS), "every table has exactly one cluster rule"
    for name in tables:
        if name in KEEPER_MAPS:
            continue
        kind, local = clustered[f"{name}_local"]
        assert kind == "TABLE" and f"CREATE TABLE IF NOT EXISTS hw.{name}_local ON CLUSTER main\n" in local
        assert re.search(rf"ENGINE = Replicated\w*MergeTree\('/clickhouse/tables/{{shard}}/hw\.{name}_local', '{{replica}}'", local), name
        kind, distributed = clustered[name]
        assert kind == "TABLE"
        assert distributed == (
            f"CREATE TABLE IF NOT EXISTS hw.{name} ON CLUSTER main AS hw.{name}_local\n"
            f"ENGINE = Distributed('main', 'hw', '{name}_local', {SHARDED[name].key})"
        )
    # the local tables keep the single-server engine's arguments and clauses
    assert "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/hw.persons_local', '{replica}', version)" in clustered["persons_local"][1]
    assert "SETTINGS non_replicated_deduplication_window = 10000" in clustered["events_local"][1]


def test_sharding_keys_are_deterministic_and_co_locate_a_distinct_ids_rows():
    for name, shard in SHARDED.items():
        assert "rand" not in shard.key.lower(), f"{name}: a retried batch must be split the same way"
        assert shard.key.startswith("cityHash64(") and shard.why
    key = SHARDED["events"].key
    assert SHARDED["person_distinct_ids"].key == key == SHARDED["person_overrides"].key == "cityHash64(team_id, distinct_id)"


def test_a_new_table_without_a_sharding_key_stops_cluster_rendering():
    migration = Migration(99, "new", "CREATE TABLE IF NOT EXISTS {db}.new_table {on_cluster} (a UInt8)\nENGINE = MergeTree()\nORDER BY a;")
    assert migration.statements(DB) == ["CREATE TABLE IF NOT EXISTS hw.new_table (a UInt8)\nENGINE = MergeTree()\nORDER BY a"]
    with pytest.raises(ClusterRenderError, match="new_table.*SHARDED"):
        migration.statements(DB, CLUSTER)


def test_materialized_views_read_and_write_local_tables():
    clustered = by_name(all_statements(CLUSTER))
    views = {name: text for name, (kind, text) in clustered.items() if kind == "MATERIALIZED VIEW"}
    assert set(views) == {"person_overrides_mv", "sessions_mv"}
    assert "TO hw.person_overrides_local\n" in views["person_overrides_mv"]
    assert "FROM hw.person_distinct_ids_local\n" in views["person_overrides_mv"]
    assert "TO hw.sessions_agg_local\n" in views["sessions_mv"] and "FROM hw.events_local\n" in views["sessions_mv"]
    for name, text in views.items():
        refs = set(re.findall(r"\bhw\.(\w+)", text)) - {name}
        assert refs and all(ref.endswith("_local") for ref in refs), (name, refs)


def test_views_read_the_distributed_tables_with_global_joins():
    clustered = all_statements(CLUSTER)
    views = [code(s) for s in clustered if re.search(r"^CREATE (OR REPLACE )?VIEW", code(s))]
    assert len(views) == 5  # persons_latest, events_with_person (0003 and 0004), groups_latest, sessions
    for text in views:
        assert "_local" not in text
        assert not re.search(r"(?<!GLOBAL )(LEFT |INNER |RIGHT |FULL )?JOIN\b", text.replace("GLOBAL LEFT JOIN", "")), text
    with_person = [v for v in views if "events_with_person" in v.splitlines()[0]]
    assert len(with_person) == 2
    for text in with_person:
        assert "FROM hw.events AS e\nGLOBAL LEFT JOIN\n(" in text and "FROM hw.person_overrides\n" in text
    # the statement's comments keep their words
    (commented,) = [s for s in load_migrations()[2].statements(DB, CLUSTER) if "events_with_person" in code(s).splitlines()[0]]
    assert "the LEFT JOIN's default values" in commented


def test_global_is_added_to_joins_and_subquery_ins_of_views_only_in_code():
    view = (
        "-- a LEFT JOIN in a comment\n"
        "CREATE VIEW IF NOT EXISTS {db}.v {on_cluster} AS\n"
        "SELECT 'x JOIN y', a FROM {db}.events AS e\n"
        "INNER JOIN {db}.persons AS p ON e.person_id = p.id\n"
        "ANY LEFT JOIN (SELECT 1 AS k) AS c ON 1 = c.k\n"
        "GLOBAL RIGHT JOIN {db}.groups AS g ON 1 = 1\n"
        "LEFT ARRAY JOIN [1, 2] AS n\n"
        "ARRAY JOIN [3] AS m\n"
        "WHERE e.distinct_id IN (SELECT distinct_id FROM {db}.person_overrides)\n"
        "AND e.team_id NOT IN (WITH 1 AS one SELECT one) AND e.event IN ('a', 'b') AND e.uuid GLOBAL IN (SELECT 1)"
    )
    (text,) = render(view, DB, CLUSTER)
    assert text == (
        "-- a LEFT JOIN in a comment\n"
        "CREATE VIEW IF NOT EXISTS hw.v ON CLUSTER main AS\n"
        "SELECT 'x JOIN y', a FROM hw.events AS e\n"
        "GLOBAL INNER JOIN hw.persons AS p ON e.person_id = p.id\n"
        "GLOBAL ANY LEFT JOIN (SELECT 1 AS k) AS c ON 1 = c.k\n"
        "GLOBAL RIGHT JOIN hw.groups AS g ON 1 = 1\n"
        "LEFT ARRAY JOIN [1, 2] AS n\n"
        "ARRAY JOIN [3] AS m\n"
        "WHERE e.distinct_id GLOBAL IN (SELECT distinct_id FROM hw.person_overrides)\n"
        "AND e.team_id GLOBAL NOT IN (WITH 1 AS one SELECT one) AND e.event IN ('a', 'b') AND e.uuid GLOBAL IN (SELECT 1)"
    )


def test_a_materialized_view_that_joins_or_names_an_unsharded_table_needs_a_decision():
    join = "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.m {on_cluster} TO {db}.persons AS SELECT * FROM {db}.events AS e LEFT JOIN {db}.persons AS p ON 1"
    with pytest.raises(ClusterRenderError, match="joins"):
        render(join, DB, CLUSTER)
    array_join = "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.m {on_cluster} TO {db}.persons AS SELECT x FROM {db}.events ARRAY JOIN [1] AS x"
    assert render(array_join, DB, CLUSTER) == [
        "CREATE MATERIALIZED VIEW IF NOT EXISTS hw.m ON CLUSTER main TO hw.persons_local AS SELECT x FROM hw.events_local ARRAY JOIN [1] AS x"
    ]
    keeper = "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.m {on_cluster} TO {db}.sink_batches AS SELECT * FROM {db}.events"
    with pytest.raises(ClusterRenderError, match="sink_batches"):
        render(keeper, DB, CLUSTER)


def test_an_alter_of_columns_alters_the_local_and_the_distributed_table():
    (groups,) = [m for m in load_migrations() if m.name == "groups"]
    local, distributed = [s for s in groups.statements(DB, CLUSTER) if "ALTER TABLE" in s]
    assert "ALTER TABLE hw.events_local ON CLUSTER main\n    ADD COLUMN IF NOT EXISTS group0_created_at" in local
    assert code(distributed).startswith("ALTER TABLE hw.events ON CLUSTER main\n    ADD COLUMN IF NOT EXISTS group0_created_at")
    assert code(local).split("\n", 1)[1] == code(distributed).split("\n", 1)[1]
    # an ALTER of something a Distributed table does not have changes the local table only
    (ttl,) = render("ALTER TABLE {db}.events {on_cluster} MODIFY TTL toDateTime(timestamp) + INTERVAL 1 YEAR", DB, CLUSTER)
    assert ttl == "ALTER TABLE hw.events_local ON CLUSTER main MODIFY TTL toDateTime(timestamp) + INTERVAL 1 YEAR"
    with pytest.raises(ClusterRenderError, match="mixes"):
        render("ALTER TABLE {db}.events {on_cluster} ADD COLUMN x UInt8, MODIFY SETTING index_granularity = 1", DB, CLUSTER)
    with pytest.raises(ClusterRenderError, match="sharded tables only"):
        render("ALTER TABLE {db}.sink_batches {on_cluster} ADD COLUMN x UInt8", DB, CLUSTER)


def test_the_sink_bookkeeping_tables_are_a_keeper_map_and_a_replicated_ttl_table():
    (migration,) = [m for m in load_migrations() if m.version == 6]
    statements = [code(s) for s in migration.statements(DB, CLUSTER)]
    batches, uuids_local, uuids = statements
    assert batches.startswith("CREATE TABLE IF NOT EXISTS hw.sink_batches ON CLUSTER main\n")
    assert batches.endswith("ENGINE = KeeperMap('/headwater/hw/sink_batches')\nPRIMARY KEY source")
    assert uuids_local.startswith("CREATE TABLE IF NOT EXISTS hw.event_uuids_local ON CLUSTER main\n")
    assert uuids_local.endswith(
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/hw.event_uuids_local', '{replica}')\n"
        f"ORDER BY {RECENT_KEYS['event_uuids'].order_by}\n"
        "PRIMARY KEY id\n"
        "TTL seen_at + INTERVAL 7200 SECOND\n"
        "SETTINGS index_granularity = 256"
    )
    assert uuids == (
        "CREATE TABLE IF NOT EXISTS hw.event_uuids ON CLUSTER main AS hw.event_uuids_local\n"
        "ENGINE = Distributed('main', 'hw', 'event_uuids_local', cityHash64(id))"
    )
    # one server: unchanged, EmbeddedRocksDB
    assert [code(s).splitlines()[-2] for s in migration.statements(DB)] == ["ENGINE = EmbeddedRocksDB", "ENGINE = EmbeddedRocksDB(7200)"]


def test_schema_migrations_is_one_keeper_map_for_the_whole_cluster():
    assert script(DB, CLUSTER)[:2] == [
        "CREATE DATABASE IF NOT EXISTS hw ON CLUSTER main",
        "CREATE TABLE IF NOT EXISTS hw.schema_migrations ON CLUSTER main (version UInt32, name String, "
        "applied_at DateTime DEFAULT now()) ENGINE = KeeperMap('/headwater/hw/schema_migrations') PRIMARY KEY version",
    ]
    assert script(DB)[:2] == [
        "CREATE DATABASE IF NOT EXISTS hw",
        "CREATE TABLE IF NOT EXISTS hw.schema_migrations (version UInt32, name String, "
        "applied_at DateTime DEFAULT now()) ENGINE = ReplacingMergeTree() ORDER BY version",
    ]


def test_the_script_is_bootstrap_then_each_migration_and_its_record():
    for cluster in (None, CLUSTER):
        expected = script(DB, cluster)[:2]
        for migration in load_migrations():
            expected += migration.statements(DB, cluster)
            expected.append(f"INSERT INTO hw.schema_migrations (version, name) VALUES ({migration.version}, '{migration.name}')")
        assert script(DB, cluster) == expected
    assert all("ON CLUSTER main" in s for s in script(DB, CLUSTER) if not s.startswith("INSERT"))


# ------------------------------------------------------------------------ headwater migrate --print


@pytest.fixture
def cli_env(monkeypatch):
    for name in ("HEADWATER_CLICKHOUSE_URL", "HEADWATER_CLICKHOUSE_CLUSTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HEADWATER_CLICKHOUSE_DATABASE", DB)
    # nowhere to connect to: --print must not try
    monkeypatch.setenv("HEADWATER_EMBEDDED_CLICKHOUSE_PORT", "1")
    return monkeypatch


def test_migrate_print_is_the_rendered_script(cli_env):
    runner = CliRunner()
    single = runner.invoke(app, ["migrate", "--print"])
    assert single.exit_code == 0, single.output
    assert single.stdout == ";\n\n".join(script(DB)) + ";\n"
    clustered = runner.invoke(app, ["migrate", "--print", "--cluster", CLUSTER])
    assert clustered.exit_code == 0, clustered.output
    assert clustered.stdout == ";\n\n".join(script(DB, CLUSTER)) + ";\n"
    cli_env.setenv("HEADWATER_CLICKHOUSE_CLUSTER", "other")
    from_env = runner.invoke(app, ["migrate", "--print"])
    assert from_env.stdout == ";\n\n".join(script(DB, "other")) + ";\n"
    assert runner.invoke(app, ["migrate", "--print", "--cluster", CLUSTER]).stdout == clustered.stdout


def test_migrate_cluster_goes_with_print_and_must_be_an_identifier(cli_env):
    runner = CliRunner()
    alone = runner.invoke(app, ["migrate", "--cluster", CLUSTER])
    assert alone.exit_code == 2 and "--print" in alone.output
    bad = runner.invoke(app, ["migrate", "--print", "--cluster", "main; DROP"])
    assert bad.exit_code == 2 and "not a plain identifier" in bad.output
    helped = runner.invoke(app, ["migrate", "--help"])
    assert "--print" in helped.output and "--cluster" in helped.output


# ---------------------------------------------------------------------------------- on chDB


def test_every_cluster_statement_parses():
    statements = script(DB, CLUSTER)
    results = run_chdb([f"SELECT formatQuery({literal(s)})" for s in statements])
    for statement, result in zip(statements, results, strict=True):
        assert "error" not in result, f"{result.get('error')}\n---\n{statement}"
        formatted = result["rows"][0][0]
        assert "ON CLUSTER main" in formatted or formatted.startswith("INSERT")
    formatted = {code(s).splitlines()[0]: r["rows"][0][0] for s, r in zip(statements, results)}
    mv = formatted["CREATE MATERIALIZED VIEW IF NOT EXISTS hw.sessions_mv ON CLUSTER main"]
    assert mv.startswith("CREATE MATERIALIZED VIEW IF NOT EXISTS hw.sessions_mv ON CLUSTER main TO hw.sessions_agg_local")
    assert "FROM hw.events_local" in mv


_CHDB_CONFIG = """<clickhouse>
    <tcp_port>9000</tcp_port>
    <zookeeper><implementation>testkeeper</implementation></zookeeper>
    <keeper_map_path_prefix>/keeper_map</keeper_map_path_prefix>
    <remote_servers>
        <main>
            <shard>
                <internal_replication>true</internal_replication>
                <replica><host>localhost</host><port>9000</port></replica>
            </shard>
        </main>
    </remote_servers>
</clickhouse>
"""


def _for_one_chdb(statement: str) -> str:
    """What one chDB can run: no ON CLUSTER (chDB has no distributed DDL queue), and the local
    tables' non-replicated engines (a Replicated table in chDB stays read-only: no replication
    threads). Everything else, Distributed and KeeperMap included, is run as rendered."""
    text = statement.replace(" ON CLUSTER main", "")
    return re.sub(r"Replicated(\w*MergeTree)\('/clickhouse/tables/\{shard\}/[\w.]+', '\{replica\}'(?:, )?", r"\1(", text)


def test_the_cluster_schema_works_on_a_one_shard_chdb_cluster(tmp_path):
    config = tmp_path / "config.xml"
    config.write_text(_CHDB_CONFIG)
    statements = [_for_one_chdb(s) for s in script(DB, CLUSTER)]
    p1, p2, p3 = "00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002", "00000000-0000-0000-0000-000000000003"
    fg = "SETTINGS distributed_foreground_insert = 1"
    checks = {
        "clusters": "SELECT cluster, shard_num, is_local FROM system.clusters WHERE cluster = 'main'",
        "events": (
            f"INSERT INTO hw.events (uuid, team_id, event, distinct_id, person_id, timestamp, properties, `$session_id`) {fg} VALUES "
            f"('10000000-0000-0000-0000-000000000001', 1, '$pageview', 'a', '{p1}', '2024-01-01 10:00:00', "
            "'{\"$current_url\": \"https://x/1\"}', 's1'), "
            f"('10000000-0000-0000-0000-000000000002', 1, '$autocapture', 'a', '{p1}', '2024-01-01 10:00:05', '{{}}', 's1'), "
            f"('10000000-0000-0000-0000-000000000003', 1, '$pageview', 'b', '{p2}', '2024-01-01 11:00:00', "
            "'{\"$current_url\": \"https://x/2\"}', 's2')"
        ),
        "distinct_ids": f"INSERT INTO hw.person_distinct_ids (team_id, distinct_id, person_id, version, is_deleted) {fg} VALUES (1, 'b', '{p3}', 1, 0), (1, 'a', '{p1}', 0, 0)",
        "persons": f"INSERT INTO hw.persons (id, team_id, properties, is_identified, created_at, version, is_deleted) {fg} VALUES ('{p1}', 1, '{{}}', 0, now(), 0, 0), ('{p1}', 1, '{{\"x\": 1}}', 1, now(), 1, 0)",
        "groups": f"INSERT INTO hw.groups (team_id, group_type_index, group_key, group_properties, created_at, version) {fg} VALUES (1, 0, 'acme', '{{}}', now(), 0), (1, 0, 'acme', '{{\"n\": 2}}', now(), 1)",
        "uuids": f"INSERT INTO hw.event_uuids (id, source_partition, source_offset) {fg} VALUES ('1:u', 0, 10), ('1:v', 3, 7)",
        "uuids_again": f"INSERT INTO hw.event_uuids (id, source_partition, source_offset) {fg} VALUES ('1:u', 0, 50)",
        "batch": f"INSERT INTO hw.sink_batches (source, first_offset, last_offset) VALUES ('events_enriched:0', 0, 9)",
        "batch_again": f"INSERT INTO hw.sink_batches (source, first_offset, last_offset) VALUES ('events_enriched:0', 10, 19)",
        "merge_uuids": "OPTIMIZE TABLE hw.event_uuids_local FINAL",
        "read_migrations": "SELECT DISTINCT version FROM hw.schema_migrations ORDER BY version",
        "read_local_events": "SELECT count() FROM hw.events_local",
        "read_overrides": "SELECT distinct_id, person_id FROM hw.person_overrides",
        "read_with_person": "SELECT distinct_id, person_id, original_person_id FROM hw.events_with_person ORDER BY timestamp",
        "read_sessions": "SELECT session_id, distinct_id, pageviews, events, entry_url, is_bounce FROM hw.sessions ORDER BY session_id",
        "read_sessions_local": "SELECT count() FROM hw.sessions_agg_local",
        "read_persons": "SELECT id, properties, is_identified FROM hw.persons_latest",
        "read_groups": "SELECT group_key, group_properties FROM hw.groups_latest",
        "read_uuids": "SELECT id, min((source_partition, source_offset)) FROM hw.event_uuids WHERE id IN ('1:u', '1:v', '1:w') GROUP BY id ORDER BY id",
        "read_uuid_rows": "SELECT count() FROM hw.event_uuids_local WHERE id = '1:u'",
        "read_batches": "SELECT source, first_offset, last_offset FROM hw.sink_batches WHERE source IN ('events_enriched:0')",
        "columns": "SELECT table, groupArray(name) FROM (SELECT table, name FROM system.columns WHERE database = 'hw' "
        "AND table IN ('events', 'events_local') ORDER BY table, position) GROUP BY table ORDER BY table",
        "engines": "SELECT name, engine FROM system.tables WHERE database = 'hw' AND engine IN ('Distributed', 'KeeperMap') ORDER BY name",
    }
    results = run_chdb(statements + list(checks.values()), config)
    for statement, result in zip(statements, results):
        assert "error" not in result, f"{result['error']}\n---\n{statement}"
    got = dict(zip(checks, results[len(statements):], strict=True))
    for name, result in got.items():
        assert "error" not in result, f"{name}: {result['error']}"
    rows = {name: result["rows"] for name, result in got.items()}

    assert rows["clusters"] == [["main", "1", "1"]]
    assert rows["read_migrations"] == [[str(m.version)] for m in load_migrations()]
    # inserts into the Distributed tables land in the locals, and the materialized views fire there
    assert rows["read_local_events"] == [["3"]]
    assert rows["read_overrides"] == [["b", p3]]
    assert rows["read_with_person"] == [["a", p1, p1], ["a", p1, p1], ["b", p3, p2]]
    # s1 has an $autocapture event: not a bounce
    assert rows["read_sessions"] == [["s1", "a", "1", "2", "https://x/1", "0"], ["s2", "b", "1", "1", "https://x/2", "1"]]
    assert rows["read_sessions_local"] == [["2"]]
    assert rows["read_persons"] == [[p1, '{"x": 1}', "1"]]
    assert rows["read_groups"] == [["acme", '{"n": 2}']]
    # the first carrier of a uuid, also after a merge; a missing id has no row
    assert rows["read_uuids"] == [["1:u", "[0, 10]"], ["1:v", "[3, 7]"]]
    assert rows["read_uuid_rows"] == [["2"]]  # a merge keeps both carriers (sorted by id and offset)
    # KeeperMap: a second insert of a key replaces its row
    assert rows["read_batches"] == [["events_enriched:0", "10", "19"]]
    events_columns = dict((table, names) for table, names in rows["columns"])
    assert events_columns["events"] == events_columns["events_local"] and "group4_created_at" in events_columns["events"]
    assert rows["engines"] == sorted(
        [[name, "Distributed"] for name in SHARDED] + [[name, "KeeperMap"] for name in [*KEEPER_MAPS, "schema_migrations"]]
    )
