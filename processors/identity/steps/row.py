"""Step ``to_event_row``: an event (the identity stage's JSON form, see ``pipeline.event_doc``)
with its person → the ClickHouse event row (a dict with exactly ``headwater.rows.EVENT_COLUMNS``).
Pure; ``created_at`` is the time headwater received the event.
"""

from __future__ import annotations

from typing import Any

import orjson

from headwater.rows import GROUP_SLOTS

from .persons import EventPerson

_EMPTY_GROUPS = {f"$group_{i}": "" for i in range(GROUP_SLOTS)}
_EMPTY_GROUP_PROPS = {f"group{i}_properties": "" for i in range(GROUP_SLOTS)}
_EMPTY_GROUP_CREATED_AT = {f"group{i}_created_at": 0 for i in range(GROUP_SLOTS)}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def to_event_row(ev: dict[str, Any], person: EventPerson) -> dict[str, Any]:
    props = ev["p"]
    return {
        "uuid": ev["u"],
        "team_id": ev["t"],
        "event": ev["e"],
        "distinct_id": ev["d"],
        "person_id": person.person_id,
        "timestamp": ev["ts"],
        "properties": orjson.dumps(props).decode(),
        "person_properties": orjson.dumps(person.properties).decode(),
        "person_created_at": person.created_at_us,
        **_EMPTY_GROUPS,
        **_EMPTY_GROUP_PROPS,
        **_EMPTY_GROUP_CREATED_AT,
        "$session_id": _text(props.get("$session_id")),
        "$window_id": _text(props.get("$window_id")),
        "created_at": ev["now"],
    }
