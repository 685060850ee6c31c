"""Latency from capture to queryable, at a fixed rate (half of E's maximum in ``bench.run``).

The whole pipeline runs: ``headwater capture``, the identity worker(s), the sink. First the mix's
warm-up goes through capture and the run waits for its rows, so that the group joins, the
migrations and the distinct ids' state are behind us. Then one client posts the mix to ``/batch``
at ``rate`` events/s for ``seconds`` (a batch every 20 ms holding the events due, as an SDK's
queue flushing often), each event stamped with its send time in ``properties.bench_sent_us``.

When is a row queryable? A poller asks ClickHouse every 100 ms which ``inserted_at`` values exist
(the events table sets ``inserted_at DEFAULT now64(6)``: one value per insert) and notes the
first time it saw each. An event's latency is that first sighting minus its send time: an upper
bound, by at most the poll interval and the query's time. ``insert_ms`` is ``inserted_at`` minus
the send time: a lower bound (the insert's start, before it is visible).

Where the time goes (``stages_ms``, p50 and p99 of each hop, per event, matched by uuid): ``capture``
(sent → its ``events_raw`` message's timestamp), ``processors`` (→ its ``events_enriched``
message's timestamp, set when the worker produced it), ``sink`` (→ ``inserted_at``) and
``visible`` (→ first seen by the poller).

    .venv/bin/python -m bench.latency [--rate 5000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import http.client
import threading
import time

import orjson

from bench.common import TOKEN, Phase, Stack, free_port, percentile, read_topic, wait_until
from bench.processors import run_workers

TICK_S = 0.02
POLL_S = 0.1


class Poster:
    """One keep-alive connection posting ``/batch`` requests."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, events: list[dict]) -> None:
        body = orjson.dumps({"api_key": TOKEN, "batch": events})
        self.connection.request("POST", "/batch/", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"capture answered {response.status}: {answer[:200]!r}")

    def close(self) -> None:
        self.connection.close()


class VisibilityPoller(threading.Thread):
    """Notes when each insert (``inserted_at`` value) of the events table is first seen."""

    def __init__(self, client, database: str, interval: float = POLL_S) -> None:
        super().__init__(name="visibility-poller", daemon=True)
        self.client, self.database, self.interval = client, database, interval
        self.seen: dict[int, int] = {}  # inserted_at µs -> first seen, µs since the epoch
        self.polls = 0
        self._done = threading.Event()

    def poll(self) -> None:
        since = max(self.seen, default=0) - 60_000_000
        rows = self.client.query(
            f"SELECT DISTINCT toUnixTimestamp64Micro(inserted_at) FROM {self.database}.events "
            f"WHERE inserted_at >= fromUnixTimestamp64Micro(toInt64({max(since, 0)}))").result_rows
        now = time.time_ns() // 1000
        for (t,) in rows:
            self.seen.setdefault(t, now)
        self.polls += 1

    def run(self) -> None:
        while not self._done.is_set():
            started = time.monotonic()
            self.poll()
            self._done.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self) -> None:
        self._done.set()
        self.join(30)
        self.poll()  # the last inserts, seen at the latest now


def send_paced(poster: Poster, events: list[dict], rate: float, tick: float = TICK_S) -> dict:
    """Post ``events`` at ``rate`` per second: every ``tick`` the events due so far, stamped now."""
    started = time.monotonic()
    sent = requests = 0
    worst_behind = 0.0
    next_tick = started
    while sent < len(events):
        now = time.monotonic()
        due = min(len(events), int(rate * (now - started)) + 1)
        if due > sent:
            stamp = time.time_ns() // 1000
            batch = [{**e, "properties": {**e["properties"], "bench_sent_us": stamp}} for e in events[sent:due]]
            poster.post(batch)
            requests += 1
            worst_behind = max(worst_behind, (due - 1) / rate - (now - started))
            sent = due
        next_tick += tick
        time.sleep(max(0.0, next_tick - time.monotonic()))
    elapsed = time.monotonic() - started
    return {"sent": sent, "requests": requests, "send_s": round(elapsed, 2), "sent_per_s": round(sent / elapsed)}


def summary_ms(values_us: list[int]) -> dict:
    return {f"p{q}": round(percentile(values_us, q) / 1000, 1) for q in (50, 95, 99)} | {
        "max": round(max(values_us) / 1000, 1) if values_us else None}


