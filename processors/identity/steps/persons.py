"""Steps on one person record (semantics §1.2-§1.6): create, update, merge, personless use.

A person record is a JSON document kept at the home of its root distinct id (ADR 0001):
``{"id", "props", "ident", "created", "v", "dids": {distinct_id: row_version}}``; a person that
was merged into another is ``{"fwd": target_root}``. Every function is pure: it returns the new
record(s) and what to publish (``Changes``), never touches Kafka or the clock. Times are
microseconds since the epoch (UTC), taken from the event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from headwater.outcomes import Warn

from ..rules import (
    NO_PERSON_UPDATE_EVENTS,
    PERSON_PROPERTIES_SIZE_LIMIT_BYTES,
    apply_property_updates,
    as_dict,
    compute_property_updates,
    detached,
    person_uuid,
    properties_size,
)

#: §1.8: ``created_at`` of the fake person of a personless event (1970-01-01T00:00:05Z).
PERSONLESS_CREATED_AT_US = 5_000_000
#: §1.8: a personless event later than ``created_at + 1 min`` is a force upgrade.
FORCE_UPGRADE_AFTER_US = 60_000_000


@dataclass
class Changes:
    """What a step asks to publish: person snapshots (``persons`` topic), deleted persons (a
    deleted snapshot then a tombstone), distinct-id rows and warnings."""

    persons: list[dict] = field(default_factory=list)
    deleted: list[dict] = field(default_factory=list)
    distinct_ids: list[tuple[str, str, int]] = field(default_factory=list)  # (did, person id, version)
    warnings: list[Warn] = field(default_factory=list)


@dataclass(frozen=True)
class EventPerson:
    """The person columns of an event row (§4): id, properties as of the event, created_at."""

    person_id: str
    properties: dict
    created_at_us: int


def _too_big(properties: dict, person_id: str, ev: dict, changes: Changes) -> bool:
    """§1.6 size cap: a write over ~640 KB is refused with ``person_properties_size_violation``."""
    if properties_size(properties) <= PERSON_PROPERTIES_SIZE_LIMIT_BYTES:
        return False
    changes.warnings.append(Warn("person_properties_size_violation", {
        "personId": person_id, "distinctId": ev["d"], "teamId": ev["t"], "eventUuid": ev["u"],
        "message": "Person properties exceeds size limit and was rejected"}))
    return True


def event_person(person: dict, ev: dict) -> EventPerson:
    """Full processing: the person's properties with the event's ``$set`` on top (§4: the row
    shows the new value even when the write filter did not store it)."""
    overlay = as_dict(ev["p"].get("$set"))
    return EventPerson(person["id"], {**person["props"], **overlay}, person["created"])


def create(ev: dict, ids: list[tuple[str, int]], *, identified: bool, changes: Changes) -> dict | None:
    """§1.6 create: id ``uuid5`` of the first distinct id, properties
    ``{...$set_once, ...$set, $creator_event_uuid}`` (only the creator uuid for events that never
    update persons), version 0, created_at = event time. None if the size cap refused it."""
    if ev["e"] in NO_PERSON_UPDATE_EVENTS:
        props: dict[str, Any] = {"$creator_event_uuid": ev["u"]}
    else:
        props = detached({**as_dict(ev["p"].get("$set_once")), **as_dict(ev["p"].get("$set")),
                          "$creator_event_uuid": ev["u"]})
    pid = person_uuid(ev["t"], ids[0][0])
    if _too_big(props, pid, ev, changes):
        return None
    person = {"id": pid, "props": props, "ident": identified, "created": ev["ts"], "v": 0,
              "dids": {did: version for did, version in ids}}
    changes.persons.append(person)
    changes.distinct_ids.extend((did, pid, version) for did, version in ids)
    return person


def update(person: dict, ev: dict, *, mark_identified: bool, changes: Changes) -> dict:
    """§1.5/§1.6 update: one write (version + 1) when properties change and the write filter
    lets them through, or when ``is_identified`` flips; the record unchanged otherwise."""
    updates = compute_property_updates(ev["e"], person["props"], ev["p"])
    flips = mark_identified and not person["ident"]
    if not flips and not ((updates.to_set or updates.to_unset) and updates.triggers_write):
        return person
    props = apply_property_updates(person["props"], updates)
    if _too_big(props, person["id"], ev, changes):
        return person  # the whole write is refused, the identified flag included (as the model)
    person = {**person, "props": props, "ident": person["ident"] or flips, "v": person["v"] + 1}
    changes.persons.append(person)
    return person


def add_distinct_id(person: dict, did: str, version: int, changes: Changes) -> dict:
    """§1.2 exactly one person exists: the missing distinct id joins it with ``version``."""
    person = {**person, "dids": {**person["dids"], did: version}}
    changes.distinct_ids.append((did, person["id"], version))
    return person


def merge(target: dict, source: dict, ev: dict, changes: Changes) -> dict:
    """§1.3 ``mergePeople`` (allowed case), one write: properties ``{...source, ...target}``
    (target wins) with the event's updates on top, judged against the merged properties;
    ``created_at = min``; identified; ``version = max + 1``; every source distinct id moves with
    its row version + 1; the source is deleted with version + 100. Over the size cap the merge
    still happens and the target keeps its own properties (ADR 0001)."""
    merged = {**source["props"], **target["props"]}
    props = apply_property_updates(merged, compute_property_updates(ev["e"], merged, ev["p"]))
    if _too_big(props, target["id"], ev, changes):
        props = target["props"]
    dids = dict(target["dids"])
    for did in sorted(source["dids"]):
        dids[did] = source["dids"][did] + 1
        changes.distinct_ids.append((did, target["id"], dids[did]))
    target = {**target, "props": props, "ident": True, "created": min(target["created"], source["created"]),
              "v": max(target["v"], source["v"]) + 1, "dids": dids}
    changes.persons.append(target)
    changes.deleted.append({**source, "v": source["v"] + 100})
    return target


def personless_use(person: dict, ev: dict) -> tuple[EventPerson, str]:
    """§1.8 a personless event of a distinct id that has a person: its id and created_at, blank
    properties; ``force_upgrade`` when ``ts > created_at + 1 min`` (nothing is written: the
    event's ``$set`` was stripped and ``last_seen_at`` is not tracked)."""
    mode = "force_upgrade" if ev["ts"] > person["created"] + FORCE_UPGRADE_AFTER_US else "propertyless"
    return EventPerson(person["id"], {}, person["created"]), mode
