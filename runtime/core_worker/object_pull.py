"""Getting an object that lives on another node into this node's store.

The core worker does not move the bytes: it asks its own object store to ``Pull``
the object from the stores that hold it, and the stores transfer it between
themselves (runtime/object_store/transfer.py explains why). What is left here:

* one request per object per process, however many threads of this process read
  it at once (the store joins requests of different processes itself);
* turning the store's reply into a result the caller can act on. A failed pull
  is a value, ``PullFailed``, that says for each holder whether it was
  unreachable or answered that it does not have the object. The object's owner
  decides from it whether to rebuild the object (lineage) or to raise
  ``PullFailed.error()``; nothing here raises for a lost object.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

from runtime.exceptions import ObjectLostError, ObjectStoreFullError
from runtime.object_store.client import StoreClient
from runtime.protocol import object_store_pb2

_FAILURE_KINDS = {
    object_store_pb2.HolderFailure.UNREACHABLE: "unreachable",
    object_store_pb2.HolderFailure.MISSING: "missing",
    object_store_pb2.HolderFailure.REFUSED: "refused",
}
_HOW = {
    object_store_pb2.PullReply.TRANSFERRED: "transferred",
    object_store_pb2.PullReply.JOINED: "joined",
    object_store_pb2.PullReply.LOCAL: "local",
}


@dataclass(frozen=True)
class HolderFailure:
    """Why one holder did not deliver: "unreachable" (no connection, or it broke or
    stalled mid-transfer), "missing" (it answered that it has no copy) or "refused"."""

    holder: str
    kind: str
    message: str


@dataclass(frozen=True)
class Pulled:
    """The object is sealed in this node's store at `path`.

    `how` is "transferred" (this request moved it), "joined" (it waited for a transfer
    another reader of this node started) or "local" (the store had it already). A
    new copy ("transferred" or "joined") is one the owner must be told about, so that
    it frees the copy with the original.
    """

    path: str
    size: int
    how: str
    spilled: bool = False

    @property
    def new_copy(self) -> bool:
        return self.how != "local"


@dataclass(frozen=True)
class PullFailed:
    """No copy was made. `failures` has one entry per holder tried, in order."""

    object_id: bytes
    failures: Tuple[HolderFailure, ...]
    message: str
    full: bool = False  # no room in this node's store (not a lost object)

    @property
    def holders_unreachable(self) -> bool:
        """Every holder tried was unreachable: their nodes (or stores) are likely dead."""
        return bool(self.failures) and all(f.kind == "unreachable" for f in self.failures)

    @property
    def object_missing(self) -> bool:
        """Some holder answered and had no copy (freed, or its store restarted)."""
        return any(f.kind == "missing" for f in self.failures)

    @property
    def lost(self) -> bool:
        """No holder can deliver: the owner may rebuild the object or give up."""
        return not self.full

    def error(self, describe: Optional[Callable[[str], str]] = None) -> Exception:
        """The error a get() raises when the object is not rebuilt.

        `describe` names a holder's store for the message ("node 1a2b3c4d
        (127.0.0.2:6382)"); the address alone otherwise.
        """
        oid = self.object_id.hex()
        if self.full:
            return ObjectStoreFullError(
                f"Object {oid} cannot be copied into this node's object store: {self.message}")
        name = describe or (lambda holder: f"the object store at {holder}")
        reasons = "; ".join(f"{name(f.holder)} is {f.kind}: {f.message}" for f in self.failures)
        return ObjectLostError(oid, (
            f"Object {oid} cannot be fetched from any node holding it: "
            f"{reasons or self.message}. "
            + ("Its nodes may be down." if self.holders_unreachable else
               "It was freed or its store restarted.")))


PullResult = Union[Pulled, PullFailed]


class ObjectPuller:
    """Pulls objects into the local store on the caller's event loop (the I/O thread)."""

    def __init__(self, local: StoreClient) -> None:
        self._local = local
        self._inflight: Dict[bytes, "asyncio.Future[PullResult]"] = {}

    async def pull(self, object_id: bytes, holders: Sequence[str],
                   timeout_s: float = 0.0) -> PullResult:
        """Copy object_id from one of `holders` (store addresses, the preferred first)
        into this node's store, once per process however many callers ask at once.

        Raises only when the local store itself cannot be asked (its StoreClient
        error names it); every failure of the holders is a PullFailed.
        """
        fut = self._inflight.get(object_id)
        if fut is None:
            fut = asyncio.ensure_future(self._pull(object_id, list(holders), timeout_s))
            self._inflight[object_id] = fut
            fut.add_done_callback(lambda _f: self._forget(object_id, fut))
        return await asyncio.shield(fut)

    async def close(self) -> None:
        """Stop waiting for this process's pulls (the store's transfers go on for the
        other readers of the node)."""
        pending = list(self._inflight.values())
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _forget(self, object_id: bytes, fut: asyncio.Future) -> None:
        if self._inflight.get(object_id) is fut:
            del self._inflight[object_id]

    async def _pull(self, object_id: bytes, holders: Sequence[str],
                    timeout_s: float) -> PullResult:
        reply = await self._local.pull(object_id, holders, timeout_s)
        if reply.ok:
            return Pulled(reply.path, reply.size, _HOW.get(reply.how, "transferred"),
                          reply.spilled)
        return PullFailed(object_id, tuple(
            HolderFailure(f.holder, _FAILURE_KINDS.get(f.kind, "unreachable"), f.message)
            for f in reply.failures), reply.message, full=reply.full)


def holders_of(primary: str, copies: Optional[Iterable[str]] = None) -> list[str]:
    """The stores to ask, in order: the primary copy's store first, then the other copies
    (sorted, so every reader of a node asks in the same order)."""
    out = [primary] if primary else []
    out.extend(sorted(c for c in (copies or ()) if c and c != primary))
    return out
