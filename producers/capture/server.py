"""The capture endpoint: routes, the request → Kafka → answer flow, start and stop.

Per capture request: read the body (limit per path) → :func:`rules.prepare_request` (one JSON
decode, every rule, one message per event, nothing sent if anything fails) →
:meth:`AckingProducer.send` (all messages queued at once, answered after the last delivery
report) → 200 ``{"status":"Ok"}`` (204 for ``?beacon=1``), or the rule's error, or 503.

``serve(settings)`` runs it in the foreground until SIGINT/SIGTERM; :class:`CaptureThread` runs
it on a background thread (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import orjson

from headwater import metrics
from headwater.settings import Settings
from headwater.topics import TopicNames

from .http import HttpError, HttpServer, Request, Response
from .kafka import AckingProducer, KafkaUnavailable
from .rules import CAPTURE_PATHS, HEALTH_PATHS, CaptureError, cors_headers, prepare_request, route_path

log = logging.getLogger(__name__)

OK_BODY = b'{"status":"Ok"}'
SMALL_BODY_LIMIT = 64 * 1024  # health and unknown paths
LIVENESS_CACHE_S = 1.0


def error_response(error: CaptureError | HttpError) -> Response:
    return Response(error.status, orjson.dumps({"status": error.status, "code": error.code, "error": error.message}))


def cors_for(method: str, headers: Mapping[str, str]) -> list[tuple[str, str]]:
    preflight = method == "OPTIONS" and "access-control-request-method" in headers
    return cors_headers(headers.get("origin"), headers.get("access-control-request-headers"), preflight)


class CaptureApp:
    """Answers one request at a time per connection; many connections at once."""

    def __init__(self, *, teams: Mapping[str, int], topic: str, producer: AckingProducer, max_message_bytes: int) -> None:
        self.teams = dict(teams)
        self.topic = topic
        self.producer = producer
        self.max_message_bytes = max_message_bytes
        self.accepted = 0  # events acknowledged by Kafka
        self.refused = 0  # requests answered with an error
        self._live: tuple[float, bool] = (0.0, False)

    def body_limit(self, method: str, path: str) -> int:
        return CAPTURE_PATHS.get(route_path(path), SMALL_BODY_LIMIT)

    async def handle(self, request: Request) -> Response:
        path = route_path(request.path)
        method = request.method
        if path in CAPTURE_PATHS:
            if method == "OPTIONS":
                return Response(200, b"")
            if method not in ("GET", "POST"):
                return self._refuse(HttpError(405, "method_not_allowed", f"{method} is not allowed on {path}"))
            return await self._capture(path, request)
        if path in HEALTH_PATHS:
            if method not in ("GET", "HEAD"):
                return self._refuse(HttpError(405, "method_not_allowed", f"{method} is not allowed on {path}"))
            if path == "/_liveness":
                return await self._liveness()
            return Response(200, b"capture", content_type="text/plain")
        return self._refuse(HttpError(404, "not_found", f"no route {path}"))

    def _refuse(self, error: CaptureError | HttpError) -> Response:
        self.refused += 1
        metrics.capture_refused(error.code)
        return error_response(error)

    async def _capture(self, path: str, request: Request) -> Response:
        try:
            prepared = prepare_request(
                path,
                request.body,
                request.headers.get("content-type", ""),
                request.query,
                teams=self.teams,
                now_us=time.time_ns() // 1000,
                ip=request.client_ip,
                max_message_bytes=self.max_message_bytes,
            )
        except CaptureError as error:
            return self._refuse(error)
        try:
            await self.producer.send(self.topic, prepared.messages)
        except KafkaUnavailable as exc:
            log.warning("capture: answering 503, %d events not acknowledged: %s", len(prepared.messages), exc)
            return self._refuse(CaptureError(503, "kafka_unavailable", "transient error, please retry"))
        self.accepted += len(prepared.messages)
        metrics.capture_accepted(len(prepared.messages))
        if "beacon=" in request.query and _is_beacon(request.query):
            return Response(204)
        return Response(200, OK_BODY)

    async def _liveness(self) -> Response:
        """200 while Kafka answers (checked at most once a second), 503 otherwise: like PostHog's
        liveness, which reports its Kafka sink's health."""
        checked_at, live = self._live
        if time.monotonic() - checked_at > LIVENESS_CACHE_S:
            live = await asyncio.get_running_loop().run_in_executor(None, self.producer.reachable, self.topic)
            self._live = (time.monotonic(), live)
        if live:
            return Response(200, b'{"status":"ok"}')
        return error_response(CaptureError(503, "kafka_unavailable", "Kafka is not reachable"))


