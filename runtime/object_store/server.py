"""The object store process: an asyncio service over ``StoreState`` and its gRPC face.

``StoreService`` turns requests into state transitions and file work. The only
slow file work is copying an object to or from the spill directory; it runs in
a thread (``asyncio.to_thread``) so a multi-GiB spill never stalls the other
requests. While an object is being copied it is marked busy: it is never chosen
for another spill, and a Get or Delete of it waits until the copy is done.
Spills and restores (the only operations that make room) are serialized by one
lock; a Create that already fits never waits for that lock.

What dead processes leave is reclaimed (``reclaim.py``): the store holds its
node's lock file while it runs, sweeps its own node's leftovers before serving
and the files of dead stores periodically, and frees an unsealed object as soon
as the process that created it exits (a pidfd per writer process, watched by
the event loop: no polling, and nothing on the put path after a process's first
Create).

Run as ``python -m runtime.object_store --node-id HEX --session-dir DIR
--capacity BYTES --host IP --port 0 --ready-file PATH``; see ``parse_args``.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import glob
import itertools
import logging
import os
import select
import sys
import time
from dataclasses import dataclass, field
from typing import Awaitable, Iterable, Sequence, TypeVar

import grpc

from runtime import component, rpc
from runtime.object_store import reclaim
from runtime.object_store.client import StoreClient
from runtime.object_store.store import (FILE_PREFIX, Entry, FileOps, ObjState, StoreState,
                                        format_bytes, object_file_name)
from runtime.object_store.transfer import (CONNECT_TIMEOUT_S, REFUSED, UNREACHABLE, HolderError,
                                           TransferCounters)
from runtime.object_store.transfer_pull import PullManager
from runtime.object_store.transfer_server import TransferServer
from runtime.protocol import common_pb2, object_store_pb2, object_store_pb2_grpc

log = logging.getLogger("object_store")

MAX_OBJECT_ID_BYTES = 64  # file names carry the hex id; keeps them far below NAME_MAX
# Freeing a file's tmpfs pages takes ~30 ms per 200 MiB; above this size it
# happens in a thread so Delete never stalls the other requests.
BACKGROUND_UNLINK_BYTES = 32 * 1024 * 1024
#: How often a running store looks for files of dead stores in its shm dir.
SWEEP_INTERVAL_S = 30.0
#: List: objects per reply unless the caller asks for fewer, and the most it may ask for
#: (or name by id) in one call; raytop's agent asks for at most its view's row limit.
LIST_DEFAULT_LIMIT = 1000
LIST_MAX = 20_000
#: Environment variable with the default of --max-serve-bytes-per-s (for stores that a
#: node or node agent starts, which inherit it).
SERVE_RATE_ENV = "RUNTIME_OBJECT_SERVE_MAX_BYTES_PER_S"
_T = TypeVar("_T")


class StoreIOError(Exception):
    """A file operation of the store failed for a reason other than lack of space."""


@dataclass
class CreateResult:
    path: str = ""
    full: bool = False
    exists: bool = False
    message: str = ""


@dataclass
class Creator:
    """Who writes a new object: (pid, start time, pid namespace) as the client sent them."""

    pid: int
    start_time: int
    pid_namespace: int


@dataclass
class _Watch:
    """A writer process the store watches (its pidfd is readable once it has exited)."""

    pid: int
    start_time: int
    pidfd: int
    objects: set[bytes] = field(default_factory=set)  # its unsealed objects


class CreatorGoneError(ValueError):
    """The process that asked for a Create is no longer running."""


def _exited(pidfd: int) -> bool:
    """Whether the process of a pidfd has exited (its pidfd turns readable)."""
    if pidfd < 0:
        return True
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


@dataclass
class GetResult:
    object_id: bytes
    path: str = ""
    size: int = 0
    found: bool = False
    spilled: bool = False  # path is the spill file on disk, not shared memory


class StoreService:
    """Create/Seal/Get/Delete with spilling, independent of gRPC (tests drive it directly)."""

    def __init__(self, *, node_id_hex: str, capacity: int, shm_dir: str,
                 spill_dir: str | None, ops: FileOps | None = None) -> None:
        """spill_dir None disables spilling (a full store then rejects Creates at once)."""
        self.node_id_hex = node_id_hex
        self.node_lock = reclaim.NodeLock(shm_dir, node_id_hex)
        self.shm_dir = shm_dir
        self.spill_dir = spill_dir
        self.state = StoreState(capacity)
        self.ops = ops or FileOps()
        self._room_lock = asyncio.Lock()
        self._transit: dict[bytes, asyncio.Event] = {}  # set when the busy object's copy ends
        self._seal_waiters: dict[bytes, set[asyncio.Future]] = {}
        self._background: set[asyncio.Future] = set()
        self._doomed_seq = itertools.count()
        self._watches: dict[int, _Watch] = {}
        self._pid_namespace = reclaim.pid_namespace()
        self._pidfd_unavailable = False
        self.reclaimed_objects = 0
        self.transfer_counters = TransferCounters()
        # Set by serve() once the transfer port is up (runtime/object_store/transfer.py).
        self.pulls: PullManager | None = None
        self.transfer_port = 0

    # ---- paths -------------------------------------------------------------------
    def shm_path(self, object_id: bytes) -> str:
        return os.path.join(self.shm_dir, object_file_name(self.node_id_hex, object_id))

    def spill_path(self, object_id: bytes) -> str:
        assert self.spill_dir is not None
        return os.path.join(self.spill_dir, object_file_name(self.node_id_hex, object_id))

    @staticmethod
    def _check_id(object_id: bytes) -> None:
        if not object_id or len(object_id) > MAX_OBJECT_ID_BYTES:
            raise ValueError(f"object id must be 1 to {MAX_OBJECT_ID_BYTES} bytes, "
                             f"got {len(object_id)}")

    # ---- Create ------------------------------------------------------------------
    async def create(self, object_id: bytes, size: int,
                     creator: Creator | None = None) -> CreateResult:
        """Reserve `size` bytes (spilling LRU sealed objects if needed) and make the file.

        With a creator, the object is freed again if that process exits before
        sealing it.
        """
        self._check_id(object_id)
        if size < 0:
            raise ValueError(f"object size must be >= 0, got {size}")
        watch = self._watch(creator) if creator is not None else None
        existing = self._existing(object_id, watch)
        if existing is not None:
            return CreateResult(path=existing.path, exists=True)
        if self.state.fits(size):
            return self._create_file(object_id, size, watch)
        async with self._room_lock:
            reason = await self._make_room(size, frozenset())
            # A retry of this Create may have won while we waited or spilled.
            existing = self._existing(object_id, watch)
            if existing is not None:
                return CreateResult(path=existing.path, exists=True)
            if reason is not None:
                message = self.state.full_message(object_id, size, reason)
                log.warning("%s", message)
                return CreateResult(full=True, message=message)
            if watch is not None and watch.pidfd < 0:
                raise CreatorGoneError(f"creator pid {watch.pid} exited while room was made")
            # No await between making room and reserving it: nobody can take it.
            return self._create_file(object_id, size, watch)

    def _existing(self, object_id: bytes, watch: _Watch | None) -> Entry | None:
        """The entry an idempotent Create returns, with the caller joined to its writers.

        None if there is none, or if it was left unsealed by writers that have all
        died, whose exits the loop has not handled yet: the new writer must write
        it afresh, not seal bytes nobody finished writing.
        """
        entry = self.state.get(object_id)
        if entry is None or entry.state is not ObjState.CREATED or entry.writers is None:
            return entry
        if watch is None or watch.pid not in entry.writers:
            dead = [pid for pid in entry.writers
                    if pid not in self._watches or _exited(self._watches[pid].pidfd)]
            if len(dead) == len(entry.writers):
                for pid in dead:
                    self._creator_exited(pid)
                entry = self.state.get(object_id)
                if entry is None:
                    return None
        self._add_writer(entry, watch)
        return entry

    # ---- writers that die before sealing ---------------------------------------------
    def _watch(self, creator: Creator) -> _Watch | None:
        """The watch of a Create's writer process; None when it cannot be watched.

        A writer outside our pid namespace, or one whose pid we cannot open, is not
        watched (what it creates lives until Deleted, as before). A writer in our
        namespace that is already gone gets a CreatorGoneError: it will never seal.
        """
        if creator.pid <= 0 or creator.pid == os.getpid() or not creator.start_time \
                or not creator.pid_namespace or creator.pid_namespace != self._pid_namespace:
            return None
        watch = self._watches.get(creator.pid)
        if watch is not None:
            if watch.start_time == creator.start_time:
                return watch
            self._creator_exited(watch.pid)  # its pid was reused: the old one is dead
        if self._pidfd_unavailable:
            return None
        try:
            pidfd = os.pidfd_open(creator.pid)
        except ProcessLookupError:
            raise CreatorGoneError(f"creator pid {creator.pid} is not running") from None
        except OSError as exc:  # e.g. ENOSYS: a kernel older than 5.3
            self._pidfd_unavailable = True
            log.warning("cannot watch writer processes (pidfd_open: %s): objects whose writer "
                        "dies before sealing them are freed only when their owner deletes them",
                        exc)
            return None
        # Checked after opening the pidfd, so the pidfd names the process we checked.
        if reclaim.process_start_time(creator.pid) != creator.start_time:
            os.close(pidfd)
            raise CreatorGoneError(f"creator pid {creator.pid} is not running "
                                   "(the pid now names another process)")
        watch = _Watch(creator.pid, creator.start_time, pidfd)
        self._watches[creator.pid] = watch
        asyncio.get_running_loop().add_reader(pidfd, self._creator_exited, creator.pid)
        return watch

    def _add_writer(self, entry: Entry, watch: _Watch | None) -> None:
        """Count a process as writing an unsealed object (a Create of it, or a retry)."""
        if entry.state is not ObjState.CREATED or entry.writers is None:
            return
        if watch is None:
            # A writer we cannot watch may still be writing when the others die.
            self._unwatch_object(entry)
            return
        entry.writers.add(watch.pid)
        watch.objects.add(entry.object_id)

    def _creator_exited(self, pid: int) -> None:
        """Free the unsealed objects whose writers have all exited, this one last."""
        watch = self._watches.pop(pid, None)
        if watch is None:
            return
        self._close_watch(watch)
        freed = 0
        count = 0
        for object_id in watch.objects:
            entry = self.state.get(object_id)
            if entry is None or entry.state is not ObjState.CREATED or entry.writers is None:
                continue
            entry.writers.discard(pid)
            if entry.writers:
                continue  # another live process is writing it too
            self.state.remove(object_id)
            self._discard(entry.shm_path, entry.size)
            freed += entry.size
            count += 1
        if count:
            self.reclaimed_objects += count
            log.warning("freed %d unsealed object%s (%s) of writer pid %d, which exited before "
                        "sealing %s", count, "" if count == 1 else "s", format_bytes(freed), pid,
                        "it" if count == 1 else "them")

    @staticmethod
    def _close_watch(watch: _Watch) -> None:
        if watch.pidfd >= 0:
            try:
                asyncio.get_running_loop().remove_reader(watch.pidfd)
            except RuntimeError:
                pass  # no running loop (shutdown from another thread)
            os.close(watch.pidfd)
            watch.pidfd = -1

    def _unwatch_object(self, entry: Entry) -> None:
        """The object is sealed or gone (or has a writer we cannot watch): never reclaim it."""
        if entry.writers is not None:
            for pid in entry.writers:
                watch = self._watches.get(pid)
                if watch is not None:
                    watch.objects.discard(entry.object_id)
            entry.writers = None

    def close_watches(self) -> None:
        """Stop watching writer processes (the store is stopping)."""
        for watch in self._watches.values():
            self._close_watch(watch)
        self._watches.clear()

    def _create_file(self, object_id: bytes, size: int, watch: _Watch | None) -> CreateResult:
        path = self.shm_path(object_id)
        entry = self.state.add_created(object_id, size, path)
        if watch is not None:
            entry.writers = {watch.pid}
            watch.objects.add(object_id)
        try:
            try:
                self.ops.create(path, size)
            except FileExistsError:
                # Only a dead store of this very node could have left it.
                log.warning("replacing stale object file %s", path)
                self.ops.unlink(path)
                self.ops.create(path, size)
        except OSError as exc:
            self._unwatch_object(entry)
            self.state.remove(object_id)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT):
                message = self.state.full_message(
                    object_id, size, f"the shared-memory directory {self.shm_dir} is out of "
                    f"space ({exc.strerror}); it is smaller than the store's capacity")
                log.error("%s", message)
                return CreateResult(full=True, message=message)
            raise StoreIOError(f"cannot create object file {path} of {size} bytes: {exc}") from exc
        return CreateResult(path=path)

    async def _make_room(self, size: int, protect: frozenset[bytes]) -> str | None:
        """Spill until `size` more bytes fit; None on success, else why not. Hold the room lock."""
        if size > self.state.capacity:
            return (f"the object is larger than the whole store ({size} > {self.state.capacity} "
                    "bytes)")
        while not self.state.fits(size):
            if self.spill_dir is None:
                return "spilling to disk is disabled (--no-spill)"
            plan = self.state.plan_spill(size, protect)
            if plan is None:
                return (f"spilling cannot make room: only {self.state.spillable_bytes(protect)} "
                        "bytes are held by sealed objects not in use; unsealed objects (still "
                        "being written) are never spilled")
            # Mark them busy now: the spill task starts a tick later, and a Delete
            # in between must wait for it instead of freeing a planned object.
            for entry in plan:
                self.state.begin_spill(entry)
                self._begin_transit(entry)
            error = await self._shielded(self._spill(plan))
            if error is not None:
                return error
        return None

    # ---- spilling & restoring ------------------------------------------------------
    async def _shielded(self, coro: Awaitable[_T]) -> _T:
        """Run coro to completion even if the RPC awaiting it is cancelled.

        A copy thread cannot be interrupted; its state transition must still
        happen, or the object would stay busy forever.
        """
        return await asyncio.shield(self._track(asyncio.ensure_future(coro)))

    def _track(self, task: asyncio.Future) -> asyncio.Future:
        """Keep a reference to background work, so drain() can wait for it."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _begin_transit(self, entry: Entry) -> None:
        self._transit[entry.object_id] = asyncio.Event()

    def _end_transit(self, entry: Entry) -> None:
        event = self._transit.pop(entry.object_id, None)
        if event is not None:
            event.set()

    async def _spill(self, plan: list[Entry]) -> str | None:
        """Spill the planned (already busy) objects; None when all went to disk, else the error."""
        start = time.monotonic()
        copied = spilled_bytes = spilled = 0
        error = None
        failed: list[Entry] = []
        for entry in plan:
            if error is None:
                dst = entry.spill_path or self.spill_path(entry.object_id)
                try:
                    copied += await asyncio.to_thread(self._spill_files, entry, dst)
                except OSError as exc:
                    error = f"spilling to {self.spill_dir} failed: {exc}"
                    log.error("cannot spill object %s (%d bytes): %s",
                              entry.object_id.hex()[:16], entry.size, exc)
                else:
                    self.state.finish_spill(entry, dst)
                    self._end_transit(entry)
                    spilled += 1
                    spilled_bytes += entry.size
                    continue
            failed.append(entry)
        for entry in reversed(failed):  # back to the LRU end, in their original order
            self.state.abort_spill(entry)
            self._end_transit(entry)
        if spilled:
            elapsed = max(time.monotonic() - start, 1e-6)
            s = self.state
            written = (f"write throughput {format_bytes(int(copied / elapsed))}/s" if copied
                       else "no write needed, their disk copies were kept")
            log.info("Spilled %s, %d objects, %s (total spilled %s, %d objects; used %s of %s)",
                     format_bytes(spilled_bytes), spilled, written,
                     format_bytes(s.spilled_bytes_total), s.spilled_objects_total,
                     format_bytes(s.used), format_bytes(s.capacity))
        return error

    def _spill_files(self, entry: Entry, dst: str) -> int:
        """Thread: copy to disk (unless a copy from an earlier spill exists), drop the shm file."""
        copied = 0
        if entry.spill_path is None:
            self.ops.copy(entry.shm_path, dst)
            copied = entry.size
        self.ops.unlink(entry.shm_path)
        return copied

    async def _restore(self, entry: Entry, protect: frozenset[bytes]) -> bool | None:
        """Copy a spilled object back into shared memory if room can be made. Hold the room lock.

        None when the object changed (deleted, say) while room was being made.
        """
        reason = await self._make_room(entry.size, protect | {entry.object_id})
        if self.state.get(entry.object_id) is not entry or entry.busy \
                or entry.state is not ObjState.SPILLED:
            return None
        if reason is not None:
            log.info("serving object %s (%d bytes) from its spill file: cannot restore it: %s",
                     entry.object_id.hex()[:16], entry.size, reason)
            return False
        self.state.begin_restore(entry)
        self._begin_transit(entry)
        start = time.monotonic()
        try:
            assert entry.spill_path is not None
            await asyncio.to_thread(self.ops.copy, entry.spill_path, entry.shm_path)
        except OSError as exc:
            self.state.abort_restore(entry)
            log.error("cannot restore object %s (%d bytes) from %s: %s; serving the spill file",
                      entry.object_id.hex()[:16], entry.size, entry.spill_path, exc)
            return False
        else:
            self.state.finish_restore(entry)
        finally:
            self._end_transit(entry)
        elapsed = max(time.monotonic() - start, 1e-6)
        log.info("Restored %s, 1 objects, read throughput %s/s (total restored %d objects)",
                 format_bytes(entry.size), format_bytes(int(entry.size / elapsed)),
                 self.state.restored_objects_total)
        return True

    # ---- Seal ----------------------------------------------------------------------
    def seal(self, object_ids: Iterable[bytes]) -> None:
        """Make objects readable and wake the Gets waiting for them.

        An object being pulled from another node is sealed by its pull, once all its
        bytes are in, even when a local writer of the same object seals it first.
        """
        for object_id in object_ids:
            if self.pulls is not None and self.pulls.intercept_seal(object_id):
                continue
            self._seal_one(object_id)

    def _seal_one(self, object_id: bytes) -> None:
        if not self.state.seal(object_id):
            entry = self.state.get(object_id)
            if entry is None:
                log.warning("seal of unknown object %s ignored", object_id.hex()[:16])
            return
        self._unwatch_object(self.state.entries[object_id])
        for fut in self._seal_waiters.pop(object_id, ()):
            if not fut.done():
                fut.set_result(None)

    # ---- pulled copies (PullManager) ---------------------------------------------------
    def seal_pulled(self, object_id: bytes) -> None:
        """Every byte of a pulled copy is in: make it readable."""
        self._seal_one(object_id)

    def discard_pulled(self, object_id: bytes) -> None:
        """Free a pull's partial copy (no holder could deliver the rest)."""
        entry = self.state.get(object_id)
        if entry is None or entry.state is not ObjState.CREATED:
            return
        self.state.remove(object_id)
        self._discard(entry.shm_path, entry.size)

    async def resolve_for_transfer(self, object_id: bytes) -> GetResult:
        """Where another store can read a sealed object from (restored if spilled and
        there is room; else its spill file). Unsealed objects are not served."""
        (result,) = await self.get([object_id], 0.0)
        return result

    # ---- Get -----------------------------------------------------------------------
    async def get(self, object_ids: Sequence[bytes], timeout_s: float) -> list[GetResult]:
        """Locate objects, waiting up to timeout_s (< 0: forever) for unsealed ones.

        Objects already returned by this call are protected from being spilled to
        make room for restoring a later one, so every path returned stays valid
        until the caller has had a chance to map it.
        """
        deadline = None if timeout_s < 0 else time.monotonic() + timeout_s
        protect: set[bytes] = set()
        return [await self._get_one(oid, deadline, protect) for oid in object_ids]

    async def _get_one(self, object_id: bytes, deadline: float | None,
                       protect: set[bytes]) -> GetResult:
        while True:
            entry = self.state.get(object_id)
            if entry is not None and entry.busy:
                await self._transit[object_id].wait()
                continue
            if entry is None or entry.state is ObjState.CREATED:
                if not await self._wait_sealed(object_id, deadline):
                    return GetResult(object_id)
                continue
            if entry.state is ObjState.SEALED:
                self.state.touch(object_id)
                protect.add(object_id)
                return GetResult(object_id, entry.shm_path, entry.size, found=True)
            async with self._room_lock:
                if self.state.get(object_id) is not entry or entry.busy \
                        or entry.state is not ObjState.SPILLED:
                    continue  # changed while we waited for the lock; look again
                restored = await self._shielded(self._restore(entry, frozenset(protect)))
            if restored is None:
                continue
            if restored:
                protect.add(object_id)
                return GetResult(object_id, entry.shm_path, entry.size, found=True)
            assert entry.spill_path is not None
            return GetResult(object_id, entry.spill_path, entry.size, found=True, spilled=True)

    async def _wait_sealed(self, object_id: bytes, deadline: float | None) -> bool:
        """Wait for a Seal of object_id; False when the deadline passed first."""
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        fut = asyncio.get_running_loop().create_future()
        waiters = self._seal_waiters.setdefault(object_id, set())
        waiters.add(fut)
        try:
            await asyncio.wait_for(fut, remaining)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            waiters.discard(fut)
            if not waiters and self._seal_waiters.get(object_id) is waiters:
                del self._seal_waiters[object_id]

    # ---- Delete --------------------------------------------------------------------
    async def delete(self, object_ids: Iterable[bytes]) -> None:
        """Free objects and their files; unknown ids are ignored (idempotent).

        An object being pulled stops receiving; its pull reports it freed.
        """
        for object_id in object_ids:
            if self.pulls is not None:
                self.pulls.cancel(object_id)
            while True:
                entry = self.state.get(object_id)
                if entry is None:
                    break
                if entry.busy:
                    await self._transit[object_id].wait()
                    continue
                self._unwatch_object(entry)
                self.state.remove(object_id)
                if entry.in_memory:
                    self._discard(entry.shm_path, entry.size)
                if entry.spill_path is not None:
                    self._discard(entry.spill_path, entry.size)
                break

    def _discard(self, path: str, size: int) -> None:
        """Unlink a file; a big one is first renamed (so its name is free at once for
        a re-created object of the same id) and then unlinked in a thread."""
        if size < BACKGROUND_UNLINK_BYTES:
            self.ops.unlink(path)
            return
        doomed = f"{path}.deleted-{next(self._doomed_seq)}"
        if self.ops.rename(path, doomed):
            self._track(asyncio.ensure_future(asyncio.to_thread(self.ops.unlink, doomed)))

    # ---- lifecycle -------------------------------------------------------------------
    def prepare_dirs(self) -> None:
        """Check the shm dir, create the spill dir, warn when shm is smaller than capacity."""
        if not os.path.isdir(self.shm_dir):
            raise SystemExit(f"object store: shared-memory directory {self.shm_dir} does not exist")
        if self.spill_dir is not None:
            os.makedirs(self.spill_dir, mode=0o700, exist_ok=True)
        st = os.statvfs(self.shm_dir)
        free = st.f_bavail * st.f_frsize
        if free < self.state.capacity:
            log.warning("%s has only %s free but the object store capacity is %s; creates may "
                        "fail with out-of-space errors before the store counts itself full",
                        self.shm_dir, format_bytes(free), format_bytes(self.state.capacity))

    def claim_node(self) -> None:
        """Take the node's lock and remove what a dead store of this node left.

        Call before serving: with the lock held, every file of this node in the shm
        and spill dirs belongs to a predecessor that died without cleaning up
        (SIGKILL, or killed with its driver), e.g. a store the node agent restarts.
        """
        try:
            self.node_lock.acquire()
        except reclaim.NodeLockError as exc:
            raise SystemExit(f"object store of node {self.node_id_hex[:12]}: {exc}") from None
        except OSError as exc:
            raise SystemExit(f"object store of node {self.node_id_hex[:12]}: cannot create its "
                             f"lock file {self.node_lock.path}: {exc}; the shared-memory "
                             f"directory must be writable (--shm-dir)") from None
        dirs = [self.shm_dir] + ([self.spill_dir] if self.spill_dir else [])
        reclaim.log_sweep(reclaim.sweep_own_files(dirs, self.node_id_hex),
                          "left by a previous store of this node")

    async def sweep_loop(self, interval_s: float = SWEEP_INTERVAL_S) -> None:
        """Now and then, remove the files of dead stores (of any node) from the shm dir."""
        while True:
            try:
                result = await asyncio.to_thread(reclaim.sweep_dead_stores, self.shm_dir,
                                                 self.node_id_hex)
            except OSError as exc:
                log.warning("sweeping %s for files of dead stores failed: %s", self.shm_dir, exc)
            else:
                reclaim.log_sweep(result, "left by dead object stores")
            await asyncio.sleep(interval_s)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Let in-flight spill/restore copies finish, so cleanup sees their files."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout_s)

    def cleanup_files(self) -> None:
        """Delete every file of this store (shm and spill), then its lock file. Safe from
        any thread."""
        paths = set()
        for entry in list(self.state.entries.values()):
            paths.add(entry.shm_path)
            if entry.spill_path:
                paths.add(entry.spill_path)
        pattern = f"{FILE_PREFIX}{self.node_id_hex[:12]}-*"
        for directory in (self.shm_dir, self.spill_dir):
            if directory:
                paths.update(glob.glob(os.path.join(glob.escape(directory), pattern)))
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        if self.spill_dir:
            try:
                os.rmdir(self.spill_dir)  # only when empty: never remove others' files
            except OSError:
                pass
        self.node_lock.release()


