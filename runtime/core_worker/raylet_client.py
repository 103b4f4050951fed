"""The core worker's side of the raylet Connect stream.

Its background tasks (connecting, reading, writing) never outlive the stream: a
registration that fails or times out, and a stream the raylet ends, cancel the
writer at once, and close() cancels and awaits all three. A writer left waiting on
the outbox of a dropped client would be garbage-collected while pending.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

import grpc

from runtime.protocol import raylet_pb2, raylet_pb2_grpc

log = logging.getLogger("runtime.core_worker")


class RayletClient:
    """Sends ClientMessages in order; hands LeaseGrants to `on_grant` and the memory
    monitor's WorkerKilled notices to `on_notice` (without one, a notice is only logged)."""

    def __init__(self, channel: grpc.aio.Channel, on_grant: Callable[[raylet_pb2.LeaseGrant], None],
                 on_lost: Callable[[str], None],
                 on_notice: Optional[Callable[[raylet_pb2.WorkerKilled], None]] = None) -> None:
        self._stub = raylet_pb2_grpc.RayletStub(channel)
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._on_grant = on_grant
        self._on_lost = on_lost
        self._on_notice = on_notice
        self._call = None
        self._reader: Optional[asyncio.Task] = None
        self._writer: Optional[asyncio.Task] = None
        self._connecting: Optional[asyncio.Task] = None
        self.registered: Optional[raylet_pb2.RegisterAck] = None
        self.closed = False

    async def connect(self, register: raylet_pb2.RegisterClient, timeout: float = 30.0) -> raylet_pb2.RegisterAck:
        """Register within `timeout`, then send whatever was queued meanwhile (messages may
        be sent before the connection is up: they wait in the outbox). On failure nothing
        of the attempt is left running."""
        self._call = self._stub.Connect()
        try:
            first = await asyncio.wait_for(self._register(register), timeout)
        except BaseException:
            self._stop_writer()
            self._call.cancel()
            raise
        self.registered = first.registered
        self._reader = asyncio.ensure_future(self._read())
        return first.registered

    async def _register(self, register: raylet_pb2.RegisterClient) -> raylet_pb2.RayletMessage:
        await self._call.write(raylet_pb2.ClientMessage(register=register))
        self._writer = asyncio.ensure_future(self._write())
        first = await self._call.read()
        if first is grpc.aio.EOF or first.WhichOneof("msg") != "registered":
            raise ConnectionError("the raylet closed the connection during registration")
        return first

    def _stop_writer(self) -> None:
        """The stream is over: nothing more can be written (a half-close would be moot)."""
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()

    def start(self, register: raylet_pb2.RegisterClient, timeout: float = 30.0) -> None:
        """Connect in the background (messages sent meanwhile wait in the outbox); a
        raylet that cannot be reached is reported to on_lost like one that goes away."""
        self._connecting = asyncio.ensure_future(self._connect_or_report(register, timeout))

    async def _connect_or_report(self, register: raylet_pb2.RegisterClient, timeout: float) -> None:
        try:
            await self.connect(register, timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, grpc.RpcError):
                reason = f"cannot connect: {exc.code().name}: {exc.details()}"
            else:
                reason = f"cannot connect: {exc!r}"
            if not self.closed:
                self.closed = True
                self._on_lost(reason)

    async def _write(self) -> None:
        try:
            while True:
                msg = await self._outbox.get()
                if msg is None:
                    await self._call.done_writing()
                    return
                await self._call.write(msg)
        except (asyncio.CancelledError, asyncio.InvalidStateError, grpc.RpcError, grpc.aio.UsageError):
            pass

    async def _read(self) -> None:
        reason = "the raylet closed the connection"
        try:
            while True:
                msg = await self._call.read()
                if msg is grpc.aio.EOF:
                    break
                kind = msg.WhichOneof("msg")
                if kind == "grant":
                    self._on_grant(msg.grant)
                elif kind == "worker_killed":
                    self._notice(msg.worker_killed)
        except asyncio.CancelledError:
            return
        except grpc.RpcError as exc:
            reason = f"lost the raylet connection: {exc.code().name}: {exc.details()}"
        except Exception as exc:  # pragma: no cover - defensive
            log.exception("raylet stream reader failed")
            reason = repr(exc)
        self._stop_writer()
        if not self.closed:
            self.closed = True
            self._on_lost(reason)

    def _notice(self, notice: raylet_pb2.WorkerKilled) -> None:
        if self._on_notice is not None:
            self._on_notice(notice)
        else:
            log.warning("the raylet killed the worker of lease %s: %s", notice.lease_id,
                        notice.reason)

    def send(self, msg: raylet_pb2.ClientMessage) -> None:
        self._outbox.put_nowait(msg)

    def request_lease(self, req: raylet_pb2.LeaseRequest) -> None:
        self.send(raylet_pb2.ClientMessage(request_lease=req))

    def return_lease(self, lease_id: int, kill_worker: bool = False,
                     worker_exiting: bool = False) -> None:
        self.send(raylet_pb2.ClientMessage(return_lease=raylet_pb2.ReturnLease(
            lease_id=lease_id, kill_worker=kill_worker, worker_exiting=worker_exiting)))

    def cancel_request(self, request_id: int) -> None:
        self.send(raylet_pb2.ClientMessage(cancel_request=raylet_pb2.CancelLeaseRequest(
            request_id=request_id)))

    def set_blocked(self, blocked: bool) -> None:
        self.send(raylet_pb2.ClientMessage(blocked=raylet_pb2.BlockedChange(blocked=blocked)))

    async def close(self) -> None:
        self.closed = True
        self._outbox.put_nowait(None)
        # One at a time, reading each attribute only when its turn comes: a connect
        # cancelled first may have started the writer meanwhile.
        for name in ("_connecting", "_reader", "_writer"):
            task = getattr(self, name)
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # cancelled or failed: either way it is over
                    pass
        if self._call is not None:
            self._call.cancel()
