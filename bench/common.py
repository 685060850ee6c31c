"""What the benchmarks share: their own embedded broker and ClickHouse (child processes ended at
exit), a ``Phase`` per measurement on that one broker and ClickHouse (its own topic prefix and
database), producing prepared messages, reading consumer-group progress, CPU seconds and RSS of a
process, and percentiles."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from headwater.embedded.broker import broker_command, wait_for_port  # noqa: E402

#: The project token of every benchmark (team 1).
TOKEN = "phc_bench"
TEAMS = f"{TOKEN}:1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int, field_name: str = "VmRSS") -> int:
    """A process's resident set (``VmRSS``) or its peak (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no {field_name} for pid {pid}")


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass  # RocksDB compacted it away meanwhile
    return total


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` with linear interpolation between the two
    nearest ranks (numpy's default); ``values`` need not be sorted; NaN when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in 0..100")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def machine() -> dict[str, Any]:
    """What the figures were taken on: cores and the load average (a busy machine shows here)."""
    return {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2), "python": sys.version.split()[0]}


class Stack:
    """An embedded broker and ClickHouse for one benchmark run, and the processes it starts."""

    def __init__(self, name: str, database: str = "bench") -> None:
        self.work = Path(tempfile.mkdtemp(prefix=f"headwater-bench-{name}-"))
        self.database = database
        self.children: list[subprocess.Popen] = []
        self.env: dict[str, str] = {}

    def __enter__(self) -> "Stack":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that __exit__ ends the children
        self.kafka_port, self.clickhouse_port = free_port(), free_port()
        self.broker = self.child(broker_command(self.kafka_port), "broker")
        self.clickhouse = self.child([sys.executable, "-m", "headwater.embedded.clickhouse_http", "--data-dir",
                                      str(self.work / "chdb"), "--port", str(self.clickhouse_port)], "clickhouse")
        wait_for_port("127.0.0.1", self.kafka_port, 30)
        wait_for_port("127.0.0.1", self.clickhouse_port, 60)
        self.env = {**os.environ, "HEADWATER_KAFKA_BOOTSTRAP": f"127.0.0.1:{self.kafka_port}",
                    "HEADWATER_CLICKHOUSE_URL": f"http://127.0.0.1:{self.clickhouse_port}/{self.database}",
                    "HEADWATER_TOPIC_PREFIX": "bench_",
                    # the production default: on a busy machine 3 s lost group sessions (ADR 0002: a join takes half of it)
                    "HEADWATER_KAFKA_SESSION_TIMEOUT_MS": "6000",
                    "HEADWATER_DATA_DIR": str(self.work / "data")}
        os.environ.update(self.env)
        return self

    def child(self, command: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.work / f"{name}.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.children.append(process)
        return process

    def headwater(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return self.child([sys.executable, "-m", "headwater.cli", *args], name, env or self.env)

    def stop(self, process: subprocess.Popen, timeout: float = 15.0) -> None:
        """End one child (SIGTERM, then SIGKILL after ``timeout``)."""
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process in self.children:
            self.children.remove(process)

    def phase(self, name: str, **env: str) -> "Phase":
        return Phase.open(self, name, env)

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.children):
            process.terminate()
        for process in reversed(self.children):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # the logs stay in the work folder; ClickHouse's data (hundreds of MB a run) does not
        shutil.rmtree(self.work / "chdb", ignore_errors=True)


@dataclass
class Phase:
    """One measurement on the run's broker and ClickHouse: its own topic prefix (``bench_<name>_``),
    database (``bench_<name>``) and data folder, so phases never read each other's messages, rows,
    consumer groups or state."""

    stack: Stack
    name: str
    env: dict[str, str]
    settings: Any  # headwater.settings.Settings
    processes: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def open(cls, stack: Stack, name: str, extra: dict[str, str]) -> "Phase":
        from headwater.kafka_admin import ensure_topics
        from headwater.settings import Settings

        env = {**stack.env, "HEADWATER_TOPIC_PREFIX": f"bench_{name}_", "HEADWATER_TEAMS": TEAMS,
               "HEADWATER_CLICKHOUSE_URL": f"http://127.0.0.1:{stack.clickhouse_port}/bench_{name}",
               "HEADWATER_DATA_DIR": str(stack.work / name), **extra}
        settings = Settings(topic_prefix=env["HEADWATER_TOPIC_PREFIX"], teams=env["HEADWATER_TEAMS"],
                            clickhouse_url=env["HEADWATER_CLICKHOUSE_URL"], data_dir=Path(env["HEADWATER_DATA_DIR"]),
                            kafka_bootstrap=env["HEADWATER_KAFKA_BOOTSTRAP"])
        ensure_topics(settings)
        return cls(stack, name, env, settings)

    @property
    def topics(self):
        from headwater.topics import TopicNames

        return TopicNames(self.settings.topic_prefix)

    @property
    def database(self) -> str:
        return self.settings.clickhouse.database

    def headwater(self, label: str, *args: str, **env: str) -> subprocess.Popen:
        process = self.stack.headwater(f"{self.name}-{label}", *args, env={**self.env, **env})
        self.processes.append(process)
        return process

    def clickhouse(self):
        """A clickhouse-connect client on the phase's database, migrations applied."""
        from sinks.clickhouse.client import connect
        from sinks.clickhouse.migrate import apply_migrations

        client = connect(self.settings.clickhouse)
        apply_migrations(client, self.database)
        return client

    def close(self) -> None:
        """Stop the phase's processes, then drop its topics so the broker's memory is given back
        (best effort)."""
        for process in reversed(self.processes):
            self.stack.stop(process)
        self.processes.clear()
        try:
            from confluent_kafka.admin import AdminClient

            admin = AdminClient(self.settings.kafka_config())
            names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(self.settings.topic_prefix)]
            if names:
                for future in admin.delete_topics(names, operation_timeout=30).values():
                    future.result(30)
        except Exception as exc:  # noqa: BLE001 - the figures are taken; a broker without deletes keeps them
            print(f"  ({self.name}: topics not deleted: {exc})")


class CpuMeter:
    """CPU seconds of named processes (one pid or several, summed) between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int | Sequence[int]]) -> None:
        self.pids = {name: [p] if isinstance(p, int) else list(p) for name, p in pids.items()}
        self.started: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}

    def start(self) -> "CpuMeter":
        self.started = self._read()
        return self

    def stop(self) -> dict[str, float]:
        now = self._read()
        self.used = {name: now[name] - self.started[name] for name in now}
        return self.used

    def read(self) -> dict[str, float]:
        """CPU seconds each name has used so far (for samples along a run)."""
        return self._read()

    def per_event_us(self, events: int) -> dict[str, float]:
        return {name: round(1e6 * s / events, 1) for name, s in self.used.items()} if events else {}

    def cores(self, seconds: float) -> dict[str, float]:
        return {name: round(s / seconds, 2) for name, s in self.used.items()} if seconds > 0 else {}


def window_rate(stamps_ms: Sequence[int], skip: int) -> tuple[int, float]:
    """Events completed per second after the first ``skip`` completions: with the completion times
    sorted, the events completed after the ``skip``-th one's time, over the time from it to the last
    one. Returns (events counted, seconds); (0, 0.0) when there is no such window."""
    ordered = sorted(stamps_ms)
    if len(ordered) <= skip or skip < 0:
        return 0, 0.0
    start = ordered[skip - 1] if skip > 0 else ordered[0]
    counted = sum(1 for t in ordered if t > start)
    seconds = (ordered[-1] - start) / 1000
    return (counted, seconds) if seconds > 0 else (0, 0.0)


def cpu_in_window(samples: Sequence[dict], counter: str, start: int, end: int, name: str) -> tuple[float, int, float]:
    """From samples ``{"t": s, <counter>: n, "cpu": {name: s}}`` taken along a run: the CPU seconds
    ``name`` used, the events ``counter`` advanced and the seconds between the first sample where
    ``counter`` reached ``start`` and the first where it reached ``end`` (or the last sample)."""
    first = next((s for s in samples if s[counter] >= start), None)
    if first is None:
        return 0.0, 0, 0.0
    last = next((s for s in samples if s[counter] >= end), samples[-1])
    return last["cpu"][name] - first["cpu"][name], last[counter] - first[counter], last["t"] - first["t"]


def rate(events: int, seconds: float) -> int:
    return round(events / seconds) if seconds > 0 else 0


def produce_all(settings, topic: str, messages: Iterable[tuple[bytes, bytes]], **config: Any) -> dict[int, int]:
    """Produce ``(key, value)`` messages as the producers do (murmur2 partitioner, lz4); return
    each partition's end offset (last delivered offset + 1), taken from the delivery reports (Tansu's
    own end offsets are not to be trusted, ADR 0002)."""
    from confluent_kafka import Producer

    ends: dict[int, int] = {}
    failed: list[str] = []

    def delivered(err, msg) -> None:
        if err is not None:
            failed.append(str(err))
        elif msg.offset() + 1 > ends.get(msg.partition(), 0):
            ends[msg.partition()] = msg.offset() + 1

    producer = Producer(settings.kafka_config(**{"linger.ms": 20, "batch.size": 1_000_000, "compression.type": "lz4",
                                                 "partitioner": "murmur2_random", "enable.idempotence": True, "log_level": 4, **config}))
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120) != 0 or failed:
        raise RuntimeError(f"could not fill {topic}: {failed[:3]}")
    return ends


def committed(settings, group: str, topic: str, partitions: Iterable[int]) -> dict[int, int]:
    """A consumer group's committed offsets on ``topic`` (-1001 and friends read as 0)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(settings.kafka_config(**{"group.id": group, "enable.auto.commit": False}))
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in found}
    finally:
        consumer.close()


class GroupProgress:
    """How far a consumer group has read a topic, polled with one long-lived client."""

    def __init__(self, settings, group: str, topic: str, ends: dict[int, int]) -> None:
        from confluent_kafka import Consumer

        self.topic, self.ends = topic, ends
        self.consumer = Consumer(settings.kafka_config(**{"group.id": group, "enable.auto.commit": False}))

    def read(self) -> int:
        from confluent_kafka import TopicPartition

        found = self.consumer.committed([TopicPartition(self.topic, p) for p in self.ends], timeout=10)
        return sum(max(tp.offset, 0) for tp in found)

    @property
    def total(self) -> int:
        return sum(self.ends.values())

    def close(self) -> None:
        self.consumer.close()


def read_topic(settings, topic: str, expected: int, timeout: float, idle: float = 5.0,
               pick: Callable[[Any], Any] | None = None) -> list:
    """Read a whole topic (read_committed, no group) until ``expected`` messages or ``idle`` seconds
    without any, or ``timeout``; return each message's timestamp in ms, or ``pick(message)``."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(settings.kafka_config(**{
        "group.id": f"bench-reader-{time.monotonic_ns()}", "enable.auto.commit": False,
        "isolation.level": "read_committed", "enable.partition.eof": False}))
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    found: list = []
    deadline = time.monotonic() + timeout
    last_seen = time.monotonic()
    try:
        while len(found) < expected and time.monotonic() < deadline and time.monotonic() - last_seen < idle:
            for m in consumer.consume(10_000, 0.5):
                if m.error() is None:
                    found.append(m.timestamp()[1] if pick is None else pick(m))
                    last_seen = time.monotonic()
    finally:
        consumer.close()
    return found


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it is truthy; return its last value (falsy after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_for_rows(count, total: int, processes: dict[str, subprocess.Popen],
                  timeout: float | None = None) -> tuple[int, int, float, dict[str, float]]:
    """Waits for the first row, then for ``total`` (or ``timeout`` seconds in all); returns (rows at
    first sight, rows at the end, seconds between, CPU seconds each process used meanwhile)."""
    deadline = time.monotonic() + timeout if timeout else float("inf")
    while (first := count()) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.perf_counter()
    cpu = {name: cpu_seconds(p.pid) for name, p in processes.items()}
    while (last := count()) < total and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    return first, last, elapsed, {name: cpu_seconds(p.pid) - cpu[name] for name, p in processes.items()}
