"""Distributed reference counting, owner side and borrower side (Ray's ownership model).

Per object this process knows about, it counts:

* ``local``: live ObjectRef instances in this process;
* ``submitted``: pending tasks submitted by this process that take the object
  as an argument (top-level or nested);
* ``contained``: live objects owned or held here whose value contains this ref;
* ``borrowers`` (owned objects only): other processes holding the ref.

An owned object is freed when all four reach zero; a borrowed one is released
(the owner is told, once) when the first three reach zero. Counting is
thread-safe: ObjectRefs die on any thread. Frees and releases are handed to the
callbacks, which must only enqueue work (they run under no lock but may run on a
user thread).

An owned object may also be pinned by *lineage* (``lineage``: finished tasks kept to
rebuild lost objects that took it as an argument; see owner_lineage.py). That count
keeps the entry, not the value: when the four counts reach zero the value is freed
(``on_free`` is called, the entry stays, ``wanted`` is False) and the entry goes once
the lineage count is zero too (``on_free`` again, with no entry left).
"""
from __future__ import annotations

import collections
import contextlib
import threading
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

Owner = Tuple[str, int, bytes]


class RefEntry:
    __slots__ = ("owner", "owned", "local", "submitted", "contained", "borrowers", "contains",
                 "lineage")

    def __init__(self, owner: Owner, owned: bool) -> None:
        self.owner = owner
        self.owned = owned
        self.local = 0
        self.submitted = 0
        self.contained = 0
        self.borrowers: Optional[Set[Owner]] = None
        self.contains: Optional[List[Tuple[bytes, Owner]]] = None
        self.lineage = 0

    def total(self) -> int:
        return self.local + self.submitted + self.contained + (len(self.borrowers) if self.borrowers else 0)


