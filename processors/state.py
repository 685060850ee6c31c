"""Partition state for stateful stages: a local key-value store plus the current batch's write set.

The store is RocksDB (rocksdict, raw bytes) in a folder of its own when a path is given, so state
beyond memory lives on disk; in memory otherwise (unit tests, the protocol harness). The changelog
topic is the source of truth: a new owner wipes the folder and restores from it.

Reads see the batch's own writes. At the end of a batch the runtime asks for the changelog
records (one per key written, value ``None`` for a delete), produces them in the batch's
transaction, and only after the commit applies the write set to the store (``commit``); an
aborted batch discards it (``rollback``). Values are JSON documents; the store keeps them
encoded, so a value read is always a fresh object the caller may change before ``put``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson

#: The key of the marker a new owner writes to a changelog partition before restoring it.
RESTORE_MARKER_KEY = b"__restore_marker__"

#: The key of the record a batch with no other output writes to its changelog partition: Tansu 0.6
#: drops the offsets of a transaction that produced nothing (ADR 0015). Not state: restores skip it.
PROGRESS_KEY = b"__progress__"


#: RocksDB memory per worker process (ADR 0001, memory target of DESIGN §7): memtables of 4 MB
#: (RocksDB's default is 64 MB each, per partition) and one block cache shared by the process's
#: partitions. Reads beyond the cache go to the OS page cache, which the kernel can reclaim.
WRITE_BUFFER_BYTES = 4 << 20
BLOCK_CACHE_BYTES = 32 << 20
_shared: dict[str, Any] = {}


def _rocksdb_options() -> Any:
    from rocksdict import BlockBasedOptions, Cache, Options

    if "cache" not in _shared:
        _shared["cache"] = Cache(BLOCK_CACHE_BYTES)
    options = Options(raw_mode=True)
    options.set_write_buffer_size(WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(2)
    table = BlockBasedOptions()
    table.set_block_cache(_shared["cache"])
    table.set_cache_index_and_filter_blocks(True)
    table.set_bloom_filter(10, False)
    options.set_block_based_table_factory(table)
    return options


class PartitionState:
    def __init__(self, path: Path | None = None) -> None:
        self._store: Any
        if path is None:
            self._store = {}
        else:
            from rocksdict import Rdict

            shutil.rmtree(path, ignore_errors=True)  # restored from the changelog, never trusted
            path.parent.mkdir(parents=True, exist_ok=True)
            self._store = Rdict(str(path), options=_rocksdb_options())
        self._path = path
        self._writes: dict[bytes, bytes | None] = {}  # the batch's writes, encoded (None: deleted)
        self._undo: list[tuple[bytes, bool, bytes | None]] = []

    def __len__(self) -> int:
        return len(self._store) if isinstance(self._store, dict) else sum(1 for _ in self._store.keys())

    def close(self) -> None:
        if self._path is not None:
            self._store.close()
            shutil.rmtree(self._path, ignore_errors=True)

    def get(self, key: str) -> Any:
        k = key.encode()
        raw = self._writes[k] if k in self._writes else self._store.get(k)
        return None if raw is None else orjson.loads(raw)

    def put(self, key: str, value: Any) -> None:
        self._write(key.encode(), orjson.dumps(value))  # encoded once: read back fresh, logged as is

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
        return list(self._writes.items())

    def commit(self, encoded: list[tuple[bytes, bytes | None]]) -> None:
        self.apply(encoded)
        self._writes = {}
        self._undo = []

    def apply(self, records: list[tuple[bytes, bytes | None]]) -> None:
        """Apply changelog records in order (a batch's writes, or a run of a restore): in RocksDB one
        write batch, a third of the cost of a put per key."""
        if isinstance(self._store, dict):
            for key, value in records:
                if value is None:
                    self._store.pop(key, None)
                else:
                    self._store[key] = value
            return
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        for key, value in records:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        self._store.write(batch)

    def rollback(self) -> None:
        self._writes = {}
        self._undo = []
