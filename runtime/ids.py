"""Binary identifiers, sized like Ray's so logs and state output look familiar.

An ObjectID is the TaskID that creates it plus a 4-byte return index, so the
creating task of any object is known without a lookup (lineage, error messages).
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
