"""Reference model (test oracle) of person identity: semantics §1 of ``ingestion-semantics.md``.

A plain, single-threaded, stdlib-only implementation of PostHog's person processing as
headwater adopts it. Events are processed one at a time, in order, for any number of teams; the
final state is exposed in the shape of the ClickHouse tables ``persons``,
``person_distinct_ids`` and ``person_overrides`` (DESIGN.md §5). The distributed pipeline is
compared against this model, so every rule carries the § it implements. The model reads time
only from event timestamps, never from the clock.

Decisions where the semantics are a quirk, UNVERIFIED or silent (each repeated where it applies):

* A merge and the event's ``$set``/``$set_once``/``$unset`` are ONE write (version
  ``max(target, source) + 1``); PostHog may write a second version afterwards (§1.3).
* The §1.5 write filter is judged per event: an "ignored" change is discarded, never carried
  into a later write, so the result does not depend on batch boundaries (§1.5 UNVERIFIED part).
* ``last_seen_at`` is tracked but never bumps the version (documented difference, §1.5).
* ``$exception`` / ``$$heatmap`` never write event properties, not even when they create the
  person (§1.5 NO_PERSON_UPDATE_EVENTS; PostHog's create path would take ``$set``).
* A write over the size cap is rejected as a whole and the event is still ingested; a rejected
  creation leaves no person (the event keeps the deterministic id). A merge whose properties
  would exceed the cap still merges (ids move, source deleted, target identified, max+1) but
  keeps the target's own properties (ADR 0001: undoing a merge across partitions is not worth
  a handshake for a case only a 640 KB person reaches).
* ``force_upgrade`` events use the existing person's id with ``{}`` properties and write nothing
  but ``last_seen_at`` (their ``$set`` was stripped, §1.8).
* The ``survey shown`` timestamp is written as ISO 8601 UTC with milliseconds
  (``2024-01-01T12:00:00.000Z``, JS ``toISOString``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable

# The pure rules (constants, illegal ids, JS semantics, §1.5/§1.7 property updates) are shared
# with the identity stage; the scenarios' hand-written expectations check them independently.
from processors.identity.rules import (  # noqa: F401 - re-exported for the tests
    BARE_CASE_INSENSITIVE_ILLEGAL_IDS, BARE_CASE_SENSITIVE_ILLEGAL_IDS, CAMPAIGN_PROPERTIES,
    CASE_INSENSITIVE_ILLEGAL_IDS, CASE_SENSITIVE_ILLEGAL_IDS, EVENT_TO_PERSON_PROPERTIES,
    FILTERED_PERSON_UPDATE_PROPERTIES, FORCE_UPGRADE_AFTER, MAPPED_PROPERTIES, NAMESPACE,
    NO_INITIAL_PROPERTY_EVENTS, NO_PERSON_UPDATE_EVENTS, PERSON_EVENTS, PERSON_PROPERTIES_SIZE_LIMIT_BYTES,
    PERSONLESS_CREATED_AT, PERSONLESS_DISALLOWED_EVENTS, UTC, PropertyUpdates, add_initial_and_campaign_properties,
    apply_property_updates, as_dict, compute_property_updates, decide_process_person, illegal_merge,
    is_distinct_id_illegal, iso_timestamp, js_differs, js_string, js_truthy, merge_other_distinct_id,
    normalize_properties, person_uuid, properties_size,
)

# --------------------------------------------------------------------------------------------
# Records


@dataclass
class Event:
    """An already-parsed event: ``properties`` has the top-level ``$set``/``$set_once`` merged in.

    ``force_disable_person_processing`` mirrors capture's header of that name (§1.8).
    """

    team_id: int
    distinct_id: str
    event: str
    uuid: str
    timestamp: datetime
    properties: dict = field(default_factory=dict)
    force_disable_person_processing: bool = False


@dataclass
class PersonRow:
    """A row of ``persons``. ``last_seen_at`` is informative only: it never bumps the version
    and is excluded from equality (§1.5, documented difference)."""

    id: str
    team_id: int
    properties: dict
    is_identified: bool
    created_at: datetime
    version: int
    is_deleted: bool
    last_seen_at: datetime | None = field(default=None, compare=False)


@dataclass
class DistinctIdRow:
    team_id: int
    distinct_id: str
    person_id: str
    version: int
    is_deleted: bool = False


@dataclass
class Warning:  # noqa: A001 - the name of the ``ingestion_warnings`` record
    type: str
    team_id: int
    event_uuid: str
    distinct_id: str
    details: dict


@dataclass
class EventResult:
    """What the event row carries (§4): person id, person properties, person_mode.

    Dropped events have ``person_id == ""``. ``person_created_at`` is None when no person exists
    (a rejected creation)."""

    uuid: str
    person_id: str
    person_properties: dict
    person_created_at: datetime | None
    person_mode: str
    dropped: bool = False
    drop_reason: str | None = None


def _hour(ts: datetime) -> datetime:
    return ts.replace(minute=0, second=0, microsecond=0)


# --------------------------------------------------------------------------------------------
# The model


@dataclass
class _Person:
    id: str
    team_id: int
    properties: dict
    is_identified: bool
    created_at: datetime
    version: int
    last_seen_at: datetime | None
    distinct_ids: set[str] = field(default_factory=set)
    is_deleted: bool = False

    def row(self) -> PersonRow:
        return PersonRow(self.id, self.team_id, copy.deepcopy(self.properties), self.is_identified,
                         self.created_at, self.version, self.is_deleted, self.last_seen_at)


class PersonsModel:
    """The oracle. ``process`` one event at a time; read the tables with the accessors.

    ``opted_out_teams``: teams with ``person_processing_opt_out`` (§1.8): every event gets
    ``$process_person_profile=false`` injected and is never force-upgraded.
    """

    def __init__(self, opted_out_teams: Iterable[int] = ()) -> None:
        self.opted_out_teams = frozenset(opted_out_teams)
        self.warnings: list[Warning] = []
        self._persons: dict[tuple[int, str], _Person] = {}  # (team, person id), deleted included
        self._distinct_ids: dict[tuple[int, str], DistinctIdRow] = {}
        self._personless: set[tuple[int, str]] = set()  # posthog_personlessdistinctid

    # ---- public read side -----------------------------------------------------------------

    def persons(self) -> list[PersonRow]:
        """Latest row of every person ever written, deleted ones included (version + 100)."""
        return [p.row() for p in self._persons.values()]

    def live_persons(self) -> dict[tuple[int, str], PersonRow]:
        return {k: p.row() for k, p in self._persons.items() if not p.is_deleted}

    def distinct_ids(self) -> dict[tuple[int, str], DistinctIdRow]:
        return {k: copy.copy(r) for k, r in self._distinct_ids.items()}

    def person_overrides(self) -> dict[tuple[int, str], DistinctIdRow]:
        """DESIGN §5 / semantics §4: the distinct-id rows with ``version > 0``."""
        return {k: copy.copy(r) for k, r in self._distinct_ids.items() if r.version > 0}

    def person_of(self, team_id: int, distinct_id: str) -> str | None:
        row = self._distinct_ids.get((team_id, distinct_id))
        return row.person_id if row else None

    def personless_distinct_ids(self) -> set[tuple[int, str]]:
        return set(self._personless)

    # ---- processing ------------------------------------------------------------------------

    def process(self, event: Event) -> EventResult:
        """§1.1 pipeline order: normalize; identify/alias/merge; update the merge's person, or
        create-or-update the person of ``distinct_id``; then build the event's person columns."""
        # ctx: the event with its own copy of the properties, normalized in place (§1.1 step 1)
        props = copy.deepcopy(event.properties) if isinstance(event.properties, dict) else {}
        ctx = dataclasses.replace(event, properties=props)
        process_person, by_property = self._decide_process_person(ctx)
        if not process_person and by_property and ctx.event in PERSONLESS_DISALLOWED_EVENTS:
            self._warn(ctx, "invalid_event_when_process_person_profile_is_false",
                       {"eventUuid": ctx.uuid, "event": ctx.event, "distinctId": ctx.distinct_id})
            return EventResult(ctx.uuid, "", {}, None, "propertyless", True,
                               "invalid_event_when_process_person_profile_is_false")
        self._normalize(ctx, process_person)
        if not process_person:
            return self._personless_event(ctx, lookup=not ctx.force_disable_person_processing)

        merged, person = self._identify_or_alias(ctx)
        if not merged:
            person = self._person_by_distinct_id(ctx.team_id, ctx.distinct_id)
            if person is None:
                person = self._create_person(ctx, [(ctx.distinct_id, 0)], is_identified=False)
            else:
                self._update_person(person, ctx, mark_identified=False)
        overlay = as_dict(ctx.properties.get("$set"))
        if person is None:  # creation rejected (§1.6 size cap): the event keeps the deterministic id
            return EventResult(ctx.uuid, person_uuid(ctx.team_id, ctx.distinct_id), copy.deepcopy(overlay),
                               None, "full")
        return EventResult(ctx.uuid, person.id, copy.deepcopy({**person.properties, **overlay}),
                           person.created_at, "full")

    def _decide_process_person(self, ctx: Event) -> tuple[bool, bool]:
        """§1.8 (rules.decide_process_person). Returns (process_person, disabled_by_property). The
        capture header also disables it but, as in PostHog's newest normalize step, does not drop
        identify/alias/groupidentify events."""
        process, by_property, warning = decide_process_person(ctx.properties, ctx.team_id in self.opted_out_teams)
        if warning is not None:
            self._warn(ctx, "invalid_process_person_profile", warning)
        return process and not ctx.force_disable_person_processing, by_property

    def _normalize(self, ctx: Event, process_person: bool) -> None:
        normalize_properties(ctx.event, ctx.properties, process_person, ctx.timestamp)

    def _personless_event(self, ctx: Event, lookup: bool) -> EventResult:
        """§1.8. No person: remember the distinct id as personless and use a fake person
        (``uuid5``, ``{}``, created 1970-01-01T00:00:05Z). A person exists: its id and created_at,
        blank properties; ``force_upgrade`` when ``ts > created_at + 1 min`` (strictly) unless the
        team opted out. The header path skips the lookup and the personless record entirely."""
        person = self._person_by_distinct_id(ctx.team_id, ctx.distinct_id) if lookup else None
        if person is None:
            if lookup:
                self._personless.add((ctx.team_id, ctx.distinct_id))
            return EventResult(ctx.uuid, person_uuid(ctx.team_id, ctx.distinct_id), {},
                               PERSONLESS_CREATED_AT, "propertyless")
        force = ctx.team_id not in self.opted_out_teams and ctx.timestamp > person.created_at + FORCE_UPGRADE_AFTER
        if force:
            self._touch_last_seen(person, ctx)
        return EventResult(ctx.uuid, person.id, {}, person.created_at, "force_upgrade" if force else "propertyless")

    # ---- §1.1-§1.3 identify / alias / merge ---------------------------------------------------

    def _identify_or_alias(self, ctx: Event) -> tuple[bool, _Person | None]:
        """§1.1 ``handleIdentifyOrAlias`` / ``merge``. Returns ``(False, None)`` when the normal
        create-or-update path must run (no trigger, ``into == other``, illegal id: the person is
        not marked identified), else ``(True, person)`` with the merge's person already written
        (None only when the size cap rejected the creation)."""
        other = merge_other_distinct_id(ctx.event, ctx.properties)
        if other is None:
            return False, None
        into = ctx.distinct_id
        if into == other:
            return False, None
        illegal = illegal_merge(into, other)
        if illegal is not None:
            self._warn(ctx, "cannot_merge_with_illegal_distinct_id", {**illegal, "eventUuid": ctx.uuid})
            return False, None
        return True, self._merge_distinct_ids(ctx, other, into)

    def _merge_distinct_ids(self, ctx: Event, other: str, into: str) -> _Person | None:
        """§1.2 ``mergeDistinctIds``; every outcome marks the resulting person identified."""
        team = ctx.team_id
        other_person = self._person_by_distinct_id(team, other)
        into_person = self._person_by_distinct_id(team, into)
        if (other_person is None) != (into_person is None):
            # Exactly one exists: add the missing id (version 0, or 1 if it was used personless),
            # then update the person; a size-capped update leaves the added id in place.
            existing, to_add = (other_person, into) if other_person else (into_person, other)
            first_use = self._note_personless_for_merge(team, to_add)
            self._set_distinct_id(team, to_add, existing, 0 if first_use else 1)
            self._update_person(existing, ctx, mark_identified=True)
            return existing
        if other_person is not None and into_person is not None:
            if other_person is into_person:
                self._update_person(into_person, ctx, mark_identified=True)
                return into_person
            return self._merge_people(ctx, into_person, into, other_person, other)
        # Neither exists: one identified person with both ids; uuid from `into`, unless only
        # `other` was used personless (swap, so its events need no override).
        into_new = (team, into) not in self._personless
        other_new = (team, other) not in self._personless
        first, second, second_version = into, other, 0
        if into_new and not other_new:
            first, second = other, into
        elif not into_new and not other_new:
            second_version = 1
        person = self._create_person(ctx, [(first, 0), (second, second_version)], is_identified=True)
        if person is not None:
            self._personless.update({(team, into), (team, other)})
        return person

    def _merge_people(self, ctx: Event, target: _Person, target_did: str, source: _Person, source_did: str) -> _Person:
        """§1.3 ``mergePeople``.

        Refused unless ``$merge_dangerously`` or the SOURCE is not identified: warning
        ``cannot_merge_already_identified``, and the target still gets the event's updates and
        ``is_identified``. Otherwise, in one write: properties ``{...source, ...target}`` (target
        wins) with the event's updates on top (judged against the merged properties),
        ``created_at = min``, ``is_identified``, ``version = max(target, source) + 1``. Every
        source distinct id moves with its own row version + 1; the source is deleted with
        ``version + 100``. Decision: PostHog then re-applies the event to the merged person (a
        possible second version for dict-valued ``$set``); here the merge is the only write.
        """
        if not (ctx.event == "$merge_dangerously" or not source.is_identified):
            self._warn(ctx, "cannot_merge_already_identified", {
                "sourcePersonDistinctId": source_did, "targetPersonDistinctId": target_did, "eventUuid": ctx.uuid})
            self._update_person(target, ctx, mark_identified=True)
            return target
        merged = {**source.properties, **target.properties}
        properties = apply_property_updates(merged, compute_property_updates(ctx.event, merged, ctx.properties))
        if self._too_big(ctx, target, properties):
            properties = target.properties  # decision (ADR 0001): merge, keep the target's properties
        target.properties = properties
        target.created_at = min(target.created_at, source.created_at)
        target.is_identified = True
        target.version = max(target.version, source.version) + 1
        self._touch_last_seen(target, ctx)
        for did in sorted(source.distinct_ids):
            row = self._distinct_ids[(ctx.team_id, did)]
            self._set_distinct_id(ctx.team_id, did, target, row.version + 1)
        source.is_deleted = True
        source.version += 100
        return target

    # ---- writes ------------------------------------------------------------------------------

    def _create_person(self, ctx: Event, ids: list[tuple[str, int]], is_identified: bool) -> _Person | None:
        """§1.6: id ``uuid5`` of the first distinct id; properties
        ``{...$set_once, ...$set, $creator_event_uuid}``; version 0; created_at = event ts;
        last_seen_at = ts truncated to the hour; distinct-id rows with the given versions."""
        if ctx.event in NO_PERSON_UPDATE_EVENTS:
            properties = {"$creator_event_uuid": ctx.uuid}  # decision: no event properties at all
        else:
            properties = copy.deepcopy({**as_dict(ctx.properties.get("$set_once")),
                                        **as_dict(ctx.properties.get("$set")), "$creator_event_uuid": ctx.uuid})
        pid = person_uuid(ctx.team_id, ids[0][0])
        if self._too_big(ctx, None, properties, pid):
            return None
        assert (ctx.team_id, pid) not in self._persons, "a person uuid is never reused"
        person = _Person(pid, ctx.team_id, properties, is_identified, ctx.timestamp, 0, _hour(ctx.timestamp))
        self._persons[(ctx.team_id, pid)] = person
        for did, version in ids:
            self._set_distinct_id(ctx.team_id, did, person, version)
        return person

    def _update_person(self, person: _Person, ctx: Event, mark_identified: bool) -> None:
        """§1.5/§1.6 update: one write (version + 1) when properties change and the write filter
        lets them through, or when ``is_identified`` flips; nothing otherwise."""
        updates = compute_property_updates(ctx.event, person.properties, ctx.properties)
        flips = mark_identified and not person.is_identified
        self._touch_last_seen(person, ctx)
        if not flips and not ((updates.to_set or updates.to_unset) and updates.triggers_write):
            return
        properties = apply_property_updates(person.properties, updates)
        if self._too_big(ctx, person, properties):
            return
        person.properties = properties
        person.is_identified = person.is_identified or flips
        person.version += 1

    def _touch_last_seen(self, person: _Person, ctx: Event) -> None:
        """§1.5 ``$update_person_last_seen_at``: ``last_seen_at = max(last_seen_at, hour(ts))``
        unless the event sets it to ``false``. DOCUMENTED DIFFERENCE: PostHog writes this as a
        person update that bumps the version; headwater never does, because a version bump per
        hour of activity would make versions depend on wall-clock bucketing."""
        if ctx.properties.get("$update_person_last_seen_at") is False:
            return
        hour = _hour(ctx.timestamp)
        if person.last_seen_at is None or hour > person.last_seen_at:
            person.last_seen_at = hour

    def _too_big(self, ctx: Event, person: _Person | None, properties: dict, pid: str | None = None) -> bool:
        """§1.6 size cap: a write over ~640 KB is rejected with ``person_properties_size_violation``.
        (Trimming of already-oversized rows cannot arise here: no oversized row is ever stored.)"""
        if properties_size(properties) <= PERSON_PROPERTIES_SIZE_LIMIT_BYTES:
            return False
        self._warn(ctx, "person_properties_size_violation", {
            "personId": person.id if person else pid, "distinctId": ctx.distinct_id, "teamId": ctx.team_id,
            "eventUuid": ctx.uuid, "message": "Person properties exceeds size limit and was rejected"})
        return True

    def _set_distinct_id(self, team_id: int, distinct_id: str, person: _Person, version: int) -> None:
        old = self._distinct_ids.get((team_id, distinct_id))
        if old is not None:
            self._persons[(team_id, old.person_id)].distinct_ids.discard(distinct_id)
        self._distinct_ids[(team_id, distinct_id)] = DistinctIdRow(team_id, distinct_id, person.id, version, False)
        person.distinct_ids.add(distinct_id)

    def _note_personless_for_merge(self, team_id: int, distinct_id: str) -> bool:
        """``addPersonlessDistinctIdForMerge``: True if the id had never been seen personless."""
        first_use = (team_id, distinct_id) not in self._personless
        self._personless.add((team_id, distinct_id))
        return first_use

    def _person_by_distinct_id(self, team_id: int, distinct_id: str) -> _Person | None:
        row = self._distinct_ids.get((team_id, distinct_id))
        return self._persons[(team_id, row.person_id)] if row else None

    def _warn(self, ctx: Event, type_: str, details: dict) -> None:
        self.warnings.append(Warning(type_, ctx.team_id, ctx.uuid, ctx.distinct_id, details))

