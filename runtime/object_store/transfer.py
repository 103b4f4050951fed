"""Moving objects between nodes: each store serves its objects on a transfer port and
pulls other stores' objects into its own shared memory.

A reader on node A whose object lives on node B asks A's store to ``Pull`` it
(gRPC, one call). A's store opens (or reuses) a TCP connection to B's transfer
port, asks for the object from an offset, and B answers with a header and the
raw bytes, sent with ``sendfile`` straight from the object's file. A receives
them into a 4 MiB buffer and ``pwrite``s each chunk into the object file it
created, then seals it. No Python process ever holds more than one chunk.

**Decision (the stores pull, not the core workers).** The store is the one
process per node that sees every reader, so an object that many workers of the
node want is transferred once (the others join the transfer under way), its
counters are the node's, and a reader that exits mid-pull costs nothing. The
bytes no longer pass through a core worker's event loop either.

**Decision (raw TCP, not a gRPC stream).** gRPC-Python copies every message
several times (into the HTTP/2 frames, out of them, into a ``bytes``, into the
protobuf); the old ``Read`` stream moved 0.2-0.5 GB/s here. Measured on this
2-core machine, 1 GiB over loopback from a file in /dev/shm into another:

====================================================  ==========  ================
receiver                                               GB/s        receiver CPU s/GB
====================================================  ==========  ================
``recv_into`` an ``mmap`` of the new file (MAP_POPULATE)  0.9         0.84
``splice`` socket -> pipe -> file                      1.1-2.6     0.60
``recv_into`` a 4 MiB buffer, ``pwrite`` to the file   1.9-2.5     0.39
====================================================  ==========  ================

Writing through the mapping is the slowest: each fresh tmpfs page costs a page
fault. The bounce buffer stays in cache, so its extra copy is cheaper than the
faults; that is what the receiver does. The sender uses ``sendfile`` (no copy
through user space).

**Failures.** Holders are tried in the order the caller gives, those that failed
in the last ``RECENT_FAILURE_S`` seconds last. A holder that refuses the
connection, breaks it, stalls for ``STALL_TIMEOUT_S`` or does not have the object
is recorded with its kind (unreachable, missing, refused) and the next one
resumes at the byte where the last one stopped (objects are immutable). When
every holder failed, the partial copy is deleted and the reply lists each
holder's failure, so the object's owner can decide to rebuild the object.

**The port.** A puller's first frame is the ``frames.hello`` with the cluster
token; nothing else is read before it matches. As on the call port, waiting
connections cost no thread: the store's event loop reads the hellos (with a
deadline and a size limit, at most ``frames.MAX_UNAUTHENTICATED`` waiting, the
oldest pushed out), and only an authenticated connection gets a thread.
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

from google.protobuf.message import DecodeError

from runtime import frames
from runtime.protocol import object_store_pb2

if TYPE_CHECKING:
    from runtime.object_store.server import GetResult, StoreService

log = logging.getLogger("object_store")

#: Receive buffer of a pull: bytes held in Python memory per transfer.
CHUNK_BYTES = 4 * 1024 * 1024
#: Connecting to a holder and its hello, together.
CONNECT_TIMEOUT_S = 5.0
#: A holder that sends nothing for this long mid-transfer is given up on.
STALL_TIMEOUT_S = 30.0
#: The server closes a connection that has asked for nothing for this long.
SERVER_IDLE_S = 120.0
#: A pooled connection idle for longer is closed rather than reused.
POOL_IDLE_S = 60.0
#: Idle connections kept per holder.
POOL_PER_HOLDER = 4
#: Transfers into this store at once; more Pulls wait for a slot.
MAX_PULLS_AT_ONCE = 8
#: Authenticated connections served at once; more are refused with a reason.
MAX_SERVING = 256
#: A holder that failed this recently is tried after the others.
RECENT_FAILURE_S = 30.0
#: Largest TransferRequest frame (an object id and an offset).
MAX_REQUEST_BYTES = 1024
#: Sending is cut into slices this large when the serve rate is capped.
RATE_SLICE_BYTES = 1024 * 1024

UNREACHABLE = object_store_pb2.HolderFailure.UNREACHABLE
MISSING = object_store_pb2.HolderFailure.MISSING
REFUSED = object_store_pb2.HolderFailure.REFUSED


class HolderError(Exception):
    """One holder could not deliver (the pull goes on with the next)."""

    def __init__(self, kind: int, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        # A pooled connection that failed before any answer: the holder may simply have
        # closed it while idle, so a fresh connection is tried before giving up on it.
        self.stale = stale


class PullCancelled(Exception):
    """The object was deleted while it was being pulled."""


class TransferCounters:
    """The store's transfer figures (StoreStats); bumped from the serving and pulling
    threads, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pulls = 0
        self.pulls_joined = 0
        self.pulls_failed = 0
        self.pull_failovers = 0
        self.pulled_bytes = 0
        self.serves = 0
        self.served_bytes = 0

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


