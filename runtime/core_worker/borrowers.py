"""Ordered, batched borrower notifications to owners.

A process that starts or stops holding a ref it does not own tells the owner
(UpdateBorrowers). Updates to one owner go out in order, batched, one RPC in
flight at a time, so an "add" is never overtaken by a later "remove". A worker
flushes its pending "adds" before it reports a task's result, so an owner
never frees an object that a finished task's worker still holds.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Dict, List, Optional, Tuple

import grpc

from runtime.protocol import common_pb2, core_worker_pb2

log = logging.getLogger("runtime.core_worker")
Owner = Tuple[str, int, bytes]


def address_proto(addr: Owner) -> common_pb2.Address:
    return common_pb2.Address(ip=addr[0], port=addr[1], worker_id=addr[2])


class _Channel:
    def __init__(self) -> None:
        self.add: List[bytes] = []
        self.remove: List[bytes] = []
        self.copies: List[Tuple[bytes, str, bytes]] = []
        self.task: Optional[asyncio.Task] = None
        self.idle = asyncio.Event()
        self.idle.set()


class BorrowerNotifier:
    def __init__(self, stub_for: Callable[[Owner], object]) -> None:
        self._stub_for = stub_for
        self._channels: Dict[Tuple[Owner, Owner], _Channel] = {}

    def add(self, owner: Owner, borrower: Owner, oid: bytes) -> None:
        ch = self._channel(owner, borrower)
        ch.add.append(oid)
        self._kick(owner, borrower, ch)

    def remove(self, owner: Owner, borrower: Owner, oid: bytes) -> None:
        ch = self._channel(owner, borrower)
        ch.remove.append(oid)
        self._kick(owner, borrower, ch)

    def copied(self, owner: Owner, borrower: Owner, oid: bytes, store_address: str,
               node_id: bytes = b"") -> None:
        """Tell the owner this process copied oid into store_address, the store of
        node_id: it frees the copy with the original, and may serve readers from it if
        the original is lost."""
        ch = self._channel(owner, borrower)
        ch.copies.append((oid, store_address, node_id))
        self._kick(owner, borrower, ch)

    async def close(self) -> None:
        """Stop sending: cancel and await every channel's sender (shutdown)."""
        tasks = [ch.task for ch in self._channels.values() if ch.task is not None]
        self._channels.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def has_pending(self) -> bool:
        return any(not ch.idle.is_set() for ch in self._channels.values())

    async def flush(self) -> None:
        """Wait until every queued update has been acknowledged (or its owner is gone)."""
        for ch in list(self._channels.values()):
            await ch.idle.wait()

    def _channel(self, owner: Owner, borrower: Owner) -> _Channel:
        key = (owner, borrower)
        ch = self._channels.get(key)
        if ch is None:
            ch = self._channels[key] = _Channel()
        return ch

    def _kick(self, owner: Owner, borrower: Owner, ch: _Channel) -> None:
        ch.idle.clear()
        if ch.task is None:
            ch.task = asyncio.ensure_future(self._send(owner, borrower, ch))

    async def _send(self, owner: Owner, borrower: Owner, ch: _Channel) -> None:
        try:
            while ch.add or ch.remove or ch.copies:
                add, remove, copies = ch.add, ch.remove, ch.copies[:1]
                ch.add, ch.remove, ch.copies = [], [], ch.copies[1:]
                update = core_worker_pb2.BorrowerUpdate(borrower=address_proto(borrower),
                                                        add=add, remove=remove)
                for oid, store, node_id in copies:
                    update.copies.append(oid)
                    update.copy_store_address = store
                    update.copy_node_id = node_id
                try:
                    await self._stub_for(owner).UpdateBorrowers(update, timeout=30)
                except grpc.RpcError as exc:
                    # The owner is gone: its objects are lost anyway, nothing to tell.
                    log.debug("borrower update to %s:%s failed: %s", owner[0], owner[1], exc)
        finally:
            ch.task = None
            if (ch.add or ch.remove or ch.copies) and self._channels.get((owner, borrower)) is ch:
                ch.task = asyncio.ensure_future(self._send(owner, borrower, ch))
            else:
                ch.idle.set()
                if self._channels.get((owner, borrower)) is ch:
                    del self._channels[(owner, borrower)]
