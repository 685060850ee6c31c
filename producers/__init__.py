"""Producers: how events get onto ``events_raw``. ``producers.backend.Client`` for Python
services; the capture HTTP endpoint for PostHog SDKs; any Kafka client following the JSON Schema.
"""
