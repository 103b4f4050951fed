"""The GCS's durable tables: an embedded store, so a restarted GCS finds the cluster.

The GCS keeps every table a restart must not lose (nodes, jobs, submitted jobs, actors,
placement groups, KV) as key -> bytes rows of named tables, written through a
``Storage`` backend. A reply that a caller waits on is sent only once its write is
committed, so whatever a client was told survives a SIGKILL of the GCS.

Backends implement four calls (``apply`` a batch atomically, ``get``, ``scan`` a table,
``close``); ``SqliteStorage`` is the default (stdlib sqlite3, WAL, a private file in the
head's state or session directory), ``MemoryStorage`` keeps nothing past the process.
Another backend (Redis, as Ray uses) needs only those four.

``DurableWriter`` runs the commits on one thread of its own, in order, and commits
whatever queued up meanwhile as one transaction (group commit): a burst of N writes
costs a few fsyncs, not N, and the GCS's event loop never waits on the disk.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sqlite3
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from runtime import config

log = logging.getLogger("runtime.gcs.storage")

#: One write: (table, key, value); a value of None deletes the row.
Op = Tuple[str, bytes, Optional[bytes]]


class StorageError(RuntimeError):
    """The GCS's store cannot be opened or written (names the file and the reason)."""


class Storage:
    """Named tables of key -> bytes; see the module docstring."""

    description = "storage"

    def apply(self, ops: Sequence[Op]) -> None:
        """Write every op, all or none."""
        raise NotImplementedError

    def get(self, table: str, key: bytes) -> Optional[bytes]:
        raise NotImplementedError

    def scan(self, table: str) -> Iterator[Tuple[bytes, bytes]]:
        """Every row of `table`, in key order."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # -- conveniences over apply ----------------------------------------------------------
    def put(self, table: str, key: bytes, value: bytes) -> None:
        self.apply([(table, key, value)])

    def delete(self, table: str, key: bytes) -> None:
        self.apply([(table, key, None)])

    def clear(self) -> None:
        """Drop every row of every table (the store belongs to another cluster)."""
        raise NotImplementedError


def _check(ops: Sequence[Op]) -> None:
    for table, key, value in ops:
        if not table or not isinstance(table, str):
            raise StorageError(f"invalid table name {table!r}: tables are non-empty strings")
        if not isinstance(key, bytes) or (value is not None and not isinstance(value, bytes)):
            raise StorageError(f"invalid row in table {table!r}: keys and values are bytes "
                               f"(got {type(key).__name__} -> {type(value).__name__})")


class MemoryStorage(Storage):
    """Keeps the tables in this process only: a restart starts empty."""

    description = "memory (not durable)"

    def __init__(self) -> None:
        self._tables: Dict[str, Dict[bytes, bytes]] = {}
        self._lock = threading.Lock()

    def apply(self, ops: Sequence[Op]) -> None:
        _check(ops)
        with self._lock:
            for table, key, value in ops:
                rows = self._tables.setdefault(table, {})
                if value is None:
                    rows.pop(key, None)
                else:
                    rows[key] = value

    def get(self, table: str, key: bytes) -> Optional[bytes]:
        with self._lock:
            return self._tables.get(table, {}).get(key)

    def scan(self, table: str) -> Iterator[Tuple[bytes, bytes]]:
        with self._lock:
            rows = sorted(self._tables.get(table, {}).items())
        return iter(rows)

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()


class SqliteStorage(Storage):
    """One SQLite file in WAL mode; a commit is durable when apply() returns (FULL sync).

    The file and its directory are private (0600 / 0700): the tables hold pickled actor
    classes and their arguments, which only the cluster's token holders may read."""

    def __init__(self, path: str, synchronous: Optional[str] = None) -> None:
        self.path = path
        self.description = f"SQLite file {path}"
        sync = (synchronous or config.GCS_STORAGE_SYNC).upper()
        if sync not in ("FULL", "NORMAL", "EXTRA"):
            raise StorageError(f"RUNTIME_GCS_STORAGE_SYNC={sync!r} is not one of FULL, NORMAL, "
                               f"EXTRA")
        self._lock = threading.Lock()
        try:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={sync}")
            self._db.execute("CREATE TABLE IF NOT EXISTS rows (tbl TEXT NOT NULL, key BLOB NOT "
                             "NULL, value BLOB NOT NULL, PRIMARY KEY (tbl, key)) WITHOUT ROWID")
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the GCS store {path}: {exc}. Check that the "
                               f"directory exists, is ours and is writable (or set "
                               f"--storage-path / RUNTIME_GCS_STORAGE).") from None

    def journal_mode(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    def apply(self, ops: Sequence[Op]) -> None:
        _check(ops)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for table, key, value in ops:
                        if value is None:
                            self._db.execute("DELETE FROM rows WHERE tbl = ? AND key = ?",
                                             (table, key))
                        else:
                            self._db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?, ?)",
                                             (table, key, value))
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"writing the GCS store {self.path} failed: {exc}") from None

    def get(self, table: str, key: bytes) -> Optional[bytes]:
        with self._lock:
            row = self._db.execute("SELECT value FROM rows WHERE tbl = ? AND key = ?",
                                   (table, key)).fetchone()
        return row[0] if row else None

    def scan(self, table: str) -> Iterator[Tuple[bytes, bytes]]:
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM rows WHERE tbl = ? ORDER BY key",
                                    (table,)).fetchall()
        return iter(rows)

    def clear(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM rows")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_storage(spec: str) -> Storage:
    """The backend `spec` names: ":memory:" (nothing kept), else a SQLite file path."""
    if spec == ":memory:":
        return MemoryStorage()
    if "://" in spec:
        raise StorageError(f"unknown GCS storage {spec!r}: give a file path for SQLite, or "
                           f"':memory:' to keep nothing")
    return SqliteStorage(spec)


class DurableWriter:
    """Ordered, group-committed writes on one thread; see the module docstring.

    ``write(ops)`` returns a future that resolves once `ops` are committed (or fails with
    the StorageError); futures resolve in the order of their writes. Call it from the
    event loop's thread only."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gcs-store")
        self._ops: List[Op] = []
        self._waiters: List[asyncio.Future] = []
        self._running: Optional[asyncio.Future] = None
        self.commits = 0

    def write(self, ops: Sequence[Op]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._ops.extend(ops)
        self._waiters.append(fut)
        if self._running is None:
            self._start(loop)
        return fut

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        ops, waiters = self._ops, self._waiters
        self._ops, self._waiters = [], []
        running = self._running = asyncio.wrap_future(self._pool.submit(self.storage.apply, ops),
                                                      loop=loop)
        running.add_done_callback(lambda done: self._finished(done, waiters, loop))

    def _finished(self, done: asyncio.Future, waiters: List[asyncio.Future],
                  loop: asyncio.AbstractEventLoop) -> None:
        self.commits += 1
        exc = done.exception() if not done.cancelled() else StorageError("write cancelled")
        if exc is not None:
            log.error("GCS store write failed (%d writes lost): %s", len(waiters), exc)
        for fut in waiters:
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(None)
        self._running = None
        if self._ops:
            self._start(loop)

    async def flush(self) -> None:
        """Until everything written so far is committed."""
        while self._running is not None:
            await asyncio.wait([self._running])
            await asyncio.sleep(0)

    async def close(self) -> None:
        await self.flush()
        self._pool.shutdown(wait=True)
