import re

import pytest

from sinks.clickhouse.migrate import ClusterRenderError, load_migrations, render, split_statements


def test_migrations_are_numbered_in_order_and_render_without_placeholders():
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert migrations[0].version == 1
    for migration in migrations:
        for cluster in (None, "main"):
            for statement in migration.statements("hw", cluster):
                assert "{db}" not in statement and "{on_cluster}" not in statement
                assert "hw." in statement


def _renderer_before_cluster_layout(statement: str, database: str) -> str:
    """The single-server renderer as it was when migrations 0001-0006 were applied (frozen here)."""
    text = statement.replace("{db}", database)
    return text.replace(" {on_cluster}", "").replace("{on_cluster}", "")


def test_single_server_rendering_is_unchanged():
    """Existing databases have these statements applied: one server's SQL never changes."""
    for migration in load_migrations():
        assert migration.statements("hw") == [_renderer_before_cluster_layout(s, "hw") for s in split_statements(migration.sql)]


def test_cluster_mode_uses_on_cluster_and_replicated_engines():
    local, distributed = render(
        "CREATE TABLE IF NOT EXISTS {db}.events {on_cluster} (a UInt8) ENGINE = ReplacingMergeTree(v) ORDER BY a",
        "hw",
        "main",
    )
    assert local == (
        "CREATE TABLE IF NOT EXISTS hw.events_local ON CLUSTER main (a UInt8) "
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/hw.events_local', '{replica}', v) ORDER BY a"
    )
    assert distributed.endswith(
        "CREATE TABLE IF NOT EXISTS hw.events ON CLUSTER main AS hw.events_local\n"
        "ENGINE = Distributed('main', 'hw', 'events_local', cityHash64(team_id, distinct_id))"
    )
    local, _ = render("CREATE TABLE IF NOT EXISTS {db}.persons {on_cluster} (a UInt8) ENGINE = MergeTree() ORDER BY a", "hw", "c")
    assert "ReplicatedMergeTree('/clickhouse/tables/{shard}/hw.persons_local', '{replica}')" in local
    # a table without a sharding key is not guessed
    with pytest.raises(ClusterRenderError):
        render("CREATE TABLE IF NOT EXISTS {db}.t {on_cluster} (a UInt8) ENGINE = MergeTree() ORDER BY a", "hw", "c")


def test_split_statements_ignores_comment_only_pieces():
    sql = "-- intro\nCREATE TABLE a (x UInt8) ENGINE = Memory;\n-- trailing comment\n"
    assert split_statements(sql) == ["-- intro\nCREATE TABLE a (x UInt8) ENGINE = Memory"]


def test_cluster_mode_renders_an_alter_on_cluster_for_the_local_and_the_distributed_table():
    local, distributed = render("ALTER TABLE {db}.events {on_cluster}\n    ADD COLUMN IF NOT EXISTS x UInt8", "hw", "main")
    assert local == "ALTER TABLE hw.events_local ON CLUSTER main\n    ADD COLUMN IF NOT EXISTS x UInt8"
    assert distributed.endswith("\nALTER TABLE hw.events ON CLUSTER main\n    ADD COLUMN IF NOT EXISTS x UInt8")
    assert "ENGINE" not in local + distributed
    assert render("ALTER TABLE {db}.events {on_cluster}\n    ADD COLUMN IF NOT EXISTS x UInt8", "hw") == [
        "ALTER TABLE hw.events\n    ADD COLUMN IF NOT EXISTS x UInt8"
    ]


def test_the_groups_migration_renders_for_one_server_and_for_a_cluster():
    (groups,) = [m for m in load_migrations() if m.name == "groups"]
    assert groups.version == 4
    single = groups.statements("hw")
    alter = next(s for s in single if "ALTER TABLE" in s)
    assert "ALTER TABLE hw.events\n" in alter and "ON CLUSTER" not in alter
    for i in range(5):
        assert f"ADD COLUMN IF NOT EXISTS group{i}_created_at DateTime64(6, 'UTC')" in alter
    clustered = groups.statements("hw", "main")
    # one more ALTER (the Distributed events) and a Distributed twin for each of the two tables
    assert len(clustered) == len(single) + 3
    assert all("ON CLUSTER main" in s for s in clustered)
    alters = [s for s in clustered if "ALTER TABLE" in s]
    assert "ALTER TABLE hw.events_local ON CLUSTER main\n" in alters[0] and "ALTER TABLE hw.events ON CLUSTER main\n" in alters[1]
    engines = [s for s in clustered if "ENGINE" in s]
    assert len(engines) == 4
    assert any("ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/hw.groups_local', '{replica}', version)" in s for s in engines)
    assert any("ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/hw.group_types_local', '{replica}')" in s for s in engines)
    assert any("ENGINE = Distributed('main', 'hw', 'groups_local', cityHash64(team_id, group_type_index, group_key))" in s for s in engines)
    assert any("ENGINE = Distributed('main', 'hw', 'group_types_local', cityHash64(team_id, group_type))" in s for s in engines)


def test_every_statement_of_every_migration_runs_on_the_cluster_in_cluster_mode():
    for migration in load_migrations():
        for statement in migration.statements("hw", "main"):
            assert "ON CLUSTER main" in statement, f"{migration.version:04d}_{migration.name}: {statement[:80]}"


def test_the_sessions_migration_renders_an_aggregating_table_a_materialized_view_and_a_view():
    (sessions,) = [m for m in load_migrations() if m.name == "sessions"]
    assert sessions.version == 5
    single = sessions.statements("hw")
    assert [next(line for line in s.splitlines() if line.startswith("CREATE")) for s in single] == [
        "CREATE TABLE IF NOT EXISTS hw.sessions_agg",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS hw.sessions_mv",
        "CREATE VIEW IF NOT EXISTS hw.sessions AS",
    ]
    assert "ENGINE = AggregatingMergeTree()" in single[0] and "ON CLUSTER" not in "".join(single)
    local, distributed, mv, view = sessions.statements("hw", "main")
    assert "CREATE TABLE IF NOT EXISTS hw.sessions_agg_local ON CLUSTER main\n" in local
    assert "ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/hw.sessions_agg_local', '{replica}')\n" in local
    assert "CREATE TABLE IF NOT EXISTS hw.sessions_agg ON CLUSTER main AS hw.sessions_agg_local\n" in distributed
    assert "ENGINE = Distributed('main', 'hw', 'sessions_agg_local', cityHash64(team_id, session_id))" in distributed
    # the materialized view fires on each shard's events_local and writes that shard's states
    assert "CREATE MATERIALIZED VIEW IF NOT EXISTS hw.sessions_mv ON CLUSTER main\nTO hw.sessions_agg_local\n" in mv
    assert "ENGINE" not in mv and "FROM hw.events_local\n" in mv
    # the view merges the states of every shard, through the Distributed table
    assert "CREATE VIEW IF NOT EXISTS hw.sessions ON CLUSTER main AS\n" in view and "ENGINE" not in view
    assert re.search(r"FROM hw\.sessions_agg\n", view)