def measure_latency(phase: Phase, rate: float, seconds: float, events: list[dict], warmup: list[dict], workers: int = 1,
                    timeout: float = 300) -> dict:
    """``events``/``warmup``: ``/batch`` events (``bench.mix.capture_event``); ``events`` should hold
    ``rate * seconds`` of them."""
    from headwater.embedded.broker import wait_for_port

    client = phase.clickhouse()
    count = lambda: client.query(f"SELECT count() FROM {phase.database}.events").result_rows[0][0]  # noqa: E731
    port = free_port()
    phase.headwater("capture", "capture", HEADWATER_CAPTURE_ADDR=f"127.0.0.1:{port}")
    processes = run_workers(phase, workers)
    processes.append(phase.headwater("sink", "sink"))
    wait_for_port("127.0.0.1", port, 30)
    poster = Poster(port)
    for i in range(0, len(warmup), 500):
        poster.post(warmup[i:i + 500])
    if not wait_until(lambda: count() >= len(warmup), timeout, 0.25):
        raise RuntimeError(f"the warm-up's {len(warmup)} rows did not arrive in {timeout:.0f}s")
    poller = VisibilityPoller(phase.clickhouse(), phase.database)
    poller.start()
    sending = send_paced(poster, events, rate)
    poster.close()
    expected = len(warmup) + sending["sent"]
    complete = bool(wait_until(lambda: count() >= expected, timeout, 0.25))
    poller.stop()
    rows = client.query(f"SELECT toString(uuid), toUnixTimestamp64Micro(inserted_at), "
                        f"JSONExtractInt(properties, 'bench_sent_us') "
                        f"FROM {phase.database}.events WHERE JSONHas(properties, 'bench_sent_us')").result_rows
    client.close()
    visible = [poller.seen[t] - sent for _, t, sent in rows if t in poller.seen]
    inserted = [t - sent for _, t, sent in rows]
    return {"rate": round(rate), **sending, "rows": len(rows), "complete": complete and len(rows) >= sending["sent"],
            "poll_ms": POLL_S * 1000, "tick_ms": TICK_S * 1000, "inserts": len(poller.seen),
            "queryable_ms": summary_ms(visible), "insert_ms": summary_ms(inserted),
            "stages_ms": stages(phase, rows, poller.seen, len(warmup) + sending["sent"])}


def _uuid_and_time(message) -> tuple[str, int]:
    return orjson.loads(message.value())["uuid"], message.timestamp()[1] * 1000


def stages(phase: Phase, rows: list[tuple[str, int, int]], seen: dict[int, int], expected: int) -> dict:
    """p50/p99 of each hop of the measured events: sent → events_raw → events_enriched → inserted → seen."""
    raw = dict(read_topic(phase.settings, phase.topics.events_raw, expected, 60, pick=_uuid_and_time))
    enriched = dict(read_topic(phase.settings, phase.topics.events_enriched, expected, 60, pick=_uuid_and_time))
    return stage_split(rows, raw, enriched, seen)


def stage_split(rows: list[tuple[str, int, int]], raw: dict[str, int], enriched: dict[str, int],
                seen: dict[int, int]) -> dict:
    """The hops of each event found everywhere (times in µs): {hop: {"p50", "p99"}} in ms."""
    hops: dict[str, list[int]] = {"capture": [], "processors": [], "sink": [], "visible": []}
    for uuid, inserted, sent in rows:
        if uuid in raw and uuid in enriched and inserted in seen:
            hops["capture"].append(raw[uuid] - sent)
            hops["processors"].append(enriched[uuid] - raw[uuid])
            hops["sink"].append(inserted - enriched[uuid])
            hops["visible"].append(seen[inserted] - inserted)
    return {hop: {q: round(percentile(values, int(q[1:])) / 1000, 1) for q in ("p50", "p99")} if values else {}
            for hop, values in hops.items()}


def mix_events(n: int, shares, seed: int) -> tuple[list[dict], list[dict]]:
    """The mix (``n`` events) and its warm-up as ``/batch`` events."""
    from bench import mix

    recorder = mix.Recorder(seed=seed)
    mix.warmup(recorder)
    warm = len(recorder.messages)
    mix.send(recorder, n, shares, seed)
    converted = [mix.capture_event(value) for _, value in recorder.messages]
    return converted[warm:], converted[:warm]


def main(argv: list[str] | None = None) -> dict:
    from bench import mix

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--identify-share", type=float, default=0.03)
    parser.add_argument("--alias-share", type=float, default=0.005)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    events, warmup = mix_events(int(args.rate * args.seconds), mix.Shares(identify=args.identify_share, alias=args.alias_share), 5)
    with Stack("latency") as stack:
        phase = stack.phase("l")
        figures = measure_latency(phase, args.rate, args.seconds, events, warmup, args.workers)
        phase.close()
        print(f"logs: {stack.work}")
    print(figures)
    return figures


if __name__ == "__main__":
    main()