# ---- gRPC ----------------------------------------------------------------------------

class ObjectStoreServicer(object_store_pb2_grpc.ObjectStoreServicer):
    """Translates the ObjectStore RPCs to StoreService calls."""

    def __init__(self, service: StoreService) -> None:
        self._svc = service

    async def Create(self, request, context):
        creator = None
        if request.HasField("creator"):
            c = request.creator
            creator = Creator(c.pid, c.start_time, c.pid_namespace)
        try:
            result = await self._svc.create(request.object_id, request.size, creator)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StoreIOError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        state = self._svc.state
        return object_store_pb2.CreateReply(path=result.path, full=result.full,
                                            message=result.message, capacity=state.capacity,
                                            used=state.used, exists=result.exists)

    async def Seal(self, request, context):
        self._svc.seal(request.object_ids)
        return common_pb2.Empty()

    async def Get(self, request, context):
        results = await self._svc.get(list(request.object_ids), request.timeout_s)
        return object_store_pb2.StoreGetReply(objects=[
            object_store_pb2.StoreObject(object_id=r.object_id, path=r.path, size=r.size,
                                         found=r.found, spilled=r.spilled) for r in results])

    async def Delete(self, request, context):
        await self._svc.delete(request.object_ids)
        return common_pb2.Empty()

    async def Pull(self, request, context):
        """Copy an object from another node's store into this one (transfer.py)."""
        if self._svc.pulls is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this object store serves no transfers (started without them)")
        try:
            self._svc._check_id(request.object_id)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Pull: {exc}")
        outcome = await self._svc.pulls.pull(request.object_id, list(request.holders),
                                             request.timeout_s)
        return outcome.to_proto()

    async def List(self, request, context):
        """What the store holds, bounded: the named ids it has, or its largest objects."""
        limit = request.limit or LIST_DEFAULT_LIMIT
        if not 0 < limit <= LIST_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"List: limit must be 1 to {LIST_MAX} (0 means "
                                f"{LIST_DEFAULT_LIMIT}), got {request.limit}")
        if len(request.object_ids) > LIST_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"List: at most {LIST_MAX} object ids per call, got "
                                f"{len(request.object_ids)}; ask in several calls")
        state = self._svc.state
        entries, truncated = state.listing(list(request.object_ids) or None, limit)
        reply = object_store_pb2.ListObjectsReply(total=len(state.entries), truncated=truncated,
                                                  node_id=self._svc.node_id_hex)
        for e in entries:
            reply.objects.add(object_id=e.object_id, size=e.size, state=e.state.value,
                              busy=e.busy, disk_copy=e.spill_path is not None,
                              writers=len(e.writers or ()))
        return reply

    async def Stats(self, request, context):
        s = self._svc.state.stats()
        t = self._svc.transfer_counters
        return object_store_pb2.StoreStats(
            capacity=s.capacity, used=s.used, num_objects=s.num_objects,
            spilled_bytes=s.spilled_bytes_total, spilled_objects=s.spilled_objects_total,
            restored_objects=s.restored_objects_total, num_spilled_now=s.num_spilled_now,
            shm_dir=self._svc.shm_dir, spill_dir=self._svc.spill_dir or "",
            node_id=self._svc.node_id_hex, num_unsealed=s.num_unsealed,
            reclaimed_objects=self._svc.reclaimed_objects,
            transfer_port=self._svc.transfer_port, pulls=t.pulls, pulls_joined=t.pulls_joined,
            pulls_failed=t.pulls_failed, pull_failovers=t.pull_failovers,
            pulled_bytes=t.pulled_bytes, serves=t.serves, served_bytes=t.served_bytes,
            pulls_active=self._svc.pulls.active if self._svc.pulls is not None else 0)


