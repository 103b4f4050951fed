"""Turning a call's arguments into a task's wire form.

Top-level ObjectRef arguments become slots, resolved by the submitter before
the task is dispatched (the worker receives their values, not refs). Refs
nested inside containers travel as refs and are counted as held by the task
until it finishes. Arguments too large to travel inline are put in the
object store first and passed as slots, as Ray does.
"""
from __future__ import annotations

import inspect
from typing import Callable, List, Tuple

from runtime import config
from runtime.object_ref import ObjectRef
from runtime.serialization import _FAST_TYPES, SerializationError, serialize

_LARGE_ARG_BYTES = 16 * 1024


class ArgSlot:
    """Placeholder for a top-level ObjectRef argument, replaced by its value."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self):
        return (ArgSlot, (self.index,))


def prepare_args(cw, fn: Callable, name: str, args: tuple, kwargs: dict
                 ) -> Tuple[bytes, List[ObjectRef], List[bytes]]:
    """(args blob, slot refs, ids of every ref the task holds)."""
    if not args and not kwargs:
        return b"", [], []
    if not kwargs and all(type(a) in _FAST_TYPES for a in args):
        ser = serialize((list(args), {}))
        return ser.to_bytes(), [], []
    slots: List[ObjectRef] = []
    args = list(args)
    kwargs = dict(kwargs)
    for i, a in enumerate(args):
        if isinstance(a, ObjectRef):
            args[i] = ArgSlot(len(slots))
            slots.append(a)
    for k, v in kwargs.items():
        if isinstance(v, ObjectRef):
            kwargs[k] = ArgSlot(len(slots))
            slots.append(v)
    try:
        ser = serialize((args, kwargs))
    except SerializationError:
        raise _which_arg_failed(fn, name, args, kwargs) from None
    if ser.total_size > config.INLINE_OBJECT_MAX_BYTES:
        # Move large arguments to the object store, keep the rest inline.
        for i, a in enumerate(args):
            if type(a) is not ArgSlot:
                s = serialize(a)
                if s.total_size > _LARGE_ARG_BYTES:
                    args[i] = ArgSlot(len(slots))
                    slots.append(cw.put_serialized(_new_id(), s))
        for k, v in list(kwargs.items()):
            if type(v) is not ArgSlot:
                s = serialize(v)
                if s.total_size > _LARGE_ARG_BYTES:
                    kwargs[k] = ArgSlot(len(slots))
                    slots.append(cw.put_serialized(_new_id(), s))
        ser = serialize((args, kwargs))
    held = [r._id for r in slots] + [r._id for r in ser.contained]
    return ser.to_bytes(), slots, held


def _new_id() -> bytes:
    from runtime.ids import new_put_id

    return new_put_id()


def _which_arg_failed(fn: Callable, name: str, args: list, kwargs: dict) -> TypeError:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    for i, a in enumerate(args):
        try:
            serialize(a)
        except SerializationError as exc:
            pname = f" '{params[i]}'" if i < len(params) else ""
            return TypeError(f"Could not serialize argument {i}{pname} of {name}(): {exc}")
    for k, v in kwargs.items():
        try:
            serialize(v)
        except SerializationError as exc:
            return TypeError(f"Could not serialize keyword argument '{k}' of {name}(): {exc}")
    return TypeError(f"Could not serialize the arguments of {name}()")
