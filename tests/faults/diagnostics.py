"""What a fault test writes when a wait times out (``diagnostics.txt`` beside the process logs):
enough to tell a stalled partition from a lost message without rerunning.

For each consumer group (identity workers, sink) and each partition of its input topics:
- the group's committed offset;
- the log's start and end as a read_uncommitted client sees them (the high watermark) and the
  end a read_committed client sees (the last stable offset, LSO; below the high watermark while
  a transaction is open on the partition);
- how many messages after the committed offset a read_uncommitted and a read_committed reader
  actually get in a short read (more for the first: records behind an open or unresolved
  transaction, which read_committed consumers wait for).
Then the group's members and assignments as the broker describes them, what was done to the
processes and when, each live process's Python stacks with their local variables (``py-spy dump --locals``), and the tail of each log.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from headwater.settings import Settings
from headwater.topics import TopicNames

SHORT_READ_S = 1.5
LOCALS = ("--locals",)  # py-spy shows each frame's local variables: the message a stuck loop handles


def _reader(settings: Settings, isolation: str) -> Consumer:
    return Consumer(settings.kafka_config(**{
        "group.id": f"diagnostics-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
        "isolation.level": isolation, "enable.partition.eof": True, "auto.offset.reset": "earliest"}))


def _readable(settings: Settings, isolation: str, tp: TopicPartition, start: int, limit: int = 200_000) -> int:
    """How many messages a reader of ``isolation`` gets from ``start`` within SHORT_READ_S."""
    reader = _reader(settings, isolation)
    got = 0
    try:
        reader.assign([TopicPartition(tp.topic, tp.partition, max(start, 0))])
        deadline = time.monotonic() + SHORT_READ_S
        while time.monotonic() < deadline and got < limit:
            for m in reader.consume(10_000, 0.2):
                if m.error() is None:
                    got += 1
                elif m.error().code() == -191:  # _PARTITION_EOF: read to what this isolation sees
                    return got
    finally:
        reader.close()
    return got


def offsets_report(settings: Settings, group: str, topics: list[str]) -> list[str]:
    lines = [f"group {group}:", "  topic[partition]  committed  start  end(HW)  end(LSO)  lag(HW)  "
             "read_uncommitted  read_committed"]
    uncommitted, committed_reader = _reader(settings, "read_uncommitted"), _reader(settings, "read_committed")
    group_reader = Consumer(settings.consumer_config(group))
    try:
        metadata = uncommitted.list_topics(timeout=10)
        tps = [TopicPartition(t, p) for t in topics if t in metadata.topics for p in sorted(metadata.topics[t].partitions)]
        committed = {(tp.topic, tp.partition): tp.offset for tp in group_reader.committed(tps, timeout=10)}
        for tp in tps:
            low, high = uncommitted.get_watermark_offsets(tp, timeout=5, cached=False)
            _, stable = committed_reader.get_watermark_offsets(tp, timeout=5, cached=False)
            done = committed[(tp.topic, tp.partition)]
            start = done if done >= 0 else low
            flag = "  <-- LSO below HW" if stable < high else ""
            lines.append(f"  {tp.topic}[{tp.partition}]  {done}  {low}  {high}  {stable}  {high - start}  "
                         f"{_readable(settings, 'read_uncommitted', tp, start)}  "
                         f"{_readable(settings, 'read_committed', tp, start)}{flag}")
    except Exception as exc:  # a diagnosis must not hide the failure it diagnoses
        lines.append(f"  (offsets not read: {exc!r})")
    finally:
        for c in (uncommitted, committed_reader, group_reader):
            c.close()
    return lines


def group_report(settings: Settings, group: str) -> list[str]:
    try:
        admin = AdminClient(settings.kafka_config())  # kept until the result: its handle serves it
        description = admin.describe_consumer_groups([group], request_timeout=10)[group].result(timeout=15)
    except Exception as exc:
        return [f"group {group}: not described ({exc!r})"]
    lines = [f"group {group}: state {description.state}, coordinator {description.coordinator}"]
    for member in description.members:
        assigned = sorted((tp.topic, tp.partition) for tp in member.assignment.topic_partitions)
        lines.append(f"  member {member.client_id} ({member.member_id[-12:]}): {assigned}")
    return lines


def stacks(pid: int) -> str:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        return subprocess.run([py_spy, "dump", *LOCALS, "--pid", str(pid)], capture_output=True, text=True, timeout=20).stdout
    except Exception as exc:
        # every component prints its threads' stacks on SIGUSR1 (headwater/cli.py): into its log
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
        return f"(py-spy dump failed: {exc!r}; SIGUSR1 sent: the stacks are in the process's log below)"


def dump(settings: Settings, deployment, reason: str, extra: str = "") -> str:
    names = TopicNames(settings.topic_prefix)
    prefix = settings.topic_prefix
    lines = [f"=== diagnostics at {time.strftime('%H:%M:%S')}: {reason}", ""]
    lines += ["processes (None = running):", *(f"  {n}: {code}" for n, code in deployment.alive().items()), ""]
    lines += ["what was done:", *(f"  {e}" for e in deployment.events), ""]
    lines += offsets_report(settings, f"{prefix}headwater-identity", [names.events_raw, names.identity_inbox])
    # the changelog is not consumed by the group (no committed offset) but read to a marker by
    # every restore: an unresolved transaction on it stops a restore, and the worker with it
    lines += offsets_report(settings, f"{prefix}headwater-identity", [names.identity_changelog])
    lines += offsets_report(settings, f"{prefix}headwater-sink", [
        names.events_enriched, names.persons, names.person_distinct_ids, names.groups, names.group_types,
        names.ingestion_warnings, names.events_dead_letter])
    lines += [""] + group_report(settings, f"{prefix}headwater-identity") + group_report(settings, f"{prefix}headwater-sink")
    if extra:
        lines += ["", extra]
    for name, process in deployment.processes.items():
        if process.poll() is None:
            lines += ["", f"--- py-spy dump of {name} (pid {process.pid})", stacks(process.pid)]
    for log in sorted(Path(deployment.log_dir).glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-80:]
        lines += ["", f"--- last {len(tail)} lines of {log.name}", *tail]
    text = "\n".join(lines)
    with open(Path(deployment.log_dir) / "diagnostics.txt", "a") as out:
        out.write(text + "\n\n")
    print(text)
    return text
