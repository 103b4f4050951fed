"""In-process store of object values and locations, with waiters.

The owner keeps every small value it owns here (inline bytes) and, for large
ones, where they live (node and object store). Borrowers cache what they learn
from owners here too. Writes happen on the event loop thread; reads may happen
on any thread (a dict lookup is atomic under the GIL), which is what makes
``get`` of a ready value cheap.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set

from runtime.protocol import common_pb2


class Value:
    """A ready value: inline serialized bytes, or a location in an object store."""

    __slots__ = ("data", "in_store", "node_id", "store_address", "size", "is_error", "copies")

    def __init__(self, data: Optional[bytes] = None, in_store: bool = False, node_id: bytes = b"",
                 store_address: str = "", size: int = 0, is_error: bool = False) -> None:
        self.data = data
        self.in_store = in_store
        self.node_id = node_id
        self.store_address = store_address
        self.size = size
        self.is_error = is_error
        # Owner side: other stores holding a copy (store address -> its node id), freed
        # with the original, and serving readers if the original is lost.
        self.copies: Optional[Dict[str, bytes]] = None

    @classmethod
    def from_proto(cls, loc: "common_pb2.ObjectLocation") -> "Value":
        if loc.in_store:
            return cls(None, True, loc.node_id, loc.store_address, loc.size, loc.is_error)
        return cls(loc.inline_data, False, b"", "", len(loc.inline_data), loc.is_error)

    def to_proto(self, oid: bytes) -> "common_pb2.ObjectLocation":
        if self.in_store:
            return common_pb2.ObjectLocation(object_id=oid, in_store=True, node_id=self.node_id,
                                             store_address=self.store_address, size=self.size,
                                             is_error=self.is_error)
        return common_pb2.ObjectLocation(object_id=oid, inline_data=self.data, size=self.size,
                                         is_error=self.is_error)


class MemoryStore:
    def __init__(self) -> None:
        self._values: Dict[bytes, Value] = {}
        self._waiters: Dict[bytes, List[Callable[[bytes, Value], None]]] = {}
        # Objects freed by free(): their value is the ObjectFreedError, and no later
        # value replaces it (a late task result, a retry, a borrower's answer), as in
        # Ray, whose memory store never overwrites a value. Cleared by delete().
        self.freed: Set[bytes] = set()

    def get(self, oid: bytes) -> Optional[Value]:
        return self._values.get(oid)

    def __contains__(self, oid: bytes) -> bool:
        return oid in self._values

    def __len__(self) -> int:
        return len(self._values)

    def put(self, oid: bytes, value: Value) -> None:
        """Loop thread only: store and wake waiters (nothing, for a freed object)."""
        if self.freed and oid in self.freed:
            return
        self._values[oid] = value
        waiters = self._waiters.pop(oid, None)
        if waiters:
            for cb in waiters:
                cb(oid, value)

    def put_fresh(self, oid: bytes, value: Value) -> None:
        """Any thread: store the value of an id made just now (a put, an actor's handle
        object), which nobody can wait for yet: visible at once, no waiter to wake."""
        self._values[oid] = value

    def add_waiter(self, oid: bytes, cb: Callable[[bytes, Value], None]) -> None:
        """Loop thread only: cb(oid, value) once the value is ready (at once if it is)."""
        v = self._values.get(oid)
        if v is not None:
            cb(oid, v)
        else:
            self._waiters.setdefault(oid, []).append(cb)

    def remove_waiter(self, oid: bytes, cb) -> None:
        lst = self._waiters.get(oid)
        if lst and cb in lst:
            lst.remove(cb)
            if not lst:
                del self._waiters[oid]

    def has_waiters(self, oid: bytes) -> bool:
        return oid in self._waiters

    def delete(self, oid: bytes) -> Optional[Value]:
        if self.freed:
            self.freed.discard(oid)
        return self._values.pop(oid, None)

    def mark_freed(self, oid: bytes, error: Value) -> Optional[Value]:
        """Loop thread only: oid was freed by free(). `error` (its ObjectFreedError)
        becomes its value for good and wakes waiters; returns the value it replaces."""
        old = self._values.get(oid)
        self.freed.discard(oid)
        self.put(oid, error)
        self.freed.add(oid)
        return old

    def is_freed(self, oid: bytes) -> bool:
        return bool(self.freed) and oid in self.freed
