"""The event mix of the benchmarks, one generator for B, P, E and the latency run, so that they
measure the same messages.

A SaaS product's stream, through the backend client's own envelope (``producers.backend.Client``):
- web ``$pageview``/``$autocapture`` of anonymous visitors with a client ``$session_id`` and about
  15 properties (the rest of the stream);
- ``$identify`` of a visitor into a user (a merge each; ``identify``), ``$create_alias`` of a
  visitor to a user (a merge each; ``alias``);
- ``$set`` of a user's properties (``set``);
- backend events of users naming their company group, without a session (server-side sessions;
  ``backend``);
- ``$groupidentify`` of a company (``group_identify``).

``warmup`` sends one event for every distinct id and company the mix uses, so that a run measured
after it finds its state already created ("caches warm"). ``unique_ids`` sends one event for each
of ``n`` new distinct ids (the memory measurement).

Messages are ``(key, value)`` bytes as ``events_raw`` holds them: the published envelope
(``headwater.wire.RawEvent``) as the backend client writes it, built here by ``Recorder``, which
has the client's calls and keeps each message instead of producing it. Uuids come from the seeded
generator, so a seed always gives the same bytes (``now`` aside).
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from bench.common import TOKEN
from headwater.wire import partition_key

START = datetime(2026, 11, 1, tzinfo=UTC)
PAGES = [f"https://app.example.com/{p}" for p in ("", "pricing", "docs", "dashboard", "settings", "billing")]
KINDS = ("identify", "alias", "set", "backend", "group_identify", "pageview")


@dataclass(frozen=True)
class Shares:
    """Each kind's share of the mix; pageviews take what is left."""

    identify: float = 0.03
    alias: float = 0.005
    set: float = 0.02
    backend: float = 0.10
    group_identify: float = 0.005

    def __post_init__(self) -> None:
        if any(v < 0 for v in asdict(self).values()) or self.pageview < 0:
            raise ValueError(f"shares must be >= 0 and add up to at most 1: {self}")

    @property
    def pageview(self) -> float:
        return 1.0 - sum(asdict(self).values())

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "pageview": round(self.pageview, 6)}


@dataclass(frozen=True)
class Population:
    """Who sends events: anonymous visitors, the users they become, the users' companies."""

    visitors: int = 20_000
    users: int = 8_000
    companies: int = 500


class Recorder:
    """The backend client's calls (``capture``, ``identify``, ``set``, ``alias``,
    ``group_identify``), keeping each ``events_raw`` message in ``messages`` instead of sending it."""

    def __init__(self, token: str = TOKEN, seed: int = 0) -> None:
        self.token = token
        self.messages: list[tuple[bytes, bytes]] = []
        self._uuids = random.Random(seed)
        self._now = datetime.now(UTC).isoformat()

    def capture(self, distinct_id: str, event: str, properties: dict[str, Any] | None = None,
                groups: dict[str, str] | None = None, timestamp: datetime | None = None) -> None:
        props = dict(properties or {})
        if groups:
            props["$groups"] = dict(groups)
        body = {"token": self.token, "distinct_id": distinct_id, "event": event,
                "uuid": str(uuid.UUID(int=self._uuids.getrandbits(128), version=4)),
                "timestamp": (timestamp or datetime.now(UTC)).isoformat(), "properties": props, "now": self._now}
        self.messages.append((partition_key(self.token, distinct_id).encode(), orjson.dumps(body)))

    def identify(self, distinct_id: str, properties: dict[str, Any], anon_distinct_id: str | None = None,
                 timestamp: datetime | None = None) -> None:
        props: dict[str, Any] = {"$set": dict(properties)}
        if anon_distinct_id is not None:
            props["$anon_distinct_id"] = anon_distinct_id
        self.capture(distinct_id, "$identify", props, timestamp=timestamp)

    def set(self, distinct_id: str, properties: dict[str, Any], timestamp: datetime | None = None) -> None:
        self.capture(distinct_id, "$set", {"$set": dict(properties)}, timestamp=timestamp)

    def alias(self, previous_id: str, distinct_id: str, timestamp: datetime | None = None) -> None:
        self.capture(distinct_id, "$create_alias", {"alias": previous_id}, timestamp=timestamp)

    def group_identify(self, group_type: str, group_key: str, properties: dict[str, Any],
                       timestamp: datetime | None = None) -> None:
        props = {"$group_type": group_type, "$group_key": group_key, "$group_set": dict(properties)}
        self.capture(f"${group_type}_{group_key}", "$groupidentify", props, timestamp=timestamp)


def _user_of(visitor: int, population: Population) -> str:
    return f"user-{visitor % population.users}"


def _company_of(visitor: int, population: Population) -> str:
    return f"company-{visitor % population.companies}"


def _web_properties(rng: random.Random, session: str) -> dict[str, Any]:
    return {"$current_url": rng.choice(PAGES), "$browser": "Chrome", "$os": "Mac OS X", "$lib": "web",
            "$lib_version": "1.200.0", "$referrer": "https://www.google.com/", "$referring_domain": "www.google.com",
            "$screen_width": 1920, "$screen_height": 1080, "$session_id": session, "$window_id": session,
            "utm_source": rng.choice(("google", "newsletter", "")), "$device_type": "Desktop", "$pathname": "/"}


