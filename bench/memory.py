"""Memory: the identity worker's resident memory per distinct id it knows, and its state on disk.

One ``headwater worker identity`` on its own topics. Once it holds its partitions (their state
folders exist) it gets a probe of 1,000 events, so that its code paths and buffers are in use; its
RSS then is the baseline. Then ``distinct_ids`` new distinct ids arrive in two halves (one event
each: web pageviews, every 4th a backend event without a session, so a server-side session too),
and after each half is processed the RSS and the size of the RocksDB folders are read, twice: at
once (``rss_busy``, what the burst left), and ``SETTLE_S`` later, once the worker has given its
free pages back (``rss``; the worker trims at most every 5 s, ADR 0016).

- ``bytes_per_id``: (RSS at the end − baseline) / distinct ids, both settled;
- ``busy_bytes_per_id``: the same with the RSS read at once;
- ``rss_peak_mb``: the worker's highest RSS (``VmHWM``), during the bursts;
- ``marginal_bytes_per_id``: (RSS at the end − RSS after the first half) / the second half: the
  cost of one more id once the fixed costs (librdkafka's fetch queue, RocksDB's memtables and block
  cache, allocator arenas) are paid;
- ``rocksdb_bytes``: the state on disk (SST files, logs) at the end.

    .venv/bin/python -m bench.memory [--distinct-ids 200000]
"""

from __future__ import annotations

import argparse
import time

from bench.common import GroupProgress, Phase, Stack, folder_bytes, produce_all, rate, rss_bytes, wait_until
from bench.processors import run_workers

PROBE = 1_000

#: Seconds after the last event before the settled RSS is read: the worker trims its heap at most
#: every 5 s after work (headwater/allocator.py).
SETTLE_S = 6.0


def _wait_processed(progress: GroupProgress, worker, timeout: float) -> bool:
    def done() -> bool:
        if worker.poll() is not None:
            raise RuntimeError("the worker exited; see its log in the work folder")
        return progress.read() >= progress.total
    return bool(wait_until(done, timeout, 0.2))


def _sample(worker, state, **extra) -> dict:
    busy = rss_bytes(worker.pid)
    time.sleep(SETTLE_S)
    return {**extra, "rss": rss_bytes(worker.pid), "rss_busy": busy, "rocksdb_bytes": folder_bytes(state)}


def measure_memory(phase: Phase, distinct_ids: int, timeout: float = 600) -> dict:
    from bench import mix

    settings = phase.settings
    raw = phase.topics.events_raw
    worker = run_workers(phase, 1)[0]
    state = settings.data_dir / "state" / f"{settings.topic_prefix}headwater-identity" / "w0"
    if not wait_until(lambda: len(list(state.glob("p*"))) >= settings.partitions, 120, 0.2):
        raise RuntimeError("the worker did not take its partitions within 120 s")
    probe = mix.Recorder(seed=11)
    mix.unique_ids(probe, PROBE, first=10**9)
    progress = GroupProgress(settings, f"{settings.topic_prefix}headwater-identity", raw, produce_all(settings, raw, probe.messages))
    samples = []
    try:
        if not _wait_processed(progress, worker, 120):
            raise RuntimeError("the probe events were not processed within 120 s")
        samples.append(_sample(worker, state, distinct_ids=0))
        half = distinct_ids // 2
        for first, n in ((0, half), (half, distinct_ids - half)):
            recorder = mix.Recorder(seed=12 + first)
            mix.unique_ids(recorder, n, first=first)
            started = time.perf_counter()
            progress.ends = produce_all(settings, raw, recorder.messages)
            del recorder
            complete = _wait_processed(progress, worker, timeout)
            seconds = time.perf_counter() - started
            samples.append(_sample(worker, state, distinct_ids=first + n, events_per_s=rate(n, seconds), complete=complete))
            if not complete:
                break
    finally:
        progress.close()
    base, mid, end = samples[0], samples[1], samples[-1]
    known = end["distinct_ids"]
    return {
        "distinct_ids": known, "complete": all(s.get("complete", True) for s in samples) and known == distinct_ids,
        "rss_start_mb": round(base["rss"] / 2**20, 1), "rss_end_mb": round(end["rss"] / 2**20, 1),
        "rss_peak_mb": round(rss_bytes(worker.pid, "VmHWM") / 2**20, 1),
        "rss_end_busy_mb": round(end["rss_busy"] / 2**20, 1),
        "bytes_per_id": round((end["rss"] - base["rss"]) / known) if known else None,
        "busy_bytes_per_id": round((end["rss_busy"] - base["rss"]) / known) if known else None,
        "marginal_bytes_per_id": round((end["rss"] - mid["rss"]) / (known - mid["distinct_ids"]))
        if known > mid["distinct_ids"] else None,
        "rocksdb_mb": round(end["rocksdb_bytes"] / 2**20, 1),
        "rocksdb_bytes_per_id": round(end["rocksdb_bytes"] / known) if known else None,
        "new_ids_per_s": [s["events_per_s"] for s in samples[1:]],
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distinct-ids", type=int, default=200_000)
    args = parser.parse_args(argv)
    with Stack("memory") as stack:
        phase = stack.phase("m")
        figures = measure_memory(phase, args.distinct_ids)
        phase.close()
        print(f"logs: {stack.work}")
    print(figures)
    return figures


if __name__ == "__main__":
    main()