#: What a blocking call on a socket with kernel timeouts raises when one expires.
TIMED_OUT = (socket.timeout, BlockingIOError)


def _kernel_timeouts(sock: socket.socket, recv_s: float, send_s: float) -> None:
    """Make sock blocking, with timeouts the kernel applies (SO_RCVTIMEO, SO_SNDTIMEO).

    With Python's own timeouts every call is a poll plus a non-blocking call that
    returns whatever the socket buffer holds; blocking calls move a whole 4 MiB chunk
    (recv with MSG_WAITALL, sendfile of the whole range) per system call instead.
    """
    sock.settimeout(None)
    for opt, seconds in ((socket.SO_RCVTIMEO, recv_s), (socket.SO_SNDTIMEO, send_s)):
        whole = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, opt,
                        struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def _recv_exact_blocking(sock: socket.socket, n: int) -> Optional[bytes]:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            return None
        got += k
    return bytes(buf)


def _recv_frame(sock: socket.socket, limit: int) -> Optional[bytes]:
    """A frame's payload (blocking, the socket's timeout applies), None at end of stream."""
    header = _recv_exact_blocking(sock, 4)
    if header is None:
        return None
    n = int.from_bytes(header, "little")
    if n > limit:
        raise frames.FrameError(f"frame of {n} bytes is over the {limit}-byte limit")
    return _recv_exact_blocking(sock, n)


def _host_key(peer: object) -> str:
    """Waiting connections are counted per IPv4 address, or per IPv6 /64."""
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])  # type: ignore[index]
    except (ValueError, TypeError, IndexError):
        return str(peer)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


