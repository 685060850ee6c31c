"""The capture endpoint on its own: events/s acknowledged through ``/batch``.

``headwater capture`` runs as its own process on the run's broker. ``connections`` client threads,
each with one keep-alive connection, post pre-built ``/batch`` bodies of ``batch`` events of the
mix (as SDKs send them: the PostHog batch format) as fast as the answers come, for ``seconds``
after one second of warm-up. Counted: the events of requests answered 200 (capture answers only
after Kafka acknowledged every event), with the CPU of capture and the broker meanwhile.

    .venv/bin/python -m bench.capture [--seconds 10] [--connections 8] [--batch 100]
"""

from __future__ import annotations

import argparse
import http.client
import os
import threading
import time

import orjson

from bench.common import TOKEN, CpuMeter, Phase, Stack, free_port, rate, wait_until

WARMUP_S = 1.0


def batch_bodies(batch: int, bodies: int = 64, seed: int = 6) -> list[bytes]:
    from bench import mix

    recorder = mix.Recorder(seed=seed)
    mix.send(recorder, batch * bodies, mix.Shares(), seed)
    events = [mix.capture_event(value) for _, value in recorder.messages]
    return [orjson.dumps({"api_key": TOKEN, "batch": events[i:i + batch]}) for i in range(0, len(events), batch)]


def _ready(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", "/_readiness")
        ok = connection.getresponse().status == 200
        connection.close()
        return ok
    except OSError:
        return False


def measure_capture(phase: Phase, seconds: float = 10, connections: int = 8, batch: int = 100) -> dict:
    port = free_port()
    capture = phase.headwater("capture", "capture", HEADWATER_CAPTURE_ADDR=f"127.0.0.1:{port}")
    if not wait_until(lambda: _ready(port), 30, 0.1):
        raise RuntimeError("capture did not answer /_readiness within 30 s")
    bodies = batch_bodies(batch)
    counting = threading.Event()
    stop = threading.Event()
    counts = [[0, 0, 0] for _ in range(connections)]  # events acknowledged, requests, errors (while counting)

    def client(slot: list[int], offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i = offset
        while not stop.is_set():
            body = bodies[i % len(bodies)]
            i += 1
            connection.request("POST", "/batch/", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if counting.is_set():
                if response.status == 200:
                    slot[0] += batch
                    slot[1] += 1
                else:
                    slot[2] += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(counts[i], i * 7), daemon=True) for i in range(connections)]
    for t in threads:
        t.start()
    time.sleep(WARMUP_S)
    meter = CpuMeter({"capture": capture.pid, "broker": phase.stack.broker.pid, "client": os.getpid()}).start()
    counting.set()
    started = time.perf_counter()
    time.sleep(seconds)
    counting.clear()
    elapsed = time.perf_counter() - started
    meter.stop()
    stop.set()
    for t in threads:
        t.join(30)
    events = sum(c[0] for c in counts)
    return {"events_per_s": rate(events, elapsed), "events": events, "seconds": round(elapsed, 2),
            "requests": sum(c[1] for c in counts), "errors": sum(c[2] for c in counts), "connections": connections,
            "batch": batch, "body_bytes": round(sum(map(len, bodies)) / len(bodies)),
            "cpu_us_per_event": meter.per_event_us(events), "cpu_cores": meter.cores(elapsed)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)
    with Stack("capture") as stack:
        phase = stack.phase("c")
        figures = measure_capture(phase, args.seconds, args.connections, args.batch)
        phase.close()
    print(figures)
    return figures


if __name__ == "__main__":
    main()
