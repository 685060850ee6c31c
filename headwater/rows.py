"""The event row: the value of ``events_enriched`` and the columns of the ClickHouse ``events`` table.

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
    "$session_id",
    "$window_id",
    "created_at",
)

WARNING_COLUMNS: tuple[str, ...] = ("team_id", "type", "event_uuid", "distinct_id", "details", "timestamp")
