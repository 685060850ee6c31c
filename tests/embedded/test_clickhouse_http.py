"""EmbeddedClickHouse against real chDB and unchanged clickhouse-connect / plain urllib (no mocks)."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import clickhouse_connect
import lz4.frame
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from headwater.embedded.clickhouse_http import EmbeddedClickHouse

REPO_ROOT = Path(__file__).resolve().parents[2]
USERS = {"default": ("", False), "ro": ("ro-secret", True)}


@pytest.fixture
def server(tmp_path):
    with EmbeddedClickHouse(tmp_path / "ch", port=0, users=USERS) as srv:
        yield srv


def client(srv: EmbeddedClickHouse, **kw):
    return clickhouse_connect.get_client(host=srv.host, port=srv.port, **kw)


def http(srv: EmbeddedClickHouse, body: bytes | None = None, path: str = "/", headers: dict | None = None, **params):
    url = srv.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def test_clickhouse_connect_roundtrip(server):
    c = client(server)
    assert c.ping()
    assert c.server_version == server.version
    c.command("CREATE DATABASE IF NOT EXISTS hw")
    c.command("CREATE TABLE hw.events (id UInt64, name String, value Float64) ENGINE = MergeTree ORDER BY id")
    rows = [(i, f"n{i % 100}", i * 0.5) for i in range(100_000)]
    started = time.perf_counter()
    summary = c.insert("hw.events", rows, column_names=["id", "name", "value"])  # lz4 by default
    rate = len(rows) / (time.perf_counter() - started)
    assert summary.written_rows == 100_000
    print(f"\ninsert rate (lz4, 100k rows): {rate:,.0f} rows/s")
    plain = client(server, compress=False)
    plain.insert("hw.events", [(i + 100_000, "x", 1.0) for i in range(100_000)], column_names=["id", "name", "value"])

    assert c.query("SELECT count(), sum(id) FROM hw.events").result_rows == [(200_000, sum(range(200_000)))]
    res = c.query("SELECT id, name, value FROM hw.events WHERE id < {limit:UInt32} ORDER BY id", parameters={"limit": 3})
    assert res.column_names == ("id", "name", "value")
    assert res.result_rows == [(0, "n0", 0.0), (1, "n1", 0.5), (2, "n2", 1.0)]
    assert c.command("SELECT count() FROM events", settings={"database": "hw"}) == 200_000
    db_client = client(server, database="hw")
    assert db_client.query("SELECT count() FROM events WHERE name = 'x'").result_rows == [(100_000,)]
    pd = pytest.importorskip("pandas")
    df = c.query_df("SELECT id, name FROM hw.events ORDER BY id LIMIT 2")
    assert isinstance(df, pd.DataFrame) and df["id"].tolist() == [0, 1] and df["name"].tolist() == ["n0", "n1"]


def test_url_settings_reach_the_engine(server):
    c = client(server)
    c.command("CREATE TABLE dedup (a UInt32) ENGINE = MergeTree ORDER BY a SETTINGS non_replicated_deduplication_window = 100")
    c.insert("dedup", [(1,), (2,)], settings={"insert_deduplication_token": "t1"})
    c.insert("dedup", [(1,), (2,)], settings={"insert_deduplication_token": "t1"})
    c.insert("dedup", [(3,)], settings={"insert_deduplication_token": "t1"})  # same token: dropped
    c.insert("dedup", [(3,)], settings={"insert_deduplication_token": "t2"})
    assert c.query("SELECT a FROM dedup ORDER BY a").result_rows == [(1,), (2,), (3,)]
    assert c.command("SELECT getSetting('max_threads')", settings={"max_threads": 3}) == 3
    assert c.command("SELECT getSetting('max_threads')") != 3  # settings do not leak between requests
    with pytest.raises(DatabaseError, match="Code: 115"):
        c.command("SELECT 1", settings={"no_such_setting_xyz": 1})


def test_errors(server):
    c = client(server)
    with pytest.raises(DatabaseError, match="Code: 62") as syntax:
        c.query("SELEC 1")
    assert syntax.value.code == 62
    with pytest.raises(DatabaseError, match="Code: 60"):
        c.query("SELECT * FROM no_such_table")
    with pytest.raises(DatabaseError, match="Code: 62"):
        c.command("SELECT 1; SELECT 2")
    status, body, headers = http(server, b"SELEC 1")
    assert status == 400 and headers["X-ClickHouse-Exception-Code"] == "62"
    assert body.startswith(b"Code: 62. DB::Exception: Syntax error") and b"(SYNTAX_ERROR) (version " in body
    status, body, headers = http(server, b"SELECT * FROM no_such_table")
    assert status == 404 and headers["X-ClickHouse-Exception-Code"] == "60" and b"(UNKNOWN_TABLE)" in body
    status, body, headers = http(server, b"SELECT * FROM no_such_db.t")
    assert status == 404 and headers["X-ClickHouse-Exception-Code"] == "81"
    status, body, headers = http(server, b"SELECT throwIf(1)")
    assert status == 500 and headers["X-ClickHouse-Exception-Code"] == "395"


def test_plain_http(server):
    assert http(server, path="/ping")[:2] == (200, b"Ok.\n")
    assert http(server)[:2] == (200, b"Ok.\n")
    status, body, headers = http(server, b"SELECT 1")
    assert (status, body) == (200, b"1\n")
    assert headers["X-ClickHouse-Format"] == "TabSeparated" and headers["X-ClickHouse-Timezone"]
    assert headers["X-ClickHouse-Query-Id"] and headers["X-ClickHouse-Server-Display-Name"]
    assert http(server, query="SELECT 1 + {x:UInt8}", param_x="2")[:2] == (200, b"3\n")  # GET
    status, body, _ = http(server, query="CREATE TABLE nope (a UInt8) ENGINE = Memory")  # GET is read-only
    assert status == 500 and body.startswith(b"Code: 164.")
    status, body, headers = http(server, b"SELECT number AS n FROM numbers(2) FORMAT JSONEachRow")
    assert body == b'{"n":0}\n{"n":1}\n' and headers["X-ClickHouse-Format"] == "JSONEachRow"
    status, body, headers = http(server, b"CREATE TABLE kv (k String, v UInt32) ENGINE = MergeTree ORDER BY k")
    assert (status, body) == (200, b"") and "X-ClickHouse-Format" not in headers
    # query in the body followed by data; query in the URL with lz4 (two frames) or gzip data
    assert http(server, b"INSERT INTO kv FORMAT CSV\na,1\nb,2\n")[0] == 200
    lz = lz4.frame.compress(b"c,3\n") + lz4.frame.compress(b"d,4\n")
    status, _, headers = http(server, lz, headers={"Content-Encoding": "lz4"}, query="INSERT INTO kv FORMAT CSV")
    assert status == 200 and '"written_rows":"2"' in headers["X-ClickHouse-Summary"]
    assert http(server, gzip.compress(b"e,5\n"), headers={"Content-Encoding": "gzip"}, query="INSERT INTO kv FORMAT CSV")[0] == 200
    assert http(server, b"('f', 6)", query="INSERT INTO kv VALUES")[0] == 200
    status, body, _ = http(server, b"SELECT k, v FROM kv ORDER BY k FORMAT CSV", headers={"X-ClickHouse-Database": "default"})
    assert body == b'"a",1\n"b",2\n"c",3\n"d",4\n"e",5\n"f",6\n'


def test_read_only_user_and_auth(server):
    admin = client(server)
    admin.command("CREATE TABLE t (a UInt8) ENGINE = MergeTree ORDER BY a")
    admin.insert("t", [(1,), (2,)])
    ro = client(server, username="ro", password="ro-secret")
    assert ro.query("SELECT count() FROM t").result_rows == [(2,)]
    for attempt in (lambda: ro.insert("t", [(3,)]), lambda: ro.command("INSERT INTO t VALUES (3)"),
                    lambda: ro.command("CREATE TABLE t2 (a UInt8) ENGINE = Memory"), lambda: ro.command("DROP TABLE t")):
        with pytest.raises(DatabaseError, match="Code: 164"):
            attempt()
    assert admin.command("SELECT count() FROM t") == 2
    with pytest.raises(DatabaseError, match="516"):
        client(server, username="ro", password="wrong")
    status, body, headers = http(server, b"SELECT 1", headers={"X-ClickHouse-User": "nobody", "X-ClickHouse-Key": "x"})
    assert status == 403 and headers["X-ClickHouse-Exception-Code"] == "516" and b"AUTHENTICATION_FAILED" in body
    assert http(server, b"SELECT 1", user="ro", password="ro-secret")[:2] == (200, b"1\n")


def test_persistence(tmp_path):
    with EmbeddedClickHouse(tmp_path / "ch", port=0) as srv:
        c = client(srv)
        c.command("CREATE TABLE p (a UInt32) ENGINE = MergeTree ORDER BY a")
        c.insert("p", [(i,) for i in range(1000)])
    srv.stop()  # idempotent
    with EmbeddedClickHouse(tmp_path / "ch", port=0) as srv:
        assert client(srv).query("SELECT count(), sum(a) FROM p").result_rows == [(1000, sum(range(1000)))]


def test_concurrent_clients(server):
    client(server).command("CREATE TABLE c (worker UInt8, i UInt32) ENGINE = MergeTree ORDER BY (worker, i)")
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            c = client(server)
            for batch in range(10):
                c.insert("c", [(worker, batch * 500 + i) for i in range(500)])
                got = c.query("SELECT count(), max(i) FROM c WHERE worker = {w:UInt8}", parameters={"w": worker})
                assert got.result_rows == [((batch + 1) * 500, (batch + 1) * 500 - 1)]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert client(server).query("SELECT worker, count() FROM c GROUP BY worker ORDER BY worker").result_rows == [
        (w, 5000) for w in range(4)
    ]


def test_child_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "headwater.embedded.clickhouse_http", "--data-dir", str(tmp_path / "ch"), "--port", str(port)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as resp:
                    assert resp.read() == b"Ok.\n"
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not answer /ping in time"
                time.sleep(0.05)
        c = clickhouse_connect.get_client(host="127.0.0.1", port=port)
        assert c.query("SELECT sum(number) FROM numbers(10)").result_rows == [(45,)]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert b"listening on" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)


def test_insert_select_from_input_takes_the_data_of_the_request(server):
    """``INSERT ... SELECT ... FROM input('structure') FORMAT fmt`` (the sink's raw event insert):
    the rows are converted on the way in, the token deduplicates, and no temporary file is left."""
    c = client(server)
    c.command("CREATE TABLE default.ts (u UUID, t DateTime64(6, 'UTC')) ENGINE = MergeTree ORDER BY u "
              "SETTINGS non_replicated_deduplication_window = 10")
    statement = ("INSERT INTO default.ts (u, t) SELECT u, fromUnixTimestamp64Micro(t, 'UTC') "
                 "FROM input('u UUID, t Int64') FORMAT JSONEachRow")
    body = b'{"u":"0190a1b2-0000-7000-8000-000000000001","t":1700000000123456}\n' \
           b'{"u":"0190a1b2-0000-7000-8000-000000000002","t":0}'
    for _ in range(2):
        c.command(statement, data=body, settings={"insert_deduplication_token": "once"})
    rows = c.query("SELECT toString(u), toUnixTimestamp64Micro(t) FROM default.ts ORDER BY u").result_rows
    assert rows == [("0190a1b2-0000-7000-8000-000000000001", 1700000000123456), ("0190a1b2-0000-7000-8000-000000000002", 0)]
    with pytest.raises(Exception, match="CANNOT_PARSE|Cannot parse"):
        c.command(statement, data=b'{"u":"not a uuid","t":1}')
    assert c.query("SELECT count() FROM default.ts").result_rows == [(2,)]
    leftovers = Path(server.data_dir) / "tmp_inputs"
    assert not leftovers.exists() or not any(leftovers.iterdir())
