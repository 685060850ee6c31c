"""What the benchmarks share: their own embedded broker and ClickHouse, as child processes ended at
exit, and the CPU seconds a process has used."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from headwater.embedded.broker import broker_command, wait_for_port  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stack:
    """An embedded broker and ClickHouse for one benchmark, and the processes it starts."""

    def __init__(self, name: str, database: str = "bench") -> None:
        self.work = Path(tempfile.mkdtemp(prefix=f"headwater-bench-{name}-"))
        self.database = database
        self.children: list[subprocess.Popen] = []
        self.env: dict[str, str] = {}

    def __enter__(self) -> "Stack":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that __exit__ ends the children
        kafka_port, ch_port = free_port(), free_port()
        self.child(broker_command(kafka_port), "broker")
        self.clickhouse = self.child([sys.executable, "-m", "headwater.embedded.clickhouse_http", "--data-dir",
                                      str(self.work / "chdb"), "--port", str(ch_port)], "clickhouse")
        wait_for_port("127.0.0.1", kafka_port, 30)
        wait_for_port("127.0.0.1", ch_port, 60)
        self.env = {**os.environ, "HEADWATER_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
                    "HEADWATER_CLICKHOUSE_URL": f"http://127.0.0.1:{ch_port}/{self.database}",
                    "HEADWATER_TOPIC_PREFIX": "bench_", "HEADWATER_KAFKA_SESSION_TIMEOUT_MS": "3000",
                    "HEADWATER_DATA_DIR": str(self.work / "data")}
        os.environ.update(self.env)
        return self

    def child(self, command: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.work / f"{name}.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.children.append(process)
        return process

    def headwater(self, name: str, *args: str) -> subprocess.Popen:
        return self.child([sys.executable, "-m", "headwater.cli", *args], name, self.env)

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.children):
            process.terminate()
        for process in reversed(self.children):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_rows(count, total: int, processes: dict[str, subprocess.Popen]) -> tuple[int, int, float, dict[str, float]]:
    """Waits for the first row, then for ``total``; returns (rows at first sight, rows at the end,
    seconds between, CPU seconds each process used meanwhile)."""
    while (first := count()) == 0:
        time.sleep(0.05)
    started = time.perf_counter()
    cpu = {name: cpu_seconds(p.pid) for name, p in processes.items()}
    while (last := count()) < total:
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    return first, last, elapsed, {name: cpu_seconds(p.pid) - cpu[name] for name, p in processes.items()}
