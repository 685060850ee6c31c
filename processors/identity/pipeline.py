"""The identity stage (ADR 0001): person state at distinct-id homes, merges serialized per team.

``IdentityPipeline.process_partition(partition, messages, state)`` takes one partition's batch
(``events_raw`` and ``identity_inbox`` messages of that partition) and returns the records to
send: event rows, person and distinct-id rows, warnings, dead letters, and inbox messages for
other partitions. Messages for this partition are handled at once through a FIFO work queue, so
every (sender, receiver) link stays FIFO. One bad message never stops the partition: its state
writes are rolled back and it becomes a dead letter ``processing_error``.

The steps, in order, for an event at its distinct id's home (``_on_event``):
parse → (held? queue) → decide person processing → normalize → merge request, or personless
use, or create / apply at the person's home. Merge messages: ``merge`` → merger → ``resolve``
(both dids) → ``resolve_p`` (their persons) → ``resolved`` → one of ``create``, ``add``,
``identify``, ``give``→``take`` → ``done`` → ``release`` (both dids).

Groups (ADR 0004): an event naming a group type its worker's ``GroupTable`` cannot answer, or a
``$groupidentify``, holds its distinct id and sends ``group`` to the team's home (the merger's
partition), which assigns types, updates the group, publishes both and answers ``grouped``; the
answer is learned and releases the distinct id. Other events read the table only.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import orjson

from headwater.outcomes import DeadLetter, Drop, Warn
from headwater.tansu import SETTLE_KEY
from headwater.topics import TopicNames

from ..outputs import Record, SourceMessage, dead_letter, warning_record
from ..state import PartitionState
from .group_table import GroupTable
from .homes import Homes
from .rules import (
    PERSON_PROPERTIES_SIZE_LIMIT_BYTES,
    PERSONLESS_DISALLOWED_EVENTS,
    decide_process_person,
    illegal_merge,
    merge_other_distinct_id,
    normalize_properties,
    person_uuid,
    properties_size,
)
from .steps import persons
from .steps.groups import (
    GROUP_PROPERTY_KEYS,
    MAX_GROUP_TYPES,
    assign_types,
    group_identify_of,
    named_groups,
    update_group,
)
from .steps.parse import ParsedEvent, parse_raw_event
from .steps.persons import PERSONLESS_CREATED_AT_US, Changes, EventPerson
from .steps.sessions import SessionRules, assign_session, client_session_id
from .steps.row import to_event_row

STAGE = "identity"
log = logging.getLogger(__name__)


def event_doc(event: ParsedEvent, source: str) -> dict[str, Any]:
    """The event as it travels between partitions and waits in queues (short keys: it is stored)."""
    return {"u": event.uuid, "t": event.team_id, "d": event.distinct_id, "e": event.event,
            "ts": event.timestamp_us, "now": event.now_us, "p": event.properties, "src": source}


def did_key(team: int, did: str) -> str:
    return f"d:{team}:{did}"


def person_key(team: int, root: str) -> str:
    return f"p:{team}:{root}"


def merger_key(team: int) -> str:
    return f"m:{team}"


def flight_key(team: int, mid: str) -> str:
    """A merge the team's merger has received and not finished: its dids, event and answers."""
    return f"mf:{team}:{mid}"


def did_lock_key(team: int, did: str) -> str:
    """At the merger: the merge in flight that holds distinct id ``did``."""
    return f"ml:{team}:{did}"


def root_lock_key(team: int, root: str) -> str:
    """At the merger: the merge holding the person ``root`` (``m``), merges waiting for it
    (``w``), and how many merge commands changed it (``c``)."""
    return f"mr:{team}:{root}"


def group_types_key(team: int) -> str:
    return f"gt:{team}"


def group_key(team: int, index: int, key: str) -> str:
    return f"g:{team}:{index}:{key}"


def session_key(team: int, person_id: str) -> str:
    return f"s:{team}:{person_id}"


def processes_person(properties: dict[str, Any], opted_out: bool) -> bool:
    """§1.8 without side effects: whether the event will be processed with a person."""
    return not opted_out and properties.get("$process_person_profile", True) is not False


