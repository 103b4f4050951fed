"""Accounting and spill policy of the object store, free of sockets and event loops.

``StoreState`` is the single source of truth for what the store holds: every
object's state, how many bytes of shared memory are reserved, the LRU order of
the objects that could be spilled, and the spill/restore counters. It performs no
I/O, so the policy (what fits, what to spill, in which order) is unit-tested
directly; ``server.StoreService`` drives it and does the file work through
``FileOps``, which tests replace to inject failures such as a full disk.

Lifecycle of an object::

    CREATED --seal--> SEALED --spill--> SPILLED --restore--> SEALED
       \\________________\\___________________\\____delete____> (gone)

A spill or restore is two steps (``begin_*`` marks the object busy, then
``finish_*`` or ``abort_*``) because the file copy between them runs in a thread
while other requests are served; a busy object is never chosen for another spill.
"""
from __future__ import annotations

import enum
import errno
import heapq
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from runtime import config

FILE_PREFIX = "rt-"


class ObjState(enum.Enum):
    CREATED = "created"  # bytes reserved in shared memory; the client is writing it
    SEALED = "sealed"    # immutable and readable, in shared memory
    SPILLED = "spilled"  # only on disk; its shared memory is released


@dataclass
class Entry:
    """One object the store knows about."""

    object_id: bytes
    size: int
    state: ObjState
    shm_path: str
    # A disk copy, once spilled. It is kept after a restore (the object is
    # immutable), so spilling the same object again costs no copy.
    spill_path: str | None = None
    busy: bool = False  # a spill or restore copy is in flight
    # While CREATED: the pids of the processes writing it, all watched, so it is freed
    # when the last of them exits unsealed; None when it is never reclaimed (sealed, or
    # a writer the store cannot watch). See server.StoreService.
    writers: set[int] | None = None

    @property
    def in_memory(self) -> bool:
        return self.state is not ObjState.SPILLED

    @property
    def path(self) -> str:
        """Where the bytes can be read now."""
        return self.shm_path if self.in_memory else (self.spill_path or self.shm_path)


@dataclass
class Stats:
    capacity: int
    used: int
    num_objects: int           # objects in shared memory (what `used` counts)
    num_unsealed: int
    spilled_bytes_total: int   # cumulative, like Ray's "Spilled X MiB" summary
    spilled_objects_total: int
    restored_bytes_total: int
    restored_objects_total: int
    num_spilled_now: int       # objects that live only on disk now
    spilled_bytes_now: int


def object_file_name(node_id_hex: str, object_id: bytes) -> str:
    """File name of an object, in the shm and spill dirs alike.

    The node prefix keeps stores of different nodes (or test clusters) sharing
    one /dev/shm apart, and lets a store find its own leftovers at shutdown.
    """
    return f"{FILE_PREFIX}{node_id_hex[:12]}-{object_id.hex()}"


