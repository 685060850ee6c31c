"""A steady load on ``events_raw`` for the fault tests: a SaaS mix with merges and group updates
whose final persons and groups do not depend on how the pipeline interleaves partitions, so a
run with faults can be compared with a run without them (``checks.reference``).

Why the final state is deterministic:
- every distinct id's events are FIFO through the pipeline (one partition, one producer);
- a user's ``$identify`` (merging its anonymous ids into it) is sent only once the anonymous
  ids' earlier events are visible in ClickHouse (``Gate``), so they have been processed;
  after it, the anonymous ids send nothing;
- each group is updated by one distinct id only (``admin-<g>``), and the group types were
  assigned by a warm-up before the load.

``Load`` paces the production (``rate`` events/s, a tick every 20 ms), keeps every message in
send order with its send time, and counts the acknowledged ones from the delivery reports.
"""

from __future__ import annotations

import queue
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import orjson
from confluent_kafka import Producer

from headwater.settings import Settings
from headwater.topics import TopicNames
from tests.identity_harness import token_of
from tests.reference.persons_model import Event

TEAM = 7100
BASE_TS = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
TICK_S = 0.02
GROUP_TYPES = ("company", "project")
GROUPS = 12


def envelope(event: Event) -> bytes:
    """The events_raw envelope, with ``now`` one second after the event (deterministic: group
    ``created_at`` reads it)."""
    return orjson.dumps({
        "token": token_of(event.team_id), "distinct_id": event.distinct_id, "event": event.event,
        "uuid": event.uuid, "timestamp": event.timestamp.isoformat(),
        "now": (event.timestamp + timedelta(seconds=1)).isoformat(), "properties": event.properties})


@dataclass
class Message:
    """One produced message: an event (``row``: it must become one row of ``events``) or a raw
    one (poison)."""

    key: bytes
    value: bytes
    kind: str
    row: bool = True
    uuid: str = ""
    sent: float = 0.0  # time.time() at produce
    partition: int = -1
    offset: int = -1
    acked: bool = False
    error: str = ""
    meta: dict = field(default_factory=dict)


def event_message(event: Event, kind: str) -> Message:
    return Message(f"{token_of(event.team_id)}:{event.distinct_id}".encode(), envelope(event), kind, True, event.uuid)


class Mix:
    """The SaaS mix: new users (anonymous ids, then the user id), pageviews and ``$set`` of known
    users naming their company and project, ``$groupidentify`` by each group's admin, and the
    ``$identify`` of users whose first events are in ClickHouse (``ready``)."""

    def __init__(self, seed: int, team: int = TEAM, merges: bool = True, groups: bool = True) -> None:
        self.rng = random.Random(seed)
        self.team = team
        self.merges = merges
        self.groups = groups
        self.seq = 0
        self.users = 0
        self.known: list[int] = []
        self.group_updates = [0] * GROUPS
        self.first_uuids: dict[int, list[str]] = {}  # user -> uuids the identify waits for
        self.anons: dict[int, list[str]] = {}

    def _event(self, did: str, name: str, props: dict) -> Event:
        self.seq += 1
        return Event(self.team, did, name, str(uuid.uuid4()), BASE_TS + timedelta(milliseconds=self.seq), props)

    def _groups(self, user: int) -> dict:
        if not self.groups:
            return {}
        return {"$groups": {"company": f"c{user % GROUPS}", "project": f"p{user % 5}"}}

    def warmup(self) -> list[Message]:
        """One update per group type from one distinct id: type indexes in a fixed order."""
        if not self.groups:
            return []
        return [event_message(self._event("admin-warmup", "$groupidentify",
                                          {"$group_type": t, "$group_key": "warm", "$group_set": {"warm": True}}),
                              "group") for t in GROUP_TYPES]

    def new_user(self) -> list[Message]:
        k = self.users
        self.users += 1
        anons = [f"anon-{k}"] + ([f"anon-{k}b"] if k % 3 == 0 else [])
        out = [event_message(self._event(a, "$pageview", {"$current_url": f"https://app.example/landing/{k}",
                                                          "$set_once": {f"first_seen_{i}": k}}), "pageview")
               for i, a in enumerate(anons)]
        out.append(event_message(self._event(f"user-{k}", "$pageview", {
            "$current_url": "https://app.example/login", "$set": {"plan": "free"}, **self._groups(k)}), "pageview"))
        self.known.append(k)
        if self.merges:
            self.first_uuids[k] = [m.uuid for m in out]
            self.anons[k] = anons
        return out

    def identify(self, k: int) -> list[Message]:
        out = [event_message(self._event(f"user-{k}", "$identify", {"$anon_distinct_id": a,
                                                                     "$set": {"email": f"u{k}@example.com"}}), "merge")
               for a in self.anons.pop(k)]
        out.append(event_message(self._event(f"user-{k}", "$pageview", {
            "$current_url": "https://app.example/billing", "$set": {"plan": "pro"}, **self._groups(k)}), "pageview"))
        return out

    def next(self, ready: list[int]) -> list[Message]:
        if ready:
            return self.identify(ready.pop())
        r = self.rng.random()
        if r < 0.06 or not self.known:
            return self.new_user()
        if self.groups and r < 0.09:
            g = self.rng.randrange(GROUPS)
            self.group_updates[g] += 1
            n = self.group_updates[g]
            props = {"$group_type": "company", "$group_key": f"c{g}",
                     "$group_set": {"name": f"Company {g}", "updates": n, f"field_{n % 4}": n}}
            return [event_message(self._event(f"admin-{g}", "$groupidentify", props), "group")]
        k = self.rng.choice(self.known)
        if r < 0.14:
            return [event_message(self._event(f"user-{k}", "$set", {"$set": {"score": self.seq}}), "set")]
        return [event_message(self._event(f"user-{k}", "$pageview", {
            "$current_url": f"https://app.example/page/{self.rng.randrange(50)}", **self._groups(k)}), "pageview")]


