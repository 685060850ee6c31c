"""Person-identity scenarios (semantics §1), with expected outcomes written out by hand.

Each ``Scenario`` is a short list of already-parsed events and what the final state must be:
the live persons (keyed by the distinct id whose ``uuid5`` is their id), their distinct ids
with row versions, properties, ``is_identified``, version and ``created_at``; the deleted
persons with their final version; the ingestion warnings in order; and, for some events, the
person columns the event row must carry. ``test_persons_model.py`` checks the reference model
against them; the same data can drive the real pipeline (``Scenario.with_team_offset`` moves a
scenario to other team ids, with fresh event uuids, so that many can share one deployment).

Conventions: every event is at ``BASE_TS + ts_offset_s``; ``U(i)`` stands for the uuid of event
``i`` of the scenario (``$creator_event_uuid``); ``c(i)`` is ``{"$creator_event_uuid": U(i)}``;
``created_at_s`` is an offset from ``BASE_TS`` (``PERSONLESS`` = 1970-01-01T00:00:05Z).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from tests.reference.persons_model import Event

BASE_TS = datetime(2024, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
EVENT_UUID_NAMESPACE = uuid.UUID("6b1f3f0e-93c4-4c43-9f38-5a0d1d7a2c55")
PERSONLESS = "personless"  # created_at of the fake person: 1970-01-01T00:00:05Z
PPF = {"$process_person_profile": False}
BIG = "x" * 700_000  # over the ~640 KB person properties cap (§1.6)


# ---- building events -------------------------------------------------------------------------


def ev(distinct_id: str, event: str, props: dict | None = None, ts_offset_s: float = 0, team_id: int = 1,
       *, force_disable: bool = False) -> Event:
    """One parsed event; its uuid is assigned by the ``Scenario`` (stable per name and index)."""
    return Event(team_id, distinct_id, event, "", BASE_TS + timedelta(seconds=ts_offset_s), dict(props or {}),
                 force_disable)


def pv(distinct_id: str, props: dict | None = None, ts_offset_s: float = 0, team_id: int = 1, **kw: Any) -> Event:
    return ev(distinct_id, "$pageview", props, ts_offset_s, team_id, **kw)


def identify(distinct_id: str, anon: Any, props: dict | None = None, ts_offset_s: float = 0, team_id: int = 1) -> Event:
    """posthog-js ``identify``: ``$identify`` with ``$anon_distinct_id`` (§1.9)."""
    return ev(distinct_id, "$identify", {"$anon_distinct_id": anon, **(props or {})}, ts_offset_s, team_id)


# ---- expectations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class U:
    """The uuid of event ``index`` of the scenario."""

    index: int


def c(index: int) -> dict:
    return {"$creator_event_uuid": U(index)}


@dataclass
class P:
    """A live person. ``owner``: the distinct id its id is ``uuid5(f"{team_id}:{owner}")`` of."""

    owner: str
    distinct_ids: dict[str, int]  # distinct id -> version of its person_distinct_ids row
    properties: dict
    is_identified: bool = False
    version: int = 0
    created_at_s: float = 0
    team_id: int = 1


@dataclass
class D:
    """A deleted (merged-away) person and the version of its deletion row."""

    owner: str
    version: int
    team_id: int = 1


@dataclass
class W:
    """An ingestion warning: type, the event's distinct id, a subset of details, the event index."""

    type: str
    distinct_id: str
    details: dict = field(default_factory=dict)
    event: int | None = None
    team_id: int = 1


@dataclass
class E:
    """What event row ``i`` carries. ``person``: owner of the expected person id (the event's
    team). ``properties`` / ``created_at_s``: None = not checked."""

    person: str | None
    mode: str = "full"
    properties: dict | None = None
    created_at_s: float | str | None = None
    dropped: bool = False
    drop_reason: str | None = None


@dataclass
class Expect:
    persons: list[P]
    deleted: list[D] = field(default_factory=list)
    warnings: list[W] = field(default_factory=list)
    events: dict[int, E] = field(default_factory=dict)
    personless: set[tuple[int, str]] | None = None  # remembered personless ids, if checked


