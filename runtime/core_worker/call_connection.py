"""The caller's end of a sync actor's call port (runtime/core_worker/actor_call_server.py).

One TCP connection per (caller, actor), speaking runtime/frames.py: calls queued
during one turn of the event loop go out as one TaskBatch frame, results come
back as ResultBatch frames in order. It looks to the actor submitter exactly
like a gRPC WorkerConnection: `send`, `inflight`, `dead`, `close`, and the same
handler callbacks.

The hello has a deadline (`frames.HANDSHAKE_TIMEOUT_S`, from connect to answer): a
port that accepts and never answers fails the connection with an error naming it,
and so does one whose answer is larger than a hello's answer can be. Calls are
written right behind the hello (the server reads nothing past the hello until it
matches); `handshake_error` tells the handler when the connection failed before the
port accepted it, so none of them ran.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

from runtime import frames
from runtime.core_worker.worker_connection import Connection
from runtime.protocol import common_pb2, core_worker_pb2

log = logging.getLogger("runtime.core_worker")


class CallConnection(Connection, asyncio.Protocol):
    def __init__(self, handler, address: str, worker_id: bytes, job_config: common_pb2.JobConfig,
                 token: str, control_address: str,
                 handshake_timeout_s: float = frames.HANDSHAKE_TIMEOUT_S) -> None:
        super().__init__(handler, address, worker_id, job_config, control_address)
        self.transport: Optional[asyncio.Transport] = None
        self._token = token
        self._frames = frames.FrameBuffer(first_limit=frames.MAX_HELLO_BYTES)
        self._accepted = False
        # Set when the connection failed before the port accepted it: nothing sent ran.
        self.handshake_error: Optional[str] = None
        self._flush_scheduled = False
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._handshake_timeout_s = handshake_timeout_s
        self._handshake_timer: Optional[asyncio.TimerHandle] = self._loop.call_later(
            handshake_timeout_s, self._handshake_expired)
        self._connecting = asyncio.ensure_future(self._connect())

    def running_slots(self) -> int:
        """None of the calls runs before the port accepted the hello (they may never)."""
        return self.concurrency if self._accepted else 0

    def _describe(self) -> str:
        return (f"the actor's call port at {self.address} (worker {self.worker_id.hex()[:8]}, "
                f"control port {self.control_address})")

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self._accepted:
            self._lost(f"{self._describe()} did not answer the hello within "
                       f"{self._handshake_timeout_s:g}s; is something else listening there, or "
                       f"is the actor's process stuck?")

    async def _connect(self) -> None:
        host, _, port = self.address.rpartition(":")
        try:
            await self._loop.create_connection(lambda: self, host.strip("[]"), int(port))
        except OSError as exc:
            self._lost(f"cannot connect to {self._describe()}: {exc}")

    # -- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        if self._closed:
            transport.close()
            return
        self.transport = transport
        frames.tune(transport.get_extra_info("socket"))
        transport.write(frames.hello(self._token))
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            for payload in self._frames.feed(data):
                if not self._accepted:
                    if payload:
                        self._lost(f"{self._describe()} refused the connection: "
                                   f"{payload.decode(errors='replace')}")
                        return
                    self._accepted = True
                    if self._handshake_timer is not None:
                        self._handshake_timer.cancel()
                        self._handshake_timer = None
                    continue
                for result in core_worker_pb2.ResultBatch.FromString(payload).results:
                    self.handler.on_result(self, result)
        except frames.FrameError as exc:
            self._lost(f"{self._describe()} broke the framing: {exc}")
        except Exception as exc:
            log.exception("bad results from %s", self.address)
            self._lost(f"bad results from {self._describe()}: {exc!r}")

    def connection_lost(self, exc: Optional[Exception]) -> None:
        when = "" if self._accepted else " before answering the hello"
        self._lost(f"{self._describe()} closed the connection{when}"
                   f"{': ' + str(exc) if exc else ''}")

    # -- sending ---------------------------------------------------------------------------------------
    def send(self, spec: common_pb2.TaskSpec) -> None:
        """Queue a call; everything queued during this turn of the loop goes as one frame."""
        self.out.append(spec)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.dead or not self.out or self.transport is None:
            return
        self.transport.write(frames.frame(self._take_batch().SerializeToString()))

    def _lost(self, error: str) -> None:
        if self.dead:
            return
        self.dead = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if not self._accepted:
            self.handshake_error = error
        if self.transport is not None:
            self.transport.close()
        if not self._closed:
            self.handler.on_connection_lost(self, error)

    def close(self) -> None:
        self._closed = True
        self.dead = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._connecting.cancel()
        if self.transport is not None:
            self.transport.close()
