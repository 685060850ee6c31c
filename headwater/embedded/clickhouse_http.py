"""ClickHouse HTTP interface (the port-8123 protocol) served on top of an in-process chDB data folder.

Supported: GET ``/`` and ``/ping`` (``Ok.``); queries in the ``query`` URL parameter and/or the
POST body (GET is read-only, as in ClickHouse); streaming ``INSERT ... FORMAT <fmt>`` with the data
after the statement, plain or ``Content-Encoding: lz4`` (one or more frames), ``gzip`` or ``deflate``;
``INSERT ... SELECT ... FROM input('structure') FORMAT <fmt>`` with the data in the request (staged in a
file of the data folder, since chDB's streaming insert takes no SELECT);
multipart/form-data ``query``/``param_*`` fields; server-side parameters (``param_x`` for
``{x:Type}``); any ClickHouse setting given as a URL parameter (applied to that request only);
``database`` / ``X-ClickHouse-Database``; ``default_format`` / ``X-ClickHouse-Format``; users with
passwords and an optional read-only flag (Basic auth, ``X-ClickHouse-User``/``X-ClickHouse-Key`` or
``user``/``password``); ClickHouse error bodies, ``X-ClickHouse-Exception-Code`` and status codes;
``X-ClickHouse-Summary``/``-Query-Id``/``-Format``/``-Timezone``/``-Server-Display-Name`` headers.
clickhouse-connect works unchanged (default settings, lz4 inserts).

Not supported: sessions (``session_id`` is accepted and ignored, so ``SET``, ``USE`` and temporary
tables do not outlive their request), external data (multipart files), ClickHouse's own block
compression (``compress=1``/``decompress=1``), compressed responses (always sent uncompressed,
without ``Content-Encoding``), progress headers, multi-statement requests (rejected, as in
ClickHouse), and query cancellation. Responses are buffered, not streamed. All engine calls are
serialized by one lock. chDB hosts one engine per process, so run at most one server per process.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import hmac
import http.server
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
import zlib
from contextlib import suppress
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import parse_qsl, urlsplit

import chdb
import lz4.frame

log = logging.getLogger(__name__)

# URL parameters that belong to the HTTP layer, not to the engine; they are never sent as settings.
_HTTP_ONLY = frozenset(
    "query database default_format user password quota_key query_id session_id session_timeout session_check "
    "compress decompress buffer_size wait_end_of_query http_wait_end_of_query enable_http_compression "
    "http_zlib_compression_level http_native_compression_disable_checksumming_on_decompress "
    "send_progress_in_http_headers http_headers_progress_interval_ms cancel_http_readonly_queries_on_client_close "
    "client_protocol_version role stacktrace add_http_cors_header http_response_buffer_size".split()
)
_STATUS_BY_NAME = {
    name: status
    for status, names in (
        (401, "REQUIRED_PASSWORD"),
        (403, "UNKNOWN_USER WRONG_PASSWORD AUTHENTICATION_FAILED SET_NON_GRANTED_ROLE ACCESS_DENIED"),
        (400, "BAD_ARGUMENTS CANNOT_COMPILE_REGEXP CANNOT_PARSE_TEXT CANNOT_PARSE_ESCAPE_SEQUENCE "
              "CANNOT_PARSE_QUOTED_STRING CANNOT_PARSE_DATE CANNOT_PARSE_DATETIME CANNOT_PARSE_NUMBER "
              "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING CANNOT_PARSE_IPV4 CANNOT_PARSE_IPV6 CANNOT_PARSE_UUID "
              "CANNOT_PARSE_INPUT_ASSERTION_FAILED DUPLICATE_COLUMN ILLEGAL_COLUMN UNKNOWN_ELEMENT_IN_AST "
              "UNKNOWN_TYPE_OF_AST_NODE THERE_IS_NO_COLUMN TOO_DEEP_AST TOO_BIG_AST UNEXPECTED_AST_STRUCTURE "
              "SYNTAX_ERROR INCORRECT_DATA TYPE_MISMATCH VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE"),
        (404, "UNKNOWN_TABLE UNKNOWN_FUNCTION UNKNOWN_IDENTIFIER UNKNOWN_TYPE UNKNOWN_STORAGE UNKNOWN_DATABASE "
              "UNKNOWN_SETTING UNKNOWN_DIRECTION_OF_SORTING UNKNOWN_AGGREGATE_FUNCTION UNKNOWN_FORMAT "
              "UNKNOWN_DATABASE_ENGINE UNKNOWN_TYPE_OF_QUERY UNKNOWN_ROLE"),
        (413, "QUERY_IS_TOO_LARGE"), (501, "NOT_IMPLEMENTED"), (411, "HTTP_LENGTH_REQUIRED"),
        (503, "SOCKET_TIMEOUT CANNOT_OPEN_FILE CANNOT_SCHEDULE_TASK"), (408, "TIMEOUT_EXCEEDED"),
        (415, "UNSUPPORTED_MEDIA_TYPE"),
    )
    for name in names.split()
}
_CODE_RE = re.compile(r"Code: (\d+)\. ")
_FORMAT_RE = re.compile(rb"\sFORMAT\s+(\w+)[ \t]*(?:\r?\n)?", re.I)
_INSERT_RE = re.compile(rb"\s*(?:(?:--[^\n]*\n|/\*.*?\*/)\s*)*INSERT\s", re.I | re.S)
_VALUES_RE = re.compile(rb"\bVALUES\b", re.I)
_OUT_FORMAT_RE = re.compile(r"\bFORMAT\s+(\w+)(?:\s+SETTINGS\b[^;]*)?\s*;?\s*$", re.I | re.S)
_INPUT_RE = re.compile(r"\binput\s*\(", re.I)  # the input() table function of INSERT ... SELECT
_SETTING_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HEAD_LIMIT = 1 << 20
_MAX_CACHED_CONNECTIONS = 8
_BASE_KEY: tuple = (None, (), False)
_READ_ONLY, _CONTROL, _UNKNOWN = 0, 3, 4  # chdb query_class values


class ClickHouseError(Exception):
    """An error reported to the client as ClickHouse does: ``Code: N. DB::Exception: ... (NAME)``."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(f"Code: {code}. DB::Exception: {message}. ({name})")
        self.code, self.name = code, name


