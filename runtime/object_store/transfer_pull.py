"""A store's pulls of other stores' objects: one transfer per object, holder failover and
resumption, a connection pool per holder (the protocol and its decisions are in
runtime/object_store/transfer.py)."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

from google.protobuf.message import DecodeError

from runtime import frames
from runtime.object_store.transfer import (CHUNK_BYTES, CONNECT_TIMEOUT_S, STALL_TIMEOUT_S,
                                           POOL_IDLE_S, POOL_PER_HOLDER, MAX_PULLS_AT_ONCE,
                                           RECENT_FAILURE_S, MAX_REQUEST_BYTES, UNREACHABLE,
                                           MISSING, REFUSED, HolderError, PullCancelled,
                                           TransferCounters, TIMED_OUT, kernel_timeouts)
from runtime.protocol import object_store_pb2

if TYPE_CHECKING:
    from runtime.object_store.server import StoreService


log = logging.getLogger("object_store")


@dataclass(eq=False)
class _Conn:
    """An authenticated connection to one holder's transfer port."""

    sock: socket.socket
    holder: str
    last_used: float
    reused: bool = False


@dataclass
class Failure:
    holder: str
    kind: int
    message: str


@dataclass
class PullOutcome:
    """How a Pull ended (see PullReply)."""

    ok: bool
    path: str = ""
    size: int = 0
    how: int = object_store_pb2.PullReply.TRANSFERRED
    failures: List[Failure] = field(default_factory=list)
    full: bool = False
    message: str = ""
    spilled: bool = False

    def to_proto(self) -> object_store_pb2.PullReply:
        return object_store_pb2.PullReply(
            ok=self.ok, path=self.path, size=self.size, how=self.how, full=self.full,
            message=self.message, spilled=self.spilled,
            failures=[object_store_pb2.HolderFailure(holder=f.holder, kind=f.kind,
                                                     message=f.message)
                      for f in self.failures])


@dataclass
class _Transfer:
    """What one pull has so far: its local entry, file and the holders that failed."""

    entry: object = None
    size: int = -1
    fd: int = -1
    failures: List[Failure] = field(default_factory=list)


@dataclass
class _Job:
    """One object being pulled into this store; later Pulls of it await `future`."""

    object_id: bytes
    future: "asyncio.Future[PullOutcome]"
    offset: int = 0              # bytes received so far (written to the file)
    cancelled: bool = False      # deleted meanwhile: stop receiving
    seal_requested: bool = False  # a local writer of the same object sealed it meanwhile
    path: str = ""


