"""The core cookbook (docs/sql/{trends,funnels,retention,persons,ingestion}/*.sql) against chDB.

The dataset is plain Python (seeded RNG), built once for the module and inserted once into the
module's own database, as the pipeline would have left it before any merge:
- two teams whose users share distinct ids (`anon-4` is a visitor in team 1, merged in team 2);
- visitors who stay anonymous; users who sign up anonymously and are then identified, either by
  adding their user id to their person (no merge) or by merging their anonymous person into an
  existing one (the anonymous id re-pointed with version 1, the merged-away person deleted with
  version + 100); chains of two merges (the anonymous id at version 2); events ingested before a
  merge keep the old person id in `events`, as they do in production;
- persons with several versions (plan upgrades), every row inserted in shuffled order, one
  version per insert, with merges stopped; persons deleted with their distinct ids, and a
  distinct id deleted while its person lives on;
- personless events (a person id without a person row), `$groupidentify` events from a CRM sync,
  events of the other team, events before and after the reported ranges, on both sides of
  midnight and of a week boundary;
- funnels done in order, out of order, too slowly, with repeated steps, across a merge, and a
  third team of five hand-made funnels whose conversion times are worked out by hand;
- dead letters (some refused twice: same source coordinates) and ingestion warnings of three teams.

Every query runs as an analyst runs it (server-side parameters) and every number it returns is
compared with the one computed here by plain loops over the same Python objects, never by SQL.
The person of an event is computed as events_with_person defines it (the latest override of its
distinct id, else its own person id), and checked against the final owner of every distinct id.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any

import pytest

from headwater.rows import EVENT_COLUMNS
from tests import cookbook

pytestmark = pytest.mark.pipeline

START = datetime(2024, 3, 4, tzinfo=UTC)  # a Monday: day 0 of week 0; events run from day -7 to day 48
LAST_DAY = 48
TEAM, OTHER_TEAM, THIRD_TEAM = 1, 2, 3  # the third team: five hand-made funnels
NAMESPACE = uuid.UUID("6f1c2a4e-0d5b-4f7e-9a21-5c3b8e7d9f10")
FUNNEL = ("signed_up", "created_project", "paid")
BROWSERS = ("Chrome", "Firefox", "Safari", "Edge", "")  # "": no $browser property
COUNTRIES = ("FR", "US", "DE", "BR")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


def person_id(team: int, distinct_id: str) -> uuid.UUID:
    """The deterministic id of the person first created with ``distinct_id`` (also the personless one)."""
    return uuid.uuid5(NAMESPACE, f"{team}:{distinct_id}")


def week_of(moment: datetime | date) -> date:
    day = moment.date() if isinstance(moment, datetime) else moment
    return day - timedelta(days=day.weekday())


# ---------------------------------------------------------------- the rows, as Python objects


@dataclass(frozen=True)
class Event:
    team_id: int
    event: str
    distinct_id: str
    person_id: uuid.UUID  # as stamped when the event was processed (before any later merge)
    timestamp: datetime
    properties: tuple[tuple[str, Any], ...]
    uuid: uuid.UUID

    def prop(self, key: str) -> Any:
        return dict(self.properties).get(key)


@dataclass(frozen=True)
class PersonRow:
    team_id: int
    id: uuid.UUID
    properties: str  # JSON text, as stored
    is_identified: int
    created_at: datetime
    version: int
    is_deleted: int


@dataclass(frozen=True)
class DistinctIdRow:
    team_id: int
    distinct_id: str
    person_id: uuid.UUID
    version: int
    is_deleted: int


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    detail: str
    stage: str
    source_topic: str
    source_partition: int
    source_offset: int
    dead_lettered_at: datetime  # millisecond precision, as stored
    key: str
    raw: str


@dataclass(frozen=True)
class Warning:
    team_id: int
    type: str
    event_uuid: str
    distinct_id: str
    details: str  # JSON text
    timestamp: datetime


@dataclass
class PersonState:
    properties: dict[str, Any]
    created_at: datetime
    version: int = 0
    is_identified: bool = False
    is_deleted: bool = False


@dataclass
class World:
    """A tiny identity model that writes the rows the pipeline writes: person snapshots with
    versions, distinct-id rows (version 0 on creation, + 1 on each re-pointing, deleted with the
    person), and events stamped with the person their distinct id belonged to at that moment."""

    rng: random.Random
    events: list[Event] = field(default_factory=list)
    persons: list[PersonRow] = field(default_factory=list)
    distinct_ids: list[DistinctIdRow] = field(default_factory=list)
    owner: dict[tuple[int, str], uuid.UUID] = field(default_factory=dict)  # (team, distinct id) → person, now
    row_version: dict[tuple[int, str], int] = field(default_factory=dict)
    state: dict[tuple[int, uuid.UUID], PersonState] = field(default_factory=dict)
    kinds: dict[tuple[int, int], str] = field(default_factory=dict)  # (team, n) → the user's story

    def new_uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def _snapshot(self, team: int, pid: uuid.UUID) -> None:
        s = self.state[(team, pid)]
        self.persons.append(PersonRow(team, pid, json.dumps(s.properties), int(s.is_identified), s.created_at,
                                      s.version, int(s.is_deleted)))

    def _point(self, team: int, did: str, pid: uuid.UUID, version: int, deleted: bool = False) -> None:
        self.distinct_ids.append(DistinctIdRow(team, did, pid, version, int(deleted)))
        self.row_version[(team, did)] = version
        if deleted:
            del self.owner[(team, did)]
        else:
            self.owner[(team, did)] = pid

    def create(self, team: int, did: str, at: datetime, **properties: Any) -> None:
        pid = person_id(team, did)
        self.state[(team, pid)] = PersonState(dict(properties), at)
        self._snapshot(team, pid)
        self._point(team, did, pid, 0)

    def set(self, team: int, did: str, **properties: Any) -> None:
        pid = self.owner[(team, did)]
        s = self.state[(team, pid)]
        s.properties.update(properties)
        s.version += 1
        self._snapshot(team, pid)

    def alias(self, team: int, new_did: str, existing_did: str) -> None:
        """Identify without a merge: the new id joins the existing person (a version-0 row)."""
        pid = self.owner[(team, existing_did)]
        self._point(team, new_did, pid, 0)
        s = self.state[(team, pid)]
        s.is_identified, s.version = True, s.version + 1
        self._snapshot(team, pid)

    def merge(self, team: int, source_did: str, target_did: str) -> None:
        source, target = self.owner[(team, source_did)], self.owner[(team, target_did)]
        src, tgt = self.state[(team, source)], self.state[(team, target)]
        tgt.properties = {**src.properties, **tgt.properties}
        tgt.created_at = min(tgt.created_at, src.created_at)
        tgt.is_identified = True
        tgt.version = max(tgt.version, src.version) + 1
        self._snapshot(team, target)
        for (t, did), pid in sorted(self.owner.items()):
            if t == team and pid == source:
                self._point(team, did, target, self.row_version[(team, did)] + 1)
        src.is_deleted, src.version = True, src.version + 100
        self._snapshot(team, source)

    def delete(self, team: int, did: str) -> uuid.UUID:
        pid = self.owner[(team, did)]
        s = self.state[(team, pid)]
        s.is_deleted, s.version = True, s.version + 1
        self._snapshot(team, pid)
        for (t, d), p in sorted(self.owner.items()):
            if t == team and p == pid:
                self._point(team, d, pid, self.row_version[(team, d)] + 1, deleted=True)
        return pid

    def forget(self, team: int, did: str) -> None:
        """The distinct id is deleted, its person stays (PostHog's split or distinct-id removal)."""
        self._point(team, did, self.owner[(team, did)], self.row_version[(team, did)] + 1, deleted=True)

    def emit(self, team: int, name: str, did: str, at: datetime, **properties: Any) -> None:
        pid = self.owner.get((team, did)) or person_id(team, did)  # no person: personless, the deterministic id
        self.events.append(Event(team, name, did, pid, at, tuple(properties.items()), self.new_uuid()))


def moment(rng: random.Random, day: int) -> datetime:
    """A random instant of day ``day`` (0 = START), to the microsecond."""
    return START + timedelta(days=day, microseconds=rng.randrange(86_400 * 10**6))


def delay(rng: random.Random, low_s: float, high_s: float) -> timedelta:
    return timedelta(microseconds=rng.randrange(int(low_s * 10**6), int(high_s * 10**6)))


def user_life(w: World, team: int, n: int, kind: str) -> None:
    """One user's story, as (time, action) steps run in time order.

    kind: ``visitor`` (anonymous forever, sometimes starts the funnel), ``alias`` (signs up, then
    identified without a merge), ``merge`` (signs up anonymously; the backend creates the user's
    person; identify merges the anonymous person into it), ``chain`` (as merge, then the user's
    person is merged into an account's person days later)."""
    rng = w.rng
    w.kinds[(team, n)] = kind
    anon, user, acct = f"anon-{n}", f"user-{n}", f"acct-{n}"
    browser = rng.choice(BROWSERS if team == TEAM else ("Chrome", "Firefox", ""))
    first = rng.randint(-7, 38)
    last = min(first + rng.randint(0, 35), LAST_DAY)
    days = [first] + [d for d in range(first + 1, last + 1) if rng.random() < 0.3]
    steps: list[tuple[datetime, Callable[..., None], tuple, dict]] = []

    def at(t: datetime, action: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        steps.append((t, action, args, kwargs))

    signup = identified = merged_again = None
    if kind != "visitor" or rng.random() < 0.3:
        signup = moment(rng, rng.choice(days))
    if kind in ("merge", "chain"):
        created = signup + delay(rng, 5, 30)  # the backend creates the user, with its own person
        at(created, w.create, team, user, created, email=f"{user}@example.com", plan="free",
           country=rng.choice(COUNTRIES))
        at(created, w.emit, team, "user_created", user, created)
    if kind != "visitor":
        identified = signup + delay(rng, 40, 90)
        if kind == "alias":
            at(identified, w.alias, team, user, anon)
        else:
            at(identified, w.merge, team, anon, user)
        at(identified, w.emit, team, "$identify", user, identified, **{"$anon_distinct_id": anon})
    if kind == "chain":
        merged_again = identified + delay(rng, 86_400, 8 * 86_400)
        linked = merged_again - timedelta(hours=1)
        at(linked, w.create, team, acct, linked, plan="enterprise", company=f"Company {n}")
        at(linked, w.emit, team, "account_linked", acct, linked)
        at(merged_again, w.merge, team, user, acct)
        at(merged_again, w.emit, team, "$merge_dangerously", acct, merged_again, alias=user)

    def web(t: datetime) -> str:
        return user if identified and t > identified else anon

    def backend(t: datetime) -> str:
        if merged_again and t > merged_again - timedelta(hours=1):
            return acct if rng.random() < 0.5 else user
        return user if identified and t > identified else anon

    for d in days:
        for _ in range(rng.randint(1, 4)):
            t = moment(rng, d)
            at(t, w.emit, team, "$pageview", web(t), t, **({"$browser": browser} if browser else {}))
        if signup and signup.date() <= (START + timedelta(days=d)).date() and rng.random() < 0.6 or rng.random() < 0.08:
            for _ in range(rng.randint(1, 3)):
                t = moment(rng, d)
                at(t, w.emit, team, "report_viewed", web(t), t)

    if signup:
        at(signup, w.emit, team, "signed_up", anon, signup)
        r = rng.random()
        project = None
        if r < 0.72:  # half of them within a day, the others up to 9 days later
            project = signup + delay(rng, 600, rng.choice([86_400, 9 * 86_400]))
        elif r < 0.85:  # out of order: a project created (as a visitor) before signing up
            early = signup - delay(rng, 3600, 2 * 86_400)
            at(early, w.emit, team, "created_project", anon, early)
        if project:
            at(project, w.emit, team, "created_project", backend(project), project)
            r = rng.random()
            if r < 0.65:
                paid = project + delay(rng, 3600, rng.choice([86_400, 6 * 86_400]))
            elif r < 0.8:  # out of order: paid before creating a project
                paid = signup + (project - signup) * rng.uniform(0.1, 0.9)
            else:
                paid = None
            if paid:
                payer = backend(paid)
                at(paid, w.emit, team, "paid", payer, paid, amount=rng.choice([29, 99, 299]))
                if kind != "visitor":
                    at(paid, w.set, team, payer, plan="pro")
                    if rng.random() < 0.4:
                        later = paid + delay(rng, 3600, 10 * 86_400)
                        at(later, w.set, team, user, plan=rng.choice(["enterprise", "free"]))
            if rng.random() < 0.2:  # a second project
                again = project + delay(rng, 60, 3 * 86_400)
                at(again, w.emit, team, "created_project", backend(again), again)
        if rng.random() < 0.25:  # signs up again (a repeated step 1), days later
            again = signup + delay(rng, 86_400, 6 * 86_400)
            at(again, w.emit, team, "signed_up", web(again), again)
    if kind == "visitor" and rng.random() < 0.4:
        t = moment(rng, rng.choice(days))
        at(t, w.set, team, anon, country=rng.choice(COUNTRIES))

    steps.sort(key=lambda step: step[0])  # stable: at one instant, in the order scheduled
    first_time = steps[0][0] - US
    w.create(team, anon, first_time, **({"$initial_browser": browser} if browser else {}))
    for _, action, args, kwargs in steps:
        action(*args, **kwargs)


def kind_of(team: int, n: int) -> str:
    if team == OTHER_TEAM:  # team 1's visitors (n % 4 == 0) are merged users here, under the same ids
        return "merge" if n % 4 == 0 else "visitor"
    if n % 12 == 5:
        return "chain"
    if n % 4 == 0:
        return "visitor"
    return "alias" if n % 6 == 1 else "merge"


@dataclass
class Dataset:
    events: list[Event]
    persons: list[PersonRow]  # in insertion order: shuffled
    distinct_ids: list[DistinctIdRow]  # in insertion order: shuffled
    owner: dict[tuple[int, str], uuid.UUID]  # the final owner of every live distinct id
    kinds: dict[tuple[int, int], str]
    deleted: list[uuid.UUID]  # team 1 persons deleted on purpose (not by a merge)
    dead_letters: list[DeadLetter]
    warnings: list[Warning]


@cache
def dataset() -> Dataset:
    rng = random.Random(20240304)
    w = World(rng)
    for n in range(1, 81):
        user_life(w, TEAM, n, kind_of(TEAM, n))
    for n in range(1, 25):
        user_life(w, OTHER_TEAM, n, kind_of(OTHER_TEAM, n))
    # a person whose plan is JSON null, and one whose browser is a number: both read as ''
    w.set(TEAM, "user-2", plan=None)
    w.emit(TEAM, "$pageview", "user-2", START + timedelta(days=12, hours=9), **{"$browser": 42})
    # deleted persons, with their distinct ids: a visitor, and an identified user with two ids
    deleted = [w.delete(TEAM, "anon-8"), w.delete(TEAM, "user-7")]
    w.forget(TEAM, "anon-3")  # a merged user's anonymous id deleted, the person kept
    # the night owl: events on both sides of midnight (day 10/11) and of a week boundary (weeks 1/2)
    owl = "night-owl"
    w.create(TEAM, owl, START + timedelta(days=10), plan="free")
    for t in (START + timedelta(days=11) - US, START + timedelta(days=11)):
        w.emit(TEAM, "$pageview", owl, t, **{"$browser": "Safari"})
    w.emit(TEAM, "signed_up", owl, START + timedelta(weeks=2) - US)
    w.emit(TEAM, "report_viewed", owl, START + timedelta(weeks=2))
    # personless backend calls (no person row) and a nightly CRM sync ($groupidentify: not activity)
    for day in range(-7, LAST_DAY + 1):
        for _ in range(rng.randint(0, 3)):
            w.emit(TEAM, "api_called", f"svc-{rng.randint(1, 3)}", moment(rng, day), **{"$process_person_profile": False})
        w.emit(TEAM, "$groupidentify", "crm-sync", moment(rng, day), **{"$group_type": "company", "$group_key": f"c{day % 9}"})
    third_team_funnels(w)
    persons, distinct_ids = w.persons[:], w.distinct_ids[:]
    rng.shuffle(persons)
    rng.shuffle(distinct_ids)
    return Dataset(w.events, persons, distinct_ids, dict(w.owner), w.kinds, deleted,
                   dead_letters(rng), warnings(rng))


def third_team_funnels(w: World) -> None:
    """Five persons of the third team, whose funnel (FUNNEL, 7 days) is worked out by hand in
    test_funnel_conversion_time_worked_out_by_hand."""
    def day(n: int, hour: int = 0) -> datetime:
        return START + timedelta(days=n, hours=hour)

    stories = {
        # the first signup is too slow (its project 9 days later); the second converts in one day
        "retry": [("signed_up", day(5, 10)), ("created_project", day(14, 10)), ("signed_up", day(15, 9)),
                  ("created_project", day(15, 10)), ("paid", day(16, 9))],
        # converts in 5 days, then again in 2 hours: the first conversion counts
        "twice": [("signed_up", day(20, 12)), ("created_project", day(21, 12)), ("paid", day(25, 12)),
                  ("signed_up", day(26, 12)), ("created_project", day(26, 13)), ("paid", day(26, 14))],
        # pays 8 days after signing up: reaches step 2 only
        "slow": [("signed_up", day(1)), ("created_project", day(2)), ("paid", day(9))],
        # pays exactly 7 days after signing up: the window's bound is included
        "exact": [("signed_up", day(30)), ("created_project", day(33)), ("paid", day(37))],
        # creates a project in the same microsecond as signing up: in order, as windowFunnel has it
        "tie": [("signed_up", day(40)), ("created_project", day(40)), ("paid", day(40, 1))],
    }
    for did, events in stories.items():
        w.create(THIRD_TEAM, did, events[0][1] - US)
        for name, t in events:
            w.emit(THIRD_TEAM, name, did, t)


REASONS = {  # reason → (stage, source topic)
    "invalid_json": ("identity", "events_raw"),
    "invalid_distinct_id": ("identity", "events_raw"),
    "event_row_too_large": ("identity", "events_raw"),
    "processing_error": ("identity", "events_raw"),
    "sink_unreadable_row": ("sink", "events_enriched"),
}
RANGE_FROM, RANGE_TO = datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 4, 1, tzinfo=UTC)


def dead_letters(rng: random.Random) -> list[DeadLetter]:
    rows: list[DeadLetter] = []
    offsets: dict[tuple[str, int], int] = defaultdict(int)
    weights = [30, 12, 3, 6, 5]
    for _ in range(140):
        reason = rng.choices(list(REASONS), weights)[0]
        stage, topic = REASONS[reason]
        if reason == "invalid_json" and rng.random() < 0.3:
            stage = "capture"  # the same reason from two stages: two rows
        partition = rng.randrange(4)
        offsets[(topic, partition)] += rng.randint(1, 500)
        at = RANGE_FROM + timedelta(milliseconds=rng.randrange(-5 * 86_400_000, 33 * 86_400_000))
        raw = json.dumps({"event": "$pageview", "distinct_id": f"d{rng.randrange(10**6)}", "n": rng.random()})
        if reason == "invalid_json":
            raw = raw[: rng.randint(5, len(raw) - 2)]
        rows.append(DeadLetter(reason, f"{reason}: at byte {rng.randrange(100)}", stage, topic, partition,
                               offsets[(topic, partition)], at, f"phc_test:d{rng.randrange(100)}", raw))
    # the latest `event_row_too_large` in the range: a long raw, with characters of several bytes
    long_raw = json.dumps({"event": "big", "properties": {"text": "é€😀" * 600}}, ensure_ascii=False)
    rows.append(DeadLetter("event_row_too_large", "row of 2,412 bytes", "identity", "events_raw", 1, 99_999,
                           RANGE_TO - timedelta(milliseconds=1), "phc_test:big", long_raw))
    # the bounds: at time_from (included) and at time_to (excluded)
    rows.append(DeadLetter("invalid_distinct_id", "at the start", "identity", "events_raw", 2, 99_998,
                           RANGE_FROM, "k", '{"distinct_id": ""}'))
    rows.append(DeadLetter("invalid_distinct_id", "at the end", "identity", "events_raw", 2, 99_997,
                           RANGE_TO, "k", '{"distinct_id": null}'))
    # messages refused again after a restart: the same source coordinates, a later broker time
    for original in rng.sample(rows[:140], 25):
        again = original.dead_lettered_at + timedelta(milliseconds=rng.randrange(1, 3 * 86_400_000))
        rows.append(DeadLetter(**{**original.__dict__, "dead_lettered_at": again}))
    rng.shuffle(rows)
    return rows


WARNING_TYPES = ("cannot_merge_already_identified", "ignored_invalid_timestamp", "invalid_process_person_profile",
                 "invalid_groups", "skipping_event_invalid_distinct_id")


def warnings(rng: random.Random) -> list[Warning]:
    rows = []
    for i in range(260):
        team = rng.choices([1, 2, 3], [6, 3, 1])[0]
        kind = rng.choices(WARNING_TYPES, [5, 8, 3, 2, 1])[0]
        did = f"d{rng.randrange(25)}"
        event_uuid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if rows and rng.random() < 0.15:  # one event, two warnings of a team
            same = rng.choice(rows)
            team, event_uuid, did = same.team_id, same.event_uuid, same.distinct_id
        at = RANGE_FROM + timedelta(microseconds=rng.randrange(-4 * 86_400 * 10**6, 32 * 86_400 * 10**6))
        details = json.dumps({"n": i, "distinctId": did, "value": rng.choice(["x", 3, None])})
        rows.append(Warning(team, kind, event_uuid, did, details, at))
    rows.append(Warning(2, "invalid_groups", "u-start", "d-start", '{"at": "start"}', RANGE_FROM))
    rows.append(Warning(2, "invalid_groups", "u-end", "d-end", '{"at": "end"}', RANGE_TO))
    return rows


# ---------------------------------------------------------------- loading into ClickHouse


def event_row(e: Event) -> list:
    values = {
        "uuid": e.uuid, "team_id": e.team_id, "event": e.event, "distinct_id": e.distinct_id,
        "person_id": e.person_id, "timestamp": e.timestamp, "properties": json.dumps(dict(e.properties)),
        "person_properties": "{}", "person_created_at": EPOCH, "$session_id": "", "$window_id": "",
        "created_at": e.timestamp,
    }
    for i in range(5):
        values |= {f"$group_{i}": "", f"group{i}_properties": "", f"group{i}_created_at": EPOCH}
    return [values[c] for c in EVENT_COLUMNS]


def blocks(rows: list, identity: Callable[[Any], tuple]) -> list[list]:
    """``rows`` in order, cut into inserts that never hold two rows of one identity:
    ReplacingMergeTree collapses those within an inserted block (optimize_on_insert)."""
    out: list[tuple[set, list]] = []
    for row in rows:
        ident = identity(row)
        target = next((b for b in out if ident not in b[0]), None)
        if target is None:
            out.append(target := (set(), []))
        target[0].add(ident)
        target[1].append(row)
    return [b[1] for b in out]


def insert(client, db: str, data: Dataset) -> None:
    client.insert(f"{db}.events", [event_row(e) for e in data.events], column_names=list(EVENT_COLUMNS))
    for batch in blocks(data.persons, lambda p: (p.team_id, p.id)):
        client.insert(f"{db}.persons", [[p.id, p.team_id, p.properties, p.is_identified, p.created_at, p.version,
                                         p.is_deleted] for p in batch],
                      column_names=["id", "team_id", "properties", "is_identified", "created_at", "version", "is_deleted"])
    for batch in blocks(data.distinct_ids, lambda d: (d.team_id, d.distinct_id)):  # person_overrides_mv follows
        client.insert(f"{db}.person_distinct_ids",
                      [[d.team_id, d.distinct_id, d.person_id, d.version, d.is_deleted] for d in batch],
                      column_names=["team_id", "distinct_id", "person_id", "version", "is_deleted"])
    for batch in blocks(data.dead_letters, lambda d: (d.source_topic, d.source_partition, d.source_offset)):
        client.insert(f"{db}.events_dead_letter",
                      [[d.reason, d.detail, d.stage, d.source_topic, d.source_partition, d.source_offset,
                        d.dead_lettered_at, d.key, d.raw] for d in batch],
                      column_names=["reason", "detail", "stage", "source_topic", "source_partition", "source_offset",
                                    "dead_lettered_at", "key", "raw"])
    client.insert(f"{db}.ingestion_warnings",
                  [[w.team_id, w.type, w.event_uuid, w.distinct_id, w.details, w.timestamp] for w in data.warnings],
                  column_names=["team_id", "type", "event_uuid", "distinct_id", "details", "timestamp"])


@dataclass(frozen=True)
class Loaded:
    client: Any
    db: str
    url: str  # HEADWATER_CLICKHOUSE_URL of the database

    def run(self, name: str, **params: Any) -> list[tuple]:
        return rows_of(cookbook.run(self.client, name, self.db, **params))


@pytest.fixture(scope="module")
def core(clickhouse_url: str) -> Iterator[Loaded]:
    """The dataset, inserted once into this module's own migrated database, merges of the tables
    with versions or duplicates stopped first (chDB merges small parts within a second or so,
    which would hide the old rows the queries must see past); checks that every row is visible."""
    from headwater.settings import ClickHouseTarget
    from sinks.clickhouse.client import connect
    from sinks.clickhouse.migrate import apply_migrations

    db = f"test_cookbook_core_{os.getpid()}"
    url = f"{clickhouse_url}/{db}"
    client = connect(ClickHouseTarget(url, "headwater"))
    apply_migrations(client, db)
    for table in ("persons", "person_distinct_ids", "person_overrides", "events_dead_letter"):
        client.command(f"SYSTEM STOP MERGES {db}.{table}")
    data = dataset()
    insert(client, db, data)
    counts = {table: client.query(f"SELECT count() FROM {db}.{table}").result_rows[0][0]
              for table in ("events", "persons", "person_distinct_ids", "person_overrides", "events_dead_letter")}
    assert counts == {"events": len(data.events), "persons": len(data.persons),
                      "person_distinct_ids": len(data.distinct_ids),
                      "person_overrides": sum(1 for d in data.distinct_ids if d.version > 0),
                      "events_dead_letter": len(data.dead_letters)}
    try:
        yield Loaded(client, db, url)
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db}")
        client.close()