def _error_from(exc: BaseException) -> tuple[int, str, str]:
    """(code, NAME, text without version) from a chDB or our own exception."""
    text = str(exc)
    m = _CODE_RE.search(text)
    if not m:
        return 1001, "STD_EXCEPTION", f"Code: 1001. DB::Exception: {type(exc).__name__}: {text}. (STD_EXCEPTION)"
    text = re.sub(r"^(Code: \d+\. DB::Exception: )\1", r"\1", text[m.start():].strip())
    text = re.sub(r" \(version [^)]*\)", "", text)
    text = re.sub(r"\((\w+)\)\. \(\1\)$", r"(\1)", text)
    names = re.findall(r"\(([A-Z][A-Z0-9_]+)\)", text)
    return int(m.group(1)), names[-1] if names else "", text


def _content_type(fmt: str) -> str:
    f = fmt.lower()
    if f.startswith(("tabseparated", "tsv")):
        return "text/tab-separated-values; charset=UTF-8"
    if f.startswith("csv"):
        return "text/csv; charset=UTF-8; header=" + ("present" if "withnames" in f else "absent")
    if f.startswith("json"):
        each = "eachrow" in f or f in ("jsonlines", "jsonstringseachrow")
        return ("application/x-ndjson" if each else "application/json") + "; charset=UTF-8"
    if f.startswith(("native", "rowbinary", "parquet", "arrow", "orc", "avro", "protobuf", "capnproto", "msgpack")):
        return "application/octet-stream"
    return "text/xml; charset=UTF-8" if f == "xml" else "text/plain; charset=UTF-8"


