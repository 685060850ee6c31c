"""P: the processors alone, ``events_raw`` to ``events_enriched``, over the benchmark's mix.

The whole input is in ``events_raw`` before the identity worker(s) start (``headwater worker
identity``, as the pipeline runs them): first the mix's warm-up (one event per distinct id and
company), then the measured events. "Caches warm" is this warm-up: the measured window starts when
the warm-up's last event came out, so every distinct id, person, company and group type the
measured events touch already has its state, and the group join and state restoration are
outside the window too.

Rate: from the timestamps of the ``events_enriched`` messages (set when the worker produced them),
the events that came out after the warm-up's last one, over the time from it to the last one.
CPU: of the worker(s) and the broker while the group's committed offsets went from the warm-up's
end to the input's end.

With ``--profile`` the worker runs under cProfile, and the functions where its time goes are listed
(the rate is then slower than P and is not reported as P).

    .venv/bin/python -m bench.processors [--events 200000] [--identify-share 0.03] [--alias-share 0.005] [--workers 1] [--profile]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import CpuMeter, GroupProgress, Phase, Stack, produce_all, rate, read_topic, window_rate


def run_workers(phase: Phase, workers: int, profile: bool = False) -> list:
    """``headwater worker identity`` processes; with ``profile`` under cProfile, each writing
    ``<work>/<phase>-identity-<i>.prof`` when it stops."""
    if not profile:
        return [phase.headwater(f"identity-{i}", "worker", "identity", "--worker-id", str(i)) for i in range(workers)]
    import sys

    processes = [phase.stack.child([sys.executable, "-m", "cProfile", "-o", str(profile_path(phase, i)), "-m",
                                    "headwater.cli", "worker", "identity", "--worker-id", str(i)],
                                   f"{phase.name}-identity-{i}", phase.env) for i in range(workers)]
    phase.processes.extend(processes)
    return processes


def profile_path(phase: Phase, worker: int):
    return phase.stack.work / f"{phase.name}-identity-{worker}.prof"


def profile_top(path, limit: int = 20) -> list[dict]:
    """The functions where the profiled worker spent its time: self time and cumulative time, as
    shares of the whole profile."""
    import pstats

    stats = pstats.Stats(str(path))
    total = stats.total_tt or 1.0
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:limit]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": calls, "self_share": round(tt / total, 3),
             "cumulative_share": round(ct / total, 3)}
            for (file, line, name), (_, calls, tt, ct, _) in rows]


def follow_progress(progress: GroupProgress, warm: int, meter: CpuMeter, processes: list, timeout: float) -> dict:
    """Polls the group's committed offsets until they reach the input's end (or ``timeout``);
    measures CPU from the warm-up's end. Returns the input side's figures."""
    launched = time.perf_counter()
    deadline = time.monotonic() + timeout
    first = window_start = None
    done = start_count = 0
    while time.monotonic() < deadline:
        done = progress.read()
        now = time.perf_counter()
        if first is None and done > 0:
            first = now
        if window_start is None and done >= warm:
            window_start, start_count = now, done
            meter.start()
        if done >= progress.total:
            break
        if any(p.poll() is not None for p in processes):
            raise RuntimeError("a worker exited; see its log in the work folder")
        time.sleep(0.1)
    end = time.perf_counter()
    if window_start is None:  # never got past the warm-up
        window_start, start_count = end, done
        meter.start()
    meter.stop()
    counted = done - start_count
    return {"input_done": done, "input_total": progress.total, "complete": done >= progress.total,
            "startup_s": round(first - launched, 2) if first else None,
            "input_events_per_s": rate(counted, end - window_start), "window_events": counted,
            "window_s": round(end - window_start, 2)}


def measure_processors(phase: Phase, messages: list[tuple[bytes, bytes]], warm: int, workers: int = 1,
                       timeout: float = 300, profile: bool = False) -> dict:
    """P over ``messages`` (the first ``warm`` of them the warm-up). With ``profile`` the workers run
    under cProfile (slower: the rate is then not P) and ``profile_top`` lists worker 0's functions."""
    raw = phase.topics.events_raw
    ends = produce_all(phase.settings, raw, messages)
    progress = GroupProgress(phase.settings, f"{phase.settings.topic_prefix}headwater-identity", raw, ends)
    processes = run_workers(phase, workers, profile)
    meter = CpuMeter({"worker": [p.pid for p in processes], "broker": phase.stack.broker.pid})
    try:
        inputs = follow_progress(progress, warm, meter, processes, timeout)
    finally:
        progress.close()
    stamps = read_topic(phase.settings, phase.topics.events_enriched, len(messages), timeout=60 if inputs["complete"] else 5)
    counted, seconds = window_rate(stamps, warm)
    profiled = {}
    if profile:
        for process in processes:
            phase.stack.stop(process, timeout=60)  # cProfile writes its file as the worker exits
        profiled = {"profiled": True, "profile_top": profile_top(profile_path(phase, 0)),
                    "profile_file": str(profile_path(phase, 0))}
    return {
        "events_per_s": rate(counted, seconds), "events": counted, "seconds": round(seconds, 2),
        "workers": workers, "output_events": len(stamps), "expected_events": len(messages),
        "complete": inputs["complete"] and len(stamps) >= len(messages),
        "cpu_us_per_event": meter.per_event_us(inputs["window_events"]), "cpu_cores": meter.cores(inputs["window_s"]),
        **inputs, **profiled,
    }


def main(argv: list[str] | None = None) -> dict:
    from bench import mix

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--identify-share", type=float, default=0.03)
    parser.add_argument("--alias-share", type=float, default=0.005)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--profile", action="store_true", help="run the worker under cProfile and list where its time goes")
    args = parser.parse_args(argv)
    messages, warm, _ = mix.messages(args.events, mix.Shares(identify=args.identify_share, alias=args.alias_share))
    with Stack("processors") as stack:
        phase = stack.phase("p")
        figures = measure_processors(phase, messages, warm, args.workers, args.timeout, args.profile)
        phase.close()
        print(f"logs: {stack.work}")
    print(figures)
    return figures


if __name__ == "__main__":
    main()
