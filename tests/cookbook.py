"""The analyst SQL cookbook (``docs/sql/``) as tests run it.

Cookbook files name the database literally (``headwater.events``) so that an analyst can run them
as they are; tests run them against their own database. ``load`` reads one file and points it at
another database, ``run`` executes it with clickhouse-connect, binding the ``{name:Type}``
placeholders server-side (``param_name`` on the HTTP interface), as an analyst's client would.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

COOKBOOK = Path(__file__).resolve().parent.parent / "docs" / "sql"
DATABASE = "headwater"

_QUALIFIED = re.compile(rf"(?<![\w.]){DATABASE}\.")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def path(name: str) -> Path:
    """The file of cookbook query ``name`` (``groups/weekly_active_groups``)."""
    return COOKBOOK / f"{name}.sql"


def load(name: str, database: str = DATABASE) -> str:
    """The SQL of cookbook query ``name``, with every ``headwater.`` table prefix made ``database.``."""
    if not _IDENTIFIER.match(database):
        raise ValueError(f"not a plain database name: {database!r}")
    return _QUALIFIED.sub(f"{database}.", path(name).read_text())


def run(client: Client, name: str, database: str = DATABASE, **params: Any) -> list[tuple]:
    """The rows of cookbook query ``name`` run on ``database`` with ``params`` bound server-side."""
    return client.query(load(name, database), parameters=params).result_rows
