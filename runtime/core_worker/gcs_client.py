"""GCS calls that ride out a GCS restart.

A GCS that dies is restarted by its node agent, on the same address, and reloads its
tables from its store; drivers, workers and raylets keep running meanwhile. A call
that needs the GCS then waits for it instead of failing: a call that finds the GCS
unreachable (UNAVAILABLE: the connection was refused or broke) is sent again on a
fresh channel until it is answered or ``config.GCS_RECONNECT_TIMEOUT_S`` (60 s, as
Ray's ``gcs_rpc_server_reconnect_timeout_s``) has passed. Then it fails with the
runtime's error naming the GCS and its address (``runtime/rpc_errors.py``).

Only UNAVAILABLE is retried. Any other failure (a wrong token, a deadline, an error in
the GCS) is the answer. A call that was in flight when the GCS died may have taken
effect: the GCS makes the calls that create something (RegisterActor,
CreatePlacementGroup) idempotent by their ids, so sending them again is safe.

``gone`` lets the owner of a private cluster, which knows its GCS exited and that
nobody restarts it, fail at once instead of waiting out the window.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Optional

import grpc
import grpc.aio

from runtime import config, rpc
from runtime.protocol import gcs_pb2_grpc
from runtime.rpc_errors import gcs_error

log = logging.getLogger("runtime.gcs_client")

#: gRPC's reconnect backoff grows to two minutes by default: a restarted GCS would go
#: unnoticed that long. Channels to the GCS try again at least every second.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
#: Pause between two tries of a call the GCS did not answer.
RETRY_INTERVAL_S = 0.2


def gcs_channel(address: str, token: str) -> rpc.AuthChannel:
    """An asyncio channel to the GCS that notices a restarted GCS within a second."""
    return rpc.AuthChannel(grpc.aio.insecure_channel(
        address, options=(*rpc.CHANNEL_OPTIONS, *RECONNECT_OPTIONS)), token)


def gcs_sync_channel(address: str, token: str) -> rpc.AuthChannel:
    """The blocking counterpart of gcs_channel (the user's thread, CLIs)."""
    return rpc.AuthChannel(grpc.insecure_channel(
        address, options=(*rpc.CHANNEL_OPTIONS, *RECONNECT_OPTIONS)), token)


def _unavailable(exc: grpc.RpcError) -> bool:
    return callable(getattr(exc, "code", None)) and exc.code() == grpc.StatusCode.UNAVAILABLE


class GcsClient:
    """The GCS calls of one process; see the module docstring.

    ``call`` runs on an event loop (the core worker's I/O thread, the raylet),
    ``call_blocking`` in any other thread; each has its own channel, made on first use.
    """

    def __init__(self, address: str, token: str, reconnect_timeout_s: Optional[float] = None,
                 gone: Optional[Callable[[], Optional[str]]] = None) -> None:
        self.address = address
        self.token = token
        self.reconnect_timeout_s = (config.GCS_RECONNECT_TIMEOUT_S if reconnect_timeout_s is None
                                    else reconnect_timeout_s)
        self.gone = gone
        self._channel: Optional[rpc.AuthChannel] = None
        self._stub: Optional[gcs_pb2_grpc.GcsStub] = None
        self._sync_channel: Optional[rpc.AuthChannel] = None
        self._sync_stub: Optional[gcs_pb2_grpc.GcsStub] = None
        self.unreachable_since: Optional[float] = None  # monotonic; None while it answers

    # -- asyncio ---------------------------------------------------------------------------
    @property
    def stub(self) -> gcs_pb2_grpc.GcsStub:
        """The stub on the current channel (long polls and streams use it directly)."""
        if self._stub is None:
            self._channel = gcs_channel(self.address, self.token)
            self._stub = gcs_pb2_grpc.GcsStub(self._channel)
        return self._stub

    async def _renew(self) -> None:
        """A fresh channel: the old one may sit in gRPC's reconnect backoff."""
        old, self._channel, self._stub = self._channel, None, None
        if old is not None:
            await old.close()

    async def call(self, method: str, request: Any, timeout: float = 30.0,
                   doing: str = "", none_on_deadline: bool = False) -> Any:
        """One GCS call, waiting out a restart of the GCS; raises the runtime's error.
        ``none_on_deadline``: a long poll whose deadline passed returns None."""
        deadline: Optional[float] = None
        while True:
            try:
                reply = await getattr(self.stub, method)(request, timeout=timeout)
            except grpc.RpcError as exc:
                if none_on_deadline and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return None
                deadline = self._retry_or_raise(exc, deadline, doing)
                await self._renew()
                await asyncio.sleep(RETRY_INTERVAL_S)
                continue
            self._answered()
            return reply

    async def close(self) -> None:
        await self._renew()
        self.close_blocking()

    # -- blocking ----------------------------------------------------------------------------
    @property
    def sync_stub(self) -> gcs_pb2_grpc.GcsStub:
        if self._sync_stub is None:
            self._sync_channel = gcs_sync_channel(self.address, self.token)
            self._sync_stub = gcs_pb2_grpc.GcsStub(self._sync_channel)
        return self._sync_stub

    def call_blocking(self, method: str, request: Any, timeout: float = 30.0,
                      doing: str = "") -> Any:
        """call() for a thread without an event loop."""
        deadline: Optional[float] = None
        while True:
            try:
                reply = getattr(self.sync_stub, method)(request, timeout=timeout)
            except grpc.RpcError as exc:
                deadline = self._retry_or_raise(exc, deadline, doing)
                self.close_blocking()
                time.sleep(RETRY_INTERVAL_S)
                continue
            self._answered()
            return reply

    def close_blocking(self) -> None:
        old, self._sync_channel, self._sync_stub = self._sync_channel, None, None
        if old is not None:
            old.close()

    # -- shared ----------------------------------------------------------------------------------
    def _retry_or_raise(self, exc: grpc.RpcError, deadline: Optional[float], doing: str
                        ) -> float:
        """The deadline to retry until, or the error to raise (not UNAVAILABLE, the
        window is over, or `gone` says the GCS will not come back)."""
        if not _unavailable(exc):
            raise gcs_error(self.address, exc, doing) from None
        now = time.monotonic()
        if self.unreachable_since is None:
            self.unreachable_since = now
            log.warning("the GCS at %s is unreachable (%s); waiting up to %gs for it to come "
                        "back", self.address, exc.details(), self.reconnect_timeout_s)
        gone = self.gone() if self.gone is not None else None
        if deadline is None:
            deadline = now + self.reconnect_timeout_s
        if gone or now >= deadline:
            err = gcs_error(self.address, exc, doing)
            why = (f" It will not come back: {gone}." if gone else
                   f" No answer for {self.reconnect_timeout_s:g}s "
                   f"(RUNTIME_GCS_RECONNECT_TIMEOUT_S sets how long calls wait for a "
                   f"restarting GCS).")
            raise type(err)(str(err) + why) from None
        return deadline

    def _answered(self) -> None:
        if self.unreachable_since is not None:
            log.info("the GCS at %s answers again after %.1fs", self.address,
                     time.monotonic() - self.unreachable_since)
            self.unreachable_since = None
