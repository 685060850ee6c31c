"""Step ``resolve_person``: the person id of an event's distinct_id.

Input: a parsed event. Output: the person id (text). For now every distinct_id resolves to its
deterministic id ``uuid5(NS, "{team_id}:{distinct_id}")``; the identity issue adds the
distinct_id → person table that merges re-point.
"""

from __future__ import annotations

from headwater.wire import person_id_for

from .parse import ParsedEvent


def resolve_person(event: ParsedEvent) -> str:
    return str(person_id_for(event.team_id, event.distinct_id))
