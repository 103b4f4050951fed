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
test (tests/test_owner_state.py), as the raylet's scheduler is (Dask's
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
worker, fails it at once. Leases belong to scheduling keys, not to tasks: a task is
bound to a lease only when it is pushed, so a lease is reused by every task of its key
and returned after LEASE_IDLE_RETURN_S of idleness.

Actor calls queue per (caller, actor), in submission order (``seq``), and go out on one
link to the actor's worker while it is alive. Calls in flight when that link breaks
wait in ``limbo`` until the GCS says what became of the actor: restarted (they are sent
again while they have ``max_task_retries`` left) or dead (they fail with the reason).

The owner keeps each finished normal task that may be retried as the *lineage* of the
objects it returned (what is needed to run it again) until the last of them is
released; ``FreeLineage`` then drops it. When an object it owns is lost (its only copy
was on a node or in a store that died, or only lineage kept it and its value was freed),
``object_lost`` re-runs the task that made it, as a new attempt that counts against
``max_retries``; its arguments are resolved again, so an argument that is lost too is
rebuilt first, recursively. What cannot be rebuilt fails with Ray 2.60's
ObjectReconstructionFailedError and its reason: a ``put`` object, a task created with
max_retries=0, one out of retries, lineage evicted (beyond LINEAGE_MAX_BYTES). A task
whose worker could not fetch an argument (its copy was lost meanwhile) is not failed:
the argument is recovered (``ArgumentLost``) and the task resolved again, without
using a retry.

How lineage pins arguments (``PinLineage``, undone by ``FreeLineage``): while a task is
kept as lineage, its arguments this process owns stay known. An argument that can be
rebuilt itself (it has lineage) is pinned by lineage only: its value is freed with its
last reference and rebuilt if a re-run needs it, as Ray's lineage_ref_count. An
argument that cannot be rebuilt (a put object, e.g. a large argument put by .remote())
keeps its value while the lineage lives, since the re-run could not do without it (Ray's
OutOfScope keeps objects that are not reconstructable for lineage references, too).
Borrowed arguments are not pinned: their owner frees them when this process is done,
so rebuilding a task that needs one of them after that fails with its owner's error.