def _decompressed(chunks: Iterable[bytes], encoding: str) -> Iterator[bytes]:
    """Decode a request body given as raw chunks; concatenated lz4 frames / gzip members are all read."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        yield from chunks
        return
    if encoding == "lz4":
        new = lz4.frame.LZ4FrameDecompressor
    elif encoding in ("gzip", "x-gzip", "deflate"):
        def new():
            return zlib.decompressobj(47)  # gzip or zlib header, auto-detected
    else:
        raise ClickHouseError(48, "NOT_IMPLEMENTED", f"Content-Encoding {encoding!r} is not supported by this server")
    dec = new()
    for chunk in chunks:
        while chunk:
            out = dec.decompress(chunk)
            if out:
                yield out
            chunk = dec.unused_data if dec.eof else b""
            if dec.eof:
                dec = new()


def _split_insert(query: str, body: Iterator[bytes]) -> tuple[str, str | None, Iterator[bytes]]:
    """Split the request (``query`` parameter, a newline, then the body) into statement text and data.

    Returns ``(sql, None, empty)`` for an ordinary statement, or ``(insert head without FORMAT, format,
    data chunks)`` for ``INSERT ... FORMAT fmt``. Data starts after the newline ending the FORMAT name.
    """
    pieces = chain([(query + "\n").encode()] if query else [], body)
    buf = bytearray()
    for chunk in pieces:
        buf += chunk
        m = _FORMAT_RE.search(buf)
        if (m and m.end() < len(buf)) or len(buf) > _HEAD_LIMIT:
            break
    m = _FORMAT_RE.search(buf) if _INSERT_RE.match(buf) else None
    if m and not _VALUES_RE.search(buf, 0, m.start()):
        data = chain([bytes(buf[m.end():])], pieces)
        return buf[: m.start()].decode("utf-8", "replace").strip(), m.group(1).decode(), data
    buf += b"".join(pieces)
    return buf.decode("utf-8", "replace"), None, iter(())


def _sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class EmbeddedClickHouse:
    """Serves the ClickHouse HTTP interface for one chDB data folder on ``host:port`` (``port=0``: any)."""

    def __init__(self, data_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8123,
                 users: dict[str, tuple[str, bool]] | None = None) -> None:
        self.data_dir = str(Path(data_dir).resolve())
        self.host, self._port = host, port
        self.users = dict(users) if users is not None else {"default": ("", False)}
        self.display_name = socket.gethostname()
        self.version = self.timezone = ""
        self._lock = threading.Lock()
        self._conns: dict[tuple, object] = {}
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> EmbeddedClickHouse:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._httpd is not None:
            return
        os.makedirs(self.data_dir, exist_ok=True)
        with self._lock:
            conn = chdb.connect(self.data_dir)
            self._conns[_BASE_KEY] = conn
            row = conn.query("SELECT version(), timezone()", "TabSeparated").bytes().decode()
            self.version, self.timezone = row.strip().split("\t")
        try:
            httpd = _Server((self.host, self._port), _Handler)
        except BaseException:
            self._close_connections()
            raise
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"clickhouse-http-{self.port}", daemon=True)
        self._thread.start()
        log.info("ClickHouse HTTP interface (chDB %s) for %s listening on %s", self.version, self.data_dir, self.url)

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        for sock in list(httpd.clients):  # wake idle keep-alive handlers
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()
        self._close_connections()

    def _close_connections(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
            for conn in conns:
                with suppress(Exception):
                    conn.close()

    def _connection(self, settings: dict[str, str], database: str | None, readonly: bool, throwaway: bool):
        """A chDB connection with the request's database and settings applied (call with the lock held)."""
        if readonly and settings.get("readonly") not in ("1", "2"):
            settings = {**settings, "readonly": "2"}  # like ClickHouse's GET: reads and SET only
        items = sorted(settings.items(), key=lambda kv: kv[0] == "readonly")  # readonly last
        key = (database or None, tuple(items), readonly)
        if not throwaway and key in self._conns:
            return self._conns[key], False
        conn = chdb.connect(self.data_dir)
        try:
            if database:
                conn.query("USE `" + database.replace("\\", "\\\\").replace("`", "\\`") + "`", "TabSeparated")
            for name, value in items:
                if not _SETTING_RE.match(name):
                    raise ClickHouseError(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
                conn.query(f"SET {name} = {_sql_string(value)}", "TabSeparated")
        except BaseException:
            conn.close()
            raise
        if throwaway:
            return conn, True
        if len(self._conns) >= _MAX_CACHED_CONNECTIONS:
            oldest = next(k for k in self._conns if k != _BASE_KEY)
            self._conns.pop(oldest).close()
        self._conns[key] = conn
        return conn, False

    def _execute(self, params: dict[str, str], body: Iterable[bytes], encoding: str = "",
                readonly: bool = False, via_get: bool = False) -> tuple[bytes, dict[str, str]]:
        """Run one request; returns (response body, extra headers). Raises on error."""
        for flag in ("compress", "decompress"):
            if params.get(flag, "0") not in ("", "0"):
                raise ClickHouseError(48, "NOT_IMPLEMENTED", f"'{flag}=1' (ClickHouse block compression) is not supported")
        if params.get("default_format", "").lower() in ("dataframe", "arrowtable", "datastore"):
            raise ClickHouseError(73, "UNKNOWN_FORMAT", f"Unknown format {params['default_format']}")
        sql, fmt, data = _split_insert(params.get("query", ""), _decompressed(body, encoding))
        if not sql.strip():
            raise ClickHouseError(62, "SYNTAX_ERROR", "Empty query")
        settings = {k: v for k, v in params.items() if k not in _HTTP_ONLY and not k.startswith("param_")}
        qparams = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        started = time.perf_counter_ns()
        with self._lock:
            if not self._conns:
                raise ClickHouseError(210, "NETWORK_ERROR", "Server is shutting down")
            info = self._conns[_BASE_KEY]._conn.classify_query(sql if fmt is None else f"{sql} FORMAT {fmt}")
            cls, count = int(info["query_class"].value), info["statement_count"]
            if count > 1:
                raise ClickHouseError(62, "SYNTAX_ERROR", "Syntax error (Multi-statements are not allowed)")
            if readonly and cls not in (_READ_ONLY, _UNKNOWN):
                hint = (". For queries over HTTP, method GET implies readonly. You should use method POST "
                        "for modifying queries") if via_get else ""
                raise ClickHouseError(164, "READONLY", f"Cannot execute query in readonly mode{hint}")
            database = params.get("database")
            conn, temp = self._connection(settings, database, readonly, cls == _CONTROL
                                          or re.match(r"\s*CREATE\s+TEMPORARY\b", sql, re.I) is not None)
            try:
                if fmt is not None and _INPUT_RE.search(sql):
                    out, stats = self._insert_select_from_input(conn, sql, fmt, data)
                elif fmt is not None:
                    inserter = conn.send_insert(sql, fmt)
                    try:
                        for chunk in data:
                            if chunk:
                                inserter.append(chunk)
                        done = inserter.finish()
                    except BaseException:
                        with suppress(Exception):
                            inserter.cancel()
                        raise
                    out, stats = b"", (0, 0, done.rows_written, done.bytes_written, 0, 0)
                else:
                    res = conn.query(sql, params.get("default_format") or "TabSeparated", params=qparams)
                    out = res.bytes()
                    stats = (res.storage_rows_read(), res.storage_bytes_read(), res.rows_written(),
                             res.bytes_written(), res.rows_read(), res.bytes_read())
            finally:
                if temp:
                    conn.close()
        names = ("read_rows", "read_bytes", "written_rows", "written_bytes", "result_rows", "result_bytes")
        summary = {k: str(v) for k, v in zip(names, stats)}
        summary.update(total_rows_to_read=summary["read_rows"], elapsed_ns=str(time.perf_counter_ns() - started))
        headers = {"X-ClickHouse-Summary": json.dumps(summary, separators=(",", ":"))}
        if fmt is None and cls == _READ_ONLY:
            m = _OUT_FORMAT_RE.search(sql)
            out_fmt = m.group(1) if m else params.get("default_format") or "TabSeparated"
            headers.update({"X-ClickHouse-Format": out_fmt, "Content-Type": _content_type(out_fmt)})
        return out, headers

    def _insert_select_from_input(self, conn, sql: str, fmt: str, data: Iterable[bytes]) -> tuple[bytes, tuple]:
        """``INSERT ... SELECT ... FROM input('structure') FORMAT fmt`` with the data in the request:
        chDB's streaming insert takes no SELECT, so the data goes to a file of the data folder first
        and ``input(`` becomes ``file('<that file>', 'fmt', ``; the file is removed afterwards."""
        folder = Path(self.data_dir) / "tmp_inputs"
        folder.mkdir(exist_ok=True)
        path = folder / f"{uuid.uuid4().hex}.{fmt}"
        try:
            with open(path, "wb") as f:
                for chunk in data:
                    f.write(chunk)
            query = _INPUT_RE.sub(lambda m: f"file({_sql_string(str(path))}, {_sql_string(fmt)}, ", sql, count=1)
            res = conn.query(query, "TabSeparated")
            return b"", (res.storage_rows_read(), res.storage_bytes_read(), res.rows_written(),
                         res.bytes_written(), res.rows_read(), res.bytes_read())
        finally:
            with suppress(OSError):
                path.unlink()

    def _authenticate(self, user: str | None, password: str | None) -> bool:
        """Returns the user's read-only flag; raises AUTHENTICATION_FAILED."""
        user, password = user or "default", password or ""
        entry = self.users.get(user)
        if entry is None or not hmac.compare_digest(entry[0].encode(), password.encode()):
            raise ClickHouseError(516, "AUTHENTICATION_FAILED",
                                  f"{user}: Authentication failed: password is incorrect, or there is no user with such name")
        return bool(entry[1])


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: EmbeddedClickHouse

    def __init__(self, *args: object) -> None:
        self.clients: set[socket.socket] = set()
        super().__init__(*args)

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("connection %s ended with an error", client_address, exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version, sys_version = "ClickHouse", ""
    timeout = 600  # idle keep-alive connections are closed after this many seconds

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.clients.add(self.connection)

    def finish(self) -> None:
        self.server.clients.discard(self.connection)
        with suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._handle(post=False)

    def do_POST(self) -> None:
        self._handle(post=True)

    def _body(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16):
                yield self.rfile.read(size)
                self.rfile.readline(1024)
            while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError("request body ended early")
            left -= len(chunk)
            yield chunk

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self, post: bool) -> None:
        owner = self.server.owner
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        query_id = params.get("query_id") or str(uuid.uuid4())
        headers = {"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Server-Display-Name": owner.display_name,
                   "X-ClickHouse-Timezone": owner.timezone}
        try:
            body = list(self._body()) if post else []  # read it all first: the lock is never held on a slow client
        except (OSError, ValueError):
            self.close_connection = True
            return
        try:
            ctype = self.headers.get("Content-Type", "")
            if post and ctype.lower().startswith("multipart/form-data"):
                params.update(_form_fields(ctype, b"".join(body)))
                body = []
            if url.path == "/ping" or (not post and "query" not in params):
                if url.path in ("/", "/ping"):
                    status, out, headers = 200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"}
                else:
                    status, out, headers = 404, f"There is no handle {url.path}\n".encode(), {"Content-Type": "text/plain"}
            else:
                h = self.headers
                user, password = h.get("X-ClickHouse-User"), h.get("X-ClickHouse-Key")
                auth = h.get("Authorization", "")
                if user is None and auth[:6].lower() == "basic ":
                    try:
                        user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
                    except ValueError:
                        user = password = "?"
                if user is None:
                    user, password = params.get("user"), params.get("password", password)
                readonly = owner._authenticate(user, password)
                if h.get("X-ClickHouse-Database"):
                    params.setdefault("database", h["X-ClickHouse-Database"])
                if h.get("X-ClickHouse-Format"):
                    params.setdefault("default_format", h["X-ClickHouse-Format"])
                out, extra = owner._execute(params, body, h.get("Content-Encoding", ""), readonly or not post, not post)
                status, headers = 200, {"Content-Type": "text/plain; charset=UTF-8", **headers, **extra}
        except Exception as exc:  # reported to the client the way ClickHouse does
            code, name, text = _error_from(exc)
            if code == 1001:
                log.exception("unexpected error in request %s", query_id)
            headers.update({"X-ClickHouse-Exception-Code": str(code), "Content-Type": "text/plain; charset=UTF-8"})
            if name == "REQUIRED_PASSWORD":
                headers["WWW-Authenticate"] = 'Basic realm="ClickHouse server HTTP API"'
            status, out = _STATUS_BY_NAME.get(name, 500), f"{text} (version {owner.version})\n".encode()
        try:
            self._reply(status, out, headers)
        except OSError:
            self.close_connection = True


_BOUNDARY_RE = re.compile(r'boundary="?([^";]+)"?', re.I)
_DISPOSITION_RE = re.compile(rb'^content-disposition:\s*form-data;\s*name="([^"]*)"\s*$', re.I)


def _form_fields(ctype: str, body: bytes) -> dict[str, str]:
    """The fields of a multipart/form-data body. Plain fields (one Content-Disposition header, as
    clickhouse-connect sends them) are split directly, because big parameters (the sink's uuid
    lookups) make the email parser slow; anything else goes through the email parser."""
    m = _BOUNDARY_RE.search(ctype)
    if m:
        fields = {}
        delimiter = b"--" + m.group(1).encode("latin-1")
        pieces = body.split(delimiter)
        for piece in pieces[1:-1]:
            head, sep, value = piece.partition(b"\r\n\r\n")
            lines = head.strip(b"\r\n").split(b"\r\n")
            match = _DISPOSITION_RE.match(lines[0]) if len(lines) == 1 and sep else None
            if match is None or not value.endswith(b"\r\n"):
                break
            fields[match.group(1).decode("utf-8", "replace")] = value[:-2].decode("utf-8", "replace")
        else:
            if len(pieces) > 1 and pieces[-1].startswith(b"--"):
                return fields
    return _form_fields_by_email_parser(ctype, body)


def _form_fields_by_email_parser(ctype: str, body: bytes) -> dict[str, str]:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + body)
    fields = {}
    for part in msg.iter_parts():
        if part.get_filename():
            raise ClickHouseError(48, "NOT_IMPLEMENTED", "External data (multipart files) is not supported")
        name = part.get_param("name", header="content-disposition")
        fields[str(name)] = part.get_payload(decode=True).decode("utf-8", "replace")
    return fields


def serve_forever(data_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8123,
                  users: dict[str, tuple[str, bool]] | None = None) -> None:
    """Serve until SIGTERM or SIGINT (call from the main thread), then stop cleanly."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with EmbeddedClickHouse(data_dir, host, port, users):
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="ClickHouse HTTP interface over a chDB data folder")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve_forever(args.data_dir, args.host, args.port)


if __name__ == "__main__":
    main()
