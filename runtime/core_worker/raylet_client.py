"""The core worker's side of the raylet Connect stream."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

import grpc

from runtime.protocol import raylet_pb2, raylet_pb2_grpc

log = logging.getLogger("runtime.core_worker")


class RayletClient:
    """Sends ClientMessages in order; hands LeaseGrants to `on_grant`."""

    def __init__(self, channel: grpc.aio.Channel, on_grant: Callable[[raylet_pb2.LeaseGrant], None],
                 on_lost: Callable[[str], None]) -> None:
        self._stub = raylet_pb2_grpc.RayletStub(channel)
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._on_grant = on_grant
        self._on_lost = on_lost
        self._call = None
        self._reader: Optional[asyncio.Task] = None
        self._writer: Optional[asyncio.Task] = None
        self._connecting: Optional[asyncio.Task] = None
        self.registered: Optional[raylet_pb2.RegisterAck] = None
        self.closed = False

    async def connect(self, register: raylet_pb2.RegisterClient, timeout: float = 30.0) -> raylet_pb2.RegisterAck:
        """Register, then send whatever was queued meanwhile (messages may be sent before
        the connection is up: they wait in the outbox)."""
        self._call = self._stub.Connect()
        await self._call.write(raylet_pb2.ClientMessage(register=register))
        self._writer = asyncio.ensure_future(self._write())
        first = await asyncio.wait_for(self._call.read(), timeout)
        if first is grpc.aio.EOF or first.WhichOneof("msg") != "registered":
            raise ConnectionError("the raylet closed the connection during registration")
        self.registered = first.registered
        self._reader = asyncio.ensure_future(self._read())
        return first.registered

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
            self._outbox.put_nowait(None)  # ends the writer, if it started
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
                if msg.WhichOneof("msg") == "grant":
                    self._on_grant(msg.grant)
        except asyncio.CancelledError:
            return
        except grpc.RpcError as exc:
            reason = f"lost the raylet connection: {exc.code().name}: {exc.details()}"
        except Exception as exc:  # pragma: no cover - defensive
            log.exception("raylet stream reader failed")
            reason = repr(exc)
        self._outbox.put_nowait(None)  # ends the writer
        if not self.closed:
            self.closed = True
            self._on_lost(reason)

    def send(self, msg: raylet_pb2.ClientMessage) -> None:
        self._outbox.put_nowait(msg)

    def request_lease(self, req: raylet_pb2.LeaseRequest) -> None:
        self.send(raylet_pb2.ClientMessage(request_lease=req))

    def return_lease(self, lease_id: int, kill_worker: bool = False) -> None:
        self.send(raylet_pb2.ClientMessage(return_lease=raylet_pb2.ReturnLease(
            lease_id=lease_id, kill_worker=kill_worker)))

    def cancel_request(self, request_id: int) -> None:
        self.send(raylet_pb2.ClientMessage(cancel_request=raylet_pb2.CancelLeaseRequest(
            request_id=request_id)))

    def set_blocked(self, blocked: bool) -> None:
        self.send(raylet_pb2.ClientMessage(blocked=raylet_pb2.BlockedChange(blocked=blocked)))

    async def close(self) -> None:
        self.closed = True
        self._outbox.put_nowait(None)
        for task in (self._connecting, self._reader, self._writer):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # cancelled or failed: either way it is over
                    pass
        if self._call is not None:
            self._call.cancel()
