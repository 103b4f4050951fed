"""Builders for the unit tests of the owner's state machine (runtime/core_worker/owner_state.py):
a machine with a fake clock, tasks, results, grants, and the steps that take a task to a
worker or to its end (tests/test_owner_state_*.py)."""
from __future__ import annotations

import types
from typing import List

from runtime.core_worker.owner_actions import Push, RequestLease
from runtime.core_worker.owner_records import PendingTask, WorkerLink
from runtime.core_worker.owner_state import OwnerState
from runtime.core_worker.owner_tasks import LOCAL_RAYLET
from runtime.protocol import common_pb2
from runtime.serialization import serialize_error

KEY = ("f", (("CPU", 1.0),), b"")
W1, W2 = b"\x01" * 28, b"\x02" * 28
ACTOR = b"\xaa" * 16


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def machine(**settings) -> OwnerState:
    knobs = types.SimpleNamespace(LEASE_IDLE_RETURN_S=0.2, PIPELINE_DEPTH=16,
                                  PIPELINE_MAX_TASK_SECONDS=0.002, TASK_OOM_RETRIES=-1)
    for k, v in settings.items():
        setattr(knobs, k, v)
    return OwnerState(clock=Clock(), settings=knobs)


_next = [0]


def task(retries: int = 3, num_returns: int = 1, slots: int = 0, retry_exceptions=False,
         key=KEY, actor: bytes = b"") -> PendingTask:
    _next[0] += 1
    t = PendingTask()
    t.task_id = _next[0].to_bytes(4, "big") * 6
    t.name = "f"
    t.function_id = b"fn"
    t.key = key
    t.resources = {"CPU": 1.0}
    t.strategy = common_pb2.SchedulingStrategy(kind="DEFAULT")
    t.return_ids = [t.task_id + bytes([i + 1]) for i in range(num_returns)]
    t.retries_left = retries
    t.retry_exceptions = retry_exceptions
    t.args = b"args"
    t.slot_refs = [object()] * slots or None
    t.actor_id = actor
    return t


def of(actions: List, kind) -> List:
    return [a for a in actions if isinstance(a, kind)]


def grant(m: OwnerState, actions, worker=W1, lease_id=7, raylet=LOCAL_RAYLET):
    (req,) = of(actions, RequestLease)[:1]
    return m.lease_granted(raylet, req.request_id, lease_id, worker, "127.0.0.1:9",
                           b"node", 42, [])


def result(t: PendingTask, app_error: bool = False, error: BaseException = None,
           exec_seconds: float = 0.5, cancelled: bool = False) -> common_pb2.TaskResult:
    r = common_pb2.TaskResult(task_id=t.task_id, app_error=app_error, exec_seconds=exec_seconds,
                              cancelled=cancelled)
    data = serialize_error(error).to_bytes() if error is not None else b"ok"
    for oid in t.return_ids:
        r.returns.add(object_id=oid, inline_data=data, is_error=app_error)
    return r


def running(m: OwnerState, t: PendingTask, **kw):
    """Submit t and have its lease granted: (link, actions of the grant)."""
    out = m.submit(t)
    actions = grant(m, out, **kw)
    (push,) = of(actions, Push)
    return push.link, actions


REMOTE = "127.0.0.3:6381"


def pushed(m: OwnerState, t: PendingTask, out, worker=W1, lease_id=7) -> WorkerLink:
    """Where t went: on a lease the actions reuse, or on one granted now."""
    for _ in range(2):
        for push in of(out, Push):
            if push.task is t:
                return push.link
        out = grant(m, out, worker=worker, lease_id=lease_id)
    raise AssertionError(f"{t.name} was not pushed")


def finished(m: OwnerState, t: PendingTask, worker=W1, lease_id=7):
    """Submit t (its slot arguments, if any, in the store of node 3), run it to the end:
    the actions of its result."""
    out = m.submit(t)
    for i in range(len(t.slot_refs or ())):
        out += m.arg_ready(t, i, in_store(t.arg_ids[i]))
    return m.task_result(pushed(m, t, out, worker, lease_id), result(t))


def in_store(oid: bytes, store: str = "127.0.0.3:6382") -> common_pb2.ObjectLocation:
    return common_pb2.ObjectLocation(object_id=oid, in_store=True, node_id=b"n3",
                                     store_address=store, size=10)


def with_args(t: PendingTask, *oids: bytes) -> PendingTask:
    t.slot_refs = [object()] * len(oids)
    t.arg_ids = list(oids)
    return t
