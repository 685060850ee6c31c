"""Step ``to_event_row``: a parsed event with its person → the ClickHouse event row (a dict with
exactly ``headwater.rows.EVENT_COLUMNS``). Pure; ``created_at`` is the time headwater received it.
"""

from __future__ import annotations

from typing import Any

import orjson

from headwater.rows import GROUP_SLOTS

from .parse import ParsedEvent

_EMPTY_GROUPS = {f"$group_{i}": "" for i in range(GROUP_SLOTS)}
_EMPTY_GROUP_PROPS = {f"group{i}_properties": "" for i in range(GROUP_SLOTS)}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def to_event_row(
    event: ParsedEvent,
    person_id: str,
    person_properties: dict[str, Any] | None = None,
    person_created_at_us: int = 0,
) -> dict[str, Any]:
    props = event.properties
    return {
        "uuid": event.uuid,
        "team_id": event.team_id,
        "event": event.event,
        "distinct_id": event.distinct_id,
        "person_id": person_id,
        "timestamp": event.timestamp_us,
        "properties": orjson.dumps(props).decode(),
        "person_properties": orjson.dumps(person_properties or {}).decode(),
        "person_created_at": person_created_at_us,
        **_EMPTY_GROUPS,
        **_EMPTY_GROUP_PROPS,
        "$session_id": _text(props.get("$session_id")),
        "$window_id": _text(props.get("$window_id")),
        "created_at": event.now_us,
    }