class HolderDirectory:
    """Where other stores serve transfers: asked of each store (its Stats) once, then
    cached by the PullManager, which asks again when the port stops answering."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._clients: dict[str, StoreClient] = {}

    async def transfer_port(self, holder: str) -> int:
        client = self._clients.get(holder)
        if client is None:
            client = self._clients[holder] = StoreClient(holder, self._token)
        try:
            reply = await asyncio.wait_for(client.stats(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise HolderError(UNREACHABLE, f"its store at {holder} did not answer within "
                                           f"{CONNECT_TIMEOUT_S:g}s") from None
        except Exception as exc:  # StoreClient's errors name the store and what failed
            raise HolderError(UNREACHABLE, str(exc)) from None
        if not reply.transfer_port:
            raise HolderError(REFUSED, f"its store at {holder} serves no transfer port")
        return reply.transfer_port

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()


# ---- process ---------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.object_store",
                                description="Per-node shared-memory object store.")
    p.add_argument("--node-id", required=True, help="hex node id (names the object files)")
    p.add_argument("--session-dir", required=True)
    p.add_argument("--capacity", required=True, type=int, help="bytes of shared memory to use")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--ready-file", default=None, help='written with {"pid", "port"} once serving')
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--spill-dir", default=None, help="default: SESSION_DIR/spill")
    p.add_argument("--no-spill", action="store_true", help="reject Creates instead of spilling")
    p.add_argument("--sweep-interval-s", type=float, default=SWEEP_INTERVAL_S,
                   help="how often to remove files of dead stores from the shm dir")
    p.add_argument("--transfer-port", type=int, default=0,
                   help="TCP port other stores pull objects from (0 picks a free port)")
    p.add_argument("--max-serve-bytes-per-s", type=int,
                   default=int(os.environ.get(SERVE_RATE_ENV, "0") or 0),
                   help="cap on the bytes per second of each transfer this store serves, "
                        f"0: none (default ${SERVE_RATE_ENV}); keeps transfers from filling "
                        "a shared link")
    args = p.parse_args(argv)
    if args.capacity < 0:
        p.error(f"--capacity must be >= 0, got {args.capacity}")
    if args.sweep_interval_s <= 0:
        p.error(f"--sweep-interval-s must be > 0, got {args.sweep_interval_s}")
    if args.max_serve_bytes_per_s < 0:
        p.error(f"--max-serve-bytes-per-s must be >= 0, got {args.max_serve_bytes_per_s}")
    if not 0 <= args.transfer_port <= 65535:
        p.error(f"--transfer-port must be 0 to 65535, got {args.transfer_port}")
    if args.no_spill:
        args.spill_dir = None
    elif args.spill_dir is None:
        args.spill_dir = os.path.join(args.session_dir, "spill")
    return args


async def serve(args: argparse.Namespace, token: str) -> None:
    """Serve until SIGTERM/SIGINT, then stop and delete every file of the store."""
    service = StoreService(node_id_hex=args.node_id, capacity=args.capacity,
                           shm_dir=args.shm_dir, spill_dir=args.spill_dir)
    service.prepare_dirs()
    service.claim_node()
    component.die_with_parent(on_parent_death=service.cleanup_files)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    component.install_stop_handler(lambda: loop.call_soon_threadsafe(stop.set))
    server = rpc.make_server(token)
    object_store_pb2_grpc.add_ObjectStoreServicer_to_server(ObjectStoreServicer(service), server)
    port = rpc.bind(server, args.host, args.port)
    transfer = TransferServer(token, service.resolve_for_transfer, service.transfer_counters,
                              max_bytes_per_s=args.max_serve_bytes_per_s)
    try:
        service.transfer_port = await transfer.start(args.host, args.transfer_port)
    except OSError as exc:
        raise SystemExit(f"object store of node {args.node_id[:12]}: {exc.strerror} "
                         "(--transfer-port)") from None
    holders = HolderDirectory(token)
    service.pulls = PullManager(service, token, service.transfer_counters, holders.transfer_port,
                                own_address=f"{args.host}:{port}")
    await server.start()
    sweeper = asyncio.ensure_future(service.sweep_loop(args.sweep_interval_s))
    try:
        component.announce_ready(args.ready_file, port=port, transfer_port=service.transfer_port)
        log.info("object store serving on %s:%d (transfers on port %d): capacity %s, shm dir "
                 "%s, spill dir %s", args.host, port, service.transfer_port,
                 format_bytes(args.capacity), args.shm_dir, args.spill_dir or "(spilling disabled)")
        await stop.wait()
        log.info("stopping: deleting %d objects", len(service.state.entries))
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        await server.stop(grace=0.5)
        await transfer.close()
        await service.pulls.close()
        await holders.close()
        service.close_watches()
        await service.drain()
        service.cleanup_files()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    token = component.token_from_env()
    component.setup_logging("object_store", args.node_id)
    asyncio.run(serve(args, token))
    sys.exit(0)
