"""`headwater up` and `headwater demo` as a user runs them: embedded broker and ClickHouse,
other shells querying while it runs, and Ctrl-C leaving no process behind."""

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import clickhouse_connect
import orjson
import pytest

from producers.backend import Client
from tests.conftest import ROOT, free_port, wait_until
from tests.pipeline.test_capture_endpoint import post

pytestmark = pytest.mark.pipeline


def embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")}
    env.update(
        HEADWATER_EMBEDDED_KAFKA_PORT=str(free_port()),
        HEADWATER_EMBEDDED_CLICKHOUSE_PORT=str(free_port()),
        HEADWATER_CAPTURE_ADDR=f"127.0.0.1:{free_port()}",
        HEADWATER_DATA_DIR=str(tmp_path / "data"),
        HEADWATER_KAFKA_SESSION_TIMEOUT_MS="1000",
        HEADWATER_SINK_BATCH_MS="200",
    )
    return env


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def headwater(env, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "headwater.cli", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_up_serves_sql_capture_and_clients_while_running_and_ctrl_c_stops_every_child(tmp_path):
    env = embedded_env(tmp_path)
    kafka_port, ch_port = env["HEADWATER_EMBEDDED_KAFKA_PORT"], int(env["HEADWATER_EMBEDDED_CLICKHOUSE_PORT"])
    capture_port = int(env["HEADWATER_CAPTURE_ADDR"].rpartition(":")[2])
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen([sys.executable, "-m", "headwater.cli", "up"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    children: list[int] = []
    try:
        def events_table_ready():
            try:
                return clickhouse_connect.get_client(host="127.0.0.1", port=ch_port).query("SELECT count() FROM headwater.events")
            except Exception:
                assert up.poll() is None, (tmp_path / "up.log").read_text()
                return None

        wait_until(events_table_ready, 90, interval=0.3, message="headwater up to be ready")
        children = wait_until(lambda: len(children_of(up.pid)) >= 5 and children_of(up.pid), 30, message="five children")
        # the banner names the capture endpoint, which is up before the banner is printed
        wait_until(lambda: "headwater is up." in (tmp_path / "up.log").read_text(), 30, message="the banner")
        assert f"Capture     http://127.0.0.1:{capture_port}" in (tmp_path / "up.log").read_text()

        client = Client("phc_local", bootstrap=f"127.0.0.1:{kafka_port}")
        for i in range(50):
            client.capture(f"user-{i}", "clicked", {"i": i})
        assert client.flush() == 0
        client.close()
        # a browser or SDK: PostHog's capture API on HEADWATER_CAPTURE_ADDR
        answer = post(("127.0.0.1", capture_port), "/batch/", {"api_key": "phc_local", "batch": [
            {"event": "captured_over_http", "distinct_id": "web-1", "properties": {"$current_url": "https://shop.example/"}}]})
        assert (answer.status, answer.json()) == (200, {"status": "Ok"})

        # another shell: headwater sql
        def sql_count():
            result = headwater(env, "sql", "SELECT count() AS n FROM headwater.events", "--format", "tsv")
            assert result.returncode == 0, result.stderr
            return result.stdout.splitlines()[-1] == "51"

        wait_until(sql_count, 60, interval=0.5, message="headwater sql to count 51 events")
        ch = clickhouse_connect.get_client(host="127.0.0.1", port=ch_port)
        [(distinct_id, properties)] = ch.query(
            "SELECT distinct_id, properties FROM headwater.events WHERE event = 'captured_over_http'").result_rows
        assert distinct_id == "web-1" and orjson.loads(properties)["$ip"] == "127.0.0.1"
        ch.close()

        # another process: clickhouse-connect can query and insert
        ch = clickhouse_connect.get_client(host="127.0.0.1", port=ch_port)
        ch.command("CREATE TABLE IF NOT EXISTS default.scratch (n UInt32) ENGINE = MergeTree ORDER BY n")
        ch.insert("default.scratch", [[i] for i in range(1000)], column_names=["n"])
        assert ch.query("SELECT count(), sum(n) FROM default.scratch").result_rows == [(1000, 499500)]
        ch.close()
    finally:
        up.send_signal(signal.SIGINT)
        try:
            code = up.wait(60)
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
            log.close()
    assert code == 0, (tmp_path / "up.log").read_text()
    assert children, "no children were seen"
    leftovers = [pid for pid in children if is_running(pid)]
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert leftovers == []
    assert "headwater: stopped." in (tmp_path / "up.log").read_text()
    # capture was stopped by SIGTERM, not killed: it answered, flushed and said so
    assert "capture: stopping (1 events accepted)" in (tmp_path / "data" / "logs" / "capture.log").read_text()


def test_demo_prints_a_summary_from_clickhouse_and_writes_the_report(tmp_path):
    env = embedded_env(tmp_path)
    result = headwater(env, "demo", "--users", "40", "--companies", "5", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    lines = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  ") and line.split()}
    sent = int(lines["sent"].split()[0].replace(",", ""))
    assert "40 visitors" in lines["sent"]
    # every event sent landed, and a fresh ClickHouse held nothing else
    assert lines["events"] == f"{sent:,} in ClickHouse" and "note" not in lines
    # each visitor is one person, whatever devices they logged in on (identify merges them)
    persons, distinct_ids = (int(n) for n in re.findall(r"\d+", lines["persons"].replace(",", ""))[:2])
    assert persons == 40 and distinct_ids > persons
    # companies come from groups_latest, with the plan of their latest $groupidentify
    companies = re.fullmatch(r"(\d+) \((.*)\)", lines["companies"])
    assert companies and 1 <= int(companies[1]) <= 5
    assert sum(int(part.split()[0]) for part in companies[2].split(", ")) == int(companies[1])
    assert all(part.split()[1] in ("free", "pro", "enterprise") for part in companies[2].split(", "))
    # the funnel decreases from every visitor
    steps = [int(n) for n in re.findall(r"(?:site|up|project) (\d+)", lines["funnel"])]
    assert len(steps) == 3 and steps[0] == 40 and steps[0] >= steps[1] >= steps[2] > 0
    # web sessions from the SDK's $session_id, and server-side sessions of the billing backend
    sessions = re.match(r"([\d,]+), .* ([\d,]+) from backend events only", lines["sessions"])
    assert sessions and int(sessions[1].replace(",", "")) > int(sessions[2].replace(",", "")) > 0
    # the report, at its default place in the data folder
    report = Path(lines["report"])
    assert report == tmp_path / "data" / "demo-report.html" and "<svg" in report.read_text()


def test_up_refuses_a_taken_capture_address_before_starting_anything(tmp_path):
    env = embedded_env(tmp_path)
    host, _, port = env["HEADWATER_CAPTURE_ADDR"].rpartition(":")
    with socket.create_server((host, int(port))):  # someone else listens there
        result = headwater(env, "up", timeout=60)
    assert result.returncode == 1
    assert f"capture address {host}:{port} is taken" in result.stderr and "HEADWATER_CAPTURE_ADDR" in result.stderr
    assert not (tmp_path / "data" / "logs" / "broker.log").exists()  # nothing was started