@dataclass
class Scenario:
    name: str
    events: list[Event]
    expect: Expect
    opted_out_teams: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.events = [dataclasses.replace(e, uuid=e.uuid or self._uuid(i)) for i, e in enumerate(self.events)]

    def _uuid(self, index: int, suffix: str = "") -> str:
        return str(uuid.uuid5(EVENT_UUID_NAMESPACE, f"{self.name}#{index}{suffix}"))

    def with_team_offset(self, offset: int) -> Scenario:
        """The same scenario for team ids ``+ offset`` and fresh event uuids."""
        events = [dataclasses.replace(e, team_id=e.team_id + offset, uuid=self._uuid(i, f"@{offset}"))
                  for i, e in enumerate(self.events)]
        x = self.expect
        expect = Expect(
            persons=[dataclasses.replace(p, team_id=p.team_id + offset) for p in x.persons],
            deleted=[dataclasses.replace(d, team_id=d.team_id + offset) for d in x.deleted],
            warnings=[dataclasses.replace(w, team_id=w.team_id + offset) for w in x.warnings],
            events=dict(x.events),
            personless=None if x.personless is None else {(t + offset, d) for t, d in x.personless},
        )
        return Scenario(self.name, events, expect, tuple(t + offset for t in self.opted_out_teams))


def resolve_uuids(value: Any, events: list[Event]) -> Any:
    """Replace every ``U(i)`` in an expected value by the uuid of event ``i``."""
    if isinstance(value, U):
        return events[value.index].uuid
    if isinstance(value, dict):
        return {k: resolve_uuids(v, events) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_uuids(v, events) for v in value]
    return value


# ---- the scenarios -----------------------------------------------------------------------------

CANNOT_MERGE_IDENTIFIED = "cannot_merge_already_identified"
ILLEGAL = "cannot_merge_with_illegal_distinct_id"
PERSONLESS_INVALID = "invalid_event_when_process_person_profile_is_false"
SIZE = "person_properties_size_violation"

