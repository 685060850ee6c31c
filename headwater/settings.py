"""Settings: environment variables with the ``HEADWATER_`` prefix, built once at the entry point.

Nothing reads the environment below the entry point: the CLI builds one :class:`Settings` and
passes it (or the sections it needs) down.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_HOST = "127.0.0.1"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_TOPIC_PREFIX = re.compile(r"^[A-Za-z0-9._-]{0,100}$")


def parse_teams(spec: str) -> dict[str, int]:
    """Parse ``token:team_id,token:team_id`` into ``{token: team_id}``; raise ValueError on junk."""
    teams: dict[str, int] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        token, sep, team = item.rpartition(":")
        if not sep or not token or not team.strip().isdigit():
            raise ValueError(f"HEADWATER_TEAMS entry {item!r} is not 'token:team_id'")
        if token in teams:
            raise ValueError(f"HEADWATER_TEAMS names token {token!r} twice")
        if int(team) in teams.values():
            # one token per team, as in PostHog: identity state is homed by "token:distinct_id"
            raise ValueError(f"HEADWATER_TEAMS gives team {int(team)} a second token {token!r}")
        teams[token] = int(team)
    if not teams:
        raise ValueError("HEADWATER_TEAMS names no team")
    return teams


class ClickHouseTarget:
    """Where ClickHouse is, parsed from ``http(s)://user:pass@host:port/db``."""

    def __init__(self, url: str, default_database: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"HEADWATER_CLICKHOUSE_URL {url!r} must look like http(s)://user:pass@host:port/db")
        self.secure = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (8443 if self.secure else 8123)
        self.username = unquote(parts.username) if parts.username else "default"
        self.password = unquote(parts.password) if parts.password else ""
        database = parts.path.strip("/") or default_database
        if not _IDENTIFIER.match(database):
            raise ValueError(f"ClickHouse database name {database!r} is not a plain identifier")
        self.database = database

    @property
    def display(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.username}@{self.host}:{self.port}/{self.database}"