# ---- serving ------------------------------------------------------------------------------
class TransferServer:
    """The transfer port: hellos on the event loop, authenticated connections on threads.

    ``resolve(object_id)`` (a coroutine run on the store's loop) says where a sealed
    object's bytes are; the serving thread opens that file and sends from it, so a
    spill or Delete that unlinks the file meanwhile does not disturb the transfer.
    """

    def __init__(self, token: str, resolve: Callable[[bytes], Awaitable["GetResult"]],
                 counters: TransferCounters, *, max_bytes_per_s: int = 0,
                 handshake_timeout_s: float = frames.HANDSHAKE_TIMEOUT_S,
                 max_unauthenticated: int = frames.MAX_UNAUTHENTICATED,
                 max_unauthenticated_per_host: int = frames.MAX_UNAUTHENTICATED_PER_HOST) -> None:
        if not token:
            raise ValueError("a cluster token is required to serve the transfer port")
        self._token = token
        self._resolve = resolve
        self.counters = counters
        self.max_bytes_per_s = max_bytes_per_s
        self._handshake_timeout_s = handshake_timeout_s
        self._max_unauth = max_unauthenticated
        self._max_unauth_host = max_unauthenticated_per_host
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._listener: Optional[socket.socket] = None
        self._acceptor: Optional[asyncio.Task] = None
        # Connections waiting for their hello, oldest first, in all and per host.
        self._waiting: "collections.OrderedDict[asyncio.Task, str]" = collections.OrderedDict()
        self._waiting_per_host: Dict[str, int] = collections.Counter()
        self._serving: Dict[socket.socket, threading.Thread] = {}
        self._serving_lock = threading.Lock()
        self._closed = False
        self._last_refusal_log = 0.0
        self._refusals_unlogged = 0
        self.port = 0

    async def start(self, host: str, port: int = 0) -> int:
        """Bind host:port (0: any free port), start accepting, return the bound port."""
        self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError as exc:
            listener.close()
            raise OSError(exc.errno, f"cannot bind the transfer port "
                                     f"{host}:{port}: {exc.strerror}") from None
        listener.listen(512)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = asyncio.ensure_future(self._accept_loop())
        return self.port

    async def close(self) -> None:
        """Stop accepting, drop waiting connections, end the serving threads."""
        self._closed = True
        if self._acceptor is not None:
            self._acceptor.cancel()
            await asyncio.gather(self._acceptor, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        waiting = list(self._waiting)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        with self._serving_lock:
            serving = list(self._serving.items())
        for sock, _thread in serving:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _sock, thread in serving:
            await asyncio.to_thread(thread.join, 5.0)

    # -- handshake (event loop) ------------------------------------------------------------
    async def _accept_loop(self) -> None:
        assert self._listener is not None and self._loop is not None
        while True:
            try:
                sock, peer = await self._loop.sock_accept(self._listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("transfer port: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            host = _host_key(peer)
            self._make_room(host)
            task = asyncio.ensure_future(self._handshake(sock, peer))
            self._waiting[task] = host
            self._waiting_per_host[host] += 1
            task.add_done_callback(self._forget_waiting)

    def _forget_waiting(self, task: asyncio.Task) -> None:
        host = self._waiting.pop(task, None)
        if host is not None:
            self._waiting_per_host[host] -= 1
            if self._waiting_per_host[host] <= 0:
                del self._waiting_per_host[host]

    def _make_room(self, host: str) -> None:
        """Push out the oldest waiting connection of `host` (or of all) when a cap is hit:
        a real puller sends its hello at once, so only silent peers are pushed out."""
        if self._waiting_per_host.get(host, 0) >= self._max_unauth_host:
            for task, h in self._waiting.items():
                if h == host:
                    task.cancel()
                    self._forget_waiting(task)
                    break
        if len(self._waiting) >= self._max_unauth:
            task = next(iter(self._waiting))
            task.cancel()
            self._forget_waiting(task)

    async def _handshake(self, sock: socket.socket, peer: object) -> None:
        assert self._loop is not None
        handed_over = False
        try:
            reason = await asyncio.wait_for(self._read_hello(sock), self._handshake_timeout_s)
            if reason is not None:
                self._note_refusal(peer, reason)
                await self._loop.sock_sendall(sock, frames.frame(reason.encode()[:1000]))
                return
            with self._serving_lock:
                full = len(self._serving) >= MAX_SERVING
            if full or self._closed:
                why = ("the store is shutting down" if self._closed else
                       f"too many transfer connections ({MAX_SERVING}); try again later")
                await self._loop.sock_sendall(sock, frames.frame(why.encode()))
                return
            await self._loop.sock_sendall(sock, frames.frame(b""))
            _kernel_timeouts(sock, SERVER_IDLE_S, STALL_TIMEOUT_S)
            frames.tune(sock)
            thread = threading.Thread(target=self._serve, args=(sock, peer),
                                      name="transfer-serve", daemon=True)
            with self._serving_lock:
                self._serving[sock] = thread
            handed_over = True
            thread.start()
        except asyncio.TimeoutError:
            self._note_refusal(peer, f"no complete hello within {self._handshake_timeout_s:g}s")
        except (OSError, frames.FrameError) as exc:
            self._note_refusal(peer, str(exc))
        finally:
            if not handed_over:
                sock.close()

    async def _read_hello(self, sock: socket.socket) -> Optional[str]:
        """Read exactly the hello (never what is pipelined behind it); None if it matches."""
        header = await self._recv_exact(sock, 4)
        if header is None:
            return "closed before its hello"
        n = int.from_bytes(header, "little")
        if n > frames.MAX_HELLO_BYTES:
            return f"hello of {n} bytes is over the {frames.MAX_HELLO_BYTES}-byte limit"
        payload = await self._recv_exact(sock, n)
        if payload is None:
            return "closed during its hello"
        return frames.check_hello(payload, self._token)

    async def _recv_exact(self, sock: socket.socket, n: int) -> Optional[bytes]:
        assert self._loop is not None
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = await self._loop.sock_recv_into(sock, view[got:])
            if not k:
                return None
            got += k
        return bytes(buf)

    def _note_refusal(self, peer: object, reason: str) -> None:
        """One warning per 10 s at most: a peer without the token chooses how often."""
        now = time.monotonic()
        if now - self._last_refusal_log < 10.0:
            self._refusals_unlogged += 1
            return
        more = (f" ({self._refusals_unlogged} more refused since the last such line)"
                if self._refusals_unlogged else "")
        log.warning("transfer port: refused a connection from %s: %s%s", peer, reason, more)
        self._last_refusal_log = now
        self._refusals_unlogged = 0

    # -- serving (one thread per authenticated connection) ------------------------------------
    def _serve(self, sock: socket.socket, peer: object) -> None:
        try:
            while not self._closed:
                try:
                    payload = _recv_frame(sock, MAX_REQUEST_BYTES)
                except TIMED_OUT:
                    return  # idle: the puller reconnects when it needs us again
                if payload is None:
                    return
                request = object_store_pb2.TransferRequest.FromString(payload)
                if not self._serve_one(sock, request):
                    return
        except (OSError, frames.FrameError, DecodeError) as exc:
            log.info("transfer connection from %s ended: %s", peer, exc)
        except Exception:  # e.g. the store's loop did not answer where an object is
            log.exception("transfer connection from %s failed", peer)
        finally:
            with self._serving_lock:
                self._serving.pop(sock, None)
            sock.close()

    def _serve_one(self, sock: socket.socket, request: object_store_pb2.TransferRequest) -> bool:
        """Answer one request; False when the connection must close (a short send)."""
        oid = request.object_id
        fd, size, why = self._open(oid)
        if fd < 0:
            sock.sendall(frames.frame(object_store_pb2.TransferHeader(
                found=False, message=why).SerializeToString()))
            return True
        try:
            offset = request.offset
            if not 0 <= offset <= size:
                sock.sendall(frames.frame(object_store_pb2.TransferHeader(
                    found=False, size=size,
                    message=f"offset {offset} is outside the object's {size} bytes")
                    .SerializeToString()))
                return True
            length = size - offset
            self.counters.add("serves")
            sock.sendall(frames.frame(object_store_pb2.TransferHeader(
                found=True, size=size, length=length).SerializeToString()))
            sent = self._send_file(sock, fd, offset, length)
        finally:
            os.close(fd)
        if sent != length:
            log.warning("object %s: sent %d of %d bytes (its file is shorter); closing the "
                        "connection so the puller tries another holder", oid.hex()[:16], sent,
                        length)
            return False
        return True

    def _open(self, oid: bytes) -> Tuple[int, int, str]:
        """(fd, size, "") of a sealed object's file, or (-1, 0, why not)."""
        assert self._loop is not None
        for _ in range(3):  # a spill may unlink the path between Get and open: ask again
            fut = asyncio.run_coroutine_threadsafe(self._resolve(oid), self._loop)
            res = fut.result(60.0)
            if not res.found:
                return -1, 0, "not in this store (freed, never here, or not sealed)"
            try:
                fd = os.open(res.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            if os.fstat(fd).st_size < res.size:
                os.close(fd)
                return -1, 0, f"its file {res.path} is shorter than {res.size} bytes"
            return fd, res.size, ""
        return -1, 0, "its file kept vanishing (spilled or freed while being opened)"

    def _send_file(self, sock: socket.socket, fd: int, offset: int, length: int) -> int:
        """sendfile from the object's file; paced when a serve rate is set."""
        sent = 0
        rate = self.max_bytes_per_s
        start = time.monotonic()
        while sent < length:
            want = length - sent if not rate else min(length - sent, RATE_SLICE_BYTES)
            n = self._sendfile(sock, fd, offset + sent, want)
            if n == 0:
                break
            sent += n
            self.counters.add("served_bytes", n)
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        return sent

    @staticmethod
    def _sendfile(sock: socket.socket, fd: int, offset: int, count: int) -> int:
        """Up to count bytes (one blocking call unless the peer stalls); 0 at the file's end."""
        total = 0
        while total < count:
            try:
                n = os.sendfile(sock.fileno(), fd, offset + total, count - total)
            except BlockingIOError:
                raise socket.timeout(f"the puller took no data for {STALL_TIMEOUT_S:g}s") from None
            if n == 0:
                break
            total += n
        return total


# ---- pulling ------------------------------------------------------------------------------
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
            answer = _recv_frame(sock, frames.MAX_HELLO_BYTES)
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
        _kernel_timeouts(sock, STALL_TIMEOUT_S, STALL_TIMEOUT_S)
        return _Conn(sock, holder, time.monotonic())

    @staticmethod
    def _ask(conn: _Conn, object_id: bytes, offset: int) -> object_store_pb2.TransferHeader:
        """Thread: send a request and read its header frame."""
        request = object_store_pb2.TransferRequest(object_id=object_id, offset=offset)
        try:
            conn.sock.sendall(frames.frame(request.SerializeToString()))
            payload = _recv_frame(conn.sock, MAX_REQUEST_BYTES)
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