class Gate(threading.Thread):
    """Polls ClickHouse for the first events of new users; a user whose events are all visible
    is put on ``ready`` (its ``$identify`` may follow). ClickHouse errors (an outage) are waited out."""

    def __init__(self, settings: Settings, interval: float = 0.3) -> None:
        super().__init__(name="identify-gate", daemon=True)
        from sinks.clickhouse.client import connect

        self.connect = lambda: connect(settings.clickhouse, form_encode_query_params=True)
        self.db = settings.clickhouse.database
        self.interval = interval
        self.pending: dict[int, set[str]] = {}
        self.ready: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.errors = 0

    def wait_for(self, user: int, uuids: list[str]) -> None:
        with self.lock:
            self.pending[user] = set(uuids)

    def run(self) -> None:
        client = None
        while not self.done.wait(self.interval):
            with self.lock:
                wanted = sorted({u for uuids in self.pending.values() for u in uuids})
            if not wanted:
                continue
            try:
                client = client or self.connect()
                seen = {r[0] for r in client.query(
                    f"SELECT toString(uuid) FROM {self.db}.events WHERE uuid IN {{u:Array(UUID)}}",
                    parameters={"u": wanted}).result_rows}
            except Exception:  # ClickHouse down: try again later
                self.errors += 1
                client = None
                continue
            with self.lock:
                for user, uuids in list(self.pending.items()):
                    if uuids <= seen:
                        del self.pending[user]
                        self.ready.put(user)

    def stop(self) -> None:
        self.done.set()
        self.join(10)


class Load:
    """Produces ``source()``'s messages at ``rate``/s in a thread, in send order in ``messages``."""

    def __init__(self, settings: Settings, rate: float, mix: Mix | Callable[[list[int]], list[Message]],
                 gate: Gate | None = None, name: str = "load") -> None:
        self.producer = Producer(settings.kafka_config(**{
            "enable.idempotence": True, "linger.ms": 5, "partitioner": "murmur2_random",
            "message.max.bytes": 4_000_000, "client.id": name}))
        self.topic = TopicNames(settings.topic_prefix).events_raw
        self.rate = rate
        self.mix = mix
        self.source = mix.next if hasattr(mix, "next") else mix
        self.gate = gate
        self.messages: list[Message] = []
        self.failed: list[Message] = []
        self.stopping = threading.Event()
        self.paused = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.behind_s = 0.0
        self.extra = 0  # messages to send at once on the next tick, beside the pace (``burst``)

    # -- sending --------------------------------------------------------------------------------
    def send(self, messages: list[Message]) -> None:
        for m in messages:
            self._produce(m)

    def _produce(self, m: Message) -> None:
        def report(error, message, m=m) -> None:
            if error is None:
                m.acked, m.partition, m.offset = True, message.partition(), message.offset()
            else:
                m.error = str(error)
                self.failed.append(m)

        m.sent = time.time()
        while True:
            try:
                self.producer.produce(self.topic, m.value, m.key, on_delivery=report)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.messages.append(m)

    def burst(self, n: int) -> None:
        """``n`` more messages of the mix at once (the workers get big batches, long transactions)."""
        self.extra += n

    def flush(self, timeout: float = 30) -> None:
        assert self.producer.flush(timeout) == 0, "the load's messages were not all acknowledged"

    def _run(self) -> None:
        started = time.monotonic()
        produced_slots = 0
        ready: list[int] = []
        while not self.stopping.is_set():
            if self.paused.is_set():
                self.producer.poll(TICK_S)
                started = time.monotonic() - produced_slots / self.rate
                continue
            if self.gate is not None:
                while not self.gate.ready.empty():
                    ready.append(self.gate.ready.get())
            due = int((time.monotonic() - started) * self.rate)
            self.behind_s = max(self.behind_s, (due - produced_slots) / self.rate)
            extra, self.extra = self.extra, 0
            while produced_slots < due or extra > 0:
                batch = self.source(ready)
                self.send(batch)
                if produced_slots < due:
                    produced_slots += len(batch)
                else:
                    extra -= len(batch)
            waits = getattr(self.mix, "first_uuids", None)
            while self.gate is not None and waits:
                self.gate.wait_for(*waits.popitem())
            self.producer.poll(TICK_S)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if not self.stopping.is_set():
            self.stopping.set()
            self.thread.join(10)
            self.flush()
            self.producer = None  # librdkafka lets go of the broker now, not when the test's frames go

    # -- what was sent --------------------------------------------------------------------------
    @property
    def acked(self) -> list[Message]:
        return [m for m in self.messages if m.acked]

    def acked_events(self) -> list[Message]:
        return [m for m in self.messages if m.acked and m.row]
