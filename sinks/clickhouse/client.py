"""One way to reach ClickHouse, embedded or real: clickhouse-connect over HTTP."""

from __future__ import annotations

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from headwater.settings import ClickHouseTarget


def connect(target: ClickHouseTarget, **kwargs) -> Client:
    """A clickhouse-connect client for ``target``; tables are always named ``db.table``."""
    return clickhouse_connect.get_client(
        host=target.host,
        port=target.port,
        username=target.username,
        password=target.password,
        secure=target.secure,
        **kwargs,
    )