A worker the raylet's memory monitor kills is announced first (``worker_killed``, the
raylet's WorkerKilled notice, written before its SIGKILL): the link is marked, and when
it breaks its tasks follow Ray's OOM retry policy instead of the crash one. A task
created with max_retries=0 fails with OutOfMemoryError (the monitor's text); any other
runs again after a backoff (1 s, doubling, at most 60 s: ``RetryLater``, then
``retry_due``) without using its max_retries, up to TASK_OOM_RETRIES times (-1, the
default: no limit), then fails with OutOfMemoryError. Each such retry is a warning in
the owner's log. A notice that arrives after the link broke (the two travel on
different streams, so the worker's death could be seen first) finds no link and
changes nothing: the tasks were already handled as after any worker death (retried
using max_retries, or failed with WorkerCrashedError). Nothing is lost or run twice
that way; only the error does not say "memory".

Tasks on a node that dies are retried elsewhere like those of any dead worker. A
remote raylet that went away (its stream broke, or it could not be reached) is
remembered: a spillback that names it is not followed but asked of the local raylet
again a moment later (HELD_RETRY_S), the dead raylet being probed at most once per
backoff (DEAD_RAYLET_BACKOFF_S), until it grants a lease again or the local raylet
stops naming it (once the GCS marks its node dead).
"""
from __future__ import annotations

import logging
from collections import OrderedDict, deque
from typing import (Any, Callable, Deque, Dict, Iterable, List, Optional, Protocol, Sequence,
                    Tuple, Union)

from runtime.core_worker.memory_store import Value
from runtime.exceptions import (ActorUnavailableError, ObjectFetchTimedOutError, ObjectLostError,
                                ObjectReconstructionFailedError, OutOfMemoryError,
                                ObjectReconstructionFailedLineageEvictedError,
                                ObjectReconstructionFailedMaxAttemptsExceededError, RayActorError,
                                RuntimeEnvSetupError, TaskCancelledError, TaskPlacementGroupRemoved,
                                TaskUnschedulableError)
from runtime.protocol import common_pb2

log = logging.getLogger("runtime.core_worker")

# The task states (one vocabulary: common.proto's TaskState).
PENDING_ARGS_AVAIL = common_pb2.PENDING_ARGS_AVAIL
PENDING_NODE_ASSIGNMENT = common_pb2.PENDING_NODE_ASSIGNMENT
SUBMITTED_TO_WORKER = common_pb2.SUBMITTED_TO_WORKER
RUNNING = common_pb2.RUNNING
FINISHED = common_pb2.FINISHED
FAILED = common_pb2.FAILED
# The actor states (common.proto's ActorState), as the GCS reports them.
ACTOR_PENDING = common_pb2.PENDING_CREATION
ACTOR_ALIVE = common_pb2.ALIVE
ACTOR_RESTARTING = common_pb2.RESTARTING
ACTOR_DEAD = common_pb2.DEAD

LOCAL_RAYLET = ""  # the raylet of this node; others are named by their address
MAX_LEASE_REQUESTS_PER_KEY = 10
LEASE_IDLE_RETURN_S = 0.2
# Call-port connections that may fail in a row before the hello is accepted.
HANDSHAKE_ATTEMPTS = 3
# How many calls an async actor is taken to run at once, for task events (RUNNING).
ASYNC_ACTOR_CONCURRENCY = 1000
# Ray's RAY_max_lineage_bytes: beyond it the oldest lineage is dropped.
LINEAGE_MAX_BYTES = 1 << 30
# Workers this owner saw die, remembered so that a grant of one of them (the raylet may
# not have noticed yet) is handed back at once instead of costing a task a retry.
DEAD_WORKERS_KEPT = 10_000
# A raylet that went away is probed (a spillback to it is followed) at most once per
# this long, doubling per failure up to the second figure; meanwhile spillbacks to it
# are asked of the local raylet again every HELD_RETRY_S, at most (it drops the node
# as soon as the GCS marks it dead).
DEAD_RAYLET_BACKOFF_S = (0.1, 2.0)
HELD_RETRY_S = 0.2
# Objects whose lineage was evicted, remembered (oldest first out) to name the reason
# when one of them is lost.
EVICTED_KEPT = 100_000
# Ray's backoff before a task the memory monitor killed runs again: the first figure,
# doubling per kill of the same task, at most the second (task_oom_retry_delay_base_ms).
OOM_RETRY_DELAY_S = (1.0, 60.0)
# How often one task may find an argument lost and be resolved again without using a
# retry (each time the argument is recovered first), before the loss fails it.
ARGUMENT_LOSSES_MAX = 3
# Ray's reasons (ErrorType names) why a lost object cannot be rebuilt.
MAX_ATTEMPTS_EXCEEDED = "OBJECT_UNRECONSTRUCTABLE_MAX_ATTEMPTS_EXCEEDED"
LINEAGE_EVICTED = "OBJECT_UNRECONSTRUCTABLE_LINEAGE_EVICTED"
PUT = "OBJECT_UNRECONSTRUCTABLE_PUT"
RETRIES_DISABLED = "OBJECT_UNRECONSTRUCTABLE_RETRIES_DISABLED"
_PUT_INDEX = b"\x00\x00\x00\x00"  # the return index of put objects (runtime/ids.py)

Error = Union[BaseException, Value]  # an exception, or one already serialized


class PendingTask:
    """A task or an actor call, from submission until its result is stored (and, as
    lineage, until its return objects are released)."""

    __slots__ = ("task_id", "function_id", "function_blob", "name", "args", "slot_refs",
                 "arg_values", "arg_ids", "return_ids", "key", "resources", "strategy",
                 "retries_left", "retry_exceptions", "attempt", "cancelled", "state", "waiting",
                 "actor_id", "method_name", "parent_task_id", "lease", "link", "seq",
                 "pushed_at", "placed_attempt", "running_attempt", "live_returns", "nslots",
                 "lineage_kept", "pins", "argument_losses", "max_calls", "concurrency_group",
                 "generator", "stream", "oom_retries_left", "oom_kills")

    def __init__(self) -> None:
        self.task_id = b""
        self.function_id = b""
        self.function_blob = b""
        self.name = ""
        self.args = b""
        self.slot_refs: Optional[list] = None
        self.arg_values: List[Any] = []
        self.arg_ids: List[bytes] = []
        self.return_ids: List[bytes] = []
        self.key: Any = None
        self.resources: Dict[str, float] = {}
        self.strategy: Any = None
        self.retries_left = 0
        self.retry_exceptions: Any = False
        self.attempt = 0
        self.cancelled = False
        self.state = PENDING_ARGS_AVAIL
        self.waiting = 0  # argument values still missing (actor calls keep order by it)
        self.actor_id = b""
        self.method_name = ""
        self.parent_task_id = b""
        self.lease: Optional[Lease] = None
        self.link: Optional[WorkerLink] = None  # where it was pushed (kept once it failed there)
        self.seq = 0
        # The attempt whose place, and whose RUNNING, task events reported (task_events.py).
        self.pushed_at = 0.0
        self.placed_attempt = -1
        self.running_attempt = -1
        self.live_returns = 0  # return objects still referenced (lineage)
        self.nslots = 0  # its first nslots arg_ids are its ObjectRef arguments (slots)
        self.lineage_kept = False  # kept as lineage: PinLineage sent, FreeLineage owed
        self.pins: Any = None  # what the shell pinned for it (PinLineage), for FreeLineage
        self.argument_losses = 0
        self.max_calls = 0  # a task: its worker exits after this many runs of the function
        self.concurrency_group = ""  # an actor call: the group named by .options()
        self.generator = 0  # generators.GENERATOR_STREAMING / _DYNAMIC, or 0
        self.stream: Any = None  # a generator's items, as the shell keeps them
        # Runs left after the memory monitor kills it (set at submit: 0 for max_retries=0,
        # else TASK_OOM_RETRIES; -1 without limit), and how often it was killed so far.
        self.oom_retries_left = 0
        self.oom_kills = 0

    @property
    def done(self) -> bool:
        return self.state >= FINISHED


class WorkerLink:
    """One connection to one worker: a leased worker (shared by the leases granted on
    it) or an actor's worker. The shell keeps the real connection beside it."""

    __slots__ = ("worker_id", "address", "control_address", "node_id", "pid", "inflight",
                 "dead", "actor", "call_port", "concurrency", "last_end", "oom")

    def __init__(self, worker_id: bytes, address: str, node_id: bytes = b"", pid: int = 0,
                 control_address: str = "", actor: Optional["ActorQueue"] = None,
                 call_port: bool = False, concurrency: int = 1) -> None:
        self.worker_id = worker_id
        self.address = address            # where tasks go (a sync actor's call port)
        self.control_address = control_address or address  # its gRPC port (CancelTask)
        self.node_id = node_id
        self.pid = pid
        self.inflight: Dict[bytes, PendingTask] = {}  # in push order
        self.dead = False
        self.actor = actor
        self.call_port = call_port
        self.concurrency = concurrency    # in-flight tasks the worker runs at once
        self.last_end = 0.0               # when the worker finished the last task answered
        self.oom = ""  # the memory monitor's notice: its raylet is killing this worker


class Lease:
    __slots__ = ("lease_id", "key", "link", "gpu_ids", "raylet", "inflight", "dead",
                 "idle_since", "timer_armed")

    def __init__(self, lease_id: int, key: "KeyState", link: WorkerLink, gpu_ids: List[int],
                 raylet: str) -> None:
        self.lease_id = lease_id
        self.key = key
        self.link = link
        self.gpu_ids = gpu_ids
        self.raylet = raylet            # the raylet that granted it (another node's after spillback)
        self.inflight = 0
        self.dead = False
        self.idle_since: Optional[float] = None  # None while it has work
        self.timer_armed = False


class KeyState:
    """The tasks of one scheduling key (function, resource shape, strategy): their queue,
    the leases that run them and the lease requests out for them."""

    __slots__ = ("queue", "leases", "requests", "resources", "strategy", "function_id", "name",
                 "warned", "queued_requests", "held", "retry_armed", "retriable")

    def __init__(self, resources: Dict[str, float], strategy: Any, function_id: bytes,
                 name: str) -> None:
        self.queue: Deque[PendingTask] = deque()
        self.leases: List[Lease] = []
        self.requests: set = set()
        self.resources = resources
        self.strategy = strategy
        self.function_id = function_id
        self.name = name
        self.warned = False
        # Requests the raylet said wait for busy resources: while there are any, more
        # workers are not coming soon, so short tasks may be pipelined.
        self.queued_requests: set = set()
        # Lease requests spilled back to a raylet that went away: sent nowhere, they
        # count as outstanding until the retry timer (ArmRetry, retry_held) asks again.
        self.held = 0
        self.retry_armed = False
        # Whether its leases run only work that runs again if the memory monitor kills it
        # (LeaseRequest.retriable): false for good once a task with max_retries=0 (or no
        # OOM retries) was queued here, since any of the key's tasks may run on a lease.
        self.retriable = True


class ActorQueue:
    """This caller's view of one actor: its queue of calls and its link."""

    __slots__ = ("actor_id", "state", "version", "link", "queue", "limbo", "death", "watching",
                 "watch_handshake_error", "endpoint", "handshake_failures", "redial", "pid",
                 "is_async", "next_seq", "recheck_alive")

    def __init__(self, actor_id: bytes) -> None:
        self.actor_id = actor_id
        self.state = ACTOR_PENDING
        self.version = 0
        self.link: Optional[WorkerLink] = None
        self.queue: Deque[PendingTask] = deque()
        self.limbo: List[PendingTask] = []   # in flight when the link broke
        self.death: Optional[Error] = None
        self.watching = False
        self.watch_handshake_error = ""  # the watch is a recheck after call-port failures
        self.endpoint: Any = None  # the common_pb2.Address where it was last seen alive
        self.handshake_failures = 0  # in a row, on the call port; reset by any result
        self.redial = False  # the next call dials `endpoint` again (it is alive there)
        self.pid = 0
        self.is_async = False
        self.next_seq = 0
        # The GCS reported alive the very worker whose link just broke: asked once more
        # (briefly) before calls in limbo are resent to it (see actor_reported).
        self.recheck_alive = False


# -- actions: what the I/O shell carries out ---------------------------------------------------
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


class OwnerState:
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

    # -- normal tasks ---------------------------------------------------------------------------
    def submit(self, task: PendingTask) -> List[Action]:
        """A task from .remote(): resolve its arguments, then queue it under its key."""
        self.tasks[task.task_id] = task
        self.recorder.new_task(task, "NORMAL_TASK", PENDING_ARGS_AVAIL)
        if task.generator:
            self.streams[task.task_id] = task
        if task.retries_left != 0:
            task.oom_retries_left = self.settings.TASK_OOM_RETRIES
        if task.retries_left != 0 and task.return_ids:
            task.live_returns = len(task.return_ids)
            lineage = self.lineage
            for oid in task.return_ids:
                lineage[oid] = task
        out: List[Action] = []
        if task.slot_refs:
            self._resolve(task, out)
        else:
            self._enqueue(task, out)
        return out

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

    def _enqueue(self, task: PendingTask, out: List[Action]) -> None:
        if self.raylet_error is not None:
            self._fail([task], self.raylet_error, out)
            return
        ks = self.keys.get(task.key)
        if ks is None:
            ks = self.keys[task.key] = KeyState(task.resources, task.strategy, task.function_id,
                                                task.name)
        task.state = PENDING_NODE_ASSIGNMENT
        self.recorder.event(task.task_id, PENDING_NODE_ASSIGNMENT)
        if not task.oom_retries_left:
            ks.retriable = False
        ks.queue.append(task)
        self._pump(ks, out)

    def _depth(self, ks: KeyState) -> int:
        """Tasks in flight per leased worker: one, unless the node is saturated (no more
        workers can be leased now) and this function's tasks are known to be short."""
        if not ks.queued_requests:
            return 1
        t = self.fn_time.get(ks.function_id)
        if t is not None and t < self.settings.PIPELINE_MAX_TASK_SECONDS:
            return self.settings.PIPELINE_DEPTH
        return 1

    def _pump(self, ks: KeyState, out: List[Action]) -> None:
        """Push what is queued onto the key's leases, then ask for as many more leases as
        the queue needs (or cancel the requests it no longer needs)."""
        depth = self._depth(ks)
        queue = ks.queue
        while queue:
            best = None
            for lease in ks.leases:
                if lease.inflight < depth and (best is None or lease.inflight < best.inflight):
                    best = lease
            if best is None:
                break
            task = queue.popleft()
            if task.cancelled:
                continue
            best.idle_since = None
            best.inflight += 1
            task.lease = best
            self._push(task, best.link, best, out)
        if queue:
            if self.raylet_up:  # else they wait for the reconnection (raylet_restored)
                for _ in range(min(len(queue), self.max_lease_requests) - len(ks.requests)
                               - ks.held):
                    self._request_lease(ks, LOCAL_RAYLET, out)
            return
        ks.held = 0  # nothing waits for them any more (the retry timer finds nothing to do)
        if ks.requests:
            for rid in ks.requests:
                self.requests.pop(rid, None)
                out.append(CancelLeaseRequest(rid, self.request_raylet.pop(rid, LOCAL_RAYLET)))
            ks.requests.clear()
            ks.queued_requests.clear()
        for lease in ks.leases:
            if lease.inflight == 0:
                if lease.idle_since is None:
                    lease.idle_since = self.clock()
                if not lease.timer_armed:
                    lease.timer_armed = True
                    out.append(ArmIdleTimer(lease, self.settings.LEASE_IDLE_RETURN_S))

    def _request_lease(self, ks: KeyState, raylet: str, out: List[Action]) -> None:
        """Ask the local raylet, or (after a spillback) the raylet it named, which must
        then grant or reject: a request never bounces between nodes."""
        self._next_request += 1
        rid = self._next_request
        ks.requests.add(rid)
        self.requests[rid] = ks
        self.request_raylet[rid] = raylet
        out.append(RequestLease(ks, rid, raylet))

    def _push(self, task: PendingTask, link: WorkerLink, lease: Optional[Lease],
              out: List[Action]) -> None:
        task.link = link
        task.state = SUBMITTED_TO_WORKER
        self.recorder.submitted(task)
        link.inflight[task.task_id] = task
        out.append(Push(task, link, lease))

    # -- lease outcomes (the raylet's LeaseGrant) --------------------------------------------------
    def _answered(self, request_id: int) -> Optional[KeyState]:
        ks = self.requests.pop(request_id, None)
        self.request_raylet.pop(request_id, None)
        if ks is not None:
            ks.requests.discard(request_id)
            ks.queued_requests.discard(request_id)
        return ks

    def lease_queued(self, request_id: int) -> List[Action]:
        """The request waits for busy resources: short tasks may be pipelined meanwhile."""
        out: List[Action] = []
        ks = self.requests.get(request_id)
        if ks is not None:
            ks.queued_requests.add(request_id)
            self._pump(ks, out)
        return out

    def lease_warning(self, request_id: int, message: str) -> List[Action]:
        """The request cannot be granted for now (it stays pending): warn once per key."""
        ks = self.requests.get(request_id)
        if ks is None or ks.warned:
            return []
        ks.warned = True
        return [Warn(message)]

    def lease_rejected(self, request_id: int, message: str, runtime_env_failed: bool = False,
                       group_removed: bool = False) -> List[Action]:
        """No node can ever grant it, its runtime_env could not be set up, or its
        placement group was removed: every task queued under the key fails."""
        out: List[Action] = []
        ks = self._answered(request_id)
        if ks is None:
            return out
        tasks = [t for t in ks.queue if not t.cancelled]
        ks.queue.clear()
        if tasks:
            error = (RuntimeEnvSetupError(message) if runtime_env_failed
                     else TaskPlacementGroupRemoved(message) if group_removed
                     else TaskUnschedulableError(message))
            self._fail(tasks, error, out)
        return out

    def lease_spilled(self, request_id: int, raylet: str) -> List[Action]:
        """Ask `raylet` (another node's) instead."""
        out: List[Action] = []
        ks = self._answered(request_id)
        if ks is None:
            return out
        dead = self.dead_raylets.get(raylet)
        if dead is not None:
            now = self.clock()
            if now < dead[0]:
                # It went away moments ago: ask the local raylet again later (its view
                # of the cluster may drop that node by then) rather than now, in a loop.
                ks.held += 1
                if not ks.retry_armed:
                    ks.retry_armed = True
                    out.append(ArmRetry(ks, min(dead[0] - now, HELD_RETRY_S)))
                return out
            # Time to probe it once more (a node agent may have restarted it there).
            dead[0] = now + _backoff(int(dead[1]))
        log.debug("lease request for %s spilled back to %s", ks.name, raylet)
        self._request_lease(ks, raylet, out)
        return out

    def retry_held(self, ks: KeyState) -> List[Action]:
        """The retry timer of `ks` fired: ask the local raylet again for the requests that
        were spilled back to a raylet that went away."""
        out: List[Action] = []
        ks.retry_armed = False
        ks.held = 0
        if ks.queue:
            self._pump(ks, out)
        return out

    def raylet_is_dead(self, raylet: str) -> bool:
        """Whether the remote raylet at `raylet` went away and has granted nothing since."""
        return raylet in self.dead_raylets

    def lease_granted(self, raylet: str, request_id: int, lease_id: int, worker_id: bytes,
                      address: str, node_id: bytes = b"", pid: int = 0,
                      gpu_ids: Sequence[int] = ()) -> List[Action]:
        """`raylet` granted the worker at `address`; tasks queued under the key go there."""
        out: List[Action] = []
        if raylet != LOCAL_RAYLET:
            self.dead_raylets.pop(raylet, None)  # it answers again
        ks = self._answered(request_id)
        if ks is None:  # cancelled meanwhile (or forgotten with its raylet): give it back
            out.append(ReturnLease(raylet, lease_id))
            return out
        if worker_id in self.dead_workers:
            # Its raylet has not noticed yet: never send a task there.
            out.append(ReturnLease(raylet, lease_id, kill_worker=True))
            self._pump(ks, out)
            return out
        link = self.links.get(worker_id)
        if link is None or link.dead:
            link = self.links[worker_id] = WorkerLink(worker_id, address, node_id, pid)
            out.append(Connect(link))
        ks.leases.append(Lease(lease_id, ks, link, list(gpu_ids), raylet))
        self._pump(ks, out)
        return out

    def lease_idle(self, lease: Lease) -> List[Action]:
        """The idle timer of `lease` fired: return it if it has been idle for LEASE_IDLE_RETURN_S
        (work that came meanwhile kept it; the timer is armed again when it is idle)."""
        lease.timer_armed = False
        ks = lease.key
        if lease.dead or lease.inflight or ks.queue or lease.idle_since is None:
            return []
        left = self.settings.LEASE_IDLE_RETURN_S - (self.clock() - lease.idle_since)
        if left > 1e-3:
            lease.timer_armed = True
            return [ArmIdleTimer(lease, left)]
        lease.dead = True
        ks.leases.remove(lease)
        return [ReturnLease(lease.raylet, lease.lease_id)]

    # -- results and lost workers ---------------------------------------------------------------
    def task_result(self, link: WorkerLink, result: Any) -> List[Action]:
        """A TaskResult came back on `link`."""
        if result.stream_item:
            return self.stream_item(result)
        out: List[Action] = []
        task = link.inflight.pop(result.task_id, None)
        if task is None:
            return out
        a = link.actor
        if a is not None:  # an actor call's error is final (as before: no retry_exceptions)
            a.handshake_failures = 0
            if self.recorder.enabled:
                self.recorder.result(task, link, result, self.node_id)
            self._finish(task, Finish(task, result), FAILED if result.app_error else FINISHED,
                         out)
            return out
        lease = task.lease
        if lease is not None:
            lease.inflight -= 1
        if result.worker_exiting:
            self._worker_exiting(link, out)
        if self.recorder.enabled:
            self.recorder.result(task, link, result, self.node_id)
        fid = task.function_id
        prev = self.fn_time.get(fid)
        self.fn_time[fid] = (result.exec_seconds if prev is None
                             else 0.8 * prev + 0.2 * result.exec_seconds)
        if not result.app_error:
            self._finish(task, Finish(task, result), FINISHED, out)
        elif result.cancelled:
            self._finish(task, Finish(task, result), FAILED, out)
        else:
            lost = self._lost_argument(task, result) if task.nslots else None
            if lost is not None:
                self._argument_lost(task, lost[0], lost[1], out)
            elif self._retry_app_error(task, result):
                if task.retries_left > 0:
                    task.retries_left -= 1
                task.attempt += 1
                log.info("retrying task %s after an application error (attempt %s)", task.name,
                         task.attempt)
                self._requeue(task, out)
            else:
                self._finish(task, Finish(task, result), FAILED, out)
        if lease is not None and not lease.dead:
            self._pump(lease.key, out)
        return out

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

    def _worker_exiting(self, link: WorkerLink, out: List[Action]) -> None:
        """The worker ran its function's max_calls and exits: its leases go back marked so
        (the raylet drops it from the pool: no crash), and the tasks sent to it after the
        last one, which it will not run, go back to their queues, retries untouched."""
        link.dead = True
        if self.links.get(link.worker_id) is link:
            del self.links[link.worker_id]
        touched: List[KeyState] = []
        for ks in self.keys.values():
            for lease in [lease for lease in ks.leases if lease.link is link]:
                lease.dead = True
                ks.leases.remove(lease)
                touched.append(ks)
                out.append(ReturnLease(lease.raylet, lease.lease_id, worker_exiting=True))
        left = list(link.inflight.values())
        link.inflight.clear()
        for task in left:
            if task.lease is not None:
                task.lease.inflight -= 1
            if task.cancelled:
                self._fail([task], TaskCancelledError(task.task_id.hex()), out)
            else:
                self._requeue(task, out)
        for ks in {id(k): k for k in touched}.values():
            self._pump(ks, out)

    def _argument_lost(self, task: PendingTask, i: int, location: Any,
                       out: List[Action]) -> None:
        """Its worker could not fetch argument `i` from `location`: recover the argument
        (ArgumentLost), then resolve the arguments again. Not a retry: the task did not
        run."""
        oid = task.arg_ids[i]
        task.argument_losses += 1
        task.attempt += 1
        task.link = None
        task.lease = None
        log.warning("the worker running %s could not fetch its argument %s (%s); recovering "
                    "it, then running the task again (attempt %s)", task.name, oid.hex(),
                    _where(location), task.attempt)
        self.recorder.requeued_task(task)
        out.append(ArgumentLost(task, oid, location))
        task.slot_refs = list(task.arg_ids[:task.nslots])
        self._resolve(task, out)

    def _lost_argument(self, task: PendingTask, result: Any) -> Optional[Tuple[int, Any]]:
        """(slot index, location) when the task failed only because its worker could not
        fetch that argument from the store that held it (a plain ObjectLostError about
        it: its owner may still rebuild it), else None."""
        if task.argument_losses >= ARGUMENT_LOSSES_MAX or not result.returns:
            return None
        try:
            err = self.parse_error(result.returns[0].inline_data)
        except Exception:
            return None
        cause = getattr(err, "cause", None) or err
        if type(cause) not in (ObjectLostError, ObjectFetchTimedOutError):
            return None
        for i, loc in enumerate(task.arg_values):
            if loc is not None and loc.in_store and loc.object_id.hex() == cause.object_ref_hex:
                return i, loc
        return None

    def _retry_app_error(self, task: PendingTask, result: Any) -> bool:
        """retry_exceptions: True retries any exception, a list only those classes."""
        if not task.retry_exceptions or task.retries_left == 0:
            return False
        if task.retry_exceptions is True:
            return True
        try:
            err = self.parse_error(result.returns[0].inline_data)
        except Exception:
            return False
        cause = getattr(err, "cause", err)
        return isinstance(cause, tuple(task.retry_exceptions))

    def _requeue(self, task: PendingTask, out: List[Action], record: bool = True) -> None:
        """Back in front of its key's queue for another attempt (`record`: tell the task
        events it is pending again, unless that was said when its wait began)."""
        task.link = None
        task.lease = None
        if record:
            self.recorder.requeued_task(task)
        if self.raylet_error is not None:
            self._fail([task], self.raylet_error, out)
            return
        ks = self.keys.get(task.key)
        if ks is None:
            self._enqueue(task, out)
            return
        task.state = PENDING_NODE_ASSIGNMENT
        ks.queue.appendleft(task)
        self._pump(ks, out)

    def worker_lost(self, link: WorkerLink, error: str,
                    handshake_error: Optional[str] = None) -> List[Action]:
        """The connection of `link` broke (the worker died or is unreachable).
        `handshake_error`: a call port failed before it accepted this caller, so none of
        the calls sent on it ran."""
        out: List[Action] = []
        if link.dead and not link.inflight:
            return out
        link.dead = True
        if link.actor is not None:
            self._actor_link_lost(link, error, handshake_error, out)
            return out
        if self.links.get(link.worker_id) is link:
            del self.links[link.worker_id]
        self.dead_workers[link.worker_id] = None
        if len(self.dead_workers) > DEAD_WORKERS_KEPT:
            self.dead_workers.popitem(last=False)
        touched: List[KeyState] = []
        for ks in self.keys.values():
            for lease in [lease for lease in ks.leases if lease.link is link]:
                lease.dead = True
                ks.leases.remove(lease)
                touched.append(ks)
                # The worker is gone (or unreachable): make sure the raylet never grants
                # it again, even before it notices the process exit itself.
                out.append(ReturnLease(lease.raylet, lease.lease_id, kill_worker=True))
        tasks = list(link.inflight.values())
        link.inflight.clear()
        died: List[PendingTask] = []
        for task in tasks:
            if task.lease is not None:
                task.lease.inflight -= 1
            if task.cancelled:
                self._fail([task], TaskCancelledError(task.task_id.hex()), out)
            elif link.oom:
                self._killed_for_memory(task, link, out)
            elif task.retries_left != 0:
                if task.retries_left > 0:
                    task.retries_left -= 1
                task.attempt += 1
                log.warning("worker %s running %s died (%s); retrying (attempt %s)",
                            link.address, task.name, error, task.attempt)
                self._requeue(task, out)
            else:
                died.append(task)
        if died:
            out.append(WorkerDied(died, error))
        for ks in {id(k): k for k in touched}.values():
            self._pump(ks, out)
        return out

    # -- the memory monitor ------------------------------------------------------------------------
    def worker_killed(self, worker_id: bytes, message: str) -> List[Action]:
        """A raylet's memory monitor is killing this worker (`message`: why, with the
        figures). Its link is marked: when it breaks, its tasks follow the OOM retry
        policy. A notice for a link already lost changes nothing (module docstring)."""
        link = self.links.get(worker_id)
        if link is None or link.dead:
            log.info("the memory monitor killed worker %s, whose loss was already handled as "
                     "an ordinary worker death", worker_id.hex()[:8])
            return []
        link.oom = message or "Task was killed due to the node running low on memory."
        return []

    def _killed_for_memory(self, task: PendingTask, link: WorkerLink, out: List[Action]) -> None:
        """Ray's OOM retry policy: max_retries=0 fails at once, others run again after a
        backoff, not using max_retries, while TASK_OOM_RETRIES allows."""
        message = link.oom
        task.oom_kills += 1
        if task.oom_retries_left == 0:
            if task.oom_kills > 1 or task.retries_left != 0:
                message += (f"\n\nThe task was killed for memory {task.oom_kills} times and "
                            f"has no OOM retries left (RAY_task_oom_retries / "
                            f"RUNTIME_TASK_OOM_RETRIES={self.settings.TASK_OOM_RETRIES}).")
            self._fail([task], OutOfMemoryError(message), out)
            return
        if task.oom_retries_left > 0:
            task.oom_retries_left -= 1
        first, most = OOM_RETRY_DELAY_S
        delay = min(most, first * 2 ** (task.oom_kills - 1))
        task.attempt += 1
        task.link = None
        task.lease = None
        task.state = PENDING_NODE_ASSIGNMENT
        self.recorder.requeued_task(task)
        left = ("infinite" if task.oom_retries_left < 0 else str(task.oom_retries_left))
        figures = message.split("\n", 2)[1] if "\n" in message else message
        out.append(Warn(
            f"Task {task.name} failed due to oom: the memory monitor of node "
            f"{link.node_id.hex()[:8]} killed its worker (pid {link.pid}). It runs again in "
            f"{delay:g}s (attempt {task.attempt}), without using its max_retries; there are "
            f"{left} oom retries remaining. {figures}"))
        out.append(RetryLater(task, delay))

    def retry_due(self, task: PendingTask) -> List[Action]:
        """The backoff of a task the memory monitor killed is over: queue it again, unless
        it was cancelled (and failed) meanwhile."""
        out: List[Action] = []
        if task.done or task.link is not None or task.cancelled:
            return out
        self._requeue(task, out, record=False)
        return out

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
            self.lineage_bytes += _lineage_size(task)
            if self.lineage_bytes > self.lineage_max_bytes:
                self._evict_lineage(out)
            return
        if task.live_returns > 0:  # an error is not worth running again
            self._unindex(task)
        if task.lineage_kept:  # a run to rebuild its objects failed, or they went meanwhile
            task.lineage_kept = False
            out.append(FreeLineage(task))

    # -- lineage --------------------------------------------------------------------------------
    def references_released(self, oids: Iterable[bytes]) -> List[Action]:
        """Owned objects lost their last reference: lineage whose objects are all
        released goes (FreeLineage)."""
        out: List[Action] = []
        lineage = self.lineage
        evicted = self.lineage_evicted
        for oid in oids:
            task = lineage.pop(oid, None)
            if task is None:
                if evicted:
                    evicted.pop(oid, None)
                continue
            task.live_returns -= 1
            if task.live_returns == 0 and self.lineage_done.pop(task.task_id, None) is not None:
                self.lineage_bytes -= _lineage_size(task)
                task.lineage_kept = False
                out.append(FreeLineage(task))
        return out

    def _unindex(self, task: PendingTask) -> None:
        for oid in task.return_ids:
            self.lineage.pop(oid, None)
        task.live_returns = 0

    def _evict_lineage(self, out: List[Action]) -> None:
        """Beyond lineage_max_bytes the oldest lineage goes first (as Ray's
        max_lineage_bytes): its objects can no longer be rebuilt."""
        evicted = self.lineage_evicted
        while self.lineage_bytes > self.lineage_max_bytes and self.lineage_done:
            _tid, task = self.lineage_done.popitem(last=False)
            self.lineage_bytes -= _lineage_size(task)
            for oid in task.return_ids:
                if self.lineage.get(oid) is task:
                    evicted[oid] = None
            while len(evicted) > EVICTED_KEPT:
                evicted.popitem(last=False)
            self._unindex(task)
            task.lineage_kept = False
            out.append(FreeLineage(task))

    # -- lost objects ---------------------------------------------------------------------------
    def object_lost(self, oid: bytes, where: str) -> List[Action]:
        """The value of `oid`, which this process owns, is gone: `where` says what became
        of it (e.g. "its only copy was in the object store of node 1a2b3c4d
        (127.0.0.3:6382), which is unreachable"). The shell has dropped the lost
        location. Re-run the task that made it, unless it runs already (once is enough
        for all its objects), or fail the object with the reason it cannot be rebuilt."""
        out: List[Action] = []
        task = self.lineage.get(oid)
        if task is not None:
            if not task.done:
                return out  # being made (again) already
            if task.retries_left != 0:
                self._rebuild(task, oid, where, out)
                return out
            reason = MAX_ATTEMPTS_EXCEEDED
        elif oid in self.lineage_evicted:
            reason = LINEAGE_EVICTED
        elif oid.endswith(_PUT_INDEX):
            reason = PUT
        else:
            reason = RETRIES_DISABLED
        cls = {MAX_ATTEMPTS_EXCEEDED: ObjectReconstructionFailedMaxAttemptsExceededError,
               LINEAGE_EVICTED: ObjectReconstructionFailedLineageEvictedError
               }.get(reason, ObjectReconstructionFailedError)
        message = ObjectReconstructionFailedError.REASONS[reason]
        log.warning("object %s was lost (%s) and cannot be rebuilt (%s)", oid.hex(), where,
                    reason)
        out.append(FailObjects([oid], cls(oid.hex(), (
            f"Failed to retrieve object {oid.hex()}: it was lost ({where}) and cannot be "
            f"rebuilt.\n\n[{reason}] {message}"), reason=reason, reason_message=message)))
        return out

    def _rebuild(self, task: PendingTask, oid: bytes, where: str, out: List[Action]) -> None:
        """Run a finished task of the lineage again, as a new attempt: its arguments are
        held and resolved again (those lost too are rebuilt first, by the same path)."""
        if self.lineage_done.pop(task.task_id, None) is not None:
            self.lineage_bytes -= _lineage_size(task)
        if task.retries_left > 0:
            task.retries_left -= 1
        task.attempt += 1
        task.cancelled = False
        task.link = None
        task.lease = None
        task.argument_losses = 0
        self.tasks[task.task_id] = task
        log.warning("object %s was lost (%s); running %s again to rebuild it (attempt %s, "
                    "%s retries left)", oid.hex(), where, task.name, task.attempt,
                    "unlimited" if task.retries_left < 0 else task.retries_left)
        self.recorder.requeued_task(task)
        out.append(Resubmit(task))
        if task.nslots:
            task.slot_refs = list(task.arg_ids[:task.nslots])
            self._resolve(task, out)
        else:
            task.state = PENDING_ARGS_AVAIL
            self._enqueue(task, out)

    # -- raylets ----------------------------------------------------------------------------------
    def raylet_lost(self, raylet: str) -> List[Action]:
        """Drop the requests pending at `raylet` and the leases it granted, so nothing
        waits for an answer that will never come and no task goes to its dying workers;
        then ask again (the queues stay as they are)."""
        out: List[Action] = []
        if raylet == LOCAL_RAYLET:
            self.raylet_up = False
        else:
            dead = self.dead_raylets.get(raylet)
            failures = 1 if dead is None else int(dead[1]) + 1
            self.dead_raylets[raylet] = [self.clock() + _backoff(failures), failures]
        touched: List[KeyState] = []
        for rid in [rid for rid, r in self.request_raylet.items() if r == raylet]:
            ks = self._answered(rid)
            if ks is not None:
                touched.append(ks)
        for ks in self.keys.values():
            for lease in [lease for lease in ks.leases if lease.raylet == raylet]:
                lease.dead = True
                ks.leases.remove(lease)
                touched.append(ks)
        for ks in {id(k): k for k in touched}.values():
            self._pump(ks, out)
        return out

    def raylet_restored(self) -> List[Action]:
        """The local raylet is back (a new node at the same address): ask it for leases."""
        out: List[Action] = []
        self.raylet_up = True
        for ks in list(self.keys.values()):
            if ks.queue:
                self._pump(ks, out)
        return out

    def raylet_gone(self, error: BaseException) -> List[Action]:
        """The local raylet is not coming back: every task still waiting for a worker fails
        (tasks running on other nodes' workers finish as usual), and so do later ones."""
        out: List[Action] = []
        self.raylet_error = error
        for ks in self.keys.values():
            tasks = [t for t in ks.queue if not t.cancelled]
            ks.queue.clear()
            if tasks:
                self._fail(tasks, error, out)
        return out

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

    # -- actor calls -------------------------------------------------------------------------------
    def actor(self, actor_id: bytes) -> ActorQueue:
        a = self.actors.get(actor_id)
        if a is None:
            a = self.actors[actor_id] = ActorQueue(actor_id)
            if self.actors_gone is not None:
                a.death = self.actors_gone
                a.state = ACTOR_DEAD
        return a

    def submit_call(self, task: PendingTask) -> List[Action]:
        """A call from a handle: queue it for its actor, in submission order."""
        out: List[Action] = []
        a = self.actor(task.actor_id)
        self.tasks[task.task_id] = task
        self.recorder.new_task(task, "ACTOR_TASK", PENDING_ARGS_AVAIL)
        if task.generator:
            self.streams[task.task_id] = task
        if a.death is not None:
            self._fail([task], a.death, out)
            return out
        a.next_seq += 1
        task.seq = a.next_seq
        a.queue.append(task)
        task.state = PENDING_NODE_ASSIGNMENT
        if task.slot_refs:
            self._resolve(task, out)
        self._pump_actor(a, out)
        return out

    def _pump_actor(self, a: ActorQueue, out: List[Action]) -> None:
        link = a.link
        if link is None or link.dead:
            if not (a.redial and a.queue and a.endpoint is not None):
                self._watch(a, "", out)
                return
            a.redial = False
            link = self._connect(a, a.endpoint, out)
        queue = a.queue
        while queue:
            task = queue[0]
            if task.cancelled:
                queue.popleft()
                continue
            if task.waiting:
                break  # keep submission order: later calls wait for this one's arguments
            queue.popleft()
            for loc in task.arg_values:
                if loc.is_error:
                    self._fail([task], Value.from_proto(loc), out)
                    break
            else:
                self._push(task, link, None, out)

    def _watch(self, a: ActorQueue, handshake_error: str, out: List[Action]) -> None:
        if not a.watching and a.death is None:
            a.watching = True
            a.recheck_alive = False
            a.watch_handshake_error = handshake_error
            out.append(WatchActor(a))

    def _connect(self, a: ActorQueue, address: Any, out: List[Action]) -> WorkerLink:
        """A link to the actor's worker: its call port when it has one."""
        a.endpoint = address
        grpc_address = f"{address.ip}:{address.port}"
        if address.task_port:
            link = WorkerLink(address.worker_id, f"{address.ip}:{address.task_port}",
                              address.node_id, a.pid, control_address=grpc_address, actor=a,
                              call_port=True)
        else:
            # An async actor runs up to max_concurrency calls at once (Ray's default 1000):
            # the caller does not know the actor's own limit, so it takes the default.
            link = WorkerLink(address.worker_id, grpc_address, address.node_id, a.pid, actor=a,
                              concurrency=ASYNC_ACTOR_CONCURRENCY if a.is_async else 1)
        a.link = link
        out.append(Connect(link))
        return link

    def _actor_link_lost(self, link: WorkerLink, error: str, handshake_error: Optional[str],
                         out: List[Action]) -> None:
        a = link.actor
        assert a is not None
        sent = list(link.inflight.values())
        link.inflight.clear()
        if a.link is not link:  # closed by this owner already (killed): nothing was left on it
            if sent:
                a.limbo.extend(sent)
            return
        a.link = None
        if handshake_error is None:
            a.limbo.extend(sent)
            self._watch(a, "", out)
            return
        # The port never accepted the connection: none of these calls ran. They go back
        # in front of the queue, in order, their retries untouched.
        for task in sent:
            task.link = None  # queued again: cancel() fails it at once
            task.state = PENDING_NODE_ASSIGNMENT
        a.queue.extendleft(reversed(sent))
        a.handshake_failures += 1
        if a.handshake_failures < HANDSHAKE_ATTEMPTS:
            log.info("the call port of actor %s failed before accepting this caller (%s); "
                     "dialling it again", a.actor_id.hex()[:8], handshake_error)
            a.redial = True
            self._pump_actor(a, out)
        else:
            self._watch(a, handshake_error, out)

    def actor_reported(self, actor_id: bytes, version: int, state: int, address: Any = None,
                       pid: int = 0, is_async: bool = False,
                       death: Optional[Error] = None) -> List[Action]:
        """The GCS reported the actor (a watch's answer). ALIVE: connect and send what
        waits, limbo first (ALIVE at the address whose link broke is asked again once,
        ``recheck_alive``); DEAD: fail everything with `death`; otherwise keep watching.
        A watch after call-port failures that brings no news (the same version: alive
        where it was) fails what is queued with ActorUnavailableError."""
        out: List[Action] = []
        a = self.actor(actor_id)
        if a.death is not None or not a.watching:
            return out
        if a.watch_handshake_error:
            if version == a.version:  # no news: alive where it was
                self._unreachable(a, a.watch_handshake_error, out)
                return out
            a.watch_handshake_error = ""  # it moved, restarts or died: an ordinary watch
            a.handshake_failures = 0
        a.version = version
        a.state = state
        if state == ACTOR_DEAD:
            self._dead(a, death if death is not None else RayActorError(
                f"The actor {actor_id.hex()} is dead.", actor_id=actor_id.hex()), out)
        elif state == ACTOR_ALIVE:
            if (a.limbo and not a.recheck_alive and a.endpoint is not None
                    and address is not None and address.worker_id == a.endpoint.worker_id):
                # The link to this very worker broke, yet the GCS still has it alive: its
                # own stream to the worker (which breaks at about the same moment when the
                # worker dies) has not told it yet. Ask once more, briefly, rather than
                # resend the calls to a dead worker and fail those without retries as if
                # it had restarted; no news then means the worker lives.
                a.recheck_alive = True
                return out
            a.recheck_alive = False
            a.watching = False
            a.pid = pid
            a.is_async = is_async
            self._connect(a, address, out)
            self._resend_limbo(a, out)
            self._pump_actor(a, out)
        return out

    def actor_dead(self, actor_id: bytes, error: Error) -> List[Action]:
        """The actor is dead (the GCS says so, or it cannot be asked): every call queued,
        in limbo or in flight fails with `error`, and so will later ones."""
        out: List[Action] = []
        a = self.actor(actor_id)
        if a.death is None:
            self._dead(a, error, out)
        return out

    def actor_killed(self, actor_id: bytes, error: Error) -> List[Action]:
        """kill() returned: current, pending and future calls fail at once (the worker may
        take a moment to die, and must not run calls meanwhile)."""
        out: List[Action] = []
        a = self.actor(actor_id)
        if a.death is None:
            self._dead(a, error, out)
        return out

    def cluster_gone(self, error: Error) -> List[Action]:
        """The private cluster lost its raylet, and with it every actor's worker: fail the
        calls in flight and pending, now and from now on."""
        out: List[Action] = []
        self.actors_gone = error
        for a in self.actors.values():
            self._dead(a, error, out)
        return out

    def watch_stopped(self, actor_id: bytes) -> None:
        """The shell's watch ended without a verdict (shutdown)."""
        a = self.actors.get(actor_id)
        if a is not None:
            a.watching = False

    def _drop_link(self, a: ActorQueue, out: List[Action]) -> None:
        link = a.link
        if link is not None:
            a.limbo.extend(link.inflight.values())
            link.inflight.clear()
            link.dead = True
            a.link = None
            out.append(CloseLink(link))

    def _dead(self, a: ActorQueue, error: Error, out: List[Action]) -> None:
        self._drop_link(a, out)
        a.death = error
        a.state = ACTOR_DEAD
        a.watching = False
        pending = sorted(a.limbo, key=_seq) + list(a.queue)
        a.limbo, a.queue = [], deque()
        if pending:
            self._fail(pending, error, out)

    def _unreachable(self, a: ActorQueue, error: str, out: List[Action]) -> None:
        """The actor is alive (the GCS says so) but its call port would not take this
        caller's connection, HANDSHAKE_ATTEMPTS times in a row: fail what is queued (none
        of it ran) and let the next call dial again."""
        a.watching = False
        a.watch_handshake_error = ""
        a.handshake_failures = 0
        a.redial = True
        pending, a.queue = list(a.queue), deque()
        if not pending:
            return
        err = ActorUnavailableError(
            f"The actor {a.actor_id.hex()} ({pending[0].name.split('.', 1)[0]}) is alive but "
            f"cannot be reached: {HANDSHAKE_ATTEMPTS} connections to its call port in a row "
            f"failed before it accepted them, so the call did not run (last error: {error}). "
            f"Later calls try again.", actor_id=a.actor_id.hex())
        self._fail(pending, err, out)

    def _resend_limbo(self, a: ActorQueue, out: List[Action]) -> None:
        """The actor is alive again: calls that were in flight when its worker died go
        first, while they have retries; cancelled ones and those without retries fail."""
        limbo = sorted(a.limbo, key=_seq)
        a.limbo = []
        failed: List[PendingTask] = []
        cancelled: List[PendingTask] = []
        for task in reversed(limbo):
            if task.cancelled:
                cancelled.append(task)
            elif task.retries_left != 0:
                if task.retries_left > 0:
                    task.retries_left -= 1
                task.attempt += 1
                task.link = None
                task.state = PENDING_NODE_ASSIGNMENT
                a.queue.appendleft(task)
            else:
                failed.append(task)
        for task in reversed(cancelled):
            self._fail([task], TaskCancelledError(task.task_id.hex()), out)
        for task in reversed(failed):
            self._fail([task], RayActorError(
                f"The actor {a.actor_id.hex()} died unexpectedly before finishing this call "
                f"({task.name}); it was restarted, but the call has no retries left "
                f"(max_task_retries).", actor_id=a.actor_id.hex()), out)

    # -- introspection ---------------------------------------------------------------------------
    def flights(self) -> List[WorkerLink]:
        """Every live link with tasks in flight (task events sample where they run)."""
        out = [link for link in self.links.values() if link.inflight and not link.dead]
        for a in self.actors.values():
            link = a.link
            if link is not None and link.inflight and not link.dead:
                out.append(link)
        return out


def _seq(task: PendingTask) -> int:
    return task.seq


def _backoff(failures: int) -> float:
    first, most = DEAD_RAYLET_BACKOFF_S
    return min(most, first * (2 ** max(0, failures - 1)))


def _where(location: Any) -> str:
    """Where an ObjectLocation says the value is, for messages."""
    if location is None or not location.in_store:
        return "inline"
    return f"the object store of node {location.node_id.hex()[:8]} ({location.store_address})"


def _lineage_size(task: PendingTask) -> int:
    """What a lineage entry costs, roughly: its arguments and the record itself."""
    return len(task.args) + 256
