"""A store's transfer port: serves its objects to other stores' pulls (the protocol and its
decisions are in runtime/object_store/transfer.py)."""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Dict, Optional, Tuple

from google.protobuf.message import DecodeError

from runtime import frames
from runtime.object_store.transfer import (STALL_TIMEOUT_S, SERVER_IDLE_S, MAX_SERVING,
                                           MAX_REQUEST_BYTES, RATE_SLICE_BYTES,
                                           TransferCounters, TIMED_OUT, kernel_timeouts)
from runtime.protocol import object_store_pb2

if TYPE_CHECKING:
    from runtime.object_store.server import GetResult


log = logging.getLogger("object_store")


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
            host = frames.host_of(peer)
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
            kernel_timeouts(sock, SERVER_IDLE_S, STALL_TIMEOUT_S)
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
                    payload = frames.recv_frame(sock, MAX_REQUEST_BYTES)
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
