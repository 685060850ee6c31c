"""The PostHog-compatible capture HTTP endpoint (``headwater capture``).

``rules`` holds PostHog's capture rules as pure functions, ``http`` a small HTTP/1.1 server,
``kafka`` the producer that answers only after Kafka acknowledged every event, and ``server``
puts them together (ADR 0009).
"""

from .server import Capture, CaptureApp, CaptureThread, serve

__all__ = ["Capture", "CaptureApp", "CaptureThread", "serve"]
