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
