"""Versioned ClickHouse migrations, applied idempotently at start.

Migrations are the ``migrations/NNNN_name.sql`` files beside this module, applied in order;
applied versions are recorded in ``<db>.schema_migrations``. Each statement is also written to
be re-runnable (``IF NOT EXISTS``), so two processes starting together do no harm.

The SQL uses two placeholders: ``{db}`` and ``{on_cluster}``. On one server they become the
database name and nothing. In cluster mode (``HEADWATER_CLICKHOUSE_CLUSTER``, ADR 0008) every
statement runs ``ON CLUSTER <name>`` and the schema is laid out for several shards:

- a data table ``X`` becomes ``X_local`` (its ``*MergeTree(args)`` engine turned into
  ``Replicated*MergeTree('/clickhouse/tables/{shard}/db.X_local', '{replica}', args)``) plus ``X``,
  ``ENGINE = Distributed(cluster, db, X_local, <sharding key from SHARDED>)``, so whatever reads or
  writes ``db.X`` keeps working;
- a materialized view reads and writes the ``_local`` tables: it fires on the shard where a
  Distributed insert lands;
- a plain view reads the Distributed tables, and its JOINs and ``IN (subquery)`` become GLOBAL;
- an ``ALTER TABLE X`` alters ``X_local``, and ``X`` too when it only touches columns;
- the sink's bookkeeping (0006) is special: ``sink_batches`` is a KeeperMap shared by every
  server, ``event_uuids`` a Replicated ReplacingMergeTree with a TTL behind a Distributed table.

A statement the cluster renderer does not know how to lay out (a table without an entry in
SHARDED, a materialized view that joins, ...) raises ``ClusterRenderError``: the cluster schema is
decided table by table, never guessed. ``headwater migrate --print [--cluster NAME]`` prints
:func:`script` for review.
"""

from __future__ import annotations

import logging
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_ENGINE = re.compile(r"ENGINE\s*=\s*(\w*MergeTree)\(([^)]*)\)")


@dataclass(frozen=True)
class Shard:
    """How a data table is spread over the shards: the Distributed table's sharding key, and why."""

    key: str
    why: str


#: Every data table of the migrations, with its sharding key (ADR 0008). Every key is
#: deterministic (never rand()): a batch the sink inserts again after a crash is split the same way,
#: so each shard refuses exactly the part it already has (the insert_deduplication_token is checked
#: per shard), and rows that ReplacingMergeTree must collapse are sent to the same shard.
SHARDED: dict[str, Shard] = {
    "events": Shard(
        "cityHash64(team_id, distinct_id)",
        "a distinct id's events on one shard, beside its person_distinct_ids and person_overrides rows "
        "(same key); the copies of an event share its distinct id, so they meet where ReplacingMergeTree "
        "collapses them",
    ),
    "ingestion_warnings": Shard("cityHash64(team_id, distinct_id)", "beside the events of the same distinct id"),
    "events_dead_letter": Shard(
        "cityHash64(source_topic, source_partition, source_offset)",
        "the ReplacingMergeTree key: a dead letter written twice meets its copy",
    ),
    "persons": Shard("cityHash64(id)", "every version of a person on one shard, where ReplacingMergeTree(version) keeps the latest"),
    "person_distinct_ids": Shard(
        "cityHash64(team_id, distinct_id)", "every version of a distinct id on one shard; the same key as events"
    ),
    "person_overrides": Shard(
        "cityHash64(team_id, distinct_id)",
        "written on each shard by person_overrides_mv from person_distinct_ids_local, so its rows sit where "
        "their person_distinct_ids rows are: the key says the same",
    ),
    "groups": Shard(
        "cityHash64(team_id, group_type_index, group_key)",
        "every version of a group on one shard, where ReplacingMergeTree(version) keeps the latest",
    ),
    "group_types": Shard("cityHash64(team_id, group_type)", "the copies of a team's type meet on one shard"),
    "sessions_agg": Shard(
        "cityHash64(team_id, session_id)",
        "written on each shard by sessions_mv, so a session has states on every shard holding its events "
        "(the sessions view merges them); the key serves inserts through this table only (ADR 0005's backfill)",
    ),
    "event_uuids": Shard("cityHash64(id)", "the sink looks uuids up by id"),
}

