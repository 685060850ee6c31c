"""The benchmark, one command: every measurement in sequence on one embedded broker and one
embedded ClickHouse, a table on the terminal and the figures as JSON.

    make bench                                   # = .venv/bin/python -m bench.run
    make bench BENCH_ARGS="--full"               # memory at 1,000,000 distinct ids
    make bench BENCH_ARGS="--identify-share 0 --alias-share 0 --only b,p,e"

Phases (each with its own topics, consumer groups, database and processes; ``bench/<phase>.py``
says how it measures):
- ``b``        B, a raw confluent-kafka consume → JSON decode/encode → produce loop over the mix
               (plain: async commits, no transactions; also B-tx with the runtime's transactions);
- ``p``        P, the identity worker(s) alone, ``events_raw`` → ``events_enriched``, caches warm;
- ``e``        E, end to end, ``events_raw`` → rows in ClickHouse (worker(s) + sink);
- ``latency``  capture → queryable at half of E's rate (or ``--rate``), p50/p95/p99;
- ``memory``   worker RSS per distinct id and its RocksDB folder (``--distinct-ids``);
- ``capture``  the capture endpoint alone, events/s acknowledged through ``/batch``;
- ``sink``     the sink alone, rows/s.
With ``--profile``, P is run a second time with the worker under cProfile (``processors_profile``:
its rate is not P's), and the functions where the worker's time goes are printed.
B, P and E read the same messages (``bench.mix``): the warm-up (one event per distinct id and
company) and ``--events`` events of the mix.

JSON (``--json``, default ``bench/results/latest.json``)::

    {"run": {"started_at", "seconds", "commit", "machine": {"cpus", "loadavg_1m", "python"},
             "loadavg_1m_end", "args": {...}},
     "mix": {"events", "warmup_events", "shares": {kind: share}, "kinds": {kind: count}},
     "passthrough": {"events_per_s", "variant", "plain": {...}, "transactional": {...}},
     "processors":  {"events_per_s", "p_over_b", "p_over_b_tx", "cpu_us_per_event": {...}, ...},
     "end_to_end":  {"events_per_s", "cpu_us_per_event": {...}, ...},
     "latency":     {"rate", "queryable_ms": {"p50", "p95", "p99", "max"}, "insert_ms": {...},
                     "stages_ms": {"capture"|"processors"|"sink"|"visible": {"p50", "p99"}}, ...},
     "memory":      {"distinct_ids", "bytes_per_id", "marginal_bytes_per_id", "rocksdb_mb", ...},
     "capture":     {"events_per_s", "cpu_us_per_event": {...}, ...},
     "sink":        {"rows_per_s", "cpu_us_per_row": {...}, ...},
     "processors_profile": {"profile_top": [{"function", "calls", "self_share", "cumulative_share"}], ...},  # --profile
     "targets":     {name: {"target", "value", "met"}}}   # met null: not comparable (memory below 1M ids)

A phase that failed holds ``{"error": "..."}``; a phase not run is absent. ``"complete": false``
marks a phase that hit ``--timeout`` before all its events were through (its rate is then the
rate of what got through).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine

PHASES = ("b", "p", "e", "latency", "memory", "capture", "sink")
SECTIONS = {"b": "passthrough", "p": "processors", "e": "end_to_end", "latency": "latency", "memory": "memory",
            "capture": "capture", "sink": "sink", "pprof": "processors_profile"}
DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events of the mix for B, P and E, after the warm-up")
    parser.add_argument("--identify-share", type=float, default=0.03, help="share of $identify (a merge each)")
    parser.add_argument("--alias-share", type=float, default=0.005, help="share of $create_alias (a merge each)")
    parser.add_argument("--workers", type=int, default=1, help="identity worker processes in P, E and latency")
    parser.add_argument("--passes", type=int, default=3, help="passes of B over the mix (the median is reported)")
    parser.add_argument("--rate", type=float, help="latency: events/s to send (default: half of E in this run)")
    parser.add_argument("--latency-seconds", type=float, default=30)
    parser.add_argument("--distinct-ids", type=int, default=200_000, help="memory: distinct ids the worker learns")
    parser.add_argument("--full", action="store_true", help="memory at 1,000,000 distinct ids (the target's size)")
    parser.add_argument("--capture-seconds", type=float, default=10)
    parser.add_argument("--capture-connections", type=int, default=8)
    parser.add_argument("--capture-batch", type=int, default=100)
    parser.add_argument("--sink-events", type=int, default=200_000)
    parser.add_argument("--timeout", type=float, default=240, help="seconds a phase waits for its events to get through")
    parser.add_argument("--only", default=",".join(PHASES), help=f"phases to run, comma-separated: {','.join(PHASES)}")
    parser.add_argument("--profile", action="store_true",
                        help="after P, run P again with the worker under cProfile and list where its time goes")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every phase in a few minutes")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the figures")
    args = parser.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.only) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; phases: {','.join(PHASES)}")
    if args.full:
        args.distinct_ids = 1_000_000
    if args.quick:
        args.events, args.distinct_ids, args.sink_events = 20_000, 20_000, 20_000
        args.latency_seconds, args.capture_seconds, args.passes = 10, 3, 1
    return args


# -- figures → targets, table ---------------------------------------------------------------------
def _get(results: dict, *path: str) -> Any:
    value: Any = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def targets(results: dict) -> dict[str, dict]:
    """DESIGN.md §7's targets against this run's figures (only those the run measured)."""
    checks = {
        "end_to_end_events_per_s": (">= 20000", _get(results, "end_to_end", "events_per_s"), lambda v: v >= 20_000),
        "p_over_b": (">= 0.35", _get(results, "processors", "p_over_b"), lambda v: v >= 0.35),
        "latency_p50_ms": ("<= 1000", _get(results, "latency", "queryable_ms", "p50"), lambda v: v <= 1000),
        "latency_p99_ms": ("<= 3000", _get(results, "latency", "queryable_ms", "p99"), lambda v: v <= 3000),
        "memory_bytes_per_id": ("<= 200 at 1M ids", _get(results, "memory", "bytes_per_id"), lambda v: v <= 200),
    }
    found = {name: {"target": target, "value": value, "met": bool(test(value))}
             for name, (target, value, test) in checks.items() if isinstance(value, (int, float))}
    ids = _get(results, "memory", "distinct_ids")
    if "memory_bytes_per_id" in found and (ids or 0) < 1_000_000:  # the target is defined at 1M ids (--full)
        found["memory_bytes_per_id"].update(met=None, note=f"measured at {ids:,} ids; the target is at 1M (--full)")
    return found


def _cpu(figures: dict | None, key: str = "cpu_us_per_event") -> str:
    cpu = (figures or {}).get(key) or {}
    return ", ".join(f"{name} {us:g}" for name, us in cpu.items() if us is not None)


def _n(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}{unit}" if isinstance(value, (int, float)) else str(value)


def _mark(results: dict, name: str) -> str:
    check = results.get("targets", {}).get(name)
    return "" if check is None or check["met"] is None else (" ✓" if check["met"] else " ✗")


def _hops(stages: dict) -> str:
    found = [(hop, q) for hop, q in stages.items() if q]
    if not found:
        return ""
    return ("hops p50/p99 ms: " + ", ".join(f"{hop} {q['p50']:,.0f}/{q['p99']:,.0f}" for hop, q in found) + "; ")


def _partial(figures: dict) -> str:
    return " (incomplete: timed out)" if figures.get("complete") is False else ""


def table_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(measure, result, target, CPU µs per event, notes) for each phase the run holds."""
    rows = []
    for phase in (*PHASES[:2], "pprof", *PHASES[2:]):
        section = SECTIONS[phase]
        f = results.get(section)
        if f is None:
            continue
        if "error" in f:
            rows.append((section, "failed", "", "", f["error"][:80]))
            continue
        if section == "passthrough":
            tx = f.get("transactional", {})
            rows.append(("B pass-through (plain)", _n(f["events_per_s"], " events/s"), "", _cpu(f.get("plain")),
                         f"B-tx {_n(tx.get('events_per_s'))} events/s; passes {f['plain'].get('passes_events_per_s')}; "
                         f"the loop's own CPU would allow {_n(f.get('cpu_limit_events_per_s'))}/s"))
        elif section == "processors_profile":
            rows.append(("P under cProfile", _n(f["events_per_s"], " events/s"), "", _cpu(f),
                         "not P: profiling slows the worker; its functions are listed below"))
        elif section == "processors":
            ratio = f.get("p_over_b")
            rows.append(("P processors", _n(f["events_per_s"], " events/s") + (f", P/B {ratio:.2f}" if ratio is not None else "")
                         + _mark(results, "p_over_b"), "P/B ≥ 0.35", _cpu(f),
                         f"{f['workers']} worker(s), caches warm{_partial(f)}"))
        elif section == "end_to_end":
            rows.append(("E end to end", _n(f["events_per_s"], " events/s") + _mark(results, "end_to_end_events_per_s"),
                         "≥ 20,000 events/s", _cpu(f), f"{f['rows']:,} rows, {f['duplicates']} duplicates{_partial(f)}"))
        elif section == "latency":
            q, i = f["queryable_ms"], f["insert_ms"]
            rows.append((f"latency at {f['rate']:,} events/s",
                         f"p50 {_n(q['p50'], ' ms')}{_mark(results, 'latency_p50_ms')}, p95 {_n(q['p95'], ' ms')}, "
                         f"p99 {_n(q['p99'], ' ms')}{_mark(results, 'latency_p99_ms')}",
                         "p50 ≤ 1 s, p99 ≤ 3 s", "",
                         f"capture → queryable (poll {f['poll_ms']:g} ms); to insert p50 {_n(i['p50'])} p99 {_n(i['p99'])} ms; "
                         + _hops(f.get("stages_ms") or {}) + f"sent {f['sent_per_s']:,}/s{_partial(f)}"))
        elif section == "memory":
            rows.append((f"memory at {f['distinct_ids']:,} ids",
                         f"{_n(f['bytes_per_id'])} B/id" + _mark(results, "memory_bytes_per_id"), "≤ 200 B/id at 1M",
                         "", f"marginal {_n(f['marginal_bytes_per_id'])} B/id; RSS {f['rss_start_mb']} → {f['rss_end_mb']} MB "
                         f"settled ({f['rss_end_busy_mb']} MB at once, {_n(f['busy_bytes_per_id'])} B/id; peak "
                         f"{f['rss_peak_mb']} MB); RocksDB {f['rocksdb_mb']} MB on disk{_partial(f)}"))
        elif section == "capture":
            rows.append(("capture alone", _n(f["events_per_s"], " events/s"), "", _cpu(f),
                         f"{f['connections']} connections × {f['batch']}-event /batch; {f['errors']} errors"))
        elif section == "sink":
            rows.append(("sink alone", _n(f["rows_per_s"], " rows/s"), "", _cpu(f, "cpu_us_per_row"),
                         f"{f['row_bytes']:,}-byte rows, {f['duplicates']} duplicates{_partial(f)}"))
    return rows


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    run = results["run"]
    title = (f"headwater benchmark — {run['started_at']}, commit {run['commit']}, {run['machine']['cpus']} cores, "
             f"load {run['machine']['loadavg_1m']} → {run.get('loadavg_1m_end')}, {run.get('seconds', 0):.0f} s")
    table = Table(title=title, title_justify="left", show_lines=False)
    for column in ("measure", "result", "target", "CPU µs per event", "notes"):
        table.add_column(column, overflow="fold")
    for row in table_rows(results):
        table.add_row(*row)
    console = Console(width=max(Console().width, 160))
    console.print(table)
    top = _get(results, "processors_profile", "profile_top")
    if top:
        console.print(f"where the worker's time goes (cProfile, whole process, waits in consume included; "
                      f"{results['processors_profile']['profile_file']}):")
        for f in top[:15]:
            console.print(f"  self {f['self_share']:6.1%}  cumulative {f['cumulative_share']:6.1%}  {f['calls']:>9,} calls  {f['function']}")
    m = results.get("mix")
    if m:
        console.print(f"mix: {m['warmup_events']:,} warm-up + {m['events']:,} events; "
                      + ", ".join(f"{k} {v:.1%}" for k, v in m["shares"].items()))


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


