"""The call port of a sync actor: each caller's calls run on the thread that reads them.

On the worker's gRPC server a call crosses threads twice (the event loop reads
it, the main thread runs it, the loop writes the result) and pays gRPC-Python's
per-message cost on top; together most of a sync actor call's latency. Here each
caller has one TCP connection (runtime/frames.py) served by one thread that reads
a batch of calls, runs them one at a time (under `Executor.actor_lock`, shared
by every caller) and writes the results: one read, one run, one write.

Only sync actors with max_concurrency 1 and no concurrency groups open one: async and
threaded actors (a sync actor with groups is threaded) run calls concurrently on their
loops or pools, and tasks never come here. The
port goes to the GCS in the creation result; the GCS publishes it in the actor's
address (`Address.task_port`) and callers connect to it. Cancels, borrower
updates and everything else still use the worker's gRPC port.

A generator call streams on the same connection: each item goes out as a ResultBatch
frame as soon as it is yielded, before the call's final result. Under back-pressure the
thread reads the socket while the generator waits: acknowledgements (TaskSpecs with
`generator_ack`) are applied, calls are kept in order and run after the generator, and
a closed connection ends the generator (see `_CallStream`).

A peer gets a thread only once its hello carried the cluster token. Until then
one thread (`actor-calls`) holds every connection in a selector: it accepts, reads
exactly the hello's bytes (never what is pipelined behind them), and closes a
connection whose hello is not complete by its deadline, is over the size limit,
or does not match. At most `frames.MAX_UNAUTHENTICATED` connections wait there,
at most `frames.MAX_UNAUTHENTICATED_PER_HOST` of them from one host. A new
connection beyond a cap pushes out the oldest waiting one (its host's, or the
oldest of all), after the hellos that have already arrived are read: a caller
writes its hello as soon as it is connected, so a flood of silent connections
churns through its own and never locks a caller out, which closing the new
ones did. So an unauthenticated peer costs a socket and at most a KiB, for at
most `frames.HANDSHAKE_TIMEOUT_S`, and can make the actor log one line per
`REFUSAL_LOG_INTERVAL_S` at most.
"""
from __future__ import annotations

import logging
import select
import selectors
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional

from google.protobuf.message import DecodeError

from runtime import frames
from runtime.protocol import common_pb2, core_worker_pb2

if TYPE_CHECKING:
    from runtime.core_worker.executor import Executor

log = logging.getLogger("runtime.worker")
# A long batch of calls sends back what has finished at least this often.
PARTIAL_RESULTS_S = 0.002
# Refused connections are logged at most once per this many seconds, with a count of the rest.
REFUSAL_LOG_INTERVAL_S = 10.0
# Connections accepted per turn of the handshake thread: between two batches it reads the
# hellos that came in, so a burst of connections cannot push out a caller whose hello is
# already waiting to be read.
ACCEPT_BATCH = 32
_HEADER_SIZE = 4


