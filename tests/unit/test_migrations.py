from sinks.clickhouse.migrate import load_migrations, render, split_statements


def test_migrations_are_numbered_in_order_and_render_without_placeholders():
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert migrations[0].version == 1
    for migration in migrations:
        for statement in migration.statements("hw"):
            assert "{db}" not in statement and "{on_cluster}" not in statement
            assert "hw." in statement


def test_cluster_mode_uses_on_cluster_and_replicated_engines():
    statement = render(
        "CREATE TABLE IF NOT EXISTS {db}.events {on_cluster} (a UInt8) ENGINE = ReplacingMergeTree(v) ORDER BY a",
        "hw",
        "main",
    )
    assert "ON CLUSTER main" in statement
    assert "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/hw.events', '{replica}', v)" in statement
    plain = render("CREATE TABLE IF NOT EXISTS {db}.t {on_cluster} (a UInt8) ENGINE = MergeTree() ORDER BY a", "hw", "c")
    assert "ReplicatedMergeTree('/clickhouse/tables/{shard}/hw.t', '{replica}')" in plain


def test_split_statements_ignores_comment_only_pieces():
    sql = "-- intro\nCREATE TABLE a (x UInt8) ENGINE = Memory;\n-- trailing comment\n"
    assert split_statements(sql) == ["-- intro\nCREATE TABLE a (x UInt8) ENGINE = Memory"]


def test_cluster_mode_renders_an_alter_on_cluster_and_leaves_it_without_an_engine():
    statement = render("ALTER TABLE {db}.events {on_cluster}\n    ADD COLUMN IF NOT EXISTS x UInt8", "hw", "main")
    assert statement == "ALTER TABLE hw.events ON CLUSTER main\n    ADD COLUMN IF NOT EXISTS x UInt8"
    assert render("ALTER TABLE {db}.events {on_cluster}\n    ADD COLUMN IF NOT EXISTS x UInt8", "hw") == (
        "ALTER TABLE hw.events\n    ADD COLUMN IF NOT EXISTS x UInt8"
    )


def test_the_groups_migration_renders_for_one_server_and_for_a_cluster():
    (groups,) = [m for m in load_migrations() if m.name == "groups"]
    assert groups.version == 4
    single = groups.statements("hw")
    alter = next(s for s in single if "ALTER TABLE" in s)
    assert "ALTER TABLE hw.events\n" in alter and "ON CLUSTER" not in alter
    for i in range(5):
        assert f"ADD COLUMN IF NOT EXISTS group{i}_created_at DateTime64(6, 'UTC')" in alter
    clustered = groups.statements("hw", "main")
    assert len(clustered) == len(single)
    assert all("ON CLUSTER main" in s for s in clustered)
    assert "ALTER TABLE hw.events ON CLUSTER main\n" in next(s for s in clustered if "ALTER TABLE" in s)
    engines = [s for s in clustered if "ENGINE" in s]
    assert len(engines) == 2
    assert any("ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/hw.groups', '{replica}', version)" in s for s in engines)
    assert any("ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/hw.group_types', '{replica}')" in s for s in engines)


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
    table, mv, view = sessions.statements("hw", "main")
    assert "CREATE TABLE IF NOT EXISTS hw.sessions_agg ON CLUSTER main\n" in table
    assert "ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/hw.sessions_agg', '{replica}')\n" in table
    # the materialized view writes TO the replicated table: it has no engine of its own to replicate
    assert "CREATE MATERIALIZED VIEW IF NOT EXISTS hw.sessions_mv ON CLUSTER main\nTO hw.sessions_agg\n" in mv
    assert "ENGINE" not in mv and "FROM hw.events\n" in mv
    assert "CREATE VIEW IF NOT EXISTS hw.sessions ON CLUSTER main AS\n" in view and "ENGINE" not in view
