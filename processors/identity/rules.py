"""Pure rules of person processing (semantics §1 of ``ingestion-semantics.md``), shared by the
identity stage and the reference model: constants, illegal distinct ids, JS value semantics,
§1.7 automatic properties, §1.5 ``$set``/``$set_once``/``$unset``. No state, no clock, stdlib only.
"""

from __future__ import annotations

import copy
import json
import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

import orjson

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
    if type(old) is str and type(new) is str:  # the common case, first
        return old != new
    if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return not (isinstance(old, bool) and isinstance(new, bool) and old == new)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return not old == new
    return type(old) is not type(new) or old != new


_JS_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|Infinity)$")


def _js_to_number(value: str) -> float:
    """JS ``Number(string)`` for decimal text (hex/octal/binary literals are not reproduced)."""
    text = value.strip()
    if text == "":
        return 0.0
    if not _JS_NUMBER.match(text):
        return math.nan
    return float(text.replace("Infinity", "inf"))


def js_loose_equals(old: Any, new: Any) -> bool:
    """JS ``old == new`` for JSON scalars (§2: a group property is updated when ``value != old``):
    ``1 == "1"``, ``true == 1``, ``"" == 0``, ``null`` equals only ``null``. Objects and arrays
    compare by value here, not by reference as in JS, so re-sending the same nested value is not
    a change (PostHog would bump the group's version every time)."""
    if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
        return type(old) is type(new) and old == new
    if old is None or new is None:
        return old is None and new is None
    if isinstance(old, bool):
        old = 1.0 if old else 0.0
    if isinstance(new, bool):
        new = 1.0 if new else 0.0
    if isinstance(old, str) and isinstance(new, str):
        return old == new
    if isinstance(old, str):
        old = _js_to_number(old)
    if isinstance(new, str):
        new = _js_to_number(new)
    return old == new


def properties_size(properties: dict) -> int:
    """Bytes of the compact UTF-8 JSON serialization, standing in for Postgres' JSONB size."""
    try:
        return len(orjson.dumps(properties, default=str, option=orjson.OPT_NON_STR_KEYS))
    except (TypeError, orjson.JSONEncodeError):  # e.g. an integer beyond 64 bits: the slow way
        return len(json.dumps(properties, ensure_ascii=False, separators=(",", ":"), default=str).encode())


def iso_timestamp(ts: datetime) -> str:
    """JS ``toISOString()`` shape: ``2024-01-01T12:00:00.000Z``."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def as_dict(value: Any) -> dict:
    """A non-object ``$set``/``$set_once`` counts as ``{}`` (§1.7; PostHog would spread a string's
    characters on the update path, a quirk not reproduced)."""
    return value if isinstance(value, dict) else {}


def _unset_keys(value: Any) -> list[str]:
    """§1.5 ``$unset``: an array of keys or an object whose keys are used; non-string keys and any
    other shape are ignored (PostHog would take ``Object.keys`` of a string: a quirk)."""
    if value is None:  # nearly every event: no $unset
        return []
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
    set_ = as_dict(properties.get("$set"))
    set_once = as_dict(properties.get("$set_once"))
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
    for key, value in as_dict(properties.get("$set_once")).items():
        if key not in before:
            to_set[key] = value
            triggers = True
    for key, value in as_dict(properties.get("$set")).items():
        if key not in before or js_differs(before[key], value):
            to_set[key] = value
            if key not in before or key not in FILTERED_PERSON_UPDATE_PROPERTIES:
                triggers = True
    to_unset = [k for k in _unset_keys(properties.get("$unset")) if k in before]
    if to_unset:
        triggers = True
    return PropertyUpdates(to_set, to_unset, triggers)


def detached(values: dict) -> dict:
    """A copy of ``values`` that shares no dict or list with it (a person must not share the
    event's nested values); scalars are immutable and kept, without ``deepcopy``'s cost per key."""
    return {k: copy.deepcopy(v) if isinstance(v, (dict, list)) else v for k, v in values.items()}


def apply_property_updates(before: dict, updates: PropertyUpdates) -> dict:
    """§1.5 ``applyEventPropertyUpdates``: set, then unset (so ``$set:{a:1}`` + ``$unset:['a']``
    removes ``a`` only when ``a`` existed before the event)."""
    after = dict(before)
    after.update(detached(updates.to_set))
    for key in updates.to_unset:
        after.pop(key, None)
    return after


def merge_other_distinct_id(event_name: str, properties: dict) -> str | None:
    """§1.1 ``handleIdentifyOrAlias``: the distinct id the event asks to merge into its own, or
    None. Alias events need a truthy ``alias``; ``$identify`` needs the KEY ``$anon_distinct_id``."""
    if event_name in ("$create_alias", "$merge_dangerously") and js_truthy(properties.get("alias")):
        return js_string(properties["alias"])
    if event_name == "$identify" and "$anon_distinct_id" in properties:
        return js_string(properties["$anon_distinct_id"])
    return None


def illegal_merge(into: str, other: str) -> dict | None:
    """§1.4: details of ``cannot_merge_with_illegal_distinct_id`` if either id is illegal."""
    for illegal, other_id in ((into, other), (other, into)):
        if is_distinct_id_illegal(illegal):
            return {"illegalDistinctId": illegal, "otherDistinctId": other_id}
    return None


def decide_process_person(properties: dict, opted_out: bool = False) -> tuple[bool, bool, dict | None]:
    """§1.8: only boolean ``false`` disables person processing; any other non-boolean value is a
    warning ``invalid_process_person_profile`` (details returned) and the default (true) is used.
    Returns ``(process_person, disabled_by_property, warning_details)``. An opted-out team gets
    ``false`` injected (mutates ``properties``)."""
    if opted_out:
        properties["$process_person_profile"] = False
    value = properties.get("$process_person_profile", True)
    if value is False:
        return False, True, None
    if value is not True:
        return True, False, {"$process_person_profile": value,
                             "message": "Only a boolean value is valid for the $process_person_profile property"}
    return True, False, None


def normalize_properties(event_name: str, properties: dict, process_person: bool, timestamp: datetime) -> None:
    """§1.7 automatic properties (not for ``$snapshot``/``$performance_event``), then §1.5/§1.8
    stripping of ``$set``/``$set_once``/``$unset`` for personless events and ``$groupidentify``,
    then the ``survey shown`` enrichment (full processing only). Mutates ``properties``."""
    if event_name not in NO_INITIAL_PROPERTY_EVENTS:
        add_initial_and_campaign_properties(properties)
    if not process_person or event_name == "$groupidentify":
        for key in ("$set", "$set_once", "$unset"):
            properties.pop(key, None)
    if process_person:
        properties.pop("$process_person_profile", None)
        if event_name == "survey shown":
            set_ = properties["$set"] = as_dict(properties.get("$set"))
            set_.setdefault("$survey_last_seen_date", iso_timestamp(timestamp))
    else:
        properties["$process_person_profile"] = False
