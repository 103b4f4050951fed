"""The actions of the owner's state machine: what the I/O shell
(runtime/core_worker/submitter.py, actor_submitter.py) carries out, in order, from the
list each stimulus of OwnerState (owner_state.py) returns.

An action names the records it concerns (owner_records.py) and what is to be done with
them; it does nothing itself. So a transition is tested by the actions it returns
(tests/test_owner_state_*.py), without a socket, a thread or a timer.
"""
from __future__ import annotations

from typing import Any, List, Optional, Union

from runtime.core_worker.owner_records import (ActorQueue, Error, KeyState, Lease, PendingTask,
                                               WorkerLink)


class RequestLease:
    __slots__ = ("key", "request_id", "raylet")

    def __init__(self, key: KeyState, request_id: int, raylet: str) -> None:
        self.key, self.request_id, self.raylet = key, request_id, raylet


class CancelLeaseRequest:
    __slots__ = ("request_id", "raylet")

    def __init__(self, request_id: int, raylet: str) -> None:
        self.request_id, self.raylet = request_id, raylet


class ReturnLease:
    __slots__ = ("raylet", "lease_id", "kill_worker", "worker_exiting")

    def __init__(self, raylet: str, lease_id: int, kill_worker: bool = False,
                 worker_exiting: bool = False) -> None:
        self.raylet, self.lease_id, self.kill_worker = raylet, lease_id, kill_worker
        self.worker_exiting = worker_exiting  # it reached max_calls: out of the pool


class ArmIdleTimer:
    """Call lease_idle(lease) after `delay` seconds."""
    __slots__ = ("lease", "delay")

    def __init__(self, lease: Lease, delay: float) -> None:
        self.lease, self.delay = lease, delay


class Connect:
    """Open the connection for a new link (a granted worker, or an actor's worker)."""
    __slots__ = ("link",)

    def __init__(self, link: WorkerLink) -> None:
        self.link = link


class CloseLink:
    __slots__ = ("link",)

    def __init__(self, link: WorkerLink) -> None:
        self.link = link


class ResolveArgs:
    """Learn the values of task.slot_refs; report each with arg_ready(task, i, location)."""
    __slots__ = ("task",)

    def __init__(self, task: PendingTask) -> None:
        self.task = task


class Push:
    __slots__ = ("task", "link", "lease")

    def __init__(self, task: PendingTask, link: WorkerLink, lease: Optional[Lease]) -> None:
        self.task, self.link, self.lease = task, link, lease


class Finish:
    """Store the task's return values as the worker sent them (its error, when it raised)."""
    __slots__ = ("task", "result")

    def __init__(self, task: PendingTask, result: Any) -> None:
        self.task, self.result = task, result


class Fail:
    """Store `error` as the value of every return of `tasks`."""
    __slots__ = ("tasks", "error")

    def __init__(self, tasks: List[PendingTask], error: Error) -> None:
        self.tasks, self.error = tasks, error


class WorkerDied:
    """The worker running `tasks` died and they have no retries left. The shell names
    the cause (the worker's crash, or its raylet's death) and calls fail_tasks."""
    __slots__ = ("tasks", "error")

    def __init__(self, tasks: List[PendingTask], error: str) -> None:
        self.tasks, self.error = tasks, error


class CancelRemote:
    __slots__ = ("task", "address", "force", "recursive")

    def __init__(self, task: PendingTask, address: str, force: bool, recursive: bool) -> None:
        self.task, self.address, self.force, self.recursive = task, address, force, recursive


class WatchActor:
    """Learn the actor's state from the GCS (actor.watch_handshake_error says how long
    to wait) and report it with actor_reported / actor_dead."""
    __slots__ = ("actor",)

    def __init__(self, actor: ActorQueue) -> None:
        self.actor = actor


class Warn:
    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class FreeLineage:
    """The task is no longer kept as lineage: undo its PinLineage, if it had one."""
    __slots__ = ("task",)

    def __init__(self, task: PendingTask) -> None:
        self.task = task


class PinLineage:
    """The task is kept as lineage: pin its arguments (see the module docstring). Comes
    before the Finish that releases what the running task held."""
    __slots__ = ("task",)

    def __init__(self, task: PendingTask) -> None:
        self.task = task


class Resubmit:
    """The task runs again to rebuild lost objects: hold its arguments as a pending task
    does (task.slot_refs are object ids now; the shell finds their owners)."""
    __slots__ = ("task",)

    def __init__(self, task: PendingTask) -> None:
        self.task = task


class FailObjects:
    """Store `error` as the value of these owned objects (lost, and not rebuilt)."""
    __slots__ = ("oids", "error")

    def __init__(self, oids: List[bytes], error: Error) -> None:
        self.oids, self.error = oids, error


class ArgumentLost:
    """The worker running `task` could not fetch its argument `oid` from `location` (an
    ObjectLocation): forget that location and recover the value (the owner rebuilds it,
    a borrower asks its owner). The task is resolved again right after."""
    __slots__ = ("task", "oid", "location")

    def __init__(self, task: PendingTask, oid: bytes, location: Any) -> None:
        self.task, self.oid, self.location = task, oid, location


class StreamItem:
    """Store one item a generator task yielded (result.returns[0], index result.item_index)
    in the task's stream."""

    __slots__ = ("task", "result")

    def __init__(self, task: PendingTask, result: Any) -> None:
        self.task = task
        self.result = result


class RetryLater:
    """Call retry_due(task) after `delay` seconds (a task the memory monitor killed)."""
    __slots__ = ("task", "delay")

    def __init__(self, task: PendingTask, delay: float) -> None:
        self.task, self.delay = task, delay


class ArmRetry:
    """Call retry_held(key) after `delay` seconds."""
    __slots__ = ("key", "delay")

    def __init__(self, key: "KeyState", delay: float) -> None:
        self.key, self.delay = key, delay


Action = Union[RequestLease, CancelLeaseRequest, ReturnLease, ArmIdleTimer, Connect, CloseLink,
               ResolveArgs, Push, Finish, Fail, WorkerDied, CancelRemote, WatchActor, Warn,
               FreeLineage, PinLineage, Resubmit, FailObjects, ArgumentLost, ArmRetry, StreamItem,
               RetryLater]
