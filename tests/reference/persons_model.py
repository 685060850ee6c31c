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
  creation leaves no person (the event keeps the deterministic id); a rejected merge changes
  nothing (§1.6).
* ``force_upgrade`` events use the existing person's id with ``{}`` properties and write nothing
  but ``last_seen_at`` (their ``$set`` was stripped, §1.8).
* The ``survey shown`` timestamp is written as ISO 8601 UTC with milliseconds
  (``2024-01-01T12:00:00.000Z``, JS ``toISOString``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

NAMESPACE = uuid.UUID("932979b4-65c3-4424-8467-0b66ec27bc22")
UTC = timezone.utc
#: §1.8: ``created_at`` of the fake person of a personless event.
PERSONLESS_CREATED_AT = datetime(1970, 1, 1, 0, 0, 5, tzinfo=UTC)
#: §1.8: a personless event later than ``person.created_at + 1 min`` is a force upgrade.
FORCE_UPGRADE_AFTER = timedelta(minutes=1)
#: §1.6: ``DEFAULT_PERSON_PROPERTIES_DB_CONSTRAINT_LIMIT_BYTES``.
PERSON_PROPERTIES_SIZE_LIMIT_BYTES = 655_360

# §1.4 illegal distinct ids, exactly as person-merge-service.ts lists them.
BARE_CASE_INSENSITIVE_ILLEGAL_IDS = ("anonymous", "guest", "distinctid", "distinct_id", "id", "not_authenticated",
                                     "email", "undefined", "true", "false")
BARE_CASE_SENSITIVE_ILLEGAL_IDS = ("[object Object]", "NaN", "None", "none", "null", "0", "undefined")


def _with_quoted_variants(ids: Iterable[str]) -> frozenset[str]:
    ids = tuple(ids)
    return frozenset(ids + tuple(f"'{i}'" for i in ids) + tuple(f'"{i}"' for i in ids))


CASE_INSENSITIVE_ILLEGAL_IDS = _with_quoted_variants(BARE_CASE_INSENSITIVE_ILLEGAL_IDS)
CASE_SENSITIVE_ILLEGAL_IDS = _with_quoted_variants(BARE_CASE_SENSITIVE_ILLEGAL_IDS)

#: §1.8 events dropped when personless.
PERSONLESS_DISALLOWED_EVENTS = frozenset({"$identify", "$create_alias", "$merge_dangerously", "$groupidentify"})
#: §1.5: events that never update person properties, and "person events" the write filter skips.
NO_PERSON_UPDATE_EVENTS = frozenset({"$exception", "$$heatmap"})
PERSON_EVENTS = frozenset({"$identify", "$create_alias", "$merge_dangerously", "$set"})
#: §1.7: events that get no automatic person properties.
NO_INITIAL_PROPERTY_EVENTS = frozenset({"$snapshot", "$performance_event"})

#: §1.7 mapped keys (order matters only for ``$os`` before ``$os_name``, as in PostHog).
EVENT_TO_PERSON_PROPERTIES = (
    "$app_build", "$app_name", "$app_namespace", "$app_version",
    "$browser", "$browser_version", "$device_type", "$current_url", "$pathname", "$os", "$os_name",
    "$os_version", "$referring_domain", "$referrer", "$screen_height", "$screen_width",
    "$viewport_height", "$viewport_width", "$raw_user_agent",
)
CAMPAIGN_PROPERTIES = (
    "utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_name", "utm_term",
    "gclid", "gad_source", "gclsrc", "dclid", "gbraid", "wbraid", "fbclid", "msclkid", "twclid",
    "li_fat_id", "mc_cid", "igshid", "ttclid", "rdt_cid", "irclid", "_kx", "epik", "qclid", "sccid",
)
MAPPED_PROPERTIES = EVENT_TO_PERSON_PROPERTIES + CAMPAIGN_PROPERTIES

#: §1.5 write filter, exactly PostHog's ``FILTERED_PERSON_UPDATE_PROPERTIES``
#: (person-property-utils.ts). ``$geoip_country_name`` and ``$geoip_city_name`` are NOT filtered.
FILTERED_PERSON_UPDATE_PROPERTIES = frozenset({
    "$current_url", "$pathname", "$referring_domain", "$referrer",  # URL / navigation
    "$screen_height", "$screen_width", "$viewport_height", "$viewport_width",  # screen / viewport
    "$browser", "$browser_version", "$device_type", "$raw_user_agent", "$os", "$os_name", "$os_version",
    # the volatile geoip keys
    "$geoip_postal_code", "$geoip_time_zone", "$geoip_latitude", "$geoip_longitude", "$geoip_accuracy_radius",
    "$geoip_subdivision_1_code", "$geoip_subdivision_1_name", "$geoip_subdivision_2_code",
    "$geoip_subdivision_2_name", "$geoip_subdivision_3_code", "$geoip_subdivision_3_name",
    "$geoip_city_confidence", "$geoip_country_confidence", "$geoip_postal_code_confidence",
    "$geoip_subdivision_1_confidence", "$geoip_subdivision_2_confidence",
})


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


# --------------------------------------------------------------------------------------------
# Pure helpers


def person_uuid(team_id: int, distinct_id: str) -> str:
    """§1.6 ``uuidFromDistinctId``: ``uuid5(NS, f"{team_id}:{distinct_id}")``."""
    return str(uuid.uuid5(NAMESPACE, f"{team_id}:{distinct_id}"))


def is_distinct_id_illegal(distinct_id: str) -> bool:
    """§1.4: blank after trimming, or listed. The lower-case check uses the UNTRIMMED id, so
    ``" guest"`` is legal while ``"   "`` is illegal."""
    return (distinct_id.strip() == "" or distinct_id.lower() in CASE_INSENSITIVE_ILLEGAL_IDS
            or distinct_id in CASE_SENSITIVE_ILLEGAL_IDS)


def js_truthy(value: Any) -> bool:
    """JS truthiness (§1.1 ``properties.alias`` must be truthy): empty containers are truthy."""
    if value is None or value is False or value == "":
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0 and not math.isnan(value)
    return True


def js_string(value: Any) -> str:
    """JS ``String(x)`` for JSON values (§1.1 ``String(properties.alias)``)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return str(int(value)) if value.is_integer() and abs(value) < 1e21 else repr(value)
    if isinstance(value, list):
        return ",".join("" if v is None else js_string(v) for v in value)
    if isinstance(value, dict):
        return "[object Object]"
    return str(value)


def js_differs(old: Any, new: Any) -> bool:
    """JS ``old !== new`` for JSON values (§1.5): objects and arrays always differ (reference
    inequality); booleans are not numbers; ``1 === 1.0``; ``NaN !== NaN``."""
    if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return not (isinstance(old, bool) and isinstance(new, bool) and old == new)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return not old == new
    return type(old) is not type(new) or old != new


def properties_size(properties: dict) -> int:
    """Bytes of the compact UTF-8 JSON serialization, standing in for Postgres' JSONB size."""
    return len(json.dumps(properties, ensure_ascii=False, separators=(",", ":"), default=str).encode())


def iso_timestamp(ts: datetime) -> str:
    """JS ``toISOString()`` shape: ``2024-01-01T12:00:00.000Z``."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _hour(ts: datetime) -> datetime:
    return ts.replace(minute=0, second=0, microsecond=0)


def _as_dict(value: Any) -> dict:
    """A non-object ``$set``/``$set_once`` counts as ``{}`` (§1.7; PostHog would spread a string's
    characters on the update path, a quirk not reproduced)."""
    return value if isinstance(value, dict) else {}


def _unset_keys(value: Any) -> list[str]:
    """§1.5 ``$unset``: an array of keys or an object whose keys are used; non-string keys and any
    other shape are ignored (PostHog would take ``Object.keys`` of a string: a quirk)."""
    keys = value if isinstance(value, list) else list(value) if isinstance(value, dict) else []
    return list(dict.fromkeys(k for k in keys if isinstance(k, str)))


def add_initial_and_campaign_properties(properties: dict) -> None:
    """§1.7 ``personInitialAndUTMProperties`` (mutates ``properties``).

    For each mapped key present (``k in properties``, so null counts): ``$set[k]`` and
    ``$set_once["$initial_" + k without its first "$"]`` unless the user already set them.
    ``$os_name`` is a fallback alias of ``$os`` and is itself removed from both.
    """
    present = [k for k in MAPPED_PROPERTIES if k in properties]
    if not present:
        return
    set_ = _as_dict(properties.get("$set"))
    set_once = _as_dict(properties.get("$set_once"))
    for key in present:
        set_.setdefault(key, properties[key])
        set_once.setdefault("$initial_" + key.replace("$", "", 1), properties[key])
    if "$os_name" in properties:
        os_name = properties["$os_name"]
        properties.setdefault("$os", os_name)
        set_.setdefault("$os", os_name)
        set_once.setdefault("$initial_os", os_name)
        set_.pop("$os_name", None)
        set_once.pop("$initial_os_name", None)
    properties["$set"] = set_
    properties["$set_once"] = set_once


@dataclass
class PropertyUpdates:
    """§1.5 ``computeEventPropertyUpdates``: the keys to set and unset, and whether they are
    worth a write (False: only filtered keys that already exist changed → "ignored")."""

    to_set: dict
    to_unset: list
    triggers_write: bool


def compute_property_updates(event_name: str, before: dict, properties: dict) -> PropertyUpdates:
    """§1.5, against the person's properties BEFORE the event.

    * ``$set_once`` key: set if absent (a null value counts as present);
    * ``$set`` key: set if ``before[k] !== value`` (after ``$set_once``, so ``$set`` wins);
    * ``$unset`` key: removed only if present before the event;
    * write filter: for a non-person event whose every changed ``$set`` key is filtered AND
      already present (and no ``$set_once``/``$unset`` change), the change is not written.
      A ``$set_once`` key is always new, so it always writes (newest batch store).
    """
    if event_name in NO_PERSON_UPDATE_EVENTS:
        return PropertyUpdates({}, [], False)
    to_set: dict = {}
    triggers = event_name in PERSON_EVENTS
    for key, value in _as_dict(properties.get("$set_once")).items():
        if key not in before:
            to_set[key] = value
            triggers = True
    for key, value in _as_dict(properties.get("$set")).items():
        if key not in before or js_differs(before[key], value):
            to_set[key] = value
            if key not in before or key not in FILTERED_PERSON_UPDATE_PROPERTIES:
                triggers = True
    to_unset = [k for k in _unset_keys(properties.get("$unset")) if k in before]
    if to_unset:
        triggers = True
    return PropertyUpdates(to_set, to_unset, triggers)


def apply_property_updates(before: dict, updates: PropertyUpdates) -> dict:
    """§1.5 ``applyEventPropertyUpdates``: set, then unset (so ``$set:{a:1}`` + ``$unset:['a']``
    removes ``a`` only when ``a`` existed before the event)."""
    after = dict(before)
    after.update(copy.deepcopy(updates.to_set))
    for key in updates.to_unset:
        after.pop(key, None)
    return after


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
        overlay = _as_dict(ctx.properties.get("$set"))
        if person is None:  # creation rejected (§1.6 size cap): the event keeps the deterministic id
            return EventResult(ctx.uuid, person_uuid(ctx.team_id, ctx.distinct_id), copy.deepcopy(overlay),
                               None, "full")
        return EventResult(ctx.uuid, person.id, copy.deepcopy({**person.properties, **overlay}),
                           person.created_at, "full")

    def _decide_process_person(self, ctx: Event) -> tuple[bool, bool]:
        """§1.8: only boolean ``false`` disables person processing; any other non-boolean value
        warns ``invalid_process_person_profile`` and the default (true) is used. Returns
        (process_person, disabled_by_property). The capture header also disables it but, as in
        PostHog's newest normalize step, does not drop identify/alias/groupidentify events."""
        if ctx.team_id in self.opted_out_teams:
            ctx.properties["$process_person_profile"] = False
        value = ctx.properties.get("$process_person_profile", True)
        if value is False:
            return False, True
        if value is not True:
            self._warn(ctx, "invalid_process_person_profile", {
                "$process_person_profile": value,
                "message": "Only a boolean value is valid for the $process_person_profile property"})
        return not ctx.force_disable_person_processing, False

    def _normalize(self, ctx: Event, process_person: bool) -> None:
        """§1.7 automatic properties (not for ``$snapshot``/``$performance_event``), then §1.5/§1.8
        stripping of ``$set``/``$set_once``/``$unset`` for personless events and
        ``$groupidentify``, then the ``survey shown`` enrichment (full processing only)."""
        props = ctx.properties
        if ctx.event not in NO_INITIAL_PROPERTY_EVENTS:
            add_initial_and_campaign_properties(props)
        if not process_person or ctx.event == "$groupidentify":
            for key in ("$set", "$set_once", "$unset"):
                props.pop(key, None)
        if process_person:
            props.pop("$process_person_profile", None)
            if ctx.event == "survey shown":
                set_ = props["$set"] = _as_dict(props.get("$set"))
                set_.setdefault("$survey_last_seen_date", iso_timestamp(ctx.timestamp))
        else:
            props["$process_person_profile"] = False

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
        props = ctx.properties
        if ctx.event in ("$create_alias", "$merge_dangerously") and js_truthy(props.get("alias")):
            other = js_string(props["alias"])
        elif ctx.event == "$identify" and "$anon_distinct_id" in props:
            other = js_string(props["$anon_distinct_id"])
        else:
            return False, None
        into = ctx.distinct_id
        if into == other:
            return False, None
        for illegal, other_id in ((into, other), (other, into)):
            if is_distinct_id_illegal(illegal):
                self._warn(ctx, "cannot_merge_with_illegal_distinct_id",
                           {"illegalDistinctId": illegal, "otherDistinctId": other_id, "eventUuid": ctx.uuid})
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
            return target  # decision: the merge transaction is rejected as a whole
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
            properties = copy.deepcopy({**_as_dict(ctx.properties.get("$set_once")),
                                        **_as_dict(ctx.properties.get("$set")), "$creator_event_uuid": ctx.uuid})
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

