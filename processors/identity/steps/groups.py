"""Steps of group analytics (semantics §2): what an event asks of groups, group type assignment,
the group update, and the group columns of an event row. Pure: no Kafka, no clock.

A group's state is ``{"props": {...}, "created": µs, "v": version}``, kept at its team's home
(ADR 0004). A team's group types are ``{"types": {group_type: index}, "refused": [group_type]}``
there too: one writer per team, so two workers can never give one type two indexes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from headwater.outcomes import Warn
from headwater.rows import GROUP_SLOTS

from ..rules import js_loose_equals, js_string, js_truthy

#: §2 ``MAX_GROUP_TYPES_PER_TEAM``: indexes 0..4.
MAX_GROUP_TYPES = GROUP_SLOTS
#: Refused group types a team remembers (so each is warned about once); beyond this, each ask warns.
MAX_REMEMBERED_REFUSALS = 100
#: The event properties PostHog fills from ``$groups`` (``$group_0`` .. ``$group_4``).
GROUP_PROPERTY_KEYS = tuple(f"$group_{i}" for i in range(GROUP_SLOTS))
_EMPTY_KEYS = dict.fromkeys(GROUP_PROPERTY_KEYS, "")
_EMPTY_PROPERTIES = {f"group{i}_properties": "" for i in range(GROUP_SLOTS)}
_EMPTY_CREATED_AT = {f"group{i}_created_at": 0 for i in range(GROUP_SLOTS)}


@dataclass(frozen=True)
class GroupIdentify:
    """A ``$groupidentify`` event's request: register ``group_type``; when ``group_key`` is not
    None, also shallow-merge ``group_set`` into that group."""

    group_type: str
    group_key: str | None
    group_set: dict


def group_identify_of(properties: dict) -> GroupIdentify | None:
    """§2: a truthy ``$group_type`` and ``$group_key`` update the group (``String(key)``, with
    ``$group_set || {}``); without a key, a present ``$group_set`` still registers the type."""
    group_type = properties.get("$group_type")
    if not js_truthy(group_type):
        return None
    group_set = properties.get("$group_set")
    key = properties.get("$group_key")
    if js_truthy(key) and not isinstance(key, (dict, list)):
        return GroupIdentify(js_string(group_type), js_string(key), group_set if isinstance(group_set, dict) else {})
    if group_set is not None:
        return GroupIdentify(js_string(group_type), None, {})
    return None


def named_groups(properties: dict) -> tuple[list[tuple[str, str]], list[Warn]]:
    """The ``(group_type, group_key)`` pairs of ``properties.$groups``; numeric and boolean keys
    become their JS string. A value that cannot be a key (null, empty, object, array) is left out
    with a warning ``invalid_group_key``; a ``$groups`` that is not an object, with
    ``invalid_groups``."""
    groups = properties.get("$groups")
    if groups is None:
        return [], []
    if not isinstance(groups, dict):
        return [], [Warn("invalid_groups", {"$groups": repr(groups)[:200],
                                            "message": "$groups must be an object of group type to group key"})]
    pairs: list[tuple[str, str]] = []
    warnings: list[Warn] = []
    for group_type, key in groups.items():
        if not group_type or key is None or key == "" or isinstance(key, (dict, list)):
            warnings.append(Warn("invalid_group_key", {"groupType": group_type, "groupKey": repr(key)[:200]}))
            continue
        pairs.append((group_type, js_string(key)))
    return pairs, warnings


def assign_types(registry: dict[str, Any], wanted: list[str]) -> tuple[dict[str, int], list[str]]:
    """§2 group type → index, first come: each new type gets the smallest unused index 0..4.
    Mutates ``registry``; returns the new assignments and the types refused for the first time
    (the caller warns about those). A type already refused stays refused."""
    types: dict[str, int] = registry.setdefault("types", {})
    refused: list[str] = registry.setdefault("refused", [])
    assigned: dict[str, int] = {}
    newly_refused: list[str] = []
    for group_type in dict.fromkeys(wanted):
        if group_type in types or group_type in refused:
            continue
        free = sorted(set(range(MAX_GROUP_TYPES)) - set(types.values()))
        if free:
            types[group_type] = assigned[group_type] = free[0]
            continue
        newly_refused.append(group_type)
        if len(refused) < MAX_REMEMBERED_REFUSALS:
            refused.append(group_type)
    return assigned, newly_refused


def update_group(current: dict[str, Any] | None, group_set: dict, timestamp_us: int, now_us: int) -> dict[str, Any] | None:
    """§2 upsert: a new group is version 1 with ``created_at = min(now, event time)``; an existing
    one takes each key that is absent or loosely unequal (JS ``!=``), and only if one did: version
    + 1 and ``created_at = min(existing, event time)``. Returns None when nothing changes."""
    if current is None:
        return {"props": dict(group_set), "created": min(now_us, timestamp_us), "v": 1}
    props = current["props"]
    changed = {k: v for k, v in group_set.items() if k not in props or not js_loose_equals(props[k], v)}
    if not changed:
        return None
    return {"props": {**props, **changed}, "created": min(current["created"], timestamp_us), "v": current["v"] + 1}


def slot_values(slots: list[list[Any]] | None) -> dict[str, Any]:
    """The event row's group columns from the slots ``[[index, key, properties_json, created_us]]``
    an event carries: ``$group_N``, ``groupN_properties``, ``groupN_created_at``."""
    row: dict[str, Any] = {**_EMPTY_KEYS, **_EMPTY_PROPERTIES, **_EMPTY_CREATED_AT}  # EVENT_COLUMNS order
    for index, key, properties, created in slots or ():
        row[f"$group_{index}"] = key
        row[f"group{index}_properties"] = properties
        row[f"group{index}_created_at"] = created
    return row