class IdentityPipeline:
    def __init__(self, topics: TopicNames, teams: dict[str, int], partitions: int,
                 max_message_bytes: int = 1_000_000, personless_teams: frozenset[int] = frozenset(),
                 groups: GroupTable | None = None, sessions: SessionRules | None = None) -> None:
        self.topics = topics
        self.session_rules = sessions if sessions is not None else SessionRules()
        self.groups = groups if groups is not None else GroupTable(topics.group_types, topics.groups)
        self.personless_teams = personless_teams
        self.max_message_bytes = max_message_bytes
        self.teams = teams
        self.homes = Homes({team: token for token, team in teams.items()}, partitions)
        self.counts: dict[str, int] = {"ok": 0, "dead_letter": 0, "dropped": 0, "warnings": 0, "merges": 0,
                                   "duplicates": 0}

    def process_partition(self, partition: int, messages: Sequence[SourceMessage], state: PartitionState) -> list[Record]:
        run = _PartitionRun(self, partition, state)
        for message in messages:
            savepoint, emitted = state.savepoint(), len(run.out)
            run.origin, run.sent = [0 if message.topic() == self.topics.events_raw else 1, message.offset()], 0
            try:
                run.message(message)
            except Exception as exc:  # a bug must not stop the partition: dead-letter and go on
                log.exception("identity: unexpected error at %s[%s]@%s", message.topic(), message.partition(), message.offset())
                state.rollback_to(savepoint)
                del run.out[emitted:]
                run.work.clear()
                self.counts["dead_letter"] += 1
                run.out.append(dead_letter(message, dlq_topic=self.topics.events_dead_letter, stage=STAGE,
                                           reason="processing_error", detail=repr(exc)[:300]))
        return run.out