class _CallStream:
    """One caller's connection, as Executor.execute sees it: the job its calls belong to,
    and what a generator call needs while it runs on the connection's thread. Its items
    go out at once (`send_item`), and while back-pressure pauses it the thread goes on
    reading the socket (`read`): acknowledgements are applied, calls are kept in
    `backlog`, in order, for `_calls` to run after it. That thread is the socket's only
    reader and writer (a sync actor with a call port runs calls one at a time, each on
    the thread of the connection it came on), so nothing here is locked."""

    __slots__ = ("job", "sock", "executor", "results", "backlog", "closed", "_poll")

    def __init__(self, sock: socket.socket, executor: "Executor") -> None:
        self.job: Optional[common_pb2.JobConfig] = None
        self.sock = sock
        self.executor = executor
        self.results: List[common_pb2.TaskResult] = []  # finished calls not sent yet
        self.backlog: Deque[common_pb2.TaskSpec] = deque()  # calls read, not run yet
        self.closed = False  # the caller went away: nothing sent now reaches it
        self._poll: Optional[select.poll] = None

    def take(self, payload: bytes) -> None:
        """A TaskBatch frame from the caller: acknowledgements are applied now, calls
        queue behind those read before them."""
        batch = core_worker_pb2.TaskBatch.FromString(payload)
        if batch.HasField("job_config"):
            self.job = batch.job_config
        backlog = self.backlog
        for spec in batch.tasks:
            if spec.generator_ack:
                self.executor.generator_ack(spec.task_id, spec.generator_ack)
            else:
                backlog.append(spec)

    def send_results(self) -> None:
        """What has finished goes out, after the borrower registrations (and printed
        lines) it depends on."""
        ex = self.executor
        if ex.must_flush():
            ex.cw.run(ex.flush())
        payload = core_worker_pb2.ResultBatch(results=self.results).SerializeToString()
        self.results.clear()
        self.sock.sendall(frames.frame(payload))

    def send_item(self, item: common_pb2.TaskResult) -> None:
        """A generator call yielded: the item goes out now, behind the results of the
        calls that ran before it. A caller gone only marks the stream closed (the
        generator stops at its next item)."""
        if self.closed:
            return
        self.results.append(item)
        try:
            self.send_results()
        except OSError as exc:
            self.closed = True
            log.debug("actor call connection closed under a generator call: %s", exc)

    def read(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for a frame from the caller and take it; a
        closed or broken connection marks the stream closed."""
        if self.closed:
            return
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.sock, select.POLLIN)
        try:
            if not self._poll.poll(timeout * 1000):
                return
            payload = frames.recv_frame(self.sock)
            if payload is None:
                self.closed = True
                return
            self.take(payload)
        except (OSError, frames.FrameError, DecodeError) as exc:
            self.closed = True
            log.debug("actor call connection failed under a generator call: %s", exc)


class RateLimitedLog:
    """One WARNING per `interval` seconds at most; what comes in between is counted and
    reported with the next line (or by `flush` once the interval has passed)."""

    def __init__(self, what: str, interval: float = REFUSAL_LOG_INTERVAL_S) -> None:
        self._what = what
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0
        self._last = ""

    def note(self, detail: str, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        self._last = detail
        if now < self._next:
            self._suppressed += 1
            return
        more = (f" ({self._suppressed} more in the last {self._interval:.0f}s not logged)"
                if self._suppressed else "")
        log.warning("%s: %s%s", self._what, detail, more)
        self._suppressed = 0
        self._next = now + self._interval

    def flush(self, now: float) -> Optional[float]:
        """Log the count of what was held back once the interval is over; returns when
        to call again (None: nothing held back)."""
        if not self._suppressed:
            return None
        if now < self._next:
            return self._next
        log.warning("%s: %d more in the last %.0fs, the latest: %s", self._what,
                    self._suppressed, self._interval, self._last)
        self._suppressed = 0
        self._next = now + self._interval
        return None


# ---- serving ------------------------------------------------------------------------------
class _Hello:
    """A connection that has not authenticated yet: its peer, deadline and the bytes of
    its hello read so far."""

    __slots__ = ("peer", "host", "deadline", "buf", "need")

    def __init__(self, peer: Any, deadline: float) -> None:
        self.peer = peer
        self.host = frames.host_of(peer)
        self.deadline = deadline
        self.buf = bytearray()
        self.need = _HEADER_SIZE  # bytes still to read of the header, then of the payload


class ActorCallServer:
    def __init__(self, executor: "Executor", handshake_timeout_s: float = frames.HANDSHAKE_TIMEOUT_S,
                 max_unauthenticated: int = frames.MAX_UNAUTHENTICATED,
                 max_unauthenticated_per_host: int = frames.MAX_UNAUTHENTICATED_PER_HOST) -> None:
        cw = executor.cw
        self.executor = executor
        self.token = cw.token
        self.handshake_timeout_s = handshake_timeout_s
        self.max_unauthenticated = max_unauthenticated
        self.max_per_host = max_unauthenticated_per_host
        family, kind, proto, _name, addr = socket.getaddrinfo(
            cw.node_ip, 0, type=socket.SOCK_STREAM)[0]
        self.sock = socket.socket(family, kind, proto)
        self.sock.bind(addr)
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.sock, selectors.EVENT_READ, None)
        # Waiting connections, oldest first (so also by deadline), in all and by host.
        self._pending: Dict[socket.socket, _Hello] = {}
        self._by_host: Dict[str, Dict[socket.socket, None]] = {}
        self._refusals = RateLimitedLog("refused actor call connections")
        self._errors = RateLimitedLog("actor call port")
        try:
            threading.Thread(target=self._run, name="actor-calls", daemon=True).start()
        except BaseException:
            self._selector.close()
            self.sock.close()
            raise

    # -- the handshake thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if not self._turn():
                    return
            except Exception as exc:  # never let one bad connection close the port
                self._errors.note(f"unexpected error, port still open: {exc!r}")
                time.sleep(0.01)

    def _turn(self) -> bool:
        """One select and what it found; False once the listening socket is closed."""
        now = time.monotonic()
        wake = []
        if self._pending:
            wake.append(next(iter(self._pending.values())).deadline)
        for limiter in (self._refusals, self._errors):
            at = limiter.flush(now)
            if at is not None:
                wake.append(at)
        timeout = max(0.0, min(wake) - now) if wake else None
        events = self._selector.select(timeout)
        accept = False
        for key, _mask in events:  # hellos first: accepting may push out a waiting one
            if key.data is None:
                accept = True
            elif key.fileobj in self._pending:
                self._read_hello(key.fileobj, key.data)
        if accept and not self._accept():
            return False
        now = time.monotonic()
        while self._pending:
            sock, h = next(iter(self._pending.items()))
            if now < h.deadline:
                break
            self._refuse(sock, h.peer, f"no complete hello within {self.handshake_timeout_s:g}s")
        return True

    def _accept(self) -> bool:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = self.sock.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                if self.sock.fileno() < 0:
                    return False  # closed: the worker is going away
                # Out of fds or memory, a peer gone before it was accepted: none of it is
                # a reason to stop serving; try again shortly.
                self._errors.note(f"accept failed ({exc}); trying again")
                time.sleep(0.05)
                return True
            h = _Hello(peer, time.monotonic() + self.handshake_timeout_s)
            self._make_room(h.host)
            sock.setblocking(False)
            self._pending[sock] = h
            self._by_host.setdefault(h.host, {})[sock] = None
            self._selector.register(sock, selectors.EVENT_READ, h)
            self._read_hello(sock, h)  # the hello often came with the connection
        return True  # more may wait: the next turn reads the hellos that came, then accepts

    def _make_room(self, host: str) -> None:
        """Below both caps for a new connection from `host`: the hellos that have arrived
        are read, then the oldest waiting connection of that host (if it has its share)
        or of all (if the table is full) is closed."""
        if (len(self._by_host.get(host, ())) < self.max_per_host
                and len(self._pending) < self.max_unauthenticated):
            return
        for key, _mask in self._selector.select(0):
            if key.data is not None and key.fileobj in self._pending:
                self._read_hello(key.fileobj, key.data)
        bucket = self._by_host.get(host, {})
        if len(bucket) >= self.max_per_host:
            victim = next(iter(bucket))
            why = (f"{self.max_per_host} connections from {host} were waiting to authenticate; "
                   f"the oldest of them goes")
        elif len(self._pending) >= self.max_unauthenticated:
            victim = next(iter(self._pending))
            why = (f"{self.max_unauthenticated} connections were waiting to authenticate; "
                   f"the oldest goes")
        else:
            return
        self._refuse(victim, self._pending[victim].peer, why)

    def _read_hello(self, sock: socket.socket, h: _Hello) -> None:
        while True:
            try:
                chunk = sock.recv(h.need)  # never more than the hello: calls may follow it
            except BlockingIOError:
                return
            except OSError as exc:
                self._drop(sock)
                log.debug("actor call connection from %s ended before its hello: %s", h.peer, exc)
                return
            if not chunk:
                self._refuse(sock, h.peer, "closed before a complete hello", answer=False)
                return
            h.buf += chunk
            h.need -= len(chunk)
            if h.need:
                return
            if len(h.buf) != _HEADER_SIZE:
                break
            n = int.from_bytes(h.buf, "little")
            if n > frames.MAX_HELLO_BYTES:
                self._refuse(sock, h.peer, f"a hello of {n} bytes is over the "
                                           f"{frames.MAX_HELLO_BYTES}-byte limit", answer=False)
                return
            h.need = n
            if not n:
                break
        reason = frames.check_hello(bytes(h.buf[_HEADER_SIZE:]), self.token)
        if reason is not None:
            self._refuse(sock, h.peer, reason)
            return
        self._drop(sock, close=False)
        try:
            threading.Thread(target=self._serve, args=(sock, h.peer), name="actor-caller",
                             daemon=True).start()
        except RuntimeError as exc:  # "can't start new thread": refuse this one, keep the port
            sock.close()
            self._errors.note(f"cannot serve the caller at {h.peer}: {exc}")

    def _drop(self, sock: socket.socket, close: bool = True) -> None:
        h = self._pending.pop(sock, None)
        if h is not None:
            bucket = self._by_host[h.host]
            del bucket[sock]
            if not bucket:
                del self._by_host[h.host]
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        if close:
            sock.close()

    def _refuse(self, sock: socket.socket, peer: Any, reason: str, answer: bool = True) -> None:
        """Close a connection that did not authenticate, with the reason when it can take
        it without waiting (the answer is small and the socket fresh)."""
        if answer:
            try:
                sock.send(frames.frame(reason.encode()[:frames.MAX_HELLO_BYTES]))
            except OSError:
                pass
        self._drop(sock)
        self._refusals.note(f"{peer}: {reason}")

    # -- one authenticated caller, on its own thread -------------------------------------------------
    def _serve(self, sock: socket.socket, peer: Any) -> None:
        try:
            sock.setblocking(True)
            frames.tune(sock)
            sock.sendall(frames.frame(b""))
            self._calls(sock)
        except (OSError, frames.FrameError, DecodeError) as exc:
            log.debug("actor call connection from %s ended: %s", peer, exc)
        finally:
            sock.close()

    def _calls(self, sock: socket.socket) -> None:
        """Run the caller's calls in the order they came, sending results at the end of
        each batch and at least every PARTIAL_RESULTS_S within a long one. Calls read
        while a generator call waited for acknowledgements are in the backlog already."""
        ex = self.executor
        stream = _CallStream(sock, ex)
        backlog = stream.backlog
        results = stream.results
        while True:
            if not backlog:
                payload = frames.recv_frame(sock)
                if payload is None:
                    return
                stream.take(payload)
                continue  # (a frame of acknowledgements only runs nothing)
            started = time.perf_counter()
            while backlog:
                result = ex.execute_call(backlog.popleft(), stream)
                results.append(result)
                if stream.closed:
                    return  # the caller went away during a generator call
                if not backlog or time.perf_counter() - started >= PARTIAL_RESULTS_S:
                    stream.send_results()
                    started = time.perf_counter()
