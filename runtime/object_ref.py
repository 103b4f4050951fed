"""ObjectRef: a future for a value in the distributed object store.

Every live ObjectRef counts as a local reference in its process's reference
table; the value is freed once no reference exists anywhere (see
runtime/core_worker/reference_table.py). A ref knows its owner (the process that
created it), which is who to ask where the value is.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Tuple

from runtime.ids import ObjectID, TaskID, task_id_of
from runtime.serialization import record_contained_ref

# (ip, port, worker_id): how to reach the owner's CoreWorker service.
OwnerAddress = Tuple[str, int, bytes]


def _current():
    from runtime.core_worker.current import core_worker_or_none

    return core_worker_or_none()


class ObjectRef:
    """A reference to a (possibly not yet computed) value; hashable and awaitable."""

    __slots__ = ("_id", "_owner", "_cw", "__weakref__")

    def __init__(self, object_id: bytes, owner: OwnerAddress, _core_worker: Any = None,
                 _add_local_ref: bool = True) -> None:
        self._id = object_id
        self._owner = owner
        cw = _core_worker if _core_worker is not None else _current()
        self._cw = cw
        if cw is not None and _add_local_ref:
            cw.refs.add_local(object_id, owner)

    def __del__(self) -> None:
        cw = self._cw
        if cw is not None:
            try:
                cw.refs.remove_local(self._id)
            except Exception:
                pass

    # -- identity ---------------------------------------------------------------
    def binary(self) -> bytes:
        return self._id

    def hex(self) -> str:
        return self._id.hex()

    def task_id(self) -> TaskID:
        """The id of the task that creates this object (a put's is a random one), as a
        TaskID: Ray's type, and bytes underneath for the runtime's own use."""
        return TaskID(task_id_of(self._id))

    def is_nil(self) -> bool:
        return ObjectID(self._id).is_nil()

    @classmethod
    def size(cls) -> int:
        return ObjectID.SIZE

    @property
    def owner_address(self) -> OwnerAddress:
        return self._owner

    def __hash__(self) -> int:
        return hash(self._id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __repr__(self) -> str:
        return f"ObjectRef({self._id.hex()})"

    def __bool__(self) -> bool:
        return True

    # -- serialization: refs nested in values travel as refs ----------------------
    def __reduce__(self):
        record_contained_ref(self)
        return (_rebuild_object_ref, (self._id, self._owner))

    def __copy__(self) -> "ObjectRef":
        return self

    def __deepcopy__(self, memo) -> "ObjectRef":
        return self

    # -- futures -----------------------------------------------------------------
    def future(self) -> concurrent.futures.Future:
        """A concurrent.futures.Future resolved with the value (or its error)."""
        cw = self._cw or _current()
        if cw is None:
            raise RuntimeError("runtime is not initialized; call runtime.init() first")
        return cw.ref_future(self)

    def __await__(self):
        return asyncio.wrap_future(self.future()).__await__()

    def as_future(self) -> "asyncio.Future":
        return asyncio.wrap_future(self.future())


def _rebuild_object_ref(object_id: bytes, owner: OwnerAddress) -> ObjectRef:
    """Unpickling a ref in another process makes that process a borrower."""
    cw = _current()
    ref = ObjectRef(object_id, tuple(owner), cw, _add_local_ref=False)  # type: ignore[arg-type]
    if cw is not None:
        cw.refs.add_local(object_id, tuple(owner), deserialized=True)
    return ref
