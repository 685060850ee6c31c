"""Topic declarations: the one place that names every topic, its key, partitions and configs.

The ``headwater topics`` command, docker compose and the deploy manifests read (or are checked
against) this list. Names get the configured prefix; partition counts come from settings except
for the per-team topics, which stay small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

COMPACT = {"cleanup.policy": "compact"}
DELETE_7D = {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * 3600 * 1000)}


@dataclass(frozen=True)
class TopicSpec:
    """One topic: ``base`` name (before the prefix), key shape, and configs."""

    base: str
    key: str
    value: str
    compacted: bool
    partitions: int | None = None  # None: the settings' partition count
    configs: dict[str, str] = field(default_factory=dict)

    def name(self, prefix: str) -> str:
        return f"{prefix}{self.base}"

    def all_configs(self) -> dict[str, str]:
        return {**(COMPACT if self.compacted else DELETE_7D), **self.configs}


EVENTS_RAW = TopicSpec("events_raw", "token:distinct_id", "raw event envelope (JSON Schema)", False)
EVENTS_ENRICHED = TopicSpec("events_enriched", "team_id:distinct_id", "event row for ClickHouse", False)
PERSONS = TopicSpec("persons", "team_id:person_id", "person snapshot with version", True)
PERSON_DISTINCT_IDS = TopicSpec(
    "person_distinct_ids", "team_id:distinct_id", "distinct_id -> person_id, version, is_deleted", True
)
GROUPS = TopicSpec("groups", "team_id:group_type_index:group_key", "group properties, version", True)
GROUP_TYPES = TopicSpec("group_types", "team_id:group_type", "group_type -> index 0..4", True)
EVENTS_DEAD_LETTER = TopicSpec(
    "events_dead_letter", "original key", "original bytes, dlq_* headers", False
)
INGESTION_WARNINGS = TopicSpec(
    "ingestion_warnings", "team_id", "{type, team_id, event_uuid, distinct_id, details, timestamp}", False
)

# Internal topics of the identity stage (ADR 0001): same partition count as events_raw.
IDENTITY_INBOX = TopicSpec("identity_inbox", "team_id:message kind", "identity protocol messages, explicit partition", False)
IDENTITY_CHANGELOG = TopicSpec("identity_changelog", "state key", "identity state records (JSON; null deletes)", True)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    EVENTS_RAW,
    EVENTS_ENRICHED,
    PERSONS,
    PERSON_DISTINCT_IDS,
    GROUPS,
    GROUP_TYPES,
    EVENTS_DEAD_LETTER,
    INGESTION_WARNINGS,
    IDENTITY_INBOX,
    IDENTITY_CHANGELOG,
)


@dataclass(frozen=True)
class TopicNames:
    """Resolved topic names for one prefix, passed to every stage: ``names.events_raw`` etc.
    The names are computed once here, not on every access (stages use them per event)."""

    prefix: str = ""

    def __post_init__(self) -> None:
        for spec in ALL_TOPICS:
            object.__setattr__(self, spec.base, spec.name(self.prefix))

    if TYPE_CHECKING:  # the attributes set above, for type checkers
        def __getattr__(self, base: str) -> str: ...
