"""Versioned ClickHouse migrations, applied idempotently at start.

Migrations are the ``migrations/NNNN_name.sql`` files beside this module, applied in order;
applied versions are recorded in ``<db>.schema_migrations``. Each statement is also written to
be re-runnable (``IF NOT EXISTS``), so two processes starting together do no harm.

The SQL uses two placeholders: ``{db}`` and ``{on_cluster}``. In cluster mode
(``HEADWATER_CLICKHOUSE_CLUSTER``) ``{on_cluster}`` becomes ``ON CLUSTER <name>`` and every
``*MergeTree(args)`` engine becomes its ``Replicated*MergeTree('/clickhouse/tables/{shard}/db.table',
'{replica}', args)`` twin.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_ENGINE = re.compile(r"ENGINE\s*=\s*(\w*MergeTree)\(([^)]*)\)")
_TABLE = re.compile(r"CREATE\s+(?:TABLE|MATERIALIZED VIEW|VIEW)\s+IF\s+NOT\s+EXISTS\s+([\w.]+)", re.I)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    def statements(self, database: str, cluster: str | None = None) -> list[str]:
        return [render(s, database, cluster) for s in split_statements(self.sql)]


def split_statements(sql: str) -> list[str]:
    """Split on ``;`` at the end of a line; drop pieces that hold only comments."""
    parts = re.split(r";[ \t]*(?:\n|$)", sql)
    out = []
    for part in parts:
        code = "\n".join(line for line in part.splitlines() if not line.strip().startswith("--")).strip()
        if code:
            out.append(part.strip())
    return out


def render(statement: str, database: str, cluster: str | None = None) -> str:
    text = statement.replace("{db}", database)
    if cluster is None:
        return text.replace(" {on_cluster}", "").replace("{on_cluster}", "")
    text = text.replace("{on_cluster}", f"ON CLUSTER {cluster}")
    match = _TABLE.search(text)
    table = match.group(1) if match else f"{database}.unknown"

    def replicated(m: re.Match[str]) -> str:
        args = m.group(2).strip()
        zk = f"'/clickhouse/tables/{{shard}}/{table}', '{{replica}}'"
        return f"ENGINE = Replicated{m.group(1)}({zk}{', ' + args if args else ''})"

    return _ENGINE.sub(replicated, text)


def load_migrations() -> list[Migration]:
    folder = resources.files("sinks.clickhouse") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version: {versions}")
    return found


def apply_migrations(client: Client, database: str, cluster: str | None = None) -> list[str]:
    """Create the database and apply every migration not yet recorded; return those applied."""
    on_cluster = f" ON CLUSTER {cluster}" if cluster else ""
    client.command(f"CREATE DATABASE IF NOT EXISTS {database}{on_cluster}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations{on_cluster} "
        "(version UInt32, name String, applied_at DateTime DEFAULT now()) "
        + ("ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/" + database + ".schema_migrations', '{replica}')"
           if cluster else "ENGINE = ReplacingMergeTree()")
        + " ORDER BY version"
    )
    done = {row[0] for row in client.query(f"SELECT DISTINCT version FROM {database}.schema_migrations").result_rows}
    applied = []
    for migration in load_migrations():
        if migration.version in done:
            continue
        for statement in migration.statements(database, cluster):
            client.command(statement)
        client.insert(f"{database}.schema_migrations", [[migration.version, migration.name]], column_names=["version", "name"])
        applied.append(f"{migration.version:04d}_{migration.name}")
        log.info("applied migration %04d_%s", migration.version, migration.name)
    return applied