#: EmbeddedRocksDB tables that every server must see alike: KeeperMap tables in cluster mode.
KEEPER_MAPS: dict[str, str] = {
    "sink_batches": "one row per source partition, read by whichever sink owns the partition next",
}


@dataclass(frozen=True)
class RecentKeys:
    """An ``EmbeddedRocksDB(ttl)`` table of recent keys, in cluster mode a Replicated
    ReplacingMergeTree with the same TTL (rows expire at a merge after it, never before)."""

    order_by: str
    ttl_column: str
    index_granularity: int = 256


#: ``event_uuids`` sorts by (id, source_partition, source_offset), not by id alone: if an id ever
#: gets two rows (two carriers recorded at once), a merge keeps both and ``min((source_partition,
#: source_offset))`` still names the first carrier, as it does before any merge.
RECENT_KEYS: dict[str, RecentKeys] = {
    "event_uuids": RecentKeys("(id, source_partition, source_offset)", "seen_at"),
}


class ClusterRenderError(ValueError):
    """A migration statement that cluster mode cannot lay out without a decision (ADR 0008)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    def statements(self, database: str, cluster: str | None = None) -> list[str]:
        return [text for s in split_statements(self.sql) for text in render(s, database, cluster)]


def split_statements(sql: str) -> list[str]:
    """Split on ``;`` at the end of a line; drop pieces that hold only comments."""
    parts = re.split(r";[ \t]*(?:\n|$)", sql)
    out = []
    for part in parts:
        code = "\n".join(line for line in part.splitlines() if not line.strip().startswith("--")).strip()
        if code:
            out.append(part.strip())
    return out


def render(statement: str, database: str, cluster: str | None = None) -> list[str]:
    """The statement(s) to run for one migration statement: one on a single server, one or two
    (local and Distributed) in cluster mode."""
    if cluster is None:
        text = statement.replace("{db}", database)
        return [text.replace(" {on_cluster}", "").replace("{on_cluster}", "")]
    return _render_cluster(statement, database, cluster)


# ---------------------------------------------------------------------------------- cluster mode

# Comments, string literals and quoted identifiers: the rewrites below never touch them.
_PROTECTED = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:[^'\\]|\\.|'')*'|`(?:[^`\\]|\\.)*`|\"(?:[^\"\\]|\\.)*\"", re.S)
_CREATE = re.compile(
    r"CREATE\s+(?:OR\s+REPLACE\s+)?(TABLE|MATERIALIZED\s+VIEW|VIEW)\s+(?:IF\s+NOT\s+EXISTS\s+)?\{db\}\.(\w+)", re.I
)
_ALTER = re.compile(r"ALTER\s+TABLE\s+\{db\}\.(\w+)", re.I)
_REF = re.compile(r"\{db\}\.(\w+)")
_JOIN = re.compile(r"\b((?:(?:GLOBAL|ANY|ALL|ASOF|INNER|LEFT|RIGHT|FULL|CROSS|OUTER|SEMI|ANTI|PASTE)\s+)*)JOIN\b", re.I)
_IN_SUBQUERY = re.compile(r"\b((?:GLOBAL\s+)?(?:NOT\s+)?IN)(?=\s*(?:\(\s*(?:SELECT|WITH)\b|\{db\}\.))", re.I)
_ROCKSDB = re.compile(r"ENGINE\s*=\s*EmbeddedRocksDB(?:\(\s*(\d*)\s*\))?\s*PRIMARY\s+KEY\s+(\w+|\([^)]*\))", re.I)
_COLUMN_COMMAND = re.compile(r"(?:ADD|DROP|MODIFY|RENAME|COMMENT)\s+COLUMN\b", re.I)


def _code_sub(pattern: re.Pattern[str], repl: Callable[[re.Match[str]], str], text: str) -> str:
    """``pattern.sub(repl, text)`` outside comments, string literals and quoted identifiers."""
    out, pos = [], 0
    for protected in _PROTECTED.finditer(text):
        out.append(pattern.sub(repl, text[pos : protected.start()]))
        out.append(protected.group(0))
        pos = protected.end()
    out.append(pattern.sub(repl, text[pos:]))
    return "".join(out)


def _code(text: str) -> str:
    """The statement without its comments (string literals blanked too)."""
    return _PROTECTED.sub(lambda m: " " if m.group(0)[0] in "-/'" else m.group(0), text).strip()


def _fill(text: str, database: str, cluster: str) -> str:
    return text.replace("{db}", database).replace("{on_cluster}", f"ON CLUSTER {cluster}")


def _render_cluster(statement: str, database: str, cluster: str) -> list[str]:
    code = _code(statement)
    if m := re.match(_CREATE, code):
        kind, name = re.sub(r"\s+", " ", m.group(1).upper()), m.group(2)
        if kind == "TABLE":
            return _cluster_table(statement, name, database, cluster)
        if kind == "MATERIALIZED VIEW":
            return [_fill(_cluster_materialized_view(statement, name, code), database, cluster)]
        return [_fill(_globalize(statement), database, cluster)]
    if m := re.match(_ALTER, code):
        return _cluster_alter(statement, m.group(1), code, database, cluster)
    raise ClusterRenderError(f"cluster mode does not know this kind of statement (ADR 0008): {code[:120]!r}")


def _rename_header(statement: str, pattern: str, name: str, new_name: str) -> str:
    """The statement with the table named in its CREATE/ALTER header renamed (once, in code)."""
    header = re.compile(pattern + r"\{db\}\." + name + r"\b", re.I)
    done = []

    def rename(m: re.Match[str]) -> str:
        if done:
            return m.group(0)
        done.append(True)
        return m.group(0)[: -len(name)] + new_name

    text = _code_sub(header, rename, statement)
    assert done, f"no header for {name} in {statement[:80]!r}"
    return text


def _cluster_table(statement: str, name: str, database: str, cluster: str) -> list[str]:
    if name in KEEPER_MAPS:
        text, n = _ROCKSDB.subn(lambda m: f"ENGINE = KeeperMap('/headwater/{database}/{name}')\nPRIMARY KEY {m.group(2)}", statement)
        if n != 1:
            raise ClusterRenderError(f"{name} is a KeeperMap in cluster mode, but its engine is not EmbeddedRocksDB")
        return [_fill(text, database, cluster)]
    shard = SHARDED.get(name)
    if shard is None:
        raise ClusterRenderError(
            f"table {name!r} has no sharding key: add it to SHARDED (or KEEPER_MAPS) in "
            "sinks/clickhouse/migrate.py and explain the choice in ADR 0008"
        )
    local = f"{name}_local"
    path = f"'/clickhouse/tables/{{shard}}/{database}.{local}', '{{replica}}'"
    text = _rename_header(statement, r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?", name, local)
    if name in RECENT_KEYS:
        rule = RECENT_KEYS[name]

        def recent(m: re.Match[str]) -> str:
            if not m.group(1):
                raise ClusterRenderError(f"{name}: EmbeddedRocksDB without a TTL is not a table of recent keys")
            return (
                f"ENGINE = ReplicatedReplacingMergeTree({path})\n"
                f"ORDER BY {rule.order_by}\n"
                f"PRIMARY KEY {m.group(2)}\n"
                f"TTL {rule.ttl_column} + INTERVAL {int(m.group(1))} SECOND\n"
                f"SETTINGS index_granularity = {rule.index_granularity}"
            )

        text, n = _ROCKSDB.subn(recent, text)
    else:

        def replicated(m: re.Match[str]) -> str:
            args = m.group(2).strip()
            return f"ENGINE = Replicated{m.group(1)}({path}{', ' + args if args else ''})"

        text, n = _ENGINE.subn(replicated, text)
    if n != 1:
        raise ClusterRenderError(f"{name}: cluster mode replicates *MergeTree engines only")
    comment = textwrap.fill(f"{name}: every server's entry to the shards' {local}. Sharding key: {shard.why}.",
                            width=100, initial_indent="-- ", subsequent_indent="-- ")
    distributed = (
        f"{comment}\n"
        f"CREATE TABLE IF NOT EXISTS {database}.{name} ON CLUSTER {cluster} AS {database}.{local}\n"
        f"ENGINE = Distributed('{cluster}', '{database}', '{local}', {shard.key})"
    )
    return [_fill(text, database, cluster), distributed]


def _cluster_materialized_view(statement: str, name: str, code: str) -> str:
    """A materialized view fires on the local table a Distributed insert lands in, and writes to
    the local table of its own shard: every table it names becomes its ``_local`` table."""
    joins = [m for m in _JOIN.finditer(code) if not re.search(r"\bARRAY\s*$", code[: m.start()], re.I)]
    if joins or _IN_SUBQUERY.search(code):
        raise ClusterRenderError(f"materialized view {name} joins or filters by a subquery: decide its cluster form (ADR 0008)")
    for ref in _REF.findall(code):
        if ref != name and ref not in SHARDED:
            raise ClusterRenderError(f"materialized view {name} names {ref}, which has no local table in cluster mode")
    return _code_sub(_REF, lambda m: m.group(0) + "_local" if m.group(1) in SHARDED and m.group(1) != name else m.group(0), statement)


def _globalize(statement: str) -> str:
    """A view reads the Distributed tables. A JOIN (or IN) whose both sides are distributed would
    be sent to every shard with its right side read from every shard again (and is refused under
    the default distributed_product_mode = 'deny'): GLOBAL reads the right side once, on the
    server that runs the query, and ships the result to the shards."""

    def join(m: re.Match[str]) -> str:
        before = m.string[: m.start()]
        if "GLOBAL" in m.group(1).upper() or re.search(r"\bARRAY\s*$", before, re.I):
            return m.group(0)
        return "GLOBAL " + m.group(0)

    def in_(m: re.Match[str]) -> str:
        return m.group(0) if m.group(1).upper().startswith("GLOBAL") else "GLOBAL " + m.group(1)

    return _code_sub(_IN_SUBQUERY, in_, _code_sub(_JOIN, join, statement))


def _top_level_commands(code: str) -> list[str]:
    """The comma-separated commands of an ALTER (commas inside parentheses do not count)."""
    commands, depth, start = [], 0, 0
    for i, ch in enumerate(code):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            commands.append(code[start:i].strip())
            start = i + 1
    commands.append(code[start:].strip())
    return commands


def _cluster_alter(statement: str, name: str, code: str, database: str, cluster: str) -> list[str]:
    """ALTER the local table; and the Distributed one too when only columns change (its columns
    were fixed when it was created; it has no parts, indexes or settings of its own)."""
    if name not in SHARDED:
        raise ClusterRenderError(f"ALTER TABLE {name}: cluster mode alters sharded tables only (ADR 0008)")
    body = re.sub(r"^ALTER\s+TABLE\s+\{db\}\.\w+\s*(?:\{on_cluster\})?", "", code, flags=re.I)
    columns = [bool(_COLUMN_COMMAND.match(c)) for c in _top_level_commands(body)]
    if any(columns) and not all(columns):
        raise ClusterRenderError(f"ALTER TABLE {name} mixes column and other commands: split it (ADR 0008)")
    local = _fill(_rename_header(statement, r"ALTER\s+TABLE\s+", name, f"{name}_local"), database, cluster)
    if not all(columns):
        return [local]
    lines = statement.splitlines()
    while lines and (not lines[0].strip() or lines[0].strip().startswith("--")):
        lines.pop(0)  # the statement's own comment stays with the local ALTER
    distributed = "\n".join(lines)
    comment = f"-- {name}: the Distributed table's columns, as {name}_local's\n"
    return [local, comment + _fill(distributed, database, cluster)]


# ------------------------------------------------------------------------------------ applying


def bootstrap_statements(database: str, cluster: str | None = None) -> list[str]:
    """The database and the table of applied migrations (in cluster mode a KeeperMap: one record
    for the whole cluster, whichever server a sink connects to)."""
    on_cluster = f" ON CLUSTER {cluster}" if cluster else ""
    return [
        f"CREATE DATABASE IF NOT EXISTS {database}{on_cluster}",
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations{on_cluster} "
        "(version UInt32, name String, applied_at DateTime DEFAULT now()) "
        + (f"ENGINE = KeeperMap('/headwater/{database}/schema_migrations') PRIMARY KEY version"
           if cluster else "ENGINE = ReplacingMergeTree() ORDER BY version"),
    ]


def script(database: str, cluster: str | None = None) -> list[str]:
    """Every statement :func:`apply_migrations` runs on an empty database, recording each migration
    as applied after its statements (what ``headwater migrate --print`` prints)."""
    statements = bootstrap_statements(database, cluster)
    for migration in load_migrations():
        statements += migration.statements(database, cluster)
        statements.append(
            f"INSERT INTO {database}.schema_migrations (version, name) VALUES ({migration.version}, '{migration.name}')"
        )
    return statements


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
    for statement in bootstrap_statements(database, cluster):
        client.command(statement)
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