def _is_beacon(query: str) -> bool:
    from urllib.parse import parse_qs

    values = parse_qs(query).get("beacon", [])
    return bool(values) and values[0].lower() in ("1", "true")


def build_producer(settings: Settings, delivery_timeout_s: float) -> AckingProducer:
    config: dict[str, Any] = settings.kafka_config()
    if settings.max_message_bytes > 1_000_000:
        config.setdefault("message.max.bytes", settings.max_message_bytes + 64 * 1024)
    return AckingProducer(config, delivery_timeout_s=delivery_timeout_s)


class Capture:
    """The app, its HTTP server and its producer, for one event loop."""

    def __init__(self, settings: Settings, *, delivery_timeout_s: float = 10.0) -> None:
        self.producer = build_producer(settings, delivery_timeout_s)
        self.app = CaptureApp(
            teams=settings.team_by_token,
            topic=TopicNames(settings.topic_prefix).events_raw,
            producer=self.producer,
            max_message_bytes=settings.max_message_bytes,
        )
        self.http = HttpServer(self.app.handle, self.app.body_limit, error_response, cors_for)
        metrics.watch_capture(settings)  # the metrics endpoint, if HEADWATER_METRICS_ADDR is set

    async def start(self, host: str, port: int) -> tuple[str, int]:
        return await self.http.start(host, port)

    async def stop(self) -> None:
        """Stop accepting, answer the requests in progress, flush the producer."""
        await self.http.close()
        left = await asyncio.get_running_loop().run_in_executor(None, self.producer.close)
        if left:
            log.error("capture: %d messages still queued at exit", left)


def serve(settings: Settings, *, delivery_timeout_s: float = 10.0) -> None:
    """Run capture on ``settings.capture_addr`` until SIGINT or SIGTERM."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        capture = Capture(settings, delivery_timeout_s=delivery_timeout_s)
        host, port = settings.capture_host_port
        bound = await capture.start(host, port)
        log.info("capture: listening on http://%s:%d, producing to %s", bound[0], bound[1], capture.app.topic)
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if not await loop.run_in_executor(None, capture.producer.reachable, capture.app.topic, 5.0):
            log.warning("capture: %s is not reachable (Kafka down, or run `headwater topics`): requests get 503 until it is",
                        capture.app.topic)
        await stop.wait()
        log.info("capture: stopping (%d events accepted)", capture.app.accepted)
        await capture.stop()

    asyncio.run(main())


class CaptureThread:
    """Capture on a background thread with its own event loop: ``start()`` returns the bound
    ``(host, port)``; ``stop()`` ends it cleanly. For tests and benchmarks."""

    def __init__(self, settings: Settings, *, host: str = "127.0.0.1", port: int = 0, delivery_timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.host, self.port = host, port
        self.delivery_timeout_s = delivery_timeout_s
        self.capture: Capture | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)

    def start(self, timeout: float = 30.0) -> tuple[str, int]:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("capture did not start")
        if self._error is not None:
            raise self._error
        return self.host, self.port

    def _run(self) -> None:
        async def main() -> None:
            try:
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                self.capture = Capture(self.settings, delivery_timeout_s=self.delivery_timeout_s)
                self.host, self.port = await self.capture.start(self.host, self.port)
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.capture.stop()

        asyncio.run(main())

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
