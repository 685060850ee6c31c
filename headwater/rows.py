"""The rows that travel on our topics and land in ClickHouse, each a tuple of JSON keys that are also
the column names: the event row (``events_enriched`` → ``events``), the warning row, the identity
rows (``persons`` → ``persons``, ``person_distinct_ids`` → ``person_distinct_ids``) and the group rows
(``groups`` → ``groups``, ``group_types`` → ``group_types``).

Rows travel as JSON objects with exactly these keys. Times are integers (microseconds since
the epoch, UTC) so that neither side parses dates on the hot path.
"""

from __future__ import annotations

GROUP_SLOTS = 5

EVENT_COLUMNS: tuple[str, ...] = (
    "uuid",
    "team_id",
    "event",
    "distinct_id",
    "person_id",
    "timestamp",
    "properties",
    "person_properties",
    "person_created_at",
    *(f"$group_{i}" for i in range(GROUP_SLOTS)),
    *(f"group{i}_properties" for i in range(GROUP_SLOTS)),
    *(f"group{i}_created_at" for i in range(GROUP_SLOTS)),  # int µs; 0 when slot i is empty
    "$session_id",
    "$window_id",
    "created_at",
)

WARNING_COLUMNS: tuple[str, ...] = ("team_id", "type", "event_uuid", "distinct_id", "details", "timestamp")

PERSON_COLUMNS: tuple[str, ...] = ("id", "team_id", "properties", "is_identified", "created_at", "version", "is_deleted")
"""The JSON keys of a value on the compacted topic ``persons`` (key ``team_id:person_id``) and the
columns the sink writes to the ClickHouse ``persons`` table. ``properties`` is a JSON text string,
``created_at`` an int (microseconds since the epoch, UTC), ``is_identified``/``is_deleted`` 0/1
ints, ``version`` an int. A record whose value is None (the Kafka tombstone sent after a person's
deleted snapshot, so compaction can drop the key) carries no row."""

DISTINCT_ID_COLUMNS: tuple[str, ...] = ("team_id", "distinct_id", "person_id", "version", "is_deleted")
"""The JSON keys of a value on the compacted topic ``person_distinct_ids`` (key
``team_id:distinct_id``) and the columns of the ClickHouse ``person_distinct_ids`` table.
``person_id`` is a UUID string, ``version`` an int, ``is_deleted`` a 0/1 int. A record whose value
is None (a Kafka tombstone) carries no row."""

GROUP_COLUMNS: tuple[str, ...] = ("team_id", "group_type_index", "group_key", "group_properties", "created_at", "version")
"""The JSON keys of a value on the compacted topic ``groups`` (key ``team_id:group_type_index:group_key``)
and the columns the sink writes to the ClickHouse ``groups`` table. ``group_type_index`` is an int
0..GROUP_SLOTS-1 (the slot ``$group_N`` of the event row), ``group_key`` a non-empty string,
``group_properties`` a JSON text string holding an object, ``created_at`` an int (microseconds since
the epoch, UTC), ``version`` an int ≥ 1. A record whose value is None (a Kafka tombstone) carries no
row."""

GROUP_TYPE_COLUMNS: tuple[str, ...] = ("team_id", "group_type", "group_type_index")
"""The JSON keys of a value on the compacted topic ``group_types`` (key ``team_id:group_type``) and
the columns of the ClickHouse ``group_types`` table: a team's group type name (``company``) and the
index 0..GROUP_SLOTS-1 it was given. A record whose value is None (a Kafka tombstone) carries no row."""
