"""The records of the owner's state machine (owner_state.py): a task or an actor call
(PendingTask), one connection to a worker (WorkerLink), a lease (Lease), the tasks of one
scheduling key (KeyState) and this caller's view of one actor (ActorQueue).

They are data without behaviour of their own: only OwnerState's transitions change them,
and the I/O shell reads them (keeping its sockets and timers beside them). They live
apart from the transitions because every part of the machine (owner_tasks.py,
owner_actors.py, owner_lineage.py, owner_oom.py) and every action (owner_actions.py)
shares them. The states are common.proto's enums, the vocabulary the task events and
the state API use too (see owner_state.py for what each task state means here).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional, Union

from runtime.core_worker.memory_store import Value
from runtime.protocol import common_pb2
from runtime.vocabulary import (FAILED, FINISHED, PENDING_ARGS_AVAIL,  # noqa: F401 (shared)
                                PENDING_NODE_ASSIGNMENT, RUNNING, SUBMITTED_TO_WORKER)

# The actor states (common.proto's ActorState), as the GCS reports them.
ACTOR_PENDING = common_pb2.PENDING_CREATION
ACTOR_ALIVE = common_pb2.ALIVE
ACTOR_RESTARTING = common_pb2.RESTARTING
ACTOR_DEAD = common_pb2.DEAD

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
