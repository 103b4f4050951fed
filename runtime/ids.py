"""Binary identifiers, sized like Ray's so logs and state output look familiar.

An ObjectID is the TaskID that creates it plus a 4-byte return index, so the
creating task of any object is known without a lookup (lineage, error messages).

Inside the runtime ids are plain bytes; the classes at the end (TaskID, JobID, ...)
are what the public API returns, as Ray's do.
"""
from __future__ import annotations

import os
import struct

JOB_ID_SIZE = 4
TASK_ID_SIZE = 24
OBJECT_ID_SIZE = TASK_ID_SIZE + 4
NODE_ID_SIZE = 28
WORKER_ID_SIZE = 28
ACTOR_ID_SIZE = 16
PLACEMENT_GROUP_ID_SIZE = 18

_INDEX = struct.Struct(">I")


def random_id(size: int) -> bytes:
    return os.urandom(size)


def new_task_id() -> bytes:
    return os.urandom(TASK_ID_SIZE)


def object_id_for_return(task_id: bytes, index: int) -> bytes:
    """Return index i of a task; index 0 is reserved for put() objects of that task."""
    return task_id + _INDEX.pack(index)


def new_put_id() -> bytes:
    return os.urandom(TASK_ID_SIZE) + _INDEX.pack(0)


def task_id_of(object_id: bytes) -> bytes:
    return object_id[:TASK_ID_SIZE]


def job_id_from_int(n: int) -> bytes:
    return n.to_bytes(JOB_ID_SIZE, "little")


def hex_id(b: bytes | None) -> str:
    return b.hex() if b else ""


# -- Ray's ID classes ---------------------------------------------------------------------------
class BaseID(bytes):
    """An identifier as Ray's API hands it out (``ref.task_id()``, ``ray.JobID``...).

    A bytes subclass: the runtime keeps ids as raw bytes everywhere (dict keys, protobuf
    fields), so an ID object can go wherever bytes went and compares equal to them,
    while offering Ray's methods (``hex()``, ``binary()``, ``is_nil()``, ``from_hex()``).
    """

    SIZE = 0

    def __new__(cls, id_bytes: bytes) -> "BaseID":
        if not isinstance(id_bytes, (bytes, bytearray, memoryview)):
            raise TypeError(f"{cls.__name__} needs bytes, got {type(id_bytes).__name__}")
        if cls.SIZE and len(id_bytes) != cls.SIZE:
            raise ValueError(f"{cls.__name__} must be {cls.SIZE} bytes long, got "
                             f"{len(id_bytes)}")
        return super().__new__(cls, id_bytes)

    @classmethod
    def size(cls) -> int:
        return cls.SIZE

    @classmethod
    def from_binary(cls, id_bytes: bytes) -> "BaseID":
        return cls(id_bytes)

    @classmethod
    def from_hex(cls, hex_id: str) -> "BaseID":
        try:
            raw = bytes.fromhex(hex_id)
        except (TypeError, ValueError):
            raise ValueError(f"{cls.__name__}.from_hex: {hex_id!r} is not a hex string") from None
        return cls(raw)

    @classmethod
    def from_random(cls) -> "BaseID":
        return cls(os.urandom(cls.SIZE))

    @classmethod
    def nil(cls) -> "BaseID":
        return cls(b"\xff" * cls.SIZE)

    def binary(self) -> bytes:
        return bytes(self)

    def is_nil(self) -> bool:
        return not self or self == b"\xff" * len(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hex()})"

    __str__ = __repr__

    def __reduce__(self):
        return (type(self), (bytes(self),))

    # bytes' own __eq__/__hash__: an ID equals the raw id it wraps.
    __hash__ = bytes.__hash__


class UniqueID(BaseID):
    SIZE = 28


class JobID(BaseID):
    SIZE = JOB_ID_SIZE

    @classmethod
    def from_int(cls, value: int) -> "JobID":
        return cls(job_id_from_int(value))

    def int(self) -> int:
        return int.from_bytes(self, "little")


class TaskID(BaseID):
    SIZE = TASK_ID_SIZE


class ObjectID(BaseID):
    SIZE = OBJECT_ID_SIZE

    def task_id(self) -> "TaskID":
        return TaskID(task_id_of(self))


class ActorID(BaseID):
    SIZE = ACTOR_ID_SIZE


class NodeID(BaseID):
    SIZE = NODE_ID_SIZE


class WorkerID(BaseID):
    SIZE = WORKER_ID_SIZE


class PlacementGroupID(BaseID):
    SIZE = PLACEMENT_GROUP_ID_SIZE


class FunctionID(BaseID):
    """A remote function's id: the SHA-1 of its pickle (20 bytes; Ray's are 28)."""

    SIZE = 20


class ActorClassID(FunctionID):
    """An actor class's id: the SHA-1 of its pickle."""


class ClusterID(BaseID):
    SIZE = 28