def send(client, n: int, shares: Shares = Shares(), seed: int = 2, population: Population = Population(),
         start: datetime = START) -> Counter:
    """Queues ``n`` events of the mix on ``client`` (a ``producers.backend.Client`` or a ``Recorder``);
    returns how many of each kind. Every kind becomes one event row."""
    rng = random.Random(seed)
    sessions: dict[int, str] = {}
    kinds: Counter = Counter()
    edges = []
    edge = 0.0
    for kind in KINDS[:-1]:
        edge += getattr(shares, kind)
        edges.append((edge, kind))
    for i in range(n):
        ts = start + timedelta(milliseconds=i * 37)
        r = rng.random()
        kind = next((k for e, k in edges if r < e), "pageview")
        visitor = rng.randrange(population.visitors)
        anon, user, company = f"anon-{visitor}", _user_of(visitor, population), _company_of(visitor, population)
        if kind == "identify":
            client.identify(user, {"email": f"{user}@example.com"}, anon_distinct_id=anon, timestamp=ts)
        elif kind == "alias":
            client.alias(anon, user, timestamp=ts)
        elif kind == "set":
            client.set(user, {"plan": rng.choice(("free", "pro", "enterprise"))}, timestamp=ts)
        elif kind == "backend":
            client.capture(user, rng.choice(("invoice_paid", "api_call", "export_done")), {"amount": rng.randint(1, 500)},
                           groups={"company": company}, timestamp=ts)
        elif kind == "group_identify":
            client.group_identify("company", company, {"name": company.title(), "plan": rng.choice(("pro", "enterprise"))},
                                  timestamp=ts)
        else:
            if visitor not in sessions or rng.random() < 0.05:
                sessions[visitor] = str(uuid.UUID(int=rng.getrandbits(128)))
            client.capture(anon, rng.choice(("$pageview", "$pageview", "$autocapture")),
                           _web_properties(rng, sessions[visitor]), timestamp=ts)
        kinds[kind] += 1
    return kinds


def warmup(client, population: Population = Population(), seed: int = 3) -> int:
    """One event for every distinct id and company of the mix (before the mix's own timestamps);
    returns how many."""
    rng = random.Random(seed)
    start = START - timedelta(hours=2)
    n = 0
    for c in range(population.companies):
        company = f"company-{c}"
        client.group_identify("company", company, {"name": company.title(), "plan": "pro"}, timestamp=start)
        n += 1
    for u in range(population.users):
        client.capture(f"user-{u}", "api_call", {"amount": 1}, groups={"company": f"company-{u % population.companies}"},
                       timestamp=start + timedelta(milliseconds=u))
        n += 1
    for v in range(population.visitors):
        session = str(uuid.UUID(int=rng.getrandbits(128)))
        client.capture(f"anon-{v}", "$pageview", _web_properties(rng, session), timestamp=start + timedelta(milliseconds=v))
        n += 1
    return n


def unique_ids(client, n: int, first: int = 0, seed: int = 4) -> int:
    """One event for each of ``n`` new distinct ids ``visitor-<first>..``: web pageviews, and every
    4th a backend event without a session (a server-side session's state too); returns ``n``."""
    rng = random.Random(seed + first)
    for i in range(first, first + n):
        did = f"visitor-{i}"
        ts = START + timedelta(milliseconds=i)
        if i % 4 == 3:
            client.capture(did, "api_call", {"amount": 1}, timestamp=ts)
        else:
            client.capture(did, "$pageview", _web_properties(rng, str(uuid.UUID(int=rng.getrandbits(128)))), timestamp=ts)
    return n


def messages(n: int, shares: Shares = Shares(), seed: int = 2, population: Population = Population(),
             with_warmup: bool = True) -> tuple[list[tuple[bytes, bytes]], int, Counter]:
    """The mix as ``events_raw`` messages: (messages, how many of them are the warm-up, kinds)."""
    recorder = Recorder(seed=seed)
    warm = warmup(recorder, population) if with_warmup else 0
    kinds = send(recorder, n, shares, seed, population)
    return recorder.messages, warm, kinds


def capture_event(value: bytes, **extra_properties: Any) -> dict[str, Any]:
    """An ``events_raw`` envelope as an event of a PostHog ``/batch`` request."""
    body = orjson.loads(value)
    return {"event": body["event"], "distinct_id": body["distinct_id"], "uuid": body["uuid"],
            "timestamp": body["timestamp"], "properties": {**body["properties"], **extra_properties}}


def kind_of(value: bytes) -> str:
    """Which kind of the mix an ``events_raw`` message is (for checks and tests)."""
    body = orjson.loads(value)
    event = body["event"]
    if event == "$identify":
        return "identify"
    if event == "$create_alias":
        return "alias"
    if event == "$set":
        return "set"
    if event == "$groupidentify":
        return "group_identify"
    if event in ("$pageview", "$autocapture"):
        return "pageview"
    return "backend"
