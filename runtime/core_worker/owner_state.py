"""The owner's side of tasks and actor calls, as a sans-I/O state machine.

Whatever happens to a task or an actor call that this process submitted (queued,
leased, pushed, retried, cancelled, failed when a worker, a connection, a raylet or
an actor dies) is decided here, and only here. Stimuli are method calls (a task is
submitted, its arguments are ready, a lease is granted or refused, a result comes
back, a worker or a connection is lost, an actor is reported alive, restarting or
dead, a cancel is requested, a reference is released); each returns the list of
actions the I/O shell (runtime/core_worker/submitter.py) must carry out: request,
cancel or return a lease, connect to a worker, push a task, store a result, fail
tasks with an error, cancel a task remotely, watch an actor, free a lineage entry.
Nothing here touches a socket, a thread or the event loop, so every path is a unit
test (tests/test_owner_state_*.py), as the raylet's scheduler is (Dask's
worker_state_machine is the model). Mutate the state only through the stimuli.

A task's state is one of the TaskState enum (protos common.proto), the vocabulary
the task events and the state API use too:

=========================  =========================================================
PENDING_ARGS_AVAIL         submitted; the values of its ObjectRef arguments are awaited
PENDING_NODE_ASSIGNMENT    queued under its scheduling key (a lease is requested when
                           there is none to use); also after a retry, and an actor call
                           queued for its actor (alive, restarting or still unknown)
SUBMITTED_TO_WORKER        pushed to a leased worker, or to the actor's worker
FINISHED / FAILED          its return values (or the error) are stored; terminal
=========================  =========================================================

RUNNING is learnt by the task events at flush time (runtime/core_worker/task_events.py)
and is not a state of its own here. A retry sends a task back to PENDING_NODE_ASSIGNMENT
with ``attempt + 1``; a cancel sets ``cancelled`` and, unless the task is out on a
worker, fails it at once.

The machine is one OwnerState, assembled from one mixin per concept, each in its own
module whose docstring tells its part of the story: owner_tasks.py (normal tasks:
queues per scheduling key, leases, results, retries, workers and raylets that die),
owner_actors.py (actor calls: queues per actor, links, the actor's liveness),
owner_lineage.py (lineage: pins, frees, re-runs that rebuild lost objects) and
owner_oom.py (tasks the memory monitor killed). The records they share are in
owner_records.py, the actions in owner_actions.py. This module holds the state itself
(OwnerState.__init__) and what every task and call goes through: argument resolution,
the push, generator streams, the end (stored or failed, kept as lineage or not),
cancellation. The parts reach each other's transitions through ``self``, never by
import: only this module imports them all, so there is no import circle.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Tuple, Union

from runtime.core_worker.memory_store import Value
from runtime.core_worker.owner_actions import (Action, CancelRemote, Fail, Finish, FreeLineage,
                                               PinLineage, Push, ResolveArgs, ReturnLease,
                                               StreamItem)
from runtime.core_worker.owner_actors import ActorTransitions
from runtime.core_worker.owner_lineage import LINEAGE_MAX_BYTES, LineageTransitions, lineage_size
from runtime.core_worker.owner_oom import OomTransitions
from runtime.core_worker.owner_records import (FAILED, FINISHED, PENDING_ARGS_AVAIL,
                                               SUBMITTED_TO_WORKER, ActorQueue, Error, KeyState,
                                               Lease, PendingTask, WorkerLink)
from runtime.core_worker.owner_tasks import (LEASE_IDLE_RETURN_S, MAX_LEASE_REQUESTS_PER_KEY,
                                             TaskTransitions)
from runtime.exceptions import TaskCancelledError


class Recorder(Protocol):
    """Where transitions are recorded for the task events (task_events.TaskEventBuffer);
    appends to in-memory lists, never I/O."""

    enabled: bool

    def new_task(self, task: PendingTask, kind: str, state: int) -> None: ...
    def event(self, task_id: bytes, state: int, when: Optional[float] = None) -> None: ...
    def submitted(self, task: PendingTask) -> None: ...
    def requeued_task(self, task: PendingTask) -> None: ...
    def result(self, task: PendingTask, link: WorkerLink, result: Any, node_id: bytes) -> None: ...
    def failed(self, task: PendingTask, error: Error, node_id: bytes) -> None: ...
    def reason(self, task_id: bytes, why: str) -> None: ...


class NoRecorder:
    enabled = False

    def new_task(self, task: PendingTask, kind: str, state: int) -> None:
        pass

    def event(self, task_id: bytes, state: int, when: Optional[float] = None) -> None:
        pass

    def submitted(self, task: PendingTask) -> None:
        pass

    def requeued_task(self, task: PendingTask) -> None:
        pass

    def result(self, task: PendingTask, link: WorkerLink, result: Any, node_id: bytes) -> None:
        pass

    def failed(self, task: PendingTask, error: Error, node_id: bytes) -> None:
        pass

    def reason(self, task_id: bytes, why: str) -> None:
        pass


def _default_parse_error(data: bytes) -> BaseException:
    from runtime.serialization import parse

    _kind, err = parse(data)
    return err


class Settings:
    """The knobs the machine reads, each time it needs one (the shell passes
    runtime.config, whose values tests may change while a cluster runs)."""

    LEASE_IDLE_RETURN_S = LEASE_IDLE_RETURN_S
    PIPELINE_DEPTH = 16
    PIPELINE_MAX_TASK_SECONDS = 0.002
    TASK_OOM_RETRIES = -1


class OwnerState(TaskTransitions, ActorTransitions, LineageTransitions, OomTransitions):
    """Every task and actor call this process owns; see the module docstring."""

    def __init__(self, *, recorder: Optional[Recorder] = None,
                 clock: Optional[Callable[[], float]] = None, settings: Any = Settings,
                 parse_error: Callable[[bytes], BaseException] = _default_parse_error,
                 max_lease_requests: int = MAX_LEASE_REQUESTS_PER_KEY,
                 lineage_max_bytes: int = LINEAGE_MAX_BYTES) -> None:
        import time

        self.recorder: Recorder = recorder if recorder is not None else NoRecorder()
        self.clock = clock or time.monotonic
        self.settings = settings
        self.parse_error = parse_error
        self.max_lease_requests = max_lease_requests
        self.lineage_max_bytes = lineage_max_bytes
        self.node_id = b""  # this process's node, for task events of tasks that ran nowhere
        self.tasks: Dict[bytes, PendingTask] = {}
        self.keys: Dict[Any, KeyState] = {}
        self.requests: Dict[int, KeyState] = {}
        self.request_raylet: Dict[int, str] = {}   # request id -> the raylet holding it
        self.links: Dict[bytes, WorkerLink] = {}  # leased workers' links, by worker id
        self.dead_workers: "OrderedDict[bytes, None]" = OrderedDict()
        self.fn_time: Dict[bytes, float] = {}     # mean run time per function (pipelining)
        self.actors: Dict[bytes, ActorQueue] = {}
        self.raylet_up = True
        self.raylet_error: Optional[BaseException] = None  # the local raylet is gone for good
        self.actors_gone: Optional[BaseException] = None   # ... and with it every actor
        self.lineage: Dict[bytes, PendingTask] = {}  # owned return object -> its task
        self.lineage_done: "OrderedDict[bytes, PendingTask]" = OrderedDict()  # finished, kept
        self.lineage_bytes = 0
        self.lineage_evicted: "OrderedDict[bytes, None]" = OrderedDict()
        # Remote raylets that went away: address -> [when the next probe may go, failures].
        self.dead_raylets: Dict[str, List[float]] = {}
        self.streams: Dict[bytes, PendingTask] = {}  # generator tasks, until their last item
        self._next_request = 0

    # -- what tasks and actor calls share: arguments, the push -------------------------------
    def _resolve(self, task: PendingTask, out: List[Action]) -> None:
        n = task.nslots = len(task.slot_refs or ())
        task.state = PENDING_ARGS_AVAIL
        task.arg_values = [None] * n
        task.waiting = n
        out.append(ResolveArgs(task))

    def arg_ready(self, task: PendingTask, index: int, location: Any) -> List[Action]:
        """The value of argument slot `index` (an ObjectLocation) is known. Once all are,
        the task is queued (an actor call: sent in its turn); a failed dependency fails
        it with the same error, without running it."""
        if task.done or task.arg_values[index] is not None:
            return []
        task.arg_values[index] = location
        task.waiting -= 1
        if task.waiting:
            return []
        out: List[Action] = []
        if task.cancelled or task.done:
            return out
        if task.actor_id:
            a = self.actors.get(task.actor_id)
            if a is not None:
                self._pump_actor(a, out)
            return out
        for loc in task.arg_values:
            if loc.is_error:
                # A failed dependency fails this task with the same error, without running it.
                self._fail([task], Value.from_proto(loc), out)
                return out
        task.slot_refs = None
        self._enqueue(task, out)
        return out

    def _push(self, task: PendingTask, link: WorkerLink, lease: Optional[Lease],
              out: List[Action]) -> None:
        task.link = link
        task.state = SUBMITTED_TO_WORKER
        self.recorder.submitted(task)
        link.inflight[task.task_id] = task
        out.append(Push(task, link, lease))

    # -- generator streams ---------------------------------------------------------------------
    def stream_item(self, result: Any) -> List[Action]:
        """A generator task yielded an item. It is looked up among generator tasks, not
        in-flight ones: an item may arrive after its task's final result (the worker
        flushes borrower registrations before some results), or from an attempt that has
        since been retried (the shell keeps only indices it has not seen)."""
        task = self.streams.get(result.task_id)
        if task is None:
            return []
        return [StreamItem(task, result)]

    def stream_closed(self, task_id: bytes) -> None:
        """Every item of a generator task, up to its end, has reached the shell."""
        self.streams.pop(task_id, None)

    # -- the end: values stored or failed, the task kept as lineage or not -------------------
    def fail_tasks(self, tasks: Iterable[PendingTask], error: Error) -> List[Action]:
        """Fail `tasks` with `error` (those cancelled meanwhile as cancelled; those already
        finished stay as they are)."""
        out: List[Action] = []
        for task in tasks:
            if task.done:
                continue
            self._fail([task], TaskCancelledError(task.task_id.hex()) if task.cancelled
                       else error, out)
        return out

    def _fail(self, tasks: List[PendingTask], error: Error, out: List[Action]) -> None:
        failing = []
        for task in tasks:
            if task.done:
                continue  # e.g. cancelled while queued, then failed with its actor: once is all
            if self.recorder.enabled:
                self.recorder.failed(task, error, self.node_id)
            failing.append(task)
        if failing:
            action = Fail(failing, error)
            out.append(action)
            for task in failing:
                self._finish(task, action, FAILED, out, shared=True)

    def _finish(self, task: PendingTask, action: Union[Finish, Fail], state: int,
                out: List[Action], shared: bool = False) -> None:
        """The task is over: its values are stored by `action` (added by the caller when
        several tasks share it). A task that finished keeps its lineage while its return
        objects are referenced."""
        task.state = state
        self.tasks.pop(task.task_id, None)
        keep = state == FINISHED and task.live_returns > 0
        if keep and not task.lineage_kept:
            task.lineage_kept = True
            if task.arg_ids:
                out.append(PinLineage(task))  # before the Finish releases what it held
        if not shared:
            out.append(action)
        task.arg_values = []
        task.slot_refs = None
        if keep:
            self.lineage_done[task.task_id] = task
            self.lineage_bytes += lineage_size(task)
            if self.lineage_bytes > self.lineage_max_bytes:
                self._evict_lineage(out)
            return
        if task.live_returns > 0:  # an error is not worth running again
            self._unindex(task)
        if task.lineage_kept:  # a run to rebuild its objects failed, or they went meanwhile
            task.lineage_kept = False
            out.append(FreeLineage(task))

    # -- cancellation ------------------------------------------------------------------------------
    def cancel(self, task_id: bytes, force: bool, recursive: bool = False
               ) -> Tuple[bool, List[Action]]:
        """(found, actions). A task not out on a worker fails at once; a running one is
        cancelled where it runs (force: its worker is killed); a call in flight to an
        actor that is restarting fails at once, and is never sent again."""
        out: List[Action] = []
        task = self.tasks.get(task_id)
        if task is None:
            return False, out
        if force and task.actor_id:
            raise ValueError("force=True is not supported for actor calls: an actor has state, "
                             "so a running call is never interrupted; use runtime.kill(actor) "
                             "to stop the actor")
        task.cancelled = True
        link = task.link
        cancelled = TaskCancelledError(task_id.hex())
        if link is None:  # waiting for its arguments, or queued (for a lease or its actor)
            if task.actor_id:
                a = self.actors.get(task.actor_id)
                if a is not None and task in a.queue:
                    a.queue.remove(task)
                    self._fail([task], cancelled, out)
                    self._pump_actor(a, out)
                    return True, out
            else:
                ks = self.keys.get(task.key)
                if ks is not None and task in ks.queue:
                    ks.queue.remove(task)
            self._fail([task], cancelled, out)
            return True, out
        if link.dead:
            a = link.actor
            if a is not None and task in a.limbo:  # its actor restarts: it is never resent
                a.limbo.remove(task)
                self._fail([task], cancelled, out)
            # else its worker died and its fate is being decided (WorkerDied): it fails
            # as cancelled (fail_tasks)
            return True, out
        lease = task.lease
        if force and lease is not None:
            if not lease.dead:
                lease.dead = True
                if lease in lease.key.leases:
                    lease.key.leases.remove(lease)
                out.append(ReturnLease(lease.raylet, lease.lease_id, kill_worker=True))
            return True, out
        out.append(CancelRemote(task, link.control_address, force, recursive))
        return True, out

    def cancel_children(self, parent_task_id: bytes, force: bool) -> List[Action]:
        """A task this process ran was cancelled with recursive=True: cancel the tasks it
        submitted (this process owns them)."""
        out: List[Action] = []
        for task in [t for t in self.tasks.values() if t.parent_task_id == parent_task_id]:
            try:
                _found, actions = self.cancel(task.task_id, force and not task.actor_id, True)
            except ValueError:
                continue
            out.extend(actions)
        return out

    # -- introspection ---------------------------------------------------------------------------
    def flights(self) -> List[WorkerLink]:
        """Every live link with tasks in flight (task events sample where they run)."""
        out = [link for link in self.links.values() if link.inflight and not link.dead]
        for a in self.actors.values():
            link = a.link
            if link is not None and link.inflight and not link.dead:
                out.append(link)
        return out
