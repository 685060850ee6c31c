"""The ClickHouse sink: versioned migrations, and batched, deduplicated inserts from Kafka."""