class Settings(BaseSettings):
    """Every knob of headwater. Defaults run the embedded mode on one machine."""

    model_config = SettingsConfigDict(env_prefix="HEADWATER_", extra="ignore")

    # Kafka -----------------------------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        default=None, description="Kafka bootstrap servers; unset: start the embedded Tansu broker."
    )
    kafka_security_protocol: str | None = None
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: str | None = None
    kafka_extra: dict[str, str] = Field(
        default_factory=dict, description="More librdkafka settings as a JSON object."
    )
    kafka_session_timeout_ms: int = Field(
        default=6000,
        ge=1000,
        description="Consumer-group session timeout; Tansu's first assignment takes about half of it.",
    )
    kafka_isolation_level: Literal["auto", "read_committed", "read_uncommitted"] = Field(
        default="auto",
        description="How the group-table follower reads transactional topics, whether restores read on "
        "uncommitted after 10 s behind a transaction, and whether the Tansu workarounds are on (a worker's own "
        "input and the sink always read read_committed). "
        "auto: read_committed "
        "on a configured cluster, read_uncommitted on the embedded Tansu broker, whose read_committed "
        "filters no aborted records and can stall behind a transaction it never resolves (ADR 0015).",
    )
    topic_prefix: str = ""
    partitions: int = Field(default=4, ge=1, le=1024)
    replication_factor: int = Field(default=1, ge=1)

    # ClickHouse --------------------------------------------------------------------------------
    clickhouse_url: str | None = Field(
        default=None, description="http(s)://user:pass@host:port/db; unset: the embedded chDB server."
    )
    clickhouse_database: str = "headwater"
    clickhouse_cluster: str | None = Field(
        default=None, description="Render the schema ON CLUSTER with Replicated/Distributed engines."
    )

    # Embedded defaults ---------------------------------------------------------------------------
    embedded_kafka_port: int = 9092
    embedded_clickhouse_port: int = 8123
    data_dir: Path = Path(".headwater")

    # Product -----------------------------------------------------------------------------------
    teams: str = "phc_local:1"
    #: teams with PostHog's ``person_processing_opt_out``: every event personless (semantics §1.8)
    personless_teams: str = ""
    capture_addr: str = "127.0.0.1:8000"
    #: server-side sessions of events without ``$session_id`` (semantics §3, posthog-js defaults)
    session_timeout_s: int = Field(default=1800, ge=1, description="Inactivity that ends a server-side session.")
    session_max_s: int = Field(default=86_400, ge=1, description="Longest server-side session.")
    session_lateness_s: int = Field(
        default=3600, ge=0, description="How late an out-of-order event may be and still join its session."
    )

    # Stages ------------------------------------------------------------------------------------
    processor_batch_size: int = Field(default=5000, ge=1)
    processor_batch_ms: int = Field(default=100, ge=1)
    sink_batch_rows: int = Field(default=10_000, ge=1)
    sink_batch_ms: int = Field(default=250, ge=1)  # p50 capture → queryable ≤ 1 s (DESIGN §7)
    max_message_bytes: int = Field(default=1_000_000, ge=1024)

    # Observability (docs/adr/0012-observability.md) -----------------------------------------------
    metrics_addr: str | None = Field(
        default=None,
        description="host:port of the Prometheus /metrics endpoint of each worker, sink and capture process; "
        "unset: no endpoint. Port 0: an ephemeral port. A taken port: the next free one (up to 63 above), "
        "so that the processes of one machine can share the setting. Each process logs its address.",
    )

    @field_validator("teams")
    @classmethod
    def _teams_parse(cls, value: str) -> str:
        parse_teams(value)
        return value

    @field_validator("personless_teams")
    @classmethod
    def _team_ids(cls, value: str) -> str:
        if not all(t.strip().isdigit() for t in value.split(",") if t.strip()):
            raise ValueError(f"{value!r} is not a comma-separated list of team ids")
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            host, sep, port = value.rpartition(":")
            if not sep or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"{value!r} is not host:port (port 0..65535; ':9100' listens on every address)")
        return value

    @field_validator("clickhouse_database")
    @classmethod
    def _database_identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError(f"{value!r} is not a plain identifier")
        return value

    @field_validator("clickhouse_cluster")
    @classmethod
    def _cluster_identifier(cls, value: str | None) -> str | None:
        if value is not None and not _IDENTIFIER.match(value):
            raise ValueError(f"{value!r} is not a plain identifier")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix_chars(cls, value: str) -> str:
        if not _TOPIC_PREFIX.match(value):
            raise ValueError("topic prefix may hold only letters, digits, '.', '_' and '-'")
        return value

    # Derived -----------------------------------------------------------------------------------
    @property
    def team_by_token(self) -> dict[str, int]:
        return parse_teams(self.teams)

    @property
    def personless_team_ids(self) -> frozenset[int]:
        return frozenset(int(t) for t in self.personless_teams.split(",") if t.strip())

    @property
    def embedded_kafka(self) -> bool:
        return self.kafka_bootstrap is None

    @property
    def embedded_clickhouse(self) -> bool:
        return self.clickhouse_url is None

    @property
    def isolation_level(self) -> str:
        """The ``isolation.level`` of the group-table follower and of ``consumer_config``'s consumers
        (ADR 0015). The stage runtime's input and the sink set ``read_committed`` over it."""
        if self.kafka_isolation_level != "auto":
            return self.kafka_isolation_level
        return "read_uncommitted" if self.embedded_kafka else "read_committed"

    @property
    def tansu_workarounds(self) -> bool:
        """Whether the workarounds for Tansu 0.6's transactions are on (ADR 0015): the gap guard on
        ``events_raw``, restores reading on past a stuck transaction, one EndTxn at a time, and the
        settler. Where the isolation level is ``read_uncommitted``, which ``auto`` picks on the
        embedded broker."""
        return self.isolation_level == "read_uncommitted"

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap or f"{EMBEDDED_HOST}:{self.embedded_kafka_port}"

    @property
    def clickhouse(self) -> ClickHouseTarget:
        url = self.clickhouse_url or f"http://{EMBEDDED_HOST}:{self.embedded_clickhouse_port}"
        return ClickHouseTarget(url, self.clickhouse_database)

    @property
    def capture_host_port(self) -> tuple[str, int]:
        host, _, port = self.capture_addr.rpartition(":")
        return host or EMBEDDED_HOST, int(port)

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        """Where the metrics endpoint listens; None: no endpoint. An empty host is every address."""
        if self.metrics_addr is None:
            return None
        host, _, port = self.metrics_addr.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)

    def kafka_config(self, **overrides: Any) -> dict[str, Any]:
        """librdkafka settings common to every client: bootstrap, security, extras, then overrides."""
        config: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        named = {
            "security.protocol": self.kafka_security_protocol,
            "sasl.mechanism": self.kafka_sasl_mechanism,
            "sasl.username": self.kafka_sasl_username,
            "sasl.password": self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None,
            "ssl.ca.location": self.kafka_ssl_ca_location,
        }
        config.update({k: v for k, v in named.items() if v is not None})
        config.update(self.kafka_extra)
        config.update(overrides)
        return config

    def consumer_config(self, group_id: str, **overrides: Any) -> dict[str, Any]:
        return self.kafka_config(
            **{
                "group.id": group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": self.isolation_level,
                "session.timeout.ms": self.kafka_session_timeout_ms,
                "heartbeat.interval.ms": max(100, self.kafka_session_timeout_ms // 4),
                "enable.partition.eof": False,
                **overrides,
            }
        )
