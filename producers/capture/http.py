"""A small HTTP/1.1 server on asyncio streams: just what capture needs, nothing else.

Keep-alive, ``Content-Length`` and chunked bodies, ``Expect: 100-continue``, a body limit chosen
per path before the body is read (413 without reading it), timeouts for idle connections (closed)
and slow bodies (408). No TLS, no HTTP/2, no pipelining beyond reading requests one after
another: put a load balancer or reverse proxy in front in production, as with PostHog's capture.

The application is one coroutine ``handle(Request) -> Response``; ``body_limit(method, path)``
says how large a body the path takes (a larger one is answered 413 without being read).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
IDLE_TIMEOUT_S = 75.0  # keep-alive: above the 60 s idle timeout of common load balancers
BODY_TIMEOUT_S = 30.0

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    411: "Length Required", 413: "Payload Too Large", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    503: "Service Unavailable",
}


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    client_ip: str


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"


class HttpError(Exception):
    """A request the server itself refuses (bad framing, too large, too slow)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


Handler = Callable[[Request], Awaitable[Response]]
BodyLimit = Callable[[str, str], int]
Cors = Callable[[str, dict[str, str]], list[tuple[str, str]]]
ErrorBody = Callable[[HttpError], Response]


def parse_head(head: bytes) -> tuple[str, str, str, str, dict[str, str]]:
    """Request line and headers → (method, path, query, version, headers)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HttpError(400, "bad_request", "undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "bad_request", "malformed request line")
    method, target, version = parts
    path, _, query = target.partition("?")
    if not path.startswith("/"):
        if path.startswith(("http://", "https://")):  # absolute form
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        else:
            raise HttpError(400, "bad_request", "malformed request target")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, "bad_request", "malformed header line")
        name = name.lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return method, path, query, version, headers


def render(response: Response, extra_headers: list[tuple[str, str]], close: bool) -> bytes:
    status = response.status
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
    if status != 204:
        lines.append(f"Content-Type: {response.content_type}")
        lines.append(f"Content-Length: {len(response.body)}")
    for name, value in response.headers:
        lines.append(f"{name}: {value}")
    for name, value in extra_headers:
        lines.append(f"{name}: {value}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + response.body if status != 204 else head


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HttpError(400, "bad_request", "malformed chunk size") from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return bytes(body)
        if len(body) + size > limit:
            raise HttpError(413, "payload_too_large", f"request body is larger than {limit} bytes")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError(400, "bad_request", "malformed chunk")


class HttpServer:
    """Serves ``handle`` on ``host:port``; ``close()`` stops accepting and waits for the
    requests in progress (each is answered: no request is cut off after Kafka took it)."""

    def __init__(self, handle: Handler, body_limit: BodyLimit, error_response: ErrorBody, cors: Cors) -> None:
        self.handle = handle
        self.body_limit = body_limit
        self.error_response = error_response
        self.cors = cors
        self._server: asyncio.base_events.Server | None = None
        self._busy: set[asyncio.Task] = set()
        self._connections: set[asyncio.StreamWriter] = set()
        self._closing = False

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._connection, host, port, limit=MAX_HEAD_BYTES,
                                                  reuse_address=True, backlog=1024)
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def close(self, timeout: float = 30.0) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self._busy:
            await asyncio.wait(list(self._busy), timeout=timeout)
        for writer in list(self._connections):
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover
                pass
        peer = writer.get_extra_info("peername")
        peer_ip = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        self._connections.add(writer)
        try:
            while not self._closing:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT_S):
                        head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    await self._refuse(writer, HttpError(431, "headers_too_large", "request head is too large"), "", {})
                    return
                task = asyncio.current_task()
                assert task is not None
                self._busy.add(task)
                try:
                    keep = await self._one_request(head, reader, writer, peer_ip)
                finally:
                    self._busy.discard(task)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter, error: HttpError, method: str, headers: dict[str, str]) -> None:
        response = self.error_response(error)
        writer.write(render(response, self.cors(method, headers), close=True))
        try:
            await writer.drain()
        except ConnectionError:
            pass

    async def _one_request(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           peer_ip: str) -> bool:
        """Read, handle and answer one request; return whether the connection stays open."""
        method, headers = "", {}
        try:
            method, path, query, version, headers = parse_head(head[:-4])
            body = await self._read_body(reader, writer, headers, self.body_limit(method, path))
        except HttpError as error:
            await self._refuse(writer, error, method, headers)
            return False
        except (TimeoutError, asyncio.IncompleteReadError):
            await self._refuse(writer, HttpError(408, "body_read_timeout", "request body not received in time"), method, headers)
            return False
        except asyncio.LimitOverrunError:
            await self._refuse(writer, HttpError(400, "bad_request", "malformed chunked body"), method, headers)
            return False
        connection = headers.get("connection", "").lower()
        keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        forwarded = headers.get("x-forwarded-for")
        client_ip = forwarded.split(",", 1)[0].strip() if forwarded else peer_ip
        request = Request(method, path, query, headers, body, client_ip)
        try:
            response = await self.handle(request)
        except Exception:
            log.exception("capture: unexpected error answering %s %s", method, path)
            response = self.error_response(HttpError(500, "internal_error", "internal error"))
        keep = keep and not self._closing
        data = render(response, self.cors(method, headers), close=not keep)
        if method == "HEAD" and response.body:  # the head of the GET answer, without its body
            data = data[: len(data) - len(response.body)]
        writer.write(data)
        await writer.drain()
        return keep

    async def _read_body(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         headers: dict[str, str], limit: int) -> bytes:
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length_text = headers.get("content-length")
        if chunked and length_text is not None:
            raise HttpError(400, "bad_request", "both Content-Length and chunked Transfer-Encoding")
        if not chunked and not length_text:
            return b""
        length = 0
        if length_text is not None:
            if not length_text.isdigit():
                raise HttpError(400, "bad_request", "malformed Content-Length")
            length = int(length_text)
        if length > limit:
            raise HttpError(413, "payload_too_large", f"request body is larger than {limit} bytes")
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        async with asyncio.timeout(BODY_TIMEOUT_S):
            if chunked:
                return await _read_chunked(reader, limit)
            return await reader.readexactly(length) if length else b""