# -- the run --------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    from bench import mix
    from bench.capture import measure_capture
    from bench.common import Stack
    from bench.latency import measure_latency, mix_events
    from bench.memory import measure_memory
    from bench.passthrough import measure_passthrough
    from bench.pipeline import measure_end_to_end
    from bench.processors import measure_processors
    from bench.sink import measure_sink

    started = time.monotonic()
    results: dict[str, Any] = {"run": {"started_at": datetime.now(UTC).isoformat(timespec="seconds"), "commit": _commit(),
                                       "machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v
                                                                      for k, v in vars(args).items()}}}
    shares = mix.Shares(identify=args.identify_share, alias=args.alias_share)
    messages, warm, kinds = [], 0, {}
    if {"b", "p", "e"} & set(args.only):
        print(f"building the mix: warm-up + {args.events:,} events ...", flush=True)
        messages, warm, kinds = mix.messages(args.events, shares)
    results["mix"] = {"events": args.events, "warmup_events": warm, "shares": shares.as_dict(), "kinds": dict(kinds)}

    def measure(phase_name: str, stack, call) -> None:
        section = SECTIONS[phase_name]
        print(f"[{time.monotonic() - started:5.0f}s] {section} ...", flush=True)
        phase = stack.phase(phase_name)
        try:
            results[section] = call(phase)
        except Exception as exc:  # noqa: BLE001 - one failed phase must not lose the others' figures
            traceback.print_exc()
            results[section] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            phase.close()
        print(f"         {json.dumps(results[section], default=str)[:300]}", flush=True)

    with Stack("run") as stack:
        print(f"work folder (logs): {stack.work}", flush=True)
        if "b" in args.only:
            measure("b", stack, lambda ph: measure_passthrough(ph, messages, args.passes, args.timeout))
        if "p" in args.only:
            measure("p", stack, lambda ph: measure_processors(ph, messages, warm, args.workers, args.timeout))
        if "p" in args.only and args.profile:
            measure("pprof", stack, lambda ph: measure_processors(ph, messages, warm, 1, args.timeout, profile=True))
        if "e" in args.only:
            measure("e", stack, lambda ph: measure_end_to_end(ph, messages, warm, args.workers, args.timeout))
        messages = []  # the broker holds them no more; neither need we
        if "latency" in args.only:
            e_rate = _get(results, "end_to_end", "events_per_s")
            rate = args.rate or (e_rate / 2 if e_rate else None)
            if rate:
                events, warmup = mix_events(int(rate * args.latency_seconds), shares, seed=5)
                measure("latency", stack, lambda ph: measure_latency(ph, rate, args.latency_seconds, events, warmup,
                                                                     args.workers, args.timeout))
            else:
                results["latency"] = {"error": "no rate: E did not run (or failed) and --rate was not given"}
        if "memory" in args.only:
            measure("memory", stack, lambda ph: measure_memory(ph, args.distinct_ids, max(args.timeout, 600)))
        if "capture" in args.only:
            measure("capture", stack, lambda ph: measure_capture(ph, args.capture_seconds, args.capture_connections,
                                                                 args.capture_batch))
        if "sink" in args.only:
            measure("sink", stack, lambda ph: measure_sink(ph, args.sink_events, timeout=args.timeout))

    add_ratios(results)
    results["targets"] = targets(results)
    results["run"]["seconds"] = round(time.monotonic() - started, 1)
    results["run"]["loadavg_1m_end"] = machine()["loadavg_1m"]
    return results


def add_ratios(results: dict) -> None:
    """P/B (against plain B) and P/B-tx, when both were measured."""
    p = _get(results, "processors", "events_per_s")
    b = _get(results, "passthrough", "plain", "events_per_s")
    btx = _get(results, "passthrough", "transactional", "events_per_s")
    if p is not None and b:
        results["processors"]["p_over_b"] = round(p / b, 3)
    if p is not None and btx:
        results["processors"]["p_over_b_tx"] = round(p / btx, 3)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = run(args)
    print()
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"figures written to {args.json}")
    return results


if __name__ == "__main__":
    main()