class ReferenceTable:
    def __init__(self, me: Owner, on_free: Callable[[bytes, RefEntry], None],
                 on_release: Callable[[bytes, Owner], None],
                 on_borrow: Callable[[bytes, Owner], None]) -> None:
        """on_free(oid, entry): an owned object has no reference left anywhere.
        on_release(oid, owner): this process stopped borrowing oid.
        on_borrow(oid, owner): this process started borrowing oid (tell the owner)."""
        self.me = me
        self._lock_ = threading.Lock()
        # An ObjectRef can be garbage-collected (and its __del__ call remove_local) in the
        # middle of any allocation, including one made while this thread holds the lock:
        # such removals are deferred until the lock is released, never re-entered.
        self._tls = threading.local()
        self._deferred: collections.deque = collections.deque()
        self._entries: Dict[bytes, RefEntry] = {}
        self._on_free = on_free
        self._on_release = on_release
        self._on_borrow = on_borrow

    @contextlib.contextmanager
    def _locked(self):
        with self._lock_:
            self._tls.busy = True
            try:
                yield
            finally:
                self._tls.busy = False
        while self._deferred:
            self._dec(self._deferred.popleft(), "local")

    # -- queries --------------------------------------------------------------------
    def __contains__(self, oid: bytes) -> bool:
        return oid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, oid: bytes) -> Optional[RefEntry]:
        return self._entries.get(oid)

    def wanted(self, oid: bytes) -> bool:
        """Whether something references oid's value (not only lineage)."""
        e = self._entries.get(oid)
        return e is not None and e.total() > 0

    def owned_ids(self) -> List[bytes]:
        with self._locked():
            return [k for k, e in self._entries.items() if e.owned]

    def snapshot(self) -> Dict[bytes, dict]:
        with self._locked():
            return {k: {"owned": e.owned, "local": e.local, "submitted": e.submitted,
                        "contained": e.contained,
                        "borrowers": len(e.borrowers) if e.borrowers else 0,
                        "lineage": e.lineage}
                    for k, e in self._entries.items()}

    # -- local references -------------------------------------------------------------
    def add_local(self, oid: bytes, owner: Owner, deserialized: bool = False) -> None:
        borrow = False
        with self._locked():
            e = self._entries.get(oid)
            if e is None:
                owned = owner[2] == self.me[2]
                e = self._entries[oid] = RefEntry(owner, owned)
                borrow = not owned
            e.local += 1
        if borrow:
            self._on_borrow(oid, owner)

    def remove_local(self, oid: bytes) -> None:
        if getattr(self._tls, "busy", False):
            self._deferred.append(oid)
            return
        self._dec(oid, "local")

    # -- pending tasks holding arguments ---------------------------------------------
    def add_submitted(self, oids: Iterable[bytes]) -> None:
        with self._locked():
            for oid in oids:
                e = self._entries.get(oid)
                if e is not None:
                    e.submitted += 1

    def remove_submitted(self, oids: Iterable[bytes]) -> None:
        for oid in oids:
            self._dec(oid, "submitted")

    # -- lineage (owner side) -----------------------------------------------------------
    def add_lineage(self, oid: bytes) -> bool:
        """Keep the entry of owned `oid` (not its value) for a task of the lineage."""
        with self._locked():
            e = self._entries.get(oid)
            if e is None or not e.owned:
                return False
            e.lineage += 1
            return True

    def remove_lineage(self, oid: bytes) -> None:
        free = None
        with self._locked():
            e = self._entries.get(oid)
            if e is None or e.lineage == 0:
                return
            e.lineage -= 1
            if e.lineage == 0 and e.total() == 0:
                free = self._entries.pop(oid)
        if free is not None:
            self._finish(oid, free)

    # -- refs contained in other objects ----------------------------------------------
    def add_contained(self, outer: bytes, inner: Iterable[Tuple[bytes, Owner]]) -> None:
        """`outer` (held here) contains refs `inner`; keep them alive while it lives.

        A contained ref this process does not know yet becomes borrowed on the
        outer's account; the caller has arranged that the owner already counts
        this process as a borrower (the worker that returned it registered us)."""
        inner = list(inner)
        if not inner:
            return
        with self._locked():
            for oid, owner in inner:
                e = self._entries.get(oid)
                if e is None:
                    e = self._entries[oid] = RefEntry(tuple(owner), owner[2] == self.me[2])
                e.contained += 1
            o = self._entries.get(outer)
            if o is not None and o.total() > 0:  # (a value only lineage keeps is freed)
                o.contains = (o.contains or []) + inner
                inner = []
        for oid, _owner in inner:  # outer already gone: drop at once
            self._dec(oid, "contained")

    # -- borrowers (owner side) ---------------------------------------------------------
    def add_borrower(self, oid: bytes, borrower: Owner) -> bool:
        with self._locked():
            e = self._entries.get(oid)
            if e is None or not e.owned:
                return False
            if e.borrowers is None:
                e.borrowers = set()
            e.borrowers.add(borrower)
            return True

    def remove_borrower(self, oid: bytes, borrower: Owner) -> None:
        free = None
        with self._locked():
            e = self._entries.get(oid)
            if e is None or not e.borrowers:
                return
            e.borrowers.discard(borrower)
            if e.total() == 0:
                free = self._zero(oid, e)
        if free is not None:
            self._finish(oid, free)

    def remove_borrower_everywhere(self, borrower: Owner) -> None:
        """A borrower process died: drop it from every object it borrowed."""
        with self._locked():
            oids = [k for k, e in self._entries.items() if e.borrowers and borrower in e.borrowers]
        for oid in oids:
            self.remove_borrower(oid, borrower)

    # -- internals ------------------------------------------------------------------------
    def _dec(self, oid: bytes, field: str) -> None:
        with self._locked():
            e = self._entries.get(oid)
            if e is None:
                return
            value = getattr(e, field) - 1
            setattr(e, field, value if value > 0 else 0)
            if e.total() != 0:
                return
            e = self._zero(oid, e)
        self._finish(oid, e)

    def _zero(self, oid: bytes, e: RefEntry) -> RefEntry:
        """Under the lock: nothing references e's value any more. Drop the entry, unless
        lineage keeps it: then a stand-in carries what to release (the value and what
        it contains) and the entry stays, emptied of them."""
        if not e.lineage:
            del self._entries[oid]
            return e
        gone = RefEntry(e.owner, e.owned)
        gone.contains, e.contains = e.contains, None
        return gone

    def _finish(self, oid: bytes, e: RefEntry) -> None:
        if e.contains:
            for inner, _owner in e.contains:
                self._dec(inner, "contained")
        if e.owned:
            self._on_free(oid, e)
        else:
            self._on_release(oid, e.owner)