def format_bytes(n: int) -> str:
    """Human-readable size for log lines and error messages ("50.0 MiB")."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class StoreState:
    """Per-object state, shared-memory accounting and LRU spill choice."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"object store capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.used = 0  # shm bytes of CREATED + SEALED objects + in-flight restores
        self.entries: dict[bytes, Entry] = {}
        # Sealed, in-memory, not busy objects; least recently used first.
        self._lru: OrderedDict[bytes, None] = OrderedDict()
        self.num_unsealed = 0
        self.spilled_bytes_now = 0
        self.num_spilled_now = 0
        self.spilled_bytes_total = 0
        self.spilled_objects_total = 0
        self.restored_bytes_total = 0
        self.restored_objects_total = 0

    # ---- queries -------------------------------------------------------------
    def get(self, object_id: bytes) -> Entry | None:
        return self.entries.get(object_id)

    def fits(self, size: int) -> bool:
        return self.used + size <= self.capacity

    def spillable_bytes(self, protect: frozenset[bytes] = frozenset()) -> int:
        return sum(self.entries[oid].size for oid in self._lru if oid not in protect)

    def lru_order(self) -> list[bytes]:
        """Spill candidates, least recently used first (for tests and debugging)."""
        return list(self._lru)

    def listing(self, object_ids: Sequence[bytes] | None,
                limit: int) -> tuple[list[Entry], bool]:
        """At most `limit` entries, and whether more matched (raytop's objects view).

        With ids: those the store holds, in the order asked (it joins them with the
        owners' objects); without: the largest, since an operator asks what fills
        the store. Either way the work is bounded by the ids or by a heap of
        `limit`, never a sort of every object.
        """
        if object_ids is not None:
            held = [e for e in map(self.entries.get, dict.fromkeys(object_ids)) if e is not None]
            return held[:limit], len(held) > limit
        top = heapq.nlargest(limit, self.entries.values(), key=lambda e: e.size)
        return top, len(self.entries) > limit

    def stats(self) -> Stats:
        return Stats(capacity=self.capacity, used=self.used,
                     num_objects=len(self.entries) - self.num_spilled_now,
                     num_unsealed=self.num_unsealed,
                     spilled_bytes_total=self.spilled_bytes_total,
                     spilled_objects_total=self.spilled_objects_total,
                     restored_bytes_total=self.restored_bytes_total,
                     restored_objects_total=self.restored_objects_total,
                     num_spilled_now=self.num_spilled_now,
                     spilled_bytes_now=self.spilled_bytes_now)

    # ---- create / seal / use / delete ---------------------------------------
    def add_created(self, object_id: bytes, size: int, shm_path: str) -> Entry:
        """Reserve `size` bytes for a new unsealed object; the caller checked `fits`."""
        if object_id in self.entries:
            raise KeyError(f"object {object_id.hex()} already exists")
        if size < 0:
            raise ValueError(f"object size must be >= 0, got {size}")
        if not self.fits(size):
            raise ValueError(f"{size} bytes do not fit: capacity {self.capacity}, used {self.used}")
        entry = Entry(object_id, size, ObjState.CREATED, shm_path)
        self.entries[object_id] = entry
        self.used += size
        self.num_unsealed += 1
        return entry

    def seal(self, object_id: bytes) -> bool:
        """CREATED -> SEALED; True when this call sealed it (others are no-ops)."""
        entry = self.entries.get(object_id)
        if entry is None or entry.state is not ObjState.CREATED:
            return False
        entry.state = ObjState.SEALED
        self.num_unsealed -= 1
        self._lru[object_id] = None
        return True

    def touch(self, object_id: bytes) -> None:
        """Mark a sealed object as just used, so it is the last to be spilled."""
        if object_id in self._lru:
            self._lru.move_to_end(object_id)

    def remove(self, object_id: bytes) -> Entry | None:
        """Forget an object and release its memory; the caller deletes its files.

        A busy object must not be removed: its copy is still running (the
        service waits for it first).
        """
        entry = self.entries.get(object_id)
        if entry is None:
            return None
        if entry.busy:
            raise RuntimeError(f"object {object_id.hex()} is being spilled or restored")
        del self.entries[object_id]
        self._lru.pop(object_id, None)
        if entry.state is ObjState.SPILLED:
            self.num_spilled_now -= 1
            self.spilled_bytes_now -= entry.size
        else:
            self.used -= entry.size
            if entry.state is ObjState.CREATED:
                self.num_unsealed -= 1
        return entry

    # ---- spilling --------------------------------------------------------------
    def plan_spill(self, size: int,
                   protect: frozenset[bytes] = frozenset()) -> list[Entry] | None:
        """The least recently used sealed objects whose spilling makes `size` fit.

        [] when it already fits; None when it cannot fit even after spilling
        every candidate (unsealed, busy and `protect`ed objects are never
        candidates: a writer or a reader holding a path needs them in memory).
        """
        if size > self.capacity:
            return None
        deficit = self.used + size - self.capacity
        plan: list[Entry] = []
        for oid in self._lru:
            if deficit <= 0:
                break
            if oid in protect:
                continue
            entry = self.entries[oid]
            plan.append(entry)
            deficit -= entry.size
        return plan if deficit <= 0 else None

    def begin_spill(self, entry: Entry) -> None:
        assert entry.state is ObjState.SEALED and not entry.busy, entry
        entry.busy = True
        self._lru.pop(entry.object_id, None)

    def finish_spill(self, entry: Entry, spill_path: str) -> None:
        """The disk copy is complete and the shm file is gone: release its memory."""
        assert entry.busy and entry.state is ObjState.SEALED, entry
        entry.busy = False
        entry.state = ObjState.SPILLED
        entry.spill_path = spill_path
        self.used -= entry.size
        self.num_spilled_now += 1
        self.spilled_bytes_now += entry.size
        self.spilled_objects_total += 1
        self.spilled_bytes_total += entry.size

    def abort_spill(self, entry: Entry) -> None:
        """The copy failed; the object stays in memory, still least recently used."""
        assert entry.busy, entry
        entry.busy = False
        self._lru[entry.object_id] = None
        self._lru.move_to_end(entry.object_id, last=False)

    # ---- restoring -------------------------------------------------------------
    def begin_restore(self, entry: Entry) -> None:
        """Reserve memory for copying a spilled object back; the caller made room."""
        assert entry.state is ObjState.SPILLED and not entry.busy, entry
        if not self.fits(entry.size):
            raise ValueError(f"restoring {entry.size} bytes does not fit: "
                             f"capacity {self.capacity}, used {self.used}")
        entry.busy = True
        self.used += entry.size

    def finish_restore(self, entry: Entry) -> None:
        assert entry.busy and entry.state is ObjState.SPILLED, entry
        entry.busy = False
        entry.state = ObjState.SEALED
        self.num_spilled_now -= 1
        self.spilled_bytes_now -= entry.size
        self.restored_objects_total += 1
        self.restored_bytes_total += entry.size
        self._lru[entry.object_id] = None  # just used: most recently used

    def abort_restore(self, entry: Entry) -> None:
        assert entry.busy and entry.state is ObjState.SPILLED, entry
        entry.busy = False
        self.used -= entry.size

    # ---- messages --------------------------------------------------------------
    def full_message(self, object_id: bytes, size: int, reason: str) -> str:
        """Why a Create failed, with the numbers and what the user can do."""
        s = self.stats()
        return (f"object store full: cannot create object {object_id.hex()[:16]} of {size} bytes "
                f"({format_bytes(size)}): capacity {s.capacity} ({format_bytes(s.capacity)}), "
                f"used {s.used} by {s.num_objects} objects ({s.num_unsealed} unsealed), "
                f"spilled {s.spilled_bytes_now} bytes in {s.num_spilled_now} objects; {reason}. "
                "Free object references you no longer need (del the refs / results), "
                "or give the node a larger object_store_memory.")


