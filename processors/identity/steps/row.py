"""Step ``to_event_row``: an event (the identity stage's JSON form, see ``pipeline.event_doc``)
with its person and its group slots (``ev["g"]``, see ``groups.slot_values``) → the ClickHouse event row (a dict with exactly ``headwater.rows.EVENT_COLUMNS``).
Pure; ``created_at`` is the time headwater received the event.
"""

from __future__ import annotations

from typing import Any

import orjson

from .groups import slot_values
from .persons import EventPerson


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
        **slot_values(ev.get("g")),
        "$session_id": _text(props.get("$session_id")),
        "$window_id": _text(props.get("$window_id")),
        "created_at": ev["now"],
    }
