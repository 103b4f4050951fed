"""``ray._private.internal_api``: ``free()``.

Ray 2.60 keeps ``free`` here, deprecated but still used by scripts that release large
objects early. Freeing is the owner's business: the caller's core worker hands each ref
to its owner (itself, or the owner over RPC), which deletes the value's copies and
remembers the object as freed, so every later read of it raises ObjectFreedError and
nothing rebuilds it (runtime/core_worker/core_worker.py, "free()").
"""
from __future__ import annotations

import warnings
from typing import List, Union

from runtime.core_worker.current import core_worker_or_none
from runtime.exceptions import RaySystemError
from runtime.object_ref import ObjectRef

__all__ = ["free"]


def free(object_refs: Union[ObjectRef, List[ObjectRef]], local_only: bool = False) -> None:
    """Free the values of `object_refs` now, whoever still holds a reference to them.

    Ray's low-level escape hatch from reference counting: the refs stay valid objects,
    but reading one (get, or a task taking it as an argument) raises ObjectFreedError,
    and lineage never rebuilds it. ``local_only=True`` deletes only the copy in this
    node's object store now; copies elsewhere go when the object goes out of scope.
    Returns once the owners have dropped the values (Ray's returns at once; waiting
    means a read after free() never sees the old value).
    """
    warnings.warn(
        "`free` is a deprecated API and will be removed in a future version of Ray. "
        "If you have a use case for this API, please open an issue on GitHub.",
        DeprecationWarning, stacklevel=2)
    if isinstance(object_refs, ObjectRef):
        object_refs = [object_refs]
    if not isinstance(object_refs, list):
        raise TypeError(f"free() expects a list of ObjectRef, got {type(object_refs)}")
    for ref in object_refs:
        if not isinstance(ref, ObjectRef):
            raise TypeError(f"Attempting to call `free` on the value {ref!r}, which is not "
                            f"an ObjectRef.")
    cw = core_worker_or_none()
    if cw is None:
        raise RaySystemError("free() needs a connected runtime, and none is: call "
                             "runtime.init() first.")
    if object_refs:
        cw.free_objects(object_refs, bool(local_only))
