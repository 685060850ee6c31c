"""Every worker's copy of the team's group types and group states (ADR 0004).

The team home owns both (one writer per team) and publishes them on the compacted topics
``group_types`` and ``groups``; each worker reads those topics from the beginning into this table
(``apply``), and also learns from the team home's answers to its own questions (``learn_*``), so
the distinct id that asked sees the answer at once. Updates only move forward (a group's highest
version wins), so the two feeds may arrive in any order.

Group types never change once assigned, so an index read here is final; a type this table does
not know is asked of the team home before its event goes on. Group properties here may lag the
team home by the topic's delivery time for distinct ids other than the one that sent the update.
"""

from __future__ import annotations

from typing import Any

import orjson

from .steps.groups import MAX_REMEMBERED_REFUSALS

#: Refused types a worker remembers per team before it starts asking again.
_MAX_REFUSED_CACHED = 10 * MAX_REMEMBERED_REFUSALS


class GroupTable:
    def __init__(self, group_types_topic: str = "group_types", groups_topic: str = "groups") -> None:
        self.group_types_topic = group_types_topic
        self.groups_topic = groups_topic
        self.types: dict[int, dict[str, int]] = {}
        self.refused: dict[int, set[str]] = {}
        # (team, index, key) -> (version, properties JSON text, created_at µs)
        self.groups: dict[tuple[int, int, str], tuple[int, str, int]] = {}

    # -- reads ----------------------------------------------------------------------------------
    def index(self, team: int, group_type: str) -> int | None:
        return self.types.get(team, {}).get(group_type)

    def unknown(self, team: int, group_types: list[str]) -> list[str]:
        """The types neither assigned nor known to be refused: the team home must be asked."""
        known = self.types.get(team, {})
        refused = self.refused.get(team, ())
        return [t for t in dict.fromkeys(group_types) if t not in known and t not in refused]

    def slots(self, team: int, pairs: list[tuple[str, str]]) -> list[list[Any]]:
        """``[[index, key, properties_json, created_us]]`` for the named groups whose type has an
        index (a refused type has none). A group never identified has ``{}`` and created 0."""
        out: list[list[Any]] = []
        taken: set[int] = set()
        for group_type, key in pairs:
            index = self.index(team, group_type)
            if index is None or index in taken:
                continue
            taken.add(index)
            _, properties, created = self.groups.get((team, index, key), (0, "{}", 0))
            out.append([index, key, properties, created])
        return out

    # -- writes ---------------------------------------------------------------------------------
    def learn_types(self, team: int, types: dict[str, int], refused: list[str]) -> None:
        self.types.setdefault(team, {}).update(types)
        cached = self.refused.setdefault(team, set())
        if len(cached) + len(refused) > _MAX_REFUSED_CACHED:
            cached.clear()
        cached.update(refused)

    def learn_group(self, team: int, index: int, key: str, version: int, properties_json: str, created_us: int) -> None:
        current = self.groups.get((team, index, key))
        if current is None or version > current[0]:
            self.groups[(team, index, key)] = (version, properties_json, created_us)

    def apply(self, topic: str | None, value: bytes | None) -> None:
        """One record of the ``group_types`` or ``groups`` topic (rows as headwater.rows defines)."""
        if value is None:
            return
        row = orjson.loads(value)
        if topic == self.group_types_topic:
            self.learn_types(row["team_id"], {row["group_type"]: row["group_type_index"]}, [])
        elif topic == self.groups_topic:
            self.learn_group(row["team_id"], row["group_type_index"], row["group_key"], row["version"],
                             row["group_properties"], row["created_at"])