def utc(value: Any) -> Any:
    """clickhouse-connect's datetimes, made comparable with ours whether or not they carry a zone."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def rows_of(result: list[tuple]) -> list[tuple]:
    return [tuple(utc(v) for v in row) for row in result]


# ---------------------------------------------------------------- the expected numbers, in Python


@cache
def overrides() -> dict[tuple[int, str], uuid.UUID]:
    """events_with_person's correction: per (team, distinct id), the person of its latest row of
    version > 0 (deleted wins a version tie), unless that row is deleted."""
    latest: dict[tuple[int, str], DistinctIdRow] = {}
    for d in dataset().distinct_ids:
        if d.version > 0:
            key = (d.team_id, d.distinct_id)
            if key not in latest or (d.version, d.is_deleted) > (latest[key].version, latest[key].is_deleted):
                latest[key] = d
    return {key: d.person_id for key, d in latest.items() if not d.is_deleted}


def person_of(e: Event) -> uuid.UUID:
    return overrides().get((e.team_id, e.distinct_id), e.person_id)


def naive_person_of(e: Event) -> uuid.UUID:
    return e.person_id


def events_of(team: int, date_from: date, date_to: date) -> list[Event]:
    return [e for e in dataset().events if e.team_id == team and date_from <= e.timestamp.date() <= date_to]


def days(date_from: date, date_to: date) -> list[date]:
    return [date_from + timedelta(days=i) for i in range((date_to - date_from).days + 1)]


def expected_dau(team: int, date_from: date, date_to: date, person=person_of) -> list[tuple]:
    active: dict[date, set[uuid.UUID]] = defaultdict(set)
    for e in events_of(team, date_from, date_to):
        if e.event != "$groupidentify":
            active[e.timestamp.date()].add(person(e))
    return [(day, len(active[day])) for day in days(date_from, date_to)]


def expected_event_counts(team: int, names: list[str], date_from: date, date_to: date) -> list[tuple]:
    wanted = list(dict.fromkeys(names))
    counts: dict[tuple[date, str], int] = defaultdict(int)
    for e in events_of(team, date_from, date_to):
        counts[(e.timestamp.date(), e.event)] += 1
    return [(day, name, counts[(day, name)]) for day in days(date_from, date_to) for name in wanted]


def text_value(properties: dict[str, Any], key: str) -> str:
    """JSONExtractString: the value of a JSON string, the JSON text of a number or a boolean, and ''
    for null or a missing key (the dataset has no objects or arrays there)."""
    value = properties.get(key)
    if value is None or isinstance(value, str):
        return value or ""
    assert isinstance(value, (bool, int, float))
    return json.dumps(value)


def expected_breakdown(team: int, event: str, prop: str, date_from: date, date_to: date, limit: int,
                       person=person_of) -> list[tuple]:
    events: dict[str, int] = defaultdict(int)
    persons: dict[str, set[uuid.UUID]] = defaultdict(set)
    for e in events_of(team, date_from, date_to):
        if e.event == event:
            value = text_value(dict(e.properties), prop)
            events[value] += 1
            persons[value].add(person(e))
    rows = sorted(((v, events[v], len(persons[v])) for v in events), key=lambda row: (-row[1], row[0]))
    return rows[:limit]


def funnel_events(team: int, steps: tuple[str, ...], date_from: date, date_to: date,
                  person=person_of) -> dict[uuid.UUID, list[Event]]:
    by_person: dict[uuid.UUID, list[Event]] = defaultdict(list)
    for e in events_of(team, date_from, date_to):
        if e.event in steps:
            by_person[person(e)].append(e)
    for evs in by_person.values():
        if team != THIRD_TEAM:  # generated data: no simultaneous events, no tie rules tested by chance
            assert len({e.timestamp for e in evs}) == len(evs)
        evs.sort(key=lambda e: e.timestamp)
    return by_person


def chain_end(events: list[Event], steps: tuple[str, ...], start: Event) -> tuple[int, datetime]:
    """From ``start`` (a step-1 event), take each next step at its first occurrence at or after the
    previous one; the level reached and the time of its last step."""
    level, previous = 1, start.timestamp
    for step in steps[1:]:
        later = [e.timestamp for e in events if e.event == step and e.timestamp >= previous]
        if not later:
            break
        level, previous = level + 1, min(later)
    return level, previous


def funnel_level(events: list[Event], steps: tuple[str, ...], window: timedelta) -> int:
    best = 0
    for start in (e for e in events if e.event == steps[0]):
        level, previous = 1, start.timestamp
        for step in steps[1:]:
            later = [e.timestamp for e in events if e.event == step and e.timestamp >= previous]
            if not later or min(later) - start.timestamp > window:
                break
            level, previous = level + 1, min(later)
        best = max(best, level)
    return best


def expected_funnel(team: int, steps: tuple[str, ...], window: timedelta, date_from: date, date_to: date,
                    person=person_of) -> list[tuple]:
    levels = [funnel_level(evs, steps, window) for evs in funnel_events(team, steps, date_from, date_to, person).values()]
    reached = [sum(1 for level in levels if level >= k) for k in range(1, len(steps) + 1)]
    if not reached[0]:
        return []
    return [(k, steps[k - 1], reached[k - 1], round(reached[k - 1] / reached[0], 4),
             round(reached[k - 1] / reached[max(k - 2, 0)], 4)) for k in range(1, len(steps) + 1)]


def conversion_seconds(team: int, steps: tuple[str, ...], window: timedelta, date_from: date, date_to: date,
                       person=person_of) -> list[float]:
    """Per converter, the time of their first conversion: the earliest step-1 event whose chain
    (each step at its first occurrence at or after the previous) ends within the window."""
    out = []
    for evs in funnel_events(team, steps, date_from, date_to, person).values():
        for start in (e for e in evs if e.event == steps[0]):
            level, end = chain_end(evs, steps, start)
            if level == len(steps) and end - start.timestamp <= window:
                out.append((end - start.timestamp) // US / 1e6)
                break
    return out


def expected_retention(team: int, start_event: str, return_event: str, date_from: date, date_to: date,
                       max_offset: int, person=person_of) -> list[tuple]:
    last_week = week_of(date_to)
    starts: dict[uuid.UUID, set[date]] = defaultdict(set)
    returns: dict[uuid.UUID, set[date]] = defaultdict(set)
    for e in dataset().events:
        if e.team_id == team and week_of(e.timestamp) <= last_week:
            if e.event == start_event:
                starts[person(e)].add(week_of(e.timestamp))
            if e.event == return_event:
                returns[person(e)].add(week_of(e.timestamp))
    cohorts: dict[date, list[uuid.UUID]] = defaultdict(list)
    for pid, weeks in starts.items():
        if min(weeks) >= week_of(date_from):
            cohorts[min(weeks)].append(pid)
    rows = []
    for cohort in sorted(cohorts):
        members = cohorts[cohort]
        for offset in range(min(max_offset, (last_week - cohort).days // 7) + 1):
            back = sum(1 for pid in members if cohort + timedelta(weeks=offset) in returns[pid])
            rows.append((cohort, offset, len(members), back, round(back / len(members), 4)))
    return rows


def latest_row(rows: list, key: Callable[[Any], tuple]) -> dict[tuple, Any]:
    """The row of each identity with the highest (version, is_deleted), as argMax picks it."""
    out: dict[tuple, Any] = {}
    for row in rows:
        k = key(row)
        if k not in out or (row.version, row.is_deleted) > (out[k].version, out[k].is_deleted):
            out[k] = row
    return out


@cache
def latest_persons() -> dict[tuple, PersonRow]:
    return latest_row(dataset().persons, lambda p: (p.team_id, p.id))


@cache
def latest_mappings() -> dict[tuple, DistinctIdRow]:
    return latest_row(dataset().distinct_ids, lambda d: (d.team_id, d.distinct_id))


def expected_person(team: int, did: str) -> list[tuple]:
    mapping = latest_mappings().get((team, did))
    if mapping is None or mapping.is_deleted:
        return []
    p = latest_persons().get((team, mapping.person_id))
    if p is None or p.is_deleted:
        return []
    return [(did, p.id, p.properties, p.is_identified, p.created_at, p.version, mapping.version)]


def expected_distinct_ids(team: int, pid: uuid.UUID) -> list[tuple]:
    return sorted((d.distinct_id, d.version) for (t, _), d in latest_mappings().items()
                  if t == team and d.person_id == pid and not d.is_deleted)


def expected_property_counts(team: int, prop: str, limit: int) -> list[tuple]:
    counts: dict[str, int] = defaultdict(int)
    for (t, _), p in latest_persons().items():
        if t == team and not p.is_deleted:
            counts[text_value(json.loads(p.properties), prop)] += 1
    return sorted(counts.items(), key=lambda row: (-row[1], row[0]))[:limit]


def expected_dead_letters(time_from: datetime, time_to: datetime) -> list[tuple]:
    groups: dict[tuple[str, str], list[DeadLetter]] = defaultdict(list)
    for d in dataset().dead_letters:
        if time_from <= d.dead_lettered_at < time_to:
            groups[(d.reason, d.stage)].append(d)
    rows = []
    for (reason, stage), letters in groups.items():
        example = max(letters, key=lambda d: (d.dead_lettered_at, d.source_topic, d.source_partition, d.source_offset))
        messages = {(d.source_topic, d.source_partition, d.source_offset) for d in letters}
        rows.append((reason, stage, len(messages), min(d.dead_lettered_at for d in letters),
                     max(d.dead_lettered_at for d in letters), example.detail,
                     f"{example.source_topic}/{example.source_partition}@{example.source_offset}", example.raw[:1000]))
    return sorted(rows, key=lambda row: (-row[2], row[0], row[1]))


def expected_warnings(time_from: datetime, time_to: datetime) -> list[tuple]:
    groups: dict[tuple[int, str], list[Warning]] = defaultdict(list)
    for w in dataset().warnings:
        if time_from <= w.timestamp < time_to:
            groups[(w.team_id, w.type)].append(w)
    rows = []
    for (team, kind), found in groups.items():
        latest = max(found, key=lambda w: (w.timestamp, w.event_uuid, w.details))
        rows.append((team, kind, len(found), len({w.event_uuid for w in found}), len({w.distinct_id for w in found}),
                     min(w.timestamp for w in found), max(w.timestamp for w in found),
                     latest.details, latest.event_uuid, latest.distinct_id))
    return sorted(rows, key=lambda row: (row[0], -row[2], row[1]))


# ---------------------------------------------------------------- the tests

SECTIONS = {
    "trends": {"daily_active_users", "event_counts_by_day", "breakdown_by_property"},
    "funnels": {"ordered_funnel", "funnel_conversion_time"},
    "retention": {"weekly_retention"},
    "persons": {"person_by_distinct_id", "distinct_ids_of_person", "person_property_counts"},
    "ingestion": {"dead_letters_by_reason", "warnings_by_type"},
}
PLACEHOLDER = re.compile(r"\{(\w+):([^}]+)\}")


def test_the_dataset_has_what_the_queries_must_get_right():
    data = dataset()
    assert len({e.uuid for e in data.events}) == len(data.events) > 2000
    kinds = list(data.kinds.items())
    assert {k for (t, _), k in kinds if t == TEAM} == {"visitor", "alias", "merge", "chain"}
    # merged persons: distinct ids re-pointed with version 1 and 2, and events that still carry the
    # person of before the merge
    versions = {d.version for d in data.distinct_ids if not d.is_deleted}
    assert {0, 1, 2} <= versions
    stale = [e for e in data.events if e.team_id == TEAM and person_of(e) != e.person_id]
    assert len(stale) > 100
    # every live distinct id's events belong, once corrected, to its final owner
    for e in data.events:
        if (e.team_id, e.distinct_id) in data.owner:
            assert person_of(e) == data.owner[(e.team_id, e.distinct_id)], e
    # persons with several versions inserted out of order, merged-away persons deleted, and persons
    # deleted on purpose with their distinct ids
    seen: dict[tuple, int] = {}
    out_of_order = 0
    for p in data.persons:
        out_of_order += p.version < seen.get((p.team_id, p.id), -1)
        seen[(p.team_id, p.id)] = max(seen.get((p.team_id, p.id), -1), p.version)
    assert out_of_order > 20
    assert sum(1 for p in latest_persons().values() if p.is_deleted and p.version >= 100) > 20
    for pid in data.deleted:
        assert latest_persons()[(TEAM, pid)].is_deleted and not expected_distinct_ids(TEAM, pid)
    # a deleted distinct id whose person lives on
    forgotten = latest_mappings()[(TEAM, "anon-3")]
    assert forgotten.is_deleted and not latest_persons()[(TEAM, forgotten.person_id)].is_deleted
    # the same distinct id in both teams, re-pointed in the other team only
    assert any(data.kinds[(TEAM, n)] == "visitor" and latest_mappings()[(OTHER_TEAM, f"anon-{n}")].version == 1
               and latest_mappings()[(TEAM, f"anon-{n}")].version == 0 for n in range(4, 25, 4))
    assert {e.event for e in data.events} >= {*FUNNEL, "$pageview", "report_viewed", "$groupidentify", "api_called"}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_each_query_documents_its_parameters_and_how_to_run_it(section):
    assert {p.stem for p in (cookbook.COOKBOOK / section).glob("*.sql")} == SECTIONS[section]  # all tested here
    readme = (cookbook.COOKBOOK / "README.md").read_text()
    for name in SECTIONS[section]:
        text = cookbook.path(f"{section}/{name}").read_text()
        header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("--"))
        code = "".join(line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("--"))
        assert text.startswith("-- ") and f"--queries-file docs/sql/{section}/{name}.sql" in header, name
        assert PLACEHOLDER.findall(code) and set(PLACEHOLDER.findall(code)) <= set(PLACEHOLDER.findall(header)), name
        assert f"({section}/{name}.sql)" in readme, name
        assert "FINAL" not in code and "headwater." not in cookbook.load(f"{section}/{name}", "test_db"), name
        assert code.count(";") == 1 and code.rstrip().endswith(";"), name  # one statement


# ---- trends


def test_daily_active_users_count_merged_persons_once(core):
    date_from, date_to = date(2024, 3, 2), date(2024, 4, 16)  # two days before the range, two after
    expected = expected_dau(TEAM, date_from, date_to)

    assert core.run("trends/daily_active_users", team_id=TEAM, date_from=date_from, date_to=date_to) == expected

    counts = [n for _, n in expected]
    assert len(expected) == 46 and min(counts) > 0 and max(counts) >= 15
    # what wrong queries would have said: events.person_id (a merged visitor counted twice on the
    # day they signed in), or $groupidentify counted as activity
    assert all(a >= b for (_, a), (_, b) in zip(expected_dau(TEAM, date_from, date_to, naive_person_of), expected))
    assert sum(n for _, n in expected_dau(TEAM, date_from, date_to, naive_person_of)) - sum(counts) >= 20
    assert expected != expected_dau(OTHER_TEAM, date_from, date_to)


def test_daily_active_users_fill_days_without_activity(core):
    got = core.run("trends/daily_active_users", team_id=OTHER_TEAM, date_from=date(2024, 4, 20), date_to=date(2024, 5, 31))
    assert got == expected_dau(OTHER_TEAM, date(2024, 4, 20), date(2024, 5, 31))
    assert len(got) == 42 and got[0][1] > 0 and got[-10:] == [(date(2024, 5, 22) + timedelta(days=i), 0) for i in range(10)]
    # midnight: the night owl's events 1 µs apart fall on two days
    owl = [e.timestamp.date() for e in dataset().events if e.distinct_id == "night-owl" and e.event == "$pageview"]
    assert owl == [date(2024, 3, 14), date(2024, 3, 15)]


@pytest.mark.parametrize("team, names, date_from, date_to", [
    pytest.param(TEAM, ["signed_up", "report_viewed", "$pageview", "never_sent"], date(2024, 3, 4), date(2024, 3, 31),
                 id="team1-4-events-4-weeks"),
    pytest.param(TEAM, ["paid", "$groupidentify", "paid"], date(2024, 2, 20), date(2024, 3, 3), id="team1-repeated-name"),
    pytest.param(OTHER_TEAM, ["$pageview", "signed_up"], date(2024, 3, 10), date(2024, 3, 16), id="team2"),
])
def test_event_counts_by_day_form_a_full_grid(core, team, names, date_from, date_to):
    expected = expected_event_counts(team, names, date_from, date_to)

    got = core.run("trends/event_counts_by_day", team_id=team, events=names, date_from=date_from, date_to=date_to)

    assert got == expected
    assert len(expected) == len(days(date_from, date_to)) * len(set(names))
    assert any(n == 0 for _, _, n in expected) and any(n > 0 for _, _, n in expected)
    if len(names) == 4:
        assert len({n for _, _, n in expected}) >= 10 and all(n == 0 for _, e, n in expected if e == "never_sent")


@pytest.mark.parametrize("team, prop, limit", [
    pytest.param(TEAM, "$browser", 100, id="team1-all-values"),
    pytest.param(TEAM, "$browser", 3, id="team1-top-3"),
    pytest.param(OTHER_TEAM, "$browser", 10, id="team2"),
])
def test_breakdown_by_property_counts_events_and_persons(core, team, prop, limit):
    date_from, date_to = date(2024, 3, 4), date(2024, 4, 7)
    expected = expected_breakdown(team, "$pageview", prop, date_from, date_to, limit)

    got = core.run("trends/breakdown_by_property", team_id=team, event="$pageview", property=prop,
                   date_from=date_from, date_to=date_to, limit=limit)

    assert got == expected
    every = expected_breakdown(team, "$pageview", prop, date_from, date_to, 100)
    assert len(expected) == min(limit, len(every)) and "" in {row[0] for row in every}
    if team == TEAM:
        assert {row[0] for row in every} == {*BROWSERS, "42"}  # a number comes as its JSON text
        assert sum(row[2] for row in every) < sum(row[1] for row in every)  # repeat page views
        naive = expected_breakdown(team, "$pageview", prop, date_from, date_to, limit, naive_person_of)
        assert any(a[2] > b[2] for a, b in zip(naive, expected))  # merged visitors counted twice


# ---- funnels

FUNNEL_CASES = [
    pytest.param(FUNNEL, timedelta(days=7), date(2024, 3, 4), date(2024, 4, 21), id="3-steps-7-days"),
    pytest.param(FUNNEL, timedelta(days=3), date(2024, 3, 4), date(2024, 4, 21), id="3-steps-3-days"),
    pytest.param(FUNNEL, timedelta(days=14), date(2024, 3, 11), date(2024, 3, 31), id="3-steps-14-days-3-weeks"),
    pytest.param(("signed_up", "paid"), timedelta(days=2), date(2024, 2, 26), date(2024, 4, 21), id="2-steps-2-days"),
]


@pytest.mark.parametrize("steps, window, date_from, date_to", FUNNEL_CASES)
def test_ordered_funnel_counts_persons_converting_in_order_within_the_window(core, steps, window, date_from, date_to):
    expected = expected_funnel(TEAM, steps, window, date_from, date_to)

    got = core.run("funnels/ordered_funnel", team_id=TEAM, steps=list(steps),
                   window_seconds=int(window.total_seconds()), date_from=date_from, date_to=date_to)

    assert got == expected
    persons = [row[2] for row in expected]
    assert persons[0] >= 15 and all(a > b > 0 for a, b in zip(persons, persons[1:]))
    # the order, the window and the merges all matter
    by_person = funnel_events(TEAM, steps, date_from, date_to)
    in_any_order = sum(1 for evs in by_person.values() if {e.event for e in evs} == set(steps))
    in_order = sum(1 for evs in by_person.values() if funnel_level(evs, steps, timedelta(days=365)) == len(steps))
    assert in_any_order >= in_order >= persons[-1]
    if len(steps) == 3:  # projects created before signing up, payments before the project
        assert in_any_order > in_order
    if window < timedelta(days=14):
        assert in_order > persons[-1]
    naive = expected_funnel(TEAM, steps, window, date_from, date_to, naive_person_of)
    assert naive[-1][2] < persons[-1]
    # converters whose steps carry two or three different person ids in `events`
    assert any(len({e.person_id for e in evs}) > 1 and funnel_level(evs, steps, window) == len(steps)
               for evs in by_person.values())


def test_ordered_funnel_of_the_other_team_and_bad_steps(core):
    expected = expected_funnel(OTHER_TEAM, FUNNEL, timedelta(days=7), date(2024, 2, 26), date(2024, 4, 21))
    got = core.run("funnels/ordered_funnel", team_id=OTHER_TEAM, steps=list(FUNNEL), window_seconds=7 * 86_400,
                   date_from=date(2024, 2, 26), date_to=date(2024, 4, 21))
    assert got == expected and expected[0][2] >= 3
    assert core.run("funnels/ordered_funnel", team_id=TEAM, steps=["signed_up", "never_sent"], window_seconds=86_400,
                    date_from=date(2024, 5, 1), date_to=date(2024, 5, 31)) == []
    for steps in (["signed_up"], ["signed_up", "paid", "signed_up"], ["a", "b", "c", "d", "e", "f"]):
        for name in ("funnels/ordered_funnel", "funnels/funnel_conversion_time"):
            with pytest.raises(Exception, match="2 to 5 distinct steps"):
                core.run(name, team_id=TEAM, steps=steps, window_seconds=86_400,
                         date_from=date(2024, 3, 4), date_to=date(2024, 4, 21))


@pytest.mark.parametrize("steps, window, date_from, date_to", FUNNEL_CASES)
def test_funnel_conversion_time_of_the_first_conversion(core, steps, window, date_from, date_to):
    seconds = conversion_seconds(TEAM, steps, window, date_from, date_to)

    got = core.run("funnels/funnel_conversion_time", team_id=TEAM, steps=list(steps),
                   window_seconds=int(window.total_seconds()), date_from=date_from, date_to=date_to)

    assert len(got) == 1
    converters, avg_s, median_s, min_s, max_s = got[0]
    assert converters == len(seconds) >= 5
    assert avg_s == pytest.approx(statistics.fmean(seconds), rel=1e-12)
    assert median_s == pytest.approx(statistics.median(seconds), rel=1e-12)
    assert (min_s, max_s) == (min(seconds), max(seconds))
    # the converters are those the funnel reports at its last step
    assert converters == expected_funnel(TEAM, steps, window, date_from, date_to)[-1][2]
    assert max_s <= window.total_seconds() and len(set(seconds)) == len(seconds)
    if len(seconds) % 2 == 0:
        assert median_s not in seconds  # the mean of the two middle values


def test_funnel_conversion_time_worked_out_by_hand(core):
    params = dict(team_id=THIRD_TEAM, steps=list(FUNNEL), window_seconds=7 * 86_400,
                  date_from=date(2024, 3, 4), date_to=date(2024, 4, 30))
    # tie: 1 hour; retry: 1 day (its second signup); twice: 5 days (its first conversion, not its
    # fastest); exact: 7 days (the bound); slow: no conversion
    assert sorted(conversion_seconds(THIRD_TEAM, FUNNEL, timedelta(days=7), date(2024, 3, 4), date(2024, 4, 30))) == [
        3_600.0, 86_400.0, 432_000.0, 604_800.0]
    assert core.run("funnels/funnel_conversion_time", **params) == [
        (4, (3_600 + 86_400 + 432_000 + 604_800) / 4, (86_400 + 432_000) / 2, 3_600.0, 604_800.0)]
    assert core.run("funnels/ordered_funnel", **params) == [
        (1, "signed_up", 5, 1.0, 1.0), (2, "created_project", 5, 1.0, 1.0), (3, "paid", 4, 0.8, 0.8)]
    # one second less of window: `exact` no longer converts
    shorter = core.run("funnels/ordered_funnel", **{**params, "window_seconds": 7 * 86_400 - 1})
    assert shorter[-1][2] == 3
    assert core.run("funnels/funnel_conversion_time", **{**params, "window_seconds": 7 * 86_400 - 1})[0][0] == 3


def test_funnel_conversion_time_takes_the_first_attempt_that_converts(core):
    """Persons whose first signup did not convert in time but a later one did, or whose first
    conversion is not their fastest: the definition picks the first attempt that converts."""
    steps, window, date_from, date_to = FUNNEL, timedelta(days=7), date(2024, 2, 26), date(2024, 4, 21)
    by_person = funnel_events(TEAM, steps, date_from, date_to)
    later_attempt = fastest_differs = 0
    for evs in by_person.values():
        durations = []
        for start in (e for e in evs if e.event == steps[0]):
            level, end = chain_end(evs, steps, start)
            durations.append(end - start.timestamp if level == len(steps) and end - start.timestamp <= window else None)
        converted = [d for d in durations if d is not None]
        later_attempt += bool(converted) and durations[0] is None
        fastest_differs += bool(converted) and converted[0] != min(converted)
    assert later_attempt + fastest_differs >= 1  # in the generated data too
    seconds = conversion_seconds(TEAM, steps, window, date_from, date_to)
    got = core.run("funnels/funnel_conversion_time", team_id=TEAM, steps=list(steps), window_seconds=7 * 86_400,
                   date_from=date_from, date_to=date_to)
    assert got[0][0] == len(seconds) and got[0][1] == pytest.approx(statistics.fmean(seconds), rel=1e-12)
    nobody = core.run("funnels/funnel_conversion_time", team_id=TEAM, steps=["paid", "signed_up"], window_seconds=1,
                      date_from=date_from, date_to=date_to)
    assert nobody == [(0, None, None, None, None)]


# ---- retention


@pytest.mark.parametrize("start_event, return_event, date_from, date_to, weeks", [
    pytest.param("signed_up", "report_viewed", date(2024, 3, 4), date(2024, 4, 14), 6, id="signup-then-reports-6-weeks"),
    pytest.param("signed_up", "report_viewed", date(2024, 3, 13), date(2024, 4, 3), 2, id="mid-week-bounds-2-offsets"),
    pytest.param("$pageview", "$pageview", date(2024, 3, 4), date(2024, 4, 21), 8, id="pageview-activity"),
])
def test_weekly_retention_follows_cohorts_of_persons(core, start_event, return_event, date_from, date_to, weeks):
    expected = expected_retention(TEAM, start_event, return_event, date_from, date_to, weeks)

    got = core.run("retention/weekly_retention", team_id=TEAM, start_event=start_event, return_event=return_event,
                   date_from=date_from, date_to=date_to, weeks=weeks)

    assert got == expected
    cohorts = {row[0] for row in expected}
    assert len(cohorts) >= 3
    assert any(0 < row[3] < row[2] for row in expected if row[1] > 0)
    if weeks >= 6:
        assert any(row[3] == 0 for row in expected if row[1] > 0)
    assert max(row[1] for row in expected) == min(weeks, (week_of(date_to) - min(cohorts)).days // 7)
    if start_event == return_event:
        assert all(row[3] == row[2] for row in expected if row[1] == 0)
    else:
        assert any(row[3] < row[2] for row in expected if row[1] == 0)  # week 0 is not always 100%
    assert expected != expected_retention(TEAM, start_event, return_event, date_from, date_to, weeks, naive_person_of)
    # persons whose first start event is before the first cohort week are in no cohort
    assert any(e.event == start_event and week_of(e.timestamp) < week_of(date_from) for e in dataset().events)


def test_weekly_retention_across_a_week_boundary(core):
    owl = person_id(TEAM, "night-owl")
    got = core.run("retention/weekly_retention", team_id=TEAM, start_event="signed_up", return_event="report_viewed",
                   date_from=date(2024, 3, 11), date_to=date(2024, 3, 24), weeks=1)
    expected = expected_retention(TEAM, "signed_up", "report_viewed", date(2024, 3, 11), date(2024, 3, 24), 1)
    assert got == expected
    owl_events = [e for e in dataset().events if e.person_id == owl and e.event in ("signed_up", "report_viewed")]
    assert [week_of(e.timestamp) for e in owl_events] == [date(2024, 3, 11), date(2024, 3, 18)]


# ---- persons


def test_person_by_distinct_id_follows_merges_to_the_current_person(core):
    data = dataset()
    team1_ids = sorted({d.distinct_id for d in data.distinct_ids if d.team_id == TEAM})
    checked = {"found": 0, "moved": 0, "twice": 0, "none": 0}
    for did in [*team1_ids, "svc-1", "crm-sync", "nobody"]:
        expected = expected_person(TEAM, did)

        got = core.run("persons/person_by_distinct_id", team_id=TEAM, distinct_id=did)

        assert got == expected, did
        if expected:
            checked["found"] += 1
            checked["moved"] += expected[0][6] >= 1
            checked["twice"] += expected[0][6] >= 2
            assert expected[0][1] == data.owner[(TEAM, did)]
        else:
            checked["none"] += 1
    assert checked["found"] > 100 and checked["moved"] > 30 and checked["twice"] >= 3 and checked["none"] >= 6
    # the same id in the other team is another person
    assert core.run("persons/person_by_distinct_id", team_id=OTHER_TEAM, distinct_id="anon-4") == \
        expected_person(OTHER_TEAM, "anon-4") != expected_person(TEAM, "anon-4")


def test_person_by_distinct_id_returns_the_latest_properties(core):
    got = {did: core.run("persons/person_by_distinct_id", team_id=TEAM, distinct_id=did)
           for did in (f"user-{n}" for n in range(1, 81)) if (TEAM, did) in dataset().owner}
    versions = {did: rows[0][5] for did, rows in got.items()}
    assert sum(1 for v in versions.values() if v >= 3) >= 10
    # the latest version was not the last one inserted, for some of these persons
    inserted = defaultdict(list)
    for p in dataset().persons:
        inserted[(p.team_id, p.id)].append(p.version)
    assert sum(1 for rows in got.values() if inserted[(TEAM, rows[0][1])][-1] != rows[0][5]) >= 5


def test_distinct_ids_of_person_are_the_current_ones(core):
    data = dataset()
    pids = sorted({d.person_id for d in data.distinct_ids if d.team_id == TEAM} | {uuid.UUID(int=7)})
    sizes: dict[int, int] = defaultdict(int)
    for pid in pids:
        expected = expected_distinct_ids(TEAM, pid)

        got = core.run("persons/distinct_ids_of_person", team_id=TEAM, person_id=pid)

        assert got == expected, pid
        sizes[len(expected)] += 1
        assert {did for did, _ in expected} == {did for (t, did), p in data.owner.items() if t == TEAM and p == pid}
    # merged-away persons have none left; merged ones two or three (anonymous, user, account)
    assert sizes[0] > 30 and sizes[2] > 20 and sizes[3] >= 3
    chain = next(n for n in range(1, 81) if data.kinds[(TEAM, n)] == "chain")
    assert core.run("persons/distinct_ids_of_person", team_id=TEAM, person_id=person_id(TEAM, f"acct-{chain}")) == [
        (f"acct-{chain}", 0), (f"anon-{chain}", 2), (f"user-{chain}", 1)]


@pytest.mark.parametrize("team, prop, limit", [
    pytest.param(TEAM, "plan", 100, id="team1-plan"),
    pytest.param(TEAM, "country", 3, id="team1-country-top-3"),
    pytest.param(OTHER_TEAM, "plan", 100, id="team2-plan"),
])
def test_person_property_counts_use_the_latest_version_of_live_persons(core, team, prop, limit):
    expected = expected_property_counts(team, prop, limit)

    got = core.run("persons/person_property_counts", team_id=team, property=prop, limit=limit)

    assert got == expected
    assert len(expected) == min(limit, len(expected_property_counts(team, prop, 100)))
    if (team, prop) == (TEAM, "plan"):
        assert {v for v, _ in expected} == {"", "free", "pro", "enterprise"}
        # every version, or the deleted persons too, would give other numbers
        every_version: dict[str, int] = defaultdict(int)
        with_deleted: dict[str, int] = defaultdict(int)
        for p in dataset().persons:
            if p.team_id == team:
                every_version[text_value(json.loads(p.properties), prop)] += 1
        for (t, _), p in latest_persons().items():
            if t == team:
                with_deleted[text_value(json.loads(p.properties), prop)] += 1
        assert dict(expected) != dict(every_version) and dict(expected) != dict(with_deleted)


# ---- ingestion


@pytest.mark.parametrize("time_from, time_to", [
    pytest.param(RANGE_FROM, RANGE_TO, id="march"),
    pytest.param(datetime(2024, 3, 10, 12, tzinfo=UTC), datetime(2024, 3, 12, tzinfo=UTC), id="a-day-and-a-half"),
])
def test_dead_letters_by_reason_count_messages_not_rows(core, time_from, time_to):
    expected = expected_dead_letters(time_from, time_to)

    got = core.run("ingestion/dead_letters_by_reason", time_from=time_from, time_to=time_to)

    assert got == expected
    rows_in_range = sum(1 for d in dataset().dead_letters if time_from <= d.dead_lettered_at < time_to)
    if time_from == RANGE_FROM:
        assert {(row[0], row[1]) for row in expected} == {*((r, s) for r, (s, _) in REASONS.items()),
                                                          ("invalid_json", "capture")}
        assert sum(row[2] for row in expected) < rows_in_range  # refused twice: counted once
        assert min(row[3] for row in expected) == RANGE_FROM and max(row[4] for row in expected) < RANGE_TO
        big = next(row for row in expected if row[0] == "event_row_too_large")
        # the latest one's detail; its first 1,000 characters, not bytes
        assert big[5] == "row of 2,412 bytes" and big[6] == "events_raw/1@99999"
        assert len(big[7]) == 1000 and len(big[7].encode()) > 2000


def test_warnings_by_type_per_team_with_the_latest_details(core):
    expected = expected_warnings(RANGE_FROM, RANGE_TO)

    got = core.run("ingestion/warnings_by_type", time_from=RANGE_FROM, time_to=RANGE_TO)

    assert got == expected
    assert {row[0] for row in expected} == {1, 2, 3} and len(expected) >= 12
    assert any(row[3] < row[2] for row in expected) and any(row[4] < row[3] for row in expected)
    assert sum(row[2] for row in expected) < len(dataset().warnings)  # the range leaves some out
    start = next(row for row in expected if row[:2] == (2, "invalid_groups"))
    assert start[5] == RANGE_FROM and start[7] != '{"at": "end"}'
    narrow = expected_warnings(datetime(2024, 3, 20, tzinfo=UTC), datetime(2024, 3, 21, 6, tzinfo=UTC))
    assert core.run("ingestion/warnings_by_type", time_from="2024-03-20 00:00:00",
                    time_to="2024-03-21 06:00:00") == narrow and 0 < len(narrow) < len(expected)


# ---- through headwater's own command


def test_headwater_sql_runs_a_core_cookbook_file(core):
    """docs/sql/README.md: ``headwater sql --file F -p NAME=VALUE``, the file's ``headwater.``
    becoming the configured database and ``['a','b']`` an Array(String)."""
    from tests.conftest import ROOT

    expected = expected_funnel(TEAM, FUNNEL, timedelta(days=7), date(2024, 3, 4), date(2024, 4, 21))
    out = subprocess.run(
        [sys.executable, "-m", "headwater.cli", "sql", "--file", str(cookbook.path("funnels/ordered_funnel")),
         "-p", f"team_id={TEAM}", "-p", "steps=['signed_up','created_project','paid']", "-p", "window_seconds=604800",
         "-p", "date_from=2024-03-04", "-p", "date_to=2024-04-21", "--format", "json"],
        env={**os.environ, "HEADWATER_CLICKHOUSE_URL": core.url}, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["step"], r["step_event"], r["persons"], r["conversion"]) for r in got] == [row[:4] for row in expected]