class PullManager:
    """This store's pulls from other stores: one transfer per object, holder failover,
    a pool of connections per holder.

    The socket work runs in threads (``asyncio.to_thread``); the store's state is only
    touched on its event loop, between them.
    """

    def __init__(self, service: "StoreService", token: str, counters: TransferCounters,
                 port_of: Callable[[str], Awaitable[int]], own_address: str = "") -> None:
        self._svc = service
        self._token = token
        self.counters = counters
        self._port_of = port_of
        self.own_address = own_address
        self._jobs: Dict[bytes, _Job] = {}
        self._slots = asyncio.Semaphore(MAX_PULLS_AT_ONCE)
        self._idle: Dict[str, List[_Conn]] = {}
        self._ports: Dict[str, int] = {}
        self._failed_at: Dict[str, float] = {}
        self._lock = threading.Lock()  # guards _idle and _busy (threads use connections)
        self._busy: set = set()  # connections a transfer is using now (see close)
        self._tasks: set = set()  # the transfers' tasks

    @property
    def active(self) -> int:
        return len(self._jobs)

    # -- what the rest of the store asks -------------------------------------------------------
    def is_pulling(self, object_id: bytes) -> bool:
        return object_id in self._jobs

    def intercept_seal(self, object_id: bytes) -> bool:
        """A Seal of an object being pulled (a local writer made the same immutable object):
        the pull seals it when its bytes are in; True when the Seal was taken over."""
        job = self._jobs.get(object_id)
        if job is None:
            return False
        job.seal_requested = True
        return True

    def cancel(self, object_id: bytes) -> None:
        """The object is being deleted: its transfer stops at the next chunk."""
        job = self._jobs.get(object_id)
        if job is not None:
            job.cancelled = True

    # -- Pull ----------------------------------------------------------------------------------
    async def pull(self, object_id: bytes, holders: Sequence[str],
                   timeout_s: float = 0.0) -> PullOutcome:
        """Copy object_id into this store from one of `holders`, once however many ask.

        The transfer is a task of its own: a reader that goes away (its Pull call is
        cancelled) does not stop it for the others, nor waste what has arrived.
        """
        job = self._jobs.get(object_id)
        if job is not None:
            self.counters.add("pulls_joined")
            outcome = await asyncio.shield(job.future)
            if outcome.ok and outcome.how == object_store_pb2.PullReply.TRANSFERRED:
                return PullOutcome(ok=True, path=outcome.path, size=outcome.size,
                                   how=object_store_pb2.PullReply.JOINED)
            return outcome
        if self._svc.state.get(object_id) is not None:
            return await self._local(object_id, timeout_s)
        job = _Job(object_id, asyncio.get_running_loop().create_future())
        self._jobs[object_id] = job
        task = asyncio.ensure_future(self._run_job(job, holders))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(job.future)

    async def _run_job(self, job: _Job, holders: Sequence[str]) -> None:
        try:
            outcome = await self._run(job, holders)
        except asyncio.CancelledError:
            outcome = PullOutcome(ok=False, message="this node's object store is stopping")
            raise
        except Exception as exc:  # a bug or a file error here: the readers get the reason
            log.exception("pulling object %s failed in this store", job.object_id.hex()[:16])
            self.counters.add("pulls_failed")
            outcome = PullOutcome(ok=False, message=f"this node's object store failed to "
                                                    f"write the copy: {exc}")
        finally:
            del self._jobs[job.object_id]
            if not job.future.done():
                job.future.set_result(outcome)

    async def _local(self, object_id: bytes, timeout_s: float) -> PullOutcome:
        """The object is here already (or a local writer is writing it): wait for its Seal."""
        (res,) = await self._svc.get([object_id], timeout_s if timeout_s > 0 else 60.0)
        if not res.found:
            return PullOutcome(ok=False, message=(
                "it is being written in this node's store and was not sealed in time"))
        return PullOutcome(ok=True, path=res.path, size=res.size,
                           how=object_store_pb2.PullReply.LOCAL, spilled=res.spilled)

    def _order(self, holders: Sequence[str]) -> List[str]:
        """Distinct holders, not this store, those that failed recently last."""
        now = time.monotonic()
        seen = dict.fromkeys(h for h in holders if h and h != self.own_address)
        fresh = [h for h in seen if now - self._failed_at.get(h, -1e9) > RECENT_FAILURE_S]
        return fresh + [h for h in seen if h not in fresh]

    async def _run(self, job: _Job, holders: Sequence[str]) -> PullOutcome:
        order = self._order(holders)
        if not order:
            return PullOutcome(ok=False, message="no other store holds a copy")
        self.counters.add("pulls")
        async with self._slots:
            state = _Transfer()
            try:
                outcome = await self._transfer(job, order, state)
            except BaseException:
                self._abandon(job, state)
                raise
            finally:
                if state.fd >= 0:
                    os.close(state.fd)
            if outcome is None:
                outcome = self._finish(job, state)
            if not outcome.ok:
                self.counters.add("pulls_failed")
            return outcome

    async def _transfer(self, job: _Job, order: Sequence[str],
                        state: "_Transfer") -> Optional[PullOutcome]:
        """Try the holders in order until the bytes are in; an outcome only when the
        pull ended without a transfer (no room here, or the object was made here)."""
        for holder in order:
            conn: Optional[_Conn] = None
            try:
                conn, header = await self._request(holder, job)
                if not header.found:
                    self._release(conn)
                    conn = None
                    raise HolderError(MISSING, header.message or "not found")
                if state.entry is None:
                    created = await self._create(job, header.size)
                    if isinstance(created, PullOutcome):
                        self._discard(conn)  # the holder is sending bytes we will not read
                        return created
                    state.entry, state.size = created, header.size
                    state.fd = os.open(job.path, os.O_WRONLY | os.O_CLOEXEC)
                elif header.size != state.size:
                    raise HolderError(REFUSED, f"it has {header.size} bytes under this id, "
                                               f"another holder had {state.size}")
                await asyncio.to_thread(self._receive, conn, state.fd, job, state.size)
                self._release(conn)
                return None
            except HolderError as exc:
                if conn is not None:
                    self._discard(conn)
                if job.cancelled:
                    return None
                if exc.kind == UNREACHABLE:
                    self._failed_at[holder] = time.monotonic()
                state.failures.append(Failure(holder, exc.kind, exc.message))
                if state.entry is not None:
                    self.counters.add("pull_failovers")
                log.warning("pulling object %s from %s: %s (%d of %s bytes in)",
                            job.object_id.hex()[:16], holder, exc.message, job.offset,
                            state.size if state.entry is not None else "?")
            except BaseException:  # PullCancelled, or this store stopping
                if conn is not None:
                    self._discard(conn)
                if job.cancelled:
                    return None
                raise
        return None

    def _finish(self, job: _Job, state: "_Transfer") -> PullOutcome:
        """Seal the copy when every byte is in; otherwise free it, and say why."""
        svc = self._svc
        oid = job.object_id
        mine = state.entry is not None and svc.state.get(oid) is state.entry
        if mine and not job.cancelled and job.offset == state.size:
            svc.seal_pulled(oid)
            return PullOutcome(ok=True, path=job.path, size=state.size)
        if mine and job.seal_requested:
            # A local writer wrote the same (immutable) object and sealed it meanwhile.
            svc.seal_pulled(oid)
            return PullOutcome(ok=True, path=job.path, size=state.size,
                               how=object_store_pb2.PullReply.LOCAL)
        if mine:
            svc.discard_pulled(oid)
        if job.cancelled or (state.entry is not None and not mine):
            return PullOutcome(ok=False, failures=state.failures,
                               message="it was freed while being pulled")
        return PullOutcome(ok=False, failures=state.failures,
                           message="no holder could deliver it")

    def _abandon(self, job: _Job, state: "_Transfer") -> None:
        """An unexpected error: leave no half-written copy behind."""
        if state.entry is not None and self._svc.state.get(job.object_id) is state.entry:
            self._svc.discard_pulled(job.object_id)

    async def _create(self, job: _Job, size: int) -> "object | PullOutcome":
        """The local entry the bytes go into; a PullOutcome when there is no room, or when
        a local writer created the object meanwhile (then its Seal is waited for)."""
        result = await self._svc.create(job.object_id, size, None)
        if result.full:
            return PullOutcome(ok=False, full=True, message=result.message)
        if result.exists:
            return await self._local(job.object_id, 60.0)
        job.path = result.path
        return self._svc.state.get(job.object_id)

    # -- connections ------------------------------------------------------------------------
    async def _request(self, holder: str, job: _Job
                       ) -> Tuple[_Conn, object_store_pb2.TransferHeader]:
        """A connection to holder with the answer to "object from job.offset" read."""
        for attempt in range(3):
            conn = self._pooled(holder)
            if conn is None:
                port = await self._transfer_port(holder, fresh=attempt > 0)
                try:
                    conn = await asyncio.to_thread(self._connect, holder, port)
                except HolderError as exc:
                    if exc.stale and attempt < 2:
                        continue  # its port changed (store restarted): ask for it again
                    raise
            with self._lock:
                self._busy.add(conn)
            try:
                header = await asyncio.to_thread(self._ask, conn, job.object_id, job.offset)
                return conn, header
            except HolderError as exc:
                self._discard(conn)
                if not (exc.stale and conn.reused) or attempt == 2:
                    raise
                self._drop_idle(holder)
        raise AssertionError("unreachable")

    async def _transfer_port(self, holder: str, fresh: bool) -> int:
        if fresh:
            self._ports.pop(holder, None)
        port = self._ports.get(holder)
        if port is None:
            port = self._ports[holder] = await self._port_of(holder)
        return port

    def _pooled(self, holder: str) -> Optional[_Conn]:
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(holder, [])
            while idle:
                conn = idle.pop()
                if now - conn.last_used < POOL_IDLE_S:
                    conn.reused = True
                    return conn
                conn.sock.close()
        return None

    def _discard(self, conn: _Conn) -> None:
        with self._lock:
            self._busy.discard(conn)
        conn.sock.close()

    def _release(self, conn: _Conn) -> None:
        """Back to the pool after a complete answer (the connection is between requests)."""
        conn.last_used = time.monotonic()
        with self._lock:
            self._busy.discard(conn)
            idle = self._idle.setdefault(conn.holder, [])
            if len(idle) < POOL_PER_HOLDER:
                idle.append(conn)
                return
        conn.sock.close()

    def _drop_idle(self, holder: str) -> None:
        """A pooled connection of holder was dead (its store restarted?): so are the others."""
        with self._lock:
            idle = self._idle.pop(holder, [])
        for conn in idle:
            conn.sock.close()

    async def close(self) -> None:
        """Stop every transfer (a thread blocked in recv is woken by the shutdown) and
        close every connection."""
        with self._lock:
            busy = list(self._busy)
            idle = [c for conns in self._idle.values() for c in conns]
            self._idle.clear()
        for conn in busy:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for conn in idle:
            conn.sock.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _connect(self, holder: str, port: int) -> _Conn:
        """Thread: connect to holder's transfer port and pass its hello."""
        host = holder.rsplit(":", 1)[0].strip("[]")
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        except ConnectionRefusedError as exc:
            raise HolderError(UNREACHABLE, f"its transfer port {host}:{port} refused the "
                                           f"connection ({exc.strerror})", stale=True) from None
        except OSError as exc:
            raise HolderError(UNREACHABLE, f"cannot connect to its transfer port "
                                           f"{host}:{port}: {exc}") from None
        try:
            frames.tune(sock)
            sock.sendall(frames.hello(self._token))
            answer = frames.recv_frame(sock, frames.MAX_HELLO_BYTES)
        except (OSError, frames.FrameError) as exc:
            sock.close()
            raise HolderError(UNREACHABLE, f"its transfer port {host}:{port} broke the "
                                           f"handshake: {exc}") from None
        if answer is None:
            sock.close()
            raise HolderError(UNREACHABLE, f"its transfer port {host}:{port} closed the "
                                           "connection during the handshake")
        if answer:
            sock.close()
            raise HolderError(REFUSED, f"its transfer port {host}:{port} refused us: "
                                       f"{answer.decode(errors='replace')}")
        kernel_timeouts(sock, STALL_TIMEOUT_S, STALL_TIMEOUT_S)
        return _Conn(sock, holder, time.monotonic())

    @staticmethod
    def _ask(conn: _Conn, object_id: bytes, offset: int) -> object_store_pb2.TransferHeader:
        """Thread: send a request and read its header frame."""
        request = object_store_pb2.TransferRequest(object_id=object_id, offset=offset)
        try:
            conn.sock.sendall(frames.frame(request.SerializeToString()))
            payload = frames.recv_frame(conn.sock, MAX_REQUEST_BYTES)
        except TIMED_OUT:
            raise HolderError(UNREACHABLE, f"no answer in {STALL_TIMEOUT_S:g}s") from None
        except (OSError, frames.FrameError) as exc:
            raise HolderError(UNREACHABLE, f"connection broke: {exc}", stale=True) from None
        if payload is None:
            raise HolderError(UNREACHABLE, "it closed the connection", stale=True)
        try:
            return object_store_pb2.TransferHeader.FromString(payload)
        except DecodeError:
            raise HolderError(REFUSED, "it sent a malformed header") from None

    def _receive(self, conn: _Conn, fd: int, job: _Job, size: int) -> None:
        """Thread: receive the object's bytes from job.offset on into the file."""
        buf = bytearray(min(CHUNK_BYTES, max(size - job.offset, 1)))
        view = memoryview(buf)
        sock = conn.sock
        while job.offset < size:
            if job.cancelled:
                raise PullCancelled()
            want = min(len(buf), size - job.offset)
            got = 0
            try:
                while got < want:
                    k = sock.recv_into(view[got:want], 0, socket.MSG_WAITALL)
                    if not k:
                        break
                    got += k
            except TIMED_OUT:
                self._keep(fd, view, got, job)
                raise HolderError(UNREACHABLE, f"it stalled: no data for {STALL_TIMEOUT_S:g}s "
                                               f"after {job.offset} of {size} bytes") from None
            except OSError as exc:
                self._keep(fd, view, got, job)
                raise HolderError(UNREACHABLE, f"the connection broke after {job.offset} of "
                                               f"{size} bytes: {exc}") from None
            self._keep(fd, view, got, job)
            if got < want:
                raise HolderError(UNREACHABLE, f"it closed the connection after {job.offset} "
                                               f"of {size} bytes (the store or its node died?)")

    def _keep(self, fd: int, view: memoryview, n: int, job: _Job) -> None:
        """Write what arrived at the job's offset, and count it."""
        done = 0
        while done < n:
            done += os.pwrite(fd, view[done:n], job.offset + done)
        job.offset += n
        if n:
            self.counters.add("pulled_bytes", n)