SCENARIOS: list[Scenario] = [
    # ---- §1.6 creation, §1.5 $set / $set_once / $unset ----------------------------------------
    Scenario("create_first_event_makes_anonymous_person", [
        pv("anon", {"$set": {"a": 1}, "$set_once": {"b": 2}}),
    ], Expect(
        persons=[P("anon", {"anon": 0}, {"a": 1, "b": 2, **c(0)})],
        events={0: E("anon", properties={"a": 1, "b": 2, **c(0)}, created_at_s=0)},
    )),
    Scenario("create_set_wins_over_set_once", [
        pv("u", {"$set": {"a": "set"}, "$set_once": {"a": "once", "b": "once"}}),
    ], Expect(persons=[P("u", {"u": 0}, {"a": "set", "b": "once", **c(0)})])),
    Scenario("create_creator_event_uuid_is_set_by_ingestion", [
        pv("u", {"$set": {"$creator_event_uuid": "fake"}}),
    ], Expect(persons=[P("u", {"u": 0}, c(0))])),
    Scenario("set_changed_value_bumps_version", [
        pv("u", {"$set": {"a": 1}}),
        pv("u", {"$set": {"a": 2}}, 10),
    ], Expect(
        persons=[P("u", {"u": 0}, {"a": 2, **c(0)}, version=1)],
        events={1: E("u", properties={"a": 2, **c(0)}, created_at_s=0)},
    )),
    Scenario("set_same_value_is_no_write", [
        pv("u", {"$set": {"a": 1}}),
        pv("u", {"$set": {"a": 1}}, 10),
    ], Expect(persons=[P("u", {"u": 0}, {"a": 1, **c(0)})])),
    Scenario("set_once_never_overwrites", [
        pv("u", {"$set_once": {"a": 1}}),
        pv("u", {"$set_once": {"a": 2, "b": 3}}, 10),
        pv("u", {"$set_once": {"a": 4}}, 20),
    ], Expect(persons=[P("u", {"u": 0}, {"a": 1, "b": 3, **c(0)}, version=1)])),
    Scenario("set_once_treats_null_as_present", [
        pv("u", {"$set": {"a": None}}),
        pv("u", {"$set_once": {"a": 5}}, 10),
    ], Expect(persons=[P("u", {"u": 0}, {"a": None, **c(0)})])),
    Scenario("set_after_set_once_wins_on_update", [
        pv("u"),
        pv("u", {"$set_once": {"a": "once"}, "$set": {"a": "set"}}, 10),
    ], Expect(persons=[P("u", {"u": 0}, {"a": "set", **c(0)}, version=1)])),
    Scenario("unset_list_and_object_forms_remove_keys", [
        pv("u", {"$set": {"a": 1, "b": 2}}),
        pv("u", {"$unset": ["a"]}, 10),
        pv("u", {"$unset": {"b": None}}, 20),
    ], Expect(persons=[P("u", {"u": 0}, c(0), version=2)])),
    Scenario("unset_missing_key_is_no_write", [
        pv("u", {"$set": {"a": 1}}),
        pv("u", {"$unset": ["zzz"]}, 10),
    ], Expect(persons=[P("u", {"u": 0}, {"a": 1, **c(0)})])),
    Scenario("set_and_unset_of_missing_key_keeps_the_set", [
        pv("u"),
        pv("u", {"$set": {"a": 1}, "$unset": ["a"]}, 10),
    ], Expect(persons=[P("u", {"u": 0}, {"a": 1, **c(0)}, version=1)])),
    Scenario("set_and_unset_of_present_key_removes_it", [
        pv("u", {"$set": {"a": 0}}),
        pv("u", {"$set": {"a": 1}, "$unset": ["a"]}, 10),
    ], Expect(
        persons=[P("u", {"u": 0}, c(0), version=1)],
        # person_properties = {...stored, ...$set}: the event still shows a=1 (§4)
        events={1: E("u", properties={"a": 1, **c(0)})},
    )),
    Scenario("dict_and_list_values_always_count_as_changed", [
        pv("u", {"$set": {"obj": {"x": 1}}}),
        pv("u", {"$set": {"obj": {"x": 1}}}, 10),
        pv("u", {"$set": {"tags": ["a"]}}, 20),
        pv("u", {"$set": {"tags": ["a"]}}, 30),
    ], Expect(persons=[P("u", {"u": 0}, {"obj": {"x": 1}, "tags": ["a"], **c(0)}, version=3)])),
    Scenario("js_strict_equality_of_numbers_strings_booleans", [
        pv("u", {"$set": {"n": 1}}),
        pv("u", {"$set": {"n": 1.0}}, 10),  # 1 === 1.0: no write
        pv("u", {"$set": {"n": "1"}}, 20),  # string: write
        pv("u", {"$set": {"n": True}}, 30),  # boolean is not a number: write
        pv("u", {"$set": {"n": True}}, 40),  # no write
    ], Expect(persons=[P("u", {"u": 0}, {"n": True, **c(0)}, version=2)])),
    # ---- §1.5 events that do not update persons --------------------------------------------
    Scenario("exception_event_does_not_update_person", [
        pv("u", {"$set": {"a": 1}}),
        ev("u", "$exception", {"$set": {"a": 2}, "$set_once": {"b": 1}}, 10),
    ], Expect(
        persons=[P("u", {"u": 0}, {"a": 1, **c(0)})],
        events={1: E("u", properties={"a": 2, **c(0)})},  # the event's $set is still overlaid
    )),
    Scenario("heatmap_event_creates_person_without_event_properties", [
        ev("u", "$$heatmap", {"$set": {"a": 1}, "$set_once": {"b": 1}}),
    ], Expect(
        persons=[P("u", {"u": 0}, c(0))],
        events={0: E("u", properties={"a": 1, **c(0)})},
    )),
    Scenario("groupidentify_strips_person_updates", [
        pv("u", {"$set": {"a": 1}}),
        ev("u", "$groupidentify", {"$group_type": "company", "$group_key": "acme", "$group_set": {"name": "Acme"},
                                    "$set": {"a": 2}, "$unset": ["a"]}, 10),
    ], Expect(
        persons=[P("u", {"u": 0}, {"a": 1, **c(0)})],
        events={1: E("u", properties={"a": 1, **c(0)})},
    )),
    Scenario("survey_shown_sets_survey_last_seen_date", [
        ev("u", "survey shown", {}, 30),
        ev("u", "survey shown", {}, 90),
    ], Expect(persons=[P("u", {"u": 0}, {"$survey_last_seen_date": "2024-01-01T12:01:30.000Z", **c(0)},
                         version=1, created_at_s=30)])),
    Scenario("survey_shown_explicit_set_wins", [
        ev("u", "survey shown", {"$set": {"$survey_last_seen_date": "2020-01-01"}}),
    ], Expect(persons=[P("u", {"u": 0}, {"$survey_last_seen_date": "2020-01-01", **c(0)})])),
    # ---- §1.5 write filter --------------------------------------------------------------------
    Scenario("filtered_only_change_to_existing_key_is_not_written", [
        pv("u", {"$current_url": "https://x/a"}),
        pv("u", {"$current_url": "https://x/b"}, 10),
    ], Expect(
        persons=[P("u", {"u": 0}, {"$current_url": "https://x/a", "$initial_current_url": "https://x/a", **c(0)})],
        events={1: E("u", properties={"$current_url": "https://x/b", "$initial_current_url": "https://x/a", **c(0)})},
    )),
    Scenario("filtered_change_with_new_key_writes_everything", [
        pv("u", {"$current_url": "https://x/a"}),
        pv("u", {"$current_url": "https://x/b", "$set": {"plan": "pro"}}, 10),
    ], Expect(persons=[P("u", {"u": 0}, {"$current_url": "https://x/b", "$initial_current_url": "https://x/a",
                                         "plan": "pro", **c(0)}, version=1)])),
    Scenario("filtered_change_with_unfiltered_change_writes_everything", [
        pv("u", {"$current_url": "https://x/a", "$set": {"plan": "free"}}),
        pv("u", {"$current_url": "https://x/b", "$set": {"plan": "pro"}}, 10),
    ], Expect(persons=[P("u", {"u": 0}, {"$current_url": "https://x/b", "$initial_current_url": "https://x/a",
                                         "plan": "pro", **c(0)}, version=1)])),
    Scenario("filtered_change_on_person_event_is_written", [
        pv("u", {"$current_url": "https://x/a"}),
        ev("u", "$set", {"$current_url": "https://x/b"}, 10),
    ], Expect(persons=[P("u", {"u": 0}, {"$current_url": "https://x/b", "$initial_current_url": "https://x/a",
                                         **c(0)}, version=1)])),
    Scenario("filtered_key_new_to_the_person_is_written", [
        pv("u"),
        pv("u", {"$pathname": "/p"}, 10),
    ], Expect(persons=[P("u", {"u": 0}, {"$pathname": "/p", "$initial_pathname": "/p", **c(0)}, version=1)])),
    Scenario("geoip_postal_code_is_filtered_country_name_is_not", [
        pv("u", {"$set": {"$geoip_country_name": "France", "$geoip_postal_code": "75001"}}),
        pv("u", {"$set": {"$geoip_postal_code": "75002"}}, 10),
        pv("u", {"$set": {"$geoip_country_name": "Spain", "$geoip_postal_code": "28001"}}, 20),
    ], Expect(persons=[P("u", {"u": 0}, {"$geoip_country_name": "Spain", "$geoip_postal_code": "28001", **c(0)},
                         version=1)])),
    Scenario("utm_change_is_not_filtered", [
        pv("u", {"utm_source": "google"}),
        pv("u", {"utm_source": "bing"}, 10),
    ], Expect(persons=[P("u", {"u": 0}, {"utm_source": "bing", "$initial_utm_source": "google", **c(0)},
                         version=1)])),
    # ---- §1.7 automatic person properties -----------------------------------------------------
    Scenario("initial_and_campaign_properties_from_event_properties", [
        pv("u", {"$browser": "Chrome", "$referrer": "https://r.example/x", "$referring_domain": "r.example",
                 "gclid": "g1", "$app_version": "1.0", "other": "not mapped"}),
    ], Expect(persons=[P("u", {"u": 0}, {
        "$browser": "Chrome", "$referrer": "https://r.example/x", "$referring_domain": "r.example",
        "gclid": "g1", "$app_version": "1.0",
        "$initial_browser": "Chrome", "$initial_referrer": "https://r.example/x",
        "$initial_referring_domain": "r.example", "$initial_gclid": "g1", "$initial_app_version": "1.0",
        **c(0)})])),
    Scenario("user_set_and_set_once_win_over_event_properties", [
        pv("u", {"$browser": "Chrome", "$set": {"$browser": "Firefox"}, "$set_once": {"$initial_browser": "Safari"}}),
    ], Expect(persons=[P("u", {"u": 0}, {"$browser": "Firefox", "$initial_browser": "Safari", **c(0)})])),
    Scenario("os_name_is_a_fallback_for_os", [
        pv("u", {"$os_name": "iOS"}),
    ], Expect(persons=[P("u", {"u": 0}, {"$os": "iOS", "$initial_os": "iOS", **c(0)})])),
    Scenario("os_wins_over_os_name", [
        pv("u", {"$os": "Mac OS X", "$os_name": "macOS"}),
    ], Expect(persons=[P("u", {"u": 0}, {"$os": "Mac OS X", "$initial_os": "Mac OS X", **c(0)})])),
    Scenario("null_mapped_property_counts_as_present", [
        pv("u", {"$referrer": None}),
    ], Expect(persons=[P("u", {"u": 0}, {"$referrer": None, "$initial_referrer": None, **c(0)})])),
    Scenario("snapshot_event_gets_no_initial_properties", [
        ev("u", "$snapshot", {"$browser": "Chrome"}),
    ], Expect(persons=[P("u", {"u": 0}, c(0))])),
    # ---- §1.1 / §1.2 merges -----------------------------------------------------------------
    Scenario("identify_neither_exists_creates_identified_person", [
        identify("user", "anon", {"$set": {"email": "u@x.io"}}),
    ], Expect(
        persons=[P("user", {"user": 0, "anon": 0}, {"email": "u@x.io", **c(0)}, is_identified=True)],
        events={0: E("user", properties={"email": "u@x.io", **c(0)})},
    )),
    Scenario("identify_anonymous_person_keeps_its_uuid", [
        pv("anon", {"$set": {"a": 1}}),
        identify("user", "anon", {"$set": {"email": "u@x.io"}}, 10),
    ], Expect(
        persons=[P("anon", {"anon": 0, "user": 0}, {"a": 1, "email": "u@x.io", **c(0)}, is_identified=True, version=1)],
        events={1: E("anon", created_at_s=0)},
    )),
    Scenario("identify_into_existing_person_adds_anon_id", [
        pv("user"),
        identify("user", "new_anon", None, 10),
    ], Expect(persons=[P("user", {"user": 0, "new_anon": 0}, c(0), is_identified=True, version=1)])),
    Scenario("identify_again_same_person_is_a_plain_update", [
        pv("anon"),
        identify("user", "anon", None, 10),
        identify("user", "anon", {"$set": {"plan": "pro"}}, 20),
        identify("user", "anon", None, 30),
    ], Expect(persons=[P("anon", {"anon": 0, "user": 0}, {"plan": "pro", **c(0)}, is_identified=True, version=2)])),
    Scenario("identify_merges_two_persons_target_wins", [
        pv("anon", {"$set": {"a": "anon", "b": "anon"}}),
        pv("user", {"$set": {"b": "user", "c": "user"}}, 10),
        identify("user", "anon", {"$set": {"d": "identify"}, "$set_once": {"a": "once", "e": "once"},
                                  "$unset": ["c"]}, 20),
        pv("anon", None, 30),
    ], Expect(
        persons=[P("user", {"user": 0, "anon": 1},
                   {"a": "anon", "b": "user", "d": "identify", "e": "once", **c(1)},
                   is_identified=True, version=1, created_at_s=0)],
        deleted=[D("anon", 100)],
        events={
            2: E("user", properties={"a": "anon", "b": "user", "d": "identify", "e": "once", **c(1)}, created_at_s=0),
            3: E("user", properties={"a": "anon", "b": "user", "d": "identify", "e": "once", **c(1)}, created_at_s=0),
        },
    )),
    Scenario("merge_version_is_max_of_both_plus_one", [
        pv("anon", {"$set": {"n": 1}}),
        pv("anon", {"$set": {"n": 2}}, 1),
        pv("anon", {"$set": {"n": 3}}, 2),
        pv("anon", {"$set": {"n": 4}}, 3),
        pv("user", None, 10),
        identify("user", "anon", None, 20),
    ], Expect(
        persons=[P("user", {"user": 0, "anon": 1}, {"n": 4, **c(4)}, is_identified=True, version=4)],
        deleted=[D("anon", 103)],
    )),
    Scenario("merge_dangerously_merges_identified_and_moves_all_ids", [
        pv("s1"),
        pv("x", None, 10),
        ev("s1", "$merge_dangerously", {"alias": "x"}, 20),
        pv("t", None, 30),
        ev("t", "$merge_dangerously", {"alias": "s1"}, 40),
    ], Expect(
        persons=[P("t", {"t": 0, "s1": 1, "x": 2}, c(3), is_identified=True, version=2, created_at_s=0)],
        deleted=[D("x", 100), D("s1", 101)],
    )),
    Scenario("identify_refused_when_source_already_identified", [
        identify("user1", "anon1"),
        pv("user2", None, 10),
        identify("user2", "user1", {"$set": {"x": 1}}, 20),
    ], Expect(
        persons=[
            P("user1", {"user1": 0, "anon1": 0}, c(0), is_identified=True),
            P("user2", {"user2": 0}, {"x": 1, **c(1)}, is_identified=True, version=1, created_at_s=10),
        ],
        warnings=[W(CANNOT_MERGE_IDENTIFIED, "user2",
                    {"sourcePersonDistinctId": "user1", "targetPersonDistinctId": "user2"}, event=2)],
        events={2: E("user2", properties={"x": 1, **c(1)})},
    )),
    Scenario("create_alias_refused_then_merge_dangerously_allowed", [
        identify("a", "a_anon"),
        pv("b", {"$set": {"k": "b"}}, 10),
        ev("b", "$create_alias", {"alias": "a"}, 20),
        ev("b", "$merge_dangerously", {"alias": "a"}, 30),
    ], Expect(
        persons=[P("b", {"b": 0, "a": 1, "a_anon": 1}, {"k": "b", **c(1)}, is_identified=True, version=2,
                   created_at_s=0)],
        deleted=[D("a", 100)],
        warnings=[W(CANNOT_MERGE_IDENTIFIED, "b", {"sourcePersonDistinctId": "a", "targetPersonDistinctId": "b"}, 2)],
    )),
    Scenario("identified_target_absorbs_anonymous_source", [
        identify("user", "anon1"),
        pv("anon2", {"$set": {"seen": "anon2"}}, 10),
        identify("user", "anon2", None, 20),
    ], Expect(
        persons=[P("user", {"user": 0, "anon1": 0, "anon2": 1}, {"seen": "anon2", **c(0)}, is_identified=True,
                   version=1)],
        deleted=[D("anon2", 100)],
    )),
    Scenario("create_alias_merges_alias_person_into_distinct_id_person", [
        pv("main", {"$set": {"k": "main"}}),
        pv("other", {"$set": {"k": "other", "o": 1}}, 10),
        ev("main", "$create_alias", {"alias": "other"}, 20),
    ], Expect(
        persons=[P("main", {"main": 0, "other": 1}, {"k": "main", "o": 1, **c(0)}, is_identified=True, version=1)],
        deleted=[D("other", 100)],
    )),
    Scenario("create_alias_with_falsy_alias_does_not_merge", [
        ev("u", "$create_alias", {"alias": ""}),
        ev("u", "$create_alias", {"alias": 0}, 10),
        ev("u", "$create_alias", {"alias": None}, 20),
        ev("u", "$create_alias", {}, 30),
    ], Expect(persons=[P("u", {"u": 0}, c(0))])),
    Scenario("create_alias_to_itself_is_a_noop", [
        ev("u", "$create_alias", {"alias": "u", "$set": {"a": 1}}),
    ], Expect(persons=[P("u", {"u": 0}, {"a": 1, **c(0)})])),
    Scenario("create_alias_numeric_alias_is_stringified", [
        ev("u", "$create_alias", {"alias": 42}),
    ], Expect(persons=[P("u", {"u": 0, "42": 0}, c(0), is_identified=True)])),
    Scenario("identify_without_anon_key_does_not_identify", [
        ev("u", "$identify", {"$set": {"email": "e@x.io"}}),
    ], Expect(persons=[P("u", {"u": 0}, {"email": "e@x.io", **c(0)})])),
    Scenario("identify_with_itself_is_a_noop_not_identified", [
        identify("u", "u", {"$set": {"a": 1}}),
    ], Expect(persons=[P("u", {"u": 0}, {"a": 1, **c(0)})])),
    Scenario("new_device_merges_into_identified_user", [
        pv("anon1", {"$set": {"device": "laptop"}}),
        identify("user", "anon1", {"$set": {"email": "e@x.io"}}, 10),
        pv("anon2", {"$set": {"device": "phone", "phone_only": True}}, 20),
        identify("user", "anon2", None, 30),
        pv("anon2", None, 40),
    ], Expect(
        persons=[P("anon1", {"anon1": 0, "user": 0, "anon2": 1},
                   {"device": "laptop", "phone_only": True, "email": "e@x.io", **c(0)},
                   is_identified=True, version=2)],
        deleted=[D("anon2", 100)],
        events={4: E("anon1", properties={"device": "laptop", "phone_only": True, "email": "e@x.io", **c(0)},
                     created_at_s=0)},
    )),
    # ---- §1.4 illegal distinct ids --------------------------------------------------------------
    Scenario("identify_anon_id_null_is_illegal", [
        identify("u", None),
    ], Expect(
        persons=[P("u", {"u": 0}, c(0))],
        warnings=[W(ILLEGAL, "u", {"illegalDistinctId": "null", "otherDistinctId": "u"}, 0)],
    )),
    Scenario("identify_with_illegal_anon_id_is_not_merged", [
        pv("Anonymous"),
        identify("user", "Anonymous", None, 10),
    ], Expect(
        persons=[P("Anonymous", {"Anonymous": 0}, c(0)), P("user", {"user": 0}, c(1), created_at_s=10)],
        warnings=[W(ILLEGAL, "user", {"illegalDistinctId": "Anonymous", "otherDistinctId": "user"}, 1)],
    )),
    Scenario("identify_with_illegal_distinct_id_is_not_merged", [
        pv("anon"),
        identify('"email"', "anon", None, 10),
    ], Expect(
        persons=[P("anon", {"anon": 0}, c(0)), P('"email"', {'"email"': 0}, c(1), created_at_s=10)],
        warnings=[W(ILLEGAL, '"email"', {"illegalDistinctId": '"email"', "otherDistinctId": "anon"}, 1)],
    )),
    Scenario("blank_id_is_illegal_but_lookalikes_are_legal", [
        identify("user", "   "),
        identify("user2", " guest", None, 10),
        identify("user3", "nan", None, 20),
        identify("user4", "NULL", None, 30),
    ], Expect(
        persons=[
            P("user", {"user": 0}, c(0)),
            P("user2", {"user2": 0, " guest": 0}, c(1), is_identified=True, created_at_s=10),
            P("user3", {"user3": 0, "nan": 0}, c(2), is_identified=True, created_at_s=20),
            P("user4", {"user4": 0, "NULL": 0}, c(3), is_identified=True, created_at_s=30),
        ],
        warnings=[W(ILLEGAL, "user", {"illegalDistinctId": "   ", "otherDistinctId": "user"}, 0)],
    )),
    # ---- §1.8 personless -------------------------------------------------------------------------
    Scenario("personless_event_without_person_uses_fake_person", [
        pv("p", {**PPF, "$set": {"a": 1}, "$browser": "Chrome"}),
    ], Expect(
        persons=[],
        events={0: E("p", mode="propertyless", properties={}, created_at_s=PERSONLESS)},
        personless={(1, "p")},
    )),
    Scenario("personless_event_with_existing_person_within_a_minute", [
        pv("u", {"$set": {"a": 1}}),
        pv("u", {**PPF, "$set": {"a": 2}}, 60),
    ], Expect(
        persons=[P("u", {"u": 0}, {"a": 1, **c(0)})],
        events={1: E("u", mode="propertyless", properties={}, created_at_s=0)},
        personless=set(),
    )),
    Scenario("personless_event_after_a_minute_is_force_upgrade", [
        pv("u", {"$set": {"a": 1}}),
        pv("u", {**PPF, "$set": {"a": 2}}, 61),
    ], Expect(
        persons=[P("u", {"u": 0}, {"a": 1, **c(0)})],
        events={1: E("u", mode="force_upgrade", properties={}, created_at_s=0)},
    )),
    Scenario("personless_identify_is_dropped", [
        identify("user", "anon", PPF),
    ], Expect(
        persons=[],
        warnings=[W(PERSONLESS_INVALID, "user", {"event": "$identify", "distinctId": "user"}, 0)],
        events={0: E(None, mode="propertyless", dropped=True, drop_reason=PERSONLESS_INVALID)},
        personless=set(),
    )),
    Scenario("personless_alias_merge_groupidentify_are_dropped", [
        ev("u", "$create_alias", {**PPF, "alias": "a"}),
        ev("u", "$merge_dangerously", {**PPF, "alias": "a"}, 10),
        ev("u", "$groupidentify", {**PPF, "$group_type": "company", "$group_key": "acme"}, 20),
    ], Expect(
        persons=[],
        warnings=[W(PERSONLESS_INVALID, "u", {"event": "$create_alias"}, 0),
                  W(PERSONLESS_INVALID, "u", {"event": "$merge_dangerously"}, 1),
                  W(PERSONLESS_INVALID, "u", {"event": "$groupidentify"}, 2)],
        events={i: E(None, mode="propertyless", dropped=True, drop_reason=PERSONLESS_INVALID) for i in range(3)},
    )),
    Scenario("invalid_process_person_profile_value_defaults_to_true", [
        pv("u", {"$process_person_profile": "false", "$set": {"a": 1}}),
        pv("u", {"$process_person_profile": True, "$set": {"a": 2}}, 10),
    ], Expect(
        persons=[P("u", {"u": 0}, {"a": 2, **c(0)}, version=1)],
        warnings=[W("invalid_process_person_profile", "u", {"$process_person_profile": "false"}, 0)],
        events={0: E("u", mode="full", properties={"a": 1, **c(0)})},
    )),
    Scenario("personless_anon_then_identify_swaps_uuid_to_anon", [
        pv("anon", PPF),
        identify("user", "anon", {"$set": {"email": "e@x.io"}}, 10),
    ], Expect(
        persons=[P("anon", {"anon": 0, "user": 0}, {"email": "e@x.io", **c(1)}, is_identified=True, created_at_s=10)],
        events={0: E("anon", mode="propertyless", created_at_s=PERSONLESS), 1: E("anon")},
    )),
    Scenario("both_personless_then_identify_writes_override", [
        pv("anon", PPF),
        pv("user", PPF, 10),
        identify("user", "anon", None, 20),
    ], Expect(persons=[P("user", {"user": 0, "anon": 1}, c(2), is_identified=True, created_at_s=20)])),
    Scenario("personless_anon_then_identify_into_existing_person_writes_override", [
        pv("anon", PPF),
        pv("user", None, 10),
        identify("user", "anon", None, 20),
    ], Expect(persons=[P("user", {"user": 0, "anon": 1}, c(1), is_identified=True, version=1, created_at_s=10)])),
    Scenario("personless_into_then_identify_existing_anon_writes_override", [
        pv("anon"),
        pv("user", PPF, 10),
        identify("user", "anon", None, 20),
    ], Expect(persons=[P("anon", {"anon": 0, "user": 1}, c(0), is_identified=True, version=1)])),
    Scenario("personless_then_full_event_creates_the_same_uuid", [
        pv("p", PPF),
        pv("p", {"$set": {"a": 1}}, 10),
    ], Expect(
        persons=[P("p", {"p": 0}, {"a": 1, **c(1)}, created_at_s=10)],
        events={0: E("p", mode="propertyless", created_at_s=PERSONLESS), 1: E("p", created_at_s=10)},
    )),
    Scenario("opted_out_team_is_always_personless", [
        pv("u", {"$set": {"a": 1}}, 0, team_id=3),
        identify("u", "x", None, 10, team_id=3),
    ], Expect(
        persons=[],
        warnings=[W(PERSONLESS_INVALID, "u", {"event": "$identify"}, 1, team_id=3)],
        events={0: E("u", mode="propertyless", properties={}, created_at_s=PERSONLESS),
                1: E(None, mode="propertyless", dropped=True, drop_reason=PERSONLESS_INVALID)},
    ), opted_out_teams=(3,)),
    Scenario("capture_force_disable_header_uses_fake_person_without_lookup", [
        identify("user", "anon"),
        pv("anon", None, 10, force_disable=True),
        identify("anon", "zzz", None, 20),
    ], Expect(
        persons=[P("user", {"user": 0, "anon": 0, "zzz": 0}, c(0), is_identified=True)],
        events={1: E("anon", mode="propertyless", properties={}, created_at_s=PERSONLESS), 2: E("user")},
    )),
    # ---- §1.6 size cap ---------------------------------------------------------------------------
    Scenario("oversized_update_is_rejected", [
        pv("u", {"$set": {"a": 1}}),
        pv("u", {"$set": {"big": BIG, "a": 2}}, 10),
        pv("u", {"$set": {"a": 3}}, 20),
    ], Expect(
        persons=[P("u", {"u": 0}, {"a": 3, **c(0)}, version=1)],
        warnings=[W(SIZE, "u", {}, 1)],
    )),
    Scenario("oversized_creation_is_rejected_and_event_kept", [
        pv("u", {"$set": {"big": BIG}}),
        pv("u", {"$set": {"a": 1}}, 10),
    ], Expect(
        persons=[P("u", {"u": 0}, {"a": 1, **c(1)}, created_at_s=10)],
        warnings=[W(SIZE, "u", {}, 0)],
        events={0: E("u", mode="full", created_at_s=None), 1: E("u", created_at_s=10)},
    )),
    # ---- teams, last_seen_at ---------------------------------------------------------------------
    Scenario("same_distinct_id_in_two_teams_are_different_persons", [
        pv("u", {"$set": {"t": 1}}, 0, team_id=1),
        pv("u", {"$set": {"t": 2}}, 10, team_id=2),
        identify("u", "anon", None, 20, team_id=2),
    ], Expect(persons=[
        P("u", {"u": 0}, {"t": 1, **c(0)}, team_id=1),
        P("u", {"u": 0, "anon": 0}, {"t": 2, **c(1)}, is_identified=True, version=1, created_at_s=10, team_id=2),
    ])),
    Scenario("activity_in_later_hours_does_not_bump_version", [
        pv("u"),
        pv("u", None, 2 * 3600),
        pv("u", None, 5 * 3600),
        pv("u", {"$update_person_last_seen_at": False}, 9 * 3600),
    ], Expect(persons=[P("u", {"u": 0}, c(0))])),
]
