"""Sinks: from the output topics into the analysts' store (ClickHouse)."""