class _PartitionRun:
    """One batch of one partition: the state, the outputs, the local work queue."""

    def __init__(self, pipeline: IdentityPipeline, partition: int, state: PartitionState) -> None:
        self.pipeline = pipeline
        self.topics = pipeline.topics
        self.homes = pipeline.homes
        self.counts = pipeline.counts
        self.partition = partition
        self.state = state
        self.out: list[Record] = []
        self.work: deque[dict[str, Any]] = deque()
        self.origin: list[int] = [9, 0]  # the input message being handled: [topic code, offset]
        self.sent = 0  # inbox messages sent for it so far

    # -- transport ------------------------------------------------------------------------------
    def message(self, message: SourceMessage) -> None:
        if message.topic() == self.topics.events_raw:
            self._raw(message)
        elif message.key() == SETTLE_KEY:  # the settler's record (ADR 0015): no message of ours
            return
        else:
            msg = orjson.loads(message.value() or b"{}")
            if self._seen_before(msg):
                return
            self._handle(msg)
        while self.work:
            self._handle(self.work.popleft())

    def send(self, partition: int, msg: dict[str, Any]) -> None:
        if partition == self.partition:
            self.work.append(msg)
        else:
            key = f"{msg.get('t', '')}:{msg['k']}".encode()
            self.sent += 1
            stamped = {**msg, "sp": self.partition, "q": [*self.origin, self.sent]}
            self.out.append(Record(self.topics.identity_inbox, key, orjson.dumps(stamped), partition=partition))

    def _seen_before(self, msg: dict[str, Any]) -> bool:
        """An inbox message this partition already handled: a copy from a sender's aborted
        transaction that the broker delivered anyway (Tansu does, ADR 0011), before the replay's
        identical one. Each sender stamps its messages with where they came from (input topic,
        offset, count), increasing along the (sender, topic) link; the highest handled is kept."""
        stamp = msg.get("q")
        if stamp is None:
            return False
        key = f"x:{msg['sp']}:{stamp[0]}"
        last = self.state.get(key)
        if last is not None and stamp[1:] <= last:
            self.counts["duplicates"] += 1
            return True
        self.state.put(key, stamp[1:])
        return False

    def to_did(self, team: int, did: str, msg: dict[str, Any]) -> None:
        self.send(self.homes.of(team, did), msg)

    def to_merger(self, team: int, msg: dict[str, Any]) -> None:
        self.send(self.homes.merger(team), msg)

    def _handle(self, msg: dict[str, Any]) -> None:
        getattr(self, "_on_" + msg["k"])(msg)

    # -- outputs --------------------------------------------------------------------------------
    def warn(self, warning: Warn, ev: dict[str, Any]) -> None:
        self.counts["warnings"] += 1
        self.out.append(warning_record(warning, topic=self.topics.ingestion_warnings, team_id=ev["t"],
                                       event_uuid=ev["u"], distinct_id=ev["d"], timestamp_us=ev["now"]))

    def emit_event(self, ev: dict[str, Any], person: EventPerson) -> None:
        self._session(ev, person.person_id)
        key = f"{ev['t']}:{ev['d']}".encode()
        value = orjson.dumps(to_event_row(ev, person))
        limit = self.pipeline.max_message_bytes
        if len(value) > limit and person.properties:
            # the person's properties beside the event's own overflow one message: keep the event
            self.warn(Warn("person_properties_dropped_from_event", {"eventUuid": ev["u"], "rowBytes": len(value)}), ev)
            person = EventPerson(person.person_id, {}, person.created_at_us)
            value = orjson.dumps(to_event_row(ev, person))
        if len(value) > limit and ev.get("g"):
            self.warn(Warn("group_properties_dropped_from_event", {"eventUuid": ev["u"], "rowBytes": len(value)}), ev)
            ev = {**ev, "g": [[index, key, "{}", created] for index, key, _, created in ev["g"]]}
            value = orjson.dumps(to_event_row(ev, person))
        if len(value) > limit:
            self.counts["dead_letter"] += 1
            topic, partition, offset = ev["src"].rsplit(":", 2)  # the message it came from
            headers = [("dlq_reason", b"event_row_too_large"), ("dlq_stage", STAGE.encode()),
                       ("dlq_topic", topic.encode()), ("dlq_partition", partition.encode()),
                       ("dlq_offset", offset.encode()),
                       ("dlq_detail", f"row of {len(value)} bytes; properties left out here".encode())]
            self.out.append(Record(self.topics.events_dead_letter, key, orjson.dumps({**ev, "p": {}}), headers))
            return
        self.counts["ok"] += 1
        self.out.append(Record(self.topics.events_enriched, key, value))

    def _session(self, ev: dict[str, Any], person_id: str) -> None:
        """§3: a client ``$session_id`` stays (a UUID lower-cased); an event without one gets its
        person's server-side session. Events are emitted at their person's home, so the person's
        session state (``s:``) is always here."""
        props = ev["p"]
        client = client_session_id(props.get("$session_id"))
        if client is not None:
            props["$session_id"] = client
            return
        key = session_key(ev["t"], person_id)
        session_id, state = assign_session(self.state.get(key), ev["t"], person_id, ev["ts"], self.pipeline.session_rules)
        self.state.put(key, state)
        props["$session_id"] = session_id

    def publish(self, team: int, changes: Changes, ev: dict[str, Any]) -> None:
        for person in changes.persons:
            self.out.append(self._person_record(team, person, deleted=False))
        for person in changes.deleted:
            self.out.append(self._person_record(team, person, deleted=True))
            self.out.append(Record(self.topics.persons, f"{team}:{person['id']}".encode(), None))  # tombstone
        for did, person_id, version in changes.distinct_ids:
            row = {"team_id": team, "distinct_id": did, "person_id": person_id, "version": version, "is_deleted": 0}
            self.out.append(Record(self.topics.person_distinct_ids, f"{team}:{did}".encode(), orjson.dumps(row)))
        for warning in changes.warnings:
            self.warn(warning, ev)

    def _person_record(self, team: int, person: dict[str, Any], *, deleted: bool) -> Record:
        row = {"id": person["id"], "team_id": team, "properties": orjson.dumps(person["props"]).decode(),
               "is_identified": int(person["ident"]), "created_at": person["created"], "version": person["v"],
               "is_deleted": int(deleted)}
        return Record(self.topics.persons, f"{team}:{person['id']}".encode(), orjson.dumps(row))

    # -- events_raw -----------------------------------------------------------------------------
    def _raw(self, message: SourceMessage) -> None:
        outcome = parse_raw_event(message.value(), self.pipeline.teams, topic=message.topic() or "",
                                  partition=message.partition() or 0, offset=message.offset() or 0,
                                  broker_timestamp_ms=message.timestamp()[1])
        if isinstance(outcome, DeadLetter):
            self.counts["dead_letter"] += 1
            self.out.append(dead_letter(message, dlq_topic=self.topics.events_dead_letter, stage=STAGE,
                                        reason=outcome.reason, detail=outcome.detail))
            return
        if isinstance(outcome, Drop):
            self.counts["dropped"] += 1
            doc = orjson.loads(message.value() or b"{}")
            self.warn(outcome.warning, {"t": self.pipeline.teams.get(doc.get("token") or "", 0),
                                        "u": str(outcome.warning.details.get("event_uuid", "")),
                                        "d": str(doc.get("distinct_id", ""))[:400], "now": message.timestamp()[1] * 1000})
            return
        ev = event_doc(outcome.value, f"{message.topic()}:{message.partition()}:{message.offset()}")
        for warning in outcome.warnings:
            self.warn(warning, ev)
        # a producer with another partitioner put it off its home: forward it there
        self.to_did(ev["t"], ev["d"], {"k": "event", "t": ev["t"], "ev": ev})

    # -- at a distinct id's home ----------------------------------------------------------------
    def _on_event(self, msg: dict[str, Any]) -> None:
        ev = msg["ev"]
        team, did = ev["t"], ev["d"]
        key = did_key(team, did)
        rec = self.state.get(key) or {}
        if rec.get("h"):  # a merge holds this distinct id: keep the order, wait for its release
            rec.setdefault("q", []).append(ev)
            self.state.put(key, rec)
            return
        props = ev["p"]
        groups = named_groups(props) if processes_person(props, team in self.pipeline.personless_teams) else None
        if groups is not None and self._ask_team_about_groups(key, rec, ev, groups[0]):
            return
        process, by_property, warning = decide_process_person(props, team in self.pipeline.personless_teams)
        if warning is not None:
            self.warn(Warn("invalid_process_person_profile", warning), ev)
        if not process and by_property and ev["e"] in PERSONLESS_DISALLOWED_EVENTS:
            self.counts["dropped"] += 1
            self.warn(Warn("invalid_event_when_process_person_profile_is_false",
                           {"eventUuid": ev["u"], "event": ev["e"], "distinctId": did}), ev)
            return
        normalize_properties(ev["e"], props, process, datetime.fromtimestamp(ev["ts"] / 1e6, timezone.utc))
        if groups is not None:
            self._add_groups(ev, *groups)
        else:  # personless (§1.8; `groups` is None exactly then): no person, and §2 no groups
            for group_property in GROUP_PROPERTY_KEYS:
                props.pop(group_property, None)
            if rec.get("r") is None:
                if not rec.get("pl"):
                    self.state.put(key, {**rec, "pl": 1})
                self.emit_event(ev, EventPerson(person_uuid(team, did), {}, PERSONLESS_CREATED_AT_US))
            else:
                self.to_person(team, rec["r"], {"k": "apply", "t": team, "root": rec["r"], "mode": "personless", "ev": ev})
            return
        other = merge_other_distinct_id(ev["e"], props)
        if other is not None and other != did:
            illegal = illegal_merge(did, other)
            if illegal is None:
                mid = ev["src"]
                self.state.put(key, {**rec, "h": [mid]})
                self.to_merger(team, {"k": "merge", "t": team, "mid": mid, "into": did, "other": other, "ev": ev})
                return
            self.warn(Warn("cannot_merge_with_illegal_distinct_id", {**illegal, "eventUuid": ev["u"]}), ev)
        if rec.get("r") is None:
            changes = Changes()
            person = persons.create(ev, [(did, 0)], identified=False, changes=changes)
            self.publish(team, changes, ev)
            if person is None:  # refused by the size cap: the event keeps the deterministic id
                self.emit_event(ev, EventPerson(person_uuid(team, did), dict(props.get("$set") or {}), 0))
                return
            self.state.put(person_key(team, did), person)
            self.state.put(key, {**rec, "r": did})
            self.emit_event(ev, persons.event_person(person, ev))
            return
        self.to_person(team, rec["r"], {"k": "apply", "t": team, "root": rec["r"], "mode": "full", "ev": ev})

    def _on_resolve(self, msg: dict[str, Any]) -> None:
        """The merger asks for a did: hold it (events queue) and answer through its person."""
        team, did, mid = msg["t"], msg["did"], msg["mid"]
        key = did_key(team, did)
        rec = self.state.get(key) or {}
        holds = rec.get("h", [])
        if mid not in holds:
            rec["h"] = holds + [mid]
        self.state.put(key, rec)
        if rec.get("r") is None:
            self.to_merger(team, {"k": "resolved", "t": team, "mid": mid, "did": did, "a": msg.get("a"),
                                  "info": {"pl": bool(rec.get("pl"))}})
        else:
            self.to_person(team, rec["r"], {"k": "resolve_p", "t": team, "mid": mid, "did": did, "root": rec["r"],
                                            "a": msg.get("a")})

    def _on_release(self, msg: dict[str, Any]) -> None:
        team, did = msg["t"], msg["did"]
        key = did_key(team, did)
        rec = self.state.get(key) or {}
        rec["h"] = [h for h in rec.get("h", []) if h != msg["mid"]]
        if msg.get("root") is not None:
            rec["r"] = msg["root"]
        if msg.get("pl"):
            rec["pl"] = 1
        queued: list[dict[str, Any]] = []
        if not rec["h"]:
            del rec["h"]
            queued = rec.pop("q", [])
        self.state.put(key, rec)
        for ev in queued:  # in order; a merge event among them holds the did again, the rest re-queue
            self._on_event({"k": "event", "ev": ev})

    def _ask_team_about_groups(self, key: str, rec: dict[str, Any], ev: dict[str, Any],
                               pairs: list[tuple[str, str]]) -> bool:
        """Hold the distinct id and ask its team's home when the event names a group type this
        worker has no answer for, or is a ``$groupidentify`` not yet applied (``gd``). The event
        waits first in the distinct id's queue; the answer (``grouped``) releases it."""
        team, props = ev["t"], ev["p"]
        identify = group_identify_of(props) if ev["e"] == "$groupidentify" and not ev.get("gd") else None
        unknown = self.pipeline.groups.unknown(team, [group_type for group_type, _ in pairs])
        if not unknown and identify is None:
            return False
        mid = "g:" + ev["src"]
        if identify is not None:
            ev["gd"] = 1
        rec["h"] = [*rec.get("h", []), mid]
        rec["q"] = [ev, *rec.get("q", [])]
        self.state.put(key, rec)
        gi = None if identify is None else [identify.group_type, identify.group_key, identify.group_set]
        self.to_merger(team, {"k": "group", "t": team, "mid": mid, "did": ev["d"], "types": unknown, "gi": gi,
                              "u": ev["u"], "ts": ev["ts"], "now": ev["now"]})
        return True

    def _add_groups(self, ev: dict[str, Any], pairs: list[tuple[str, str]], warnings: list[Warn]) -> None:
        """§2 ``addGroupProperties``: ``$group_N`` for each named group whose type has an index, and
        the group's current properties and created_at beside it (the slots ``ev["g"]``)."""
        for warning in warnings:
            self.warn(warning, ev)
        slots = self.pipeline.groups.slots(ev["t"], pairs)
        for index, key, _, _ in slots:
            ev["p"][f"$group_{index}"] = key
        if slots:
            ev["g"] = slots

    def _on_grouped(self, msg: dict[str, Any]) -> None:
        """The team home answered: learn the team's types (and the group it updated), release."""
        team, table = msg["t"], self.pipeline.groups
        table.learn_types(team, msg["types"], msg["refused"])
        if msg["group"] is not None:
            table.learn_group(team, *msg["group"])
        self._on_release(msg)

    # -- at a person's home ---------------------------------------------------------------------
    def to_person(self, team: int, root: str, msg: dict[str, Any]) -> None:
        self.to_did(team, root, msg)

    def _live_person(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """The person ``msg['root']`` names, or None after forwarding ``msg`` to where it went."""
        team, root = msg["t"], msg["root"]
        person = self.state.get(person_key(team, root))
        if person is None:
            raise LookupError(f"no person {root!r} of team {team} at partition {self.partition}")
        if "fwd" in person:
            self.to_person(team, person["fwd"], {**msg, "root": person["fwd"]})
            return None
        return person

    def _on_apply(self, msg: dict[str, Any]) -> None:
        person = self._live_person(msg)
        if person is None:
            return
        if msg["mode"] == "personless":
            view, _mode = persons.personless_use(person, msg["ev"])
            self.emit_event(msg["ev"], view)
            return
        self._update_and_emit(msg, person, Changes(), mark_identified=False)

    def _update_and_emit(self, msg: dict[str, Any], person: dict[str, Any], changes: Changes, *,
                         mark_identified: bool, changed: bool = False) -> None:
        """Apply the event's person updates, store the person if it changed, publish, emit the row."""
        team, ev = msg["t"], msg["ev"]
        updated = persons.update(person, ev, mark_identified=mark_identified, changes=changes)
        if changed or updated is not person:
            self.state.put(person_key(team, msg["root"]), updated)
        self.publish(team, changes, ev)
        self.emit_event(ev, persons.event_person(updated, ev))

    def _on_resolve_p(self, msg: dict[str, Any]) -> None:
        person = self._live_person(msg)
        if person is None:
            return
        info = {"root": msg["root"], "ident": person["ident"], "se": person.get("se", 0)}
        self.to_merger(msg["t"], {"k": "resolved", "t": msg["t"], "mid": msg["mid"], "did": msg["did"],
                                  "a": msg.get("a"), "info": info})

    def _done(self, msg: dict[str, Any], root: str | None) -> None:
        self.to_merger(msg["t"], {"k": "done", "t": msg["t"], "mid": msg["mid"], "root": root})

    def _on_create(self, msg: dict[str, Any]) -> None:
        """§1.2 neither exists: one identified person with both ids, at the first id's home."""
        team, ev = msg["t"], msg["ev"]
        changes = Changes()
        ids = [(did, version) for did, version in msg["ids"]]
        person = persons.create(ev, ids, identified=True, changes=changes)
        self.publish(team, changes, ev)
        if person is None:
            self.emit_event(ev, EventPerson(person_uuid(team, ev["d"]), dict(ev["p"].get("$set") or {}), 0))
            self._done(msg, None)
            return
        self.state.put(person_key(team, ids[0][0]), person)
        self.emit_event(ev, persons.event_person(person, ev))
        self._done(msg, ids[0][0])

    def _on_add(self, msg: dict[str, Any]) -> None:
        """§1.2 exactly one exists: the missing id joins the person, then the identified update."""
        person = self._live_person(msg)
        if person is None:
            return
        changes = Changes()
        person = persons.add_distinct_id(person, msg["did"], msg["version"], changes)
        person["se"] = person.get("se", 0) + 1  # a merge changed it (the merger counts it too)
        self._update_and_emit(msg, person, changes, mark_identified=True, changed=True)
        self._done(msg, msg["root"])

    def _on_identify(self, msg: dict[str, Any]) -> None:
        """§1.2 same person, or §1.3 refused merge: the target gets the event and is identified."""
        person = self._live_person(msg)
        if person is None:
            return
        person["se"] = person.get("se", 0) + 1  # a merge changed it (the merger counts it too)
        self._update_and_emit(msg, person, Changes(), mark_identified=True, changed=True)
        self._done(msg, msg["root"])

    def _on_give(self, msg: dict[str, Any]) -> None:
        """§1.3 at the source's home: become a forwarding pointer, hand the state to the target."""
        team, source_root, target_root = msg["t"], msg["root"], msg["target"]
        source = self._live_person(msg)
        if source is None:
            return
        self.state.put(person_key(team, source_root), {"fwd": target_root})
        self.state.delete(session_key(team, source["id"]))  # its events are the target's now
        self.to_person(team, target_root, {**msg, "k": "take", "root": target_root, "source": source})

    def _on_take(self, msg: dict[str, Any]) -> None:
        target = self._live_person(msg)
        if target is None:
            return
        team, ev = msg["t"], msg["ev"]
        changes = Changes()
        merged = persons.merge(target, msg["source"], ev, changes)
        merged["se"] = target.get("se", 0) + 1  # a merge changed it (the merger counts it too)
        self.state.put(person_key(team, msg["root"]), merged)
        self.publish(team, changes, ev)
        self.counts["merges"] += 1
        self.emit_event(ev, persons.event_person(merged, ev))
        self._done(msg, msg["root"])

    # -- at the team's home: group types and groups (one writer per team) ------------------------
    def _on_group(self, msg: dict[str, Any]) -> None:
        team, gi = msg["t"], msg["gi"]
        ev = {"t": team, "u": msg["u"], "d": msg["did"], "now": msg["now"]}
        key = group_types_key(team)
        registry = self.state.get(key) or {"types": {}, "refused": []}
        assigned, refused = assign_types(registry, msg["types"] + ([gi[0]] if gi else []))
        if assigned or refused:
            self.state.put(key, registry)
        for group_type, index in assigned.items():
            row = {"team_id": team, "group_type": group_type, "group_type_index": index}
            self.out.append(Record(self.topics.group_types, f"{team}:{group_type}".encode(), orjson.dumps(row)))
        for group_type in refused:  # PostHog ignores a 6th type silently; we say so, once per type
            self.warn(Warn("group_type_limit_reached", {"groupType": group_type, "maxGroupTypes": MAX_GROUP_TYPES,
                                                        "groupTypes": registry["types"]}), ev)
        group = None
        index = None if gi is None or gi[1] is None else registry["types"].get(gi[0])
        if index is not None:
            group = self._update_group(team, index, gi[1], gi[2], msg, ev)
        self.to_did(team, msg["did"], {"k": "grouped", "t": team, "mid": msg["mid"], "did": msg["did"],
                                       "types": registry["types"], "refused": registry["refused"], "group": group})

    def _update_group(self, team: int, index: int, key: str, group_set: dict, msg: dict[str, Any],
                      ev: dict[str, Any]) -> list[Any] | None:
        """§2 upsert of one group; publishes a changed group. Returns the group as the table learns it."""
        state_key = group_key(team, index, key)
        current = self.state.get(state_key)
        updated = update_group(current, group_set, msg["ts"], msg["now"])
        if updated is not None and properties_size(updated["props"]) > PERSON_PROPERTIES_SIZE_LIMIT_BYTES:
            self.warn(Warn("group_properties_size_violation", {"groupTypeIndex": index, "groupKey": key,
                                                               "limitBytes": PERSON_PROPERTIES_SIZE_LIMIT_BYTES}), ev)
            updated = None
        group = updated or current
        if group is None:
            return None
        properties = orjson.dumps(group["props"]).decode()
        if updated is not None:
            self.state.put(state_key, updated)
            row = {"team_id": team, "group_type_index": index, "group_key": key, "group_properties": properties,
                   "created_at": updated["created"], "version": updated["v"]}
            self.out.append(Record(self.topics.groups, f"{team}:{index}:{key}".encode(), orjson.dumps(row)))
        return [index, key, group["v"], properties, group["created"]]

    # -- at the team's merger -------------------------------------------------------------------
    # Merges of one team run concurrently when they share nothing (ADR 0001, "Concurrent merges"):
    # a merge locks its two distinct ids when it starts (``ml:``) and, once both are resolved, the
    # persons they resolved to (``mr:``). A merge whose did is locked waits in the team's queue
    # (``m:``, in arrival order); one whose person is locked waits on that lock and resolves again
    # when it is freed. ``mr:`` also counts the merge commands applied to the person (``c``), as the
    # person does itself (``se``): an answer whose ``se`` is below the count was read before another
    # merge changed the person, so the merge resolves again instead of deciding on stale facts.
    def _on_merge(self, msg: dict[str, Any]) -> None:
        team, mid = msg["t"], msg["mid"]
        self.state.put(flight_key(team, mid), {"mid": mid, "into": msg["into"], "other": msg["other"],
                                               "ev": msg["ev"], "info": {}, "a": 0})
        key = merger_key(team)
        merger = self.state.get(key) or {}
        queue = merger.get("q", [])
        dids = {msg["into"], msg["other"]}
        if any(dids & {into, other} for _, into, other in queue) or not self._lock_dids(team, mid, dids):
            queue.append([mid, msg["into"], msg["other"]])
            self.state.put(key, {**merger, "q": queue})
            return
        self._resolve(team, self.state.get(flight_key(team, mid)))

    def _lock_dids(self, team: int, mid: str, dids: set[str]) -> bool:
        if any(self.state.get(did_lock_key(team, did)) is not None for did in dids):
            return False
        for did in dids:
            self.state.put(did_lock_key(team, did), mid)
        return True

    def _resolve(self, team: int, flight: dict[str, Any]) -> None:
        """(Again) ask both dids' homes, and through them their persons, for the facts."""
        flight["a"] += 1
        flight["info"] = {}
        self.state.put(flight_key(team, flight["mid"]), flight)
        for did in (flight["into"], flight["other"]):
            self.to_did(team, did, {"k": "resolve", "t": team, "mid": flight["mid"], "did": did, "a": flight["a"]})

    def _on_resolved(self, msg: dict[str, Any]) -> None:
        team, mid = msg["t"], msg["mid"]
        flight = self.state.get(flight_key(team, mid))
        if flight is None:
            raise LookupError(f"resolved for {mid!r}, which is not a merge in flight")
        if msg.get("a", flight["a"]) != flight["a"]:
            return  # an answer to an earlier round
        flight["info"][msg["did"]] = msg["info"]
        if len(flight["info"]) < 2:
            self.state.put(flight_key(team, mid), flight)
            return
        roots = sorted({info["root"] for info in flight["info"].values() if "root" in info})
        locks = {root: self.state.get(root_lock_key(team, root)) or {"c": 0} for root in roots}
        for root, lock in locks.items():
            if lock.get("m") not in (None, mid):  # another merge holds the person: wait for it
                lock.setdefault("w", []).append(mid)
                self.state.put(root_lock_key(team, root), lock)
                self.state.put(flight_key(team, mid), flight)
                return
        if any(info.get("se", 0) < locks[info["root"]]["c"] for info in flight["info"].values() if "root" in info):
            self._resolve(team, flight)  # read before another merge changed the person: ask again
            return
        for root, lock in locks.items():
            self.state.put(root_lock_key(team, root), {**lock, "m": mid})
        flight["roots"] = roots
        self._decide(team, flight)
        self.state.put(flight_key(team, mid), flight)

    def _decide(self, team: int, cur: dict[str, Any]) -> None:
        """§1.2 / §1.3 ``mergeDistinctIds``, from the facts the dids' homes and persons sent. Sets
        ``cur["changed"]``: the persons whose structure the command changes (their ``c`` grows)."""
        into, other, ev, mid = cur["into"], cur["other"], cur["ev"], cur["mid"]
        a, b = cur["info"][into], cur["info"][other]
        base = {"t": team, "mid": mid, "ev": ev}
        if ("root" in a) != ("root" in b):
            existing, to_add, added = (a, other, b) if "root" in a else (b, into, a)
            cur["pl"] = [to_add]  # addPersonlessDistinctIdForMerge
            cur["changed"] = [existing["root"]]
            self.to_person(team, existing["root"], {**base, "k": "add", "root": existing["root"], "did": to_add,
                                                    "version": 1 if added["pl"] else 0})
        elif "root" in a:
            cur["changed"] = [a["root"]]
            if a["root"] == b["root"]:
                self.to_person(team, a["root"], {**base, "k": "identify", "root": a["root"]})
            elif ev["e"] == "$merge_dangerously" or not b["ident"]:
                cur["changed"] = [a["root"], b["root"]]
                self.to_person(team, b["root"], {**base, "k": "give", "root": b["root"], "target": a["root"]})
            else:
                cur["refused"] = True
                self.warn(Warn("cannot_merge_already_identified", {
                    "sourcePersonDistinctId": other, "targetPersonDistinctId": into, "eventUuid": ev["u"]}), ev)
                self.to_person(team, a["root"], {**base, "k": "identify", "root": a["root"]})
        else:
            first, second, second_version = into, other, 0
            if not a["pl"] and b["pl"]:  # only `other` was used personless: its uuid, no override needed
                first, second = other, into
            elif a["pl"] and b["pl"]:
                second_version = 1
            cur["pl"] = [into, other]
            self.to_did(team, first, {**base, "k": "create", "ids": [[first, 0], [second, second_version]]})

    def _on_done(self, msg: dict[str, Any]) -> None:
        team, mid = msg["t"], msg["mid"]
        cur = self.state.get(flight_key(team, mid))
        if cur is None:
            raise LookupError(f"done for {mid!r}, which is not a merge in flight")
        self.state.delete(flight_key(team, mid))
        root = msg["root"]
        personless = set(cur.get("pl", [])) if root is not None else set()
        # a refused merge leaves `other` on its own person; every other outcome puts both on `root`
        other_root = None if cur.get("refused") else root
        for did, new_root in ((cur["into"], root), (cur["other"], other_root)):
            self.to_did(team, did, {"k": "release", "t": team, "mid": mid, "did": did, "root": new_root,
                                    "pl": did in personless})
        changed = set(cur.get("changed", []))
        waiting: list[str] = []
        for person_root in cur.get("roots", []):
            lock = self.state.get(root_lock_key(team, person_root)) or {"c": 0}
            waiting += lock.get("w", [])
            count = lock["c"] + (person_root in changed)
            if count:
                self.state.put(root_lock_key(team, person_root), {"c": count})
            else:
                self.state.delete(root_lock_key(team, person_root))
        for did in (cur["into"], cur["other"]):
            self.state.delete(did_lock_key(team, did))
        for waiter in waiting:  # their answers may be stale now: they ask again
            self._resolve(team, self.state.get(flight_key(team, waiter)))
        self._start_queued(team)

    def _start_queued(self, team: int) -> None:
        """Start every queued merge whose dids are free, keeping each did's merges in arrival order."""
        key = merger_key(team)
        merger = self.state.get(key) or {}
        queue = merger.get("q", [])
        if not queue:
            return
        kept, blocked = [], set()
        for entry in queue:
            mid, into, other = entry
            dids = {into, other}
            if dids & blocked or not self._lock_dids(team, mid, dids):
                blocked |= dids
                kept.append(entry)
            else:
                self._resolve(team, self.state.get(flight_key(team, mid)))
        if len(kept) != len(queue):
            if kept:
                self.state.put(key, {**merger, "q": kept})
            else:
                self.state.delete(key)