def _open_new(path: str, access: int) -> int:
    """Create path (never an existing name, never through a symlink) with STORE_FILE_MODE;
    the umask would strip a group-write bit the packaged agent asks for, so the new
    file's mode is set on its descriptor."""
    mode = config.STORE_FILE_MODE
    fd = os.open(path, access | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    if mode != 0o600:
        os.fchmod(fd, mode)
    return fd


class FileOps:
    """The store's only file-system calls, so tests can inject failures (ENOSPC)."""

    def create(self, path: str, size: int) -> None:
        """A new private file of `size` bytes; sparse, the client writes the data."""
        fd = _open_new(path, os.O_RDWR)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            self.unlink(path)
            raise
        os.close(fd)

    def copy(self, src: str, dst: str) -> None:
        """Copy src to a new file dst (kernel-side, no Python buffers); no partial dst on error."""
        fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd_in).st_size
            fd_out = _open_new(dst, os.O_WRONLY)
            try:
                offset = 0
                while offset < size:
                    n = os.sendfile(fd_out, fd_in, offset, min(size - offset, 1 << 30))
                    if n == 0:
                        raise OSError(errno.EIO, f"{src} ended after {offset} of {size} bytes")
                    offset += n
            except BaseException:
                os.close(fd_out)
                self.unlink(dst)
                raise
            os.close(fd_out)
        finally:
            os.close(fd_in)

    def rename(self, src: str, dst: str) -> bool:
        """Rename within a directory; False when src is missing."""
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return False
        return True

    def unlink(self, path: str) -> None:
        """Remove a file; a missing one is fine (delete is idempotent)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
