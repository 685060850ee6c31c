"""Partition state for stateful stages: a local key-value store plus the current batch's write set.

Reads see the batch's own writes. At the end of a batch the runtime asks for the changelog
records (one per key written, value ``None`` for a delete), produces them in the batch's
transaction, and only after the commit applies the write set to the store (``commit``); an
aborted batch discards it (``rollback``). Values are JSON documents; the store keeps them
encoded, so a value read is always a fresh object the caller may change before ``put``.
"""

from __future__ import annotations

from typing import Any

import orjson

#: The key of the marker a new owner writes to a changelog partition before restoring it.
RESTORE_MARKER_KEY = b"__restore_marker__"


class PartitionState:
    def __init__(self) -> None:
        self._store: dict[bytes, bytes] = {}
        self._writes: dict[bytes, Any] = {}
        self._undo: list[tuple[bytes, bool, Any]] = []

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: str) -> Any:
        k = key.encode()
        if k in self._writes:
            value = self._writes[k]
            return None if value is None else orjson.loads(orjson.dumps(value))
        raw = self._store.get(k)
        return None if raw is None else orjson.loads(raw)

    def put(self, key: str, value: Any) -> None:
        self._write(key.encode(), value)

    def delete(self, key: str) -> None:
        self._write(key.encode(), None)

    def _write(self, key: bytes, value: Any) -> None:
        self._undo.append((key, key in self._writes, self._writes.get(key)))
        self._writes[key] = value

    def savepoint(self) -> int:
        """A point to roll the batch's writes back to (one message's writes, when it fails)."""
        return len(self._undo)

    def rollback_to(self, savepoint: int) -> None:
        while len(self._undo) > savepoint:
            key, had, old = self._undo.pop()
            if had:
                self._writes[key] = old
            else:
                del self._writes[key]

    def pending(self) -> list[tuple[bytes, bytes | None]]:
        """The batch's writes, encoded, in key-first-written order (the changelog records)."""
        return [(k, None if v is None else orjson.dumps(v)) for k, v in self._writes.items()]

    def commit(self, encoded: list[tuple[bytes, bytes | None]]) -> None:
        for key, value in encoded:
            self.restore(key, value)
        self._writes = {}
        self._undo = []

    def rollback(self) -> None:
        self._writes = {}
        self._undo = []

    def restore(self, key: bytes, value: bytes | None) -> None:
        """Apply one changelog record (restoring, or committing a batch)."""
        if value is None:
            self._store.pop(key, None)
        else:
            self._store[key] = value
