"""Task submission's I/O shell: from .remote() to a result in the owner's memory store.

What happens to a task or an actor call is decided by the owner's state machine
(runtime/core_worker/owner_state.py); this module feeds it what the world says (lease
grants on the raylets' Connect streams, results and broken streams from workers, the
GCS's answers about actors, argument values, timers) and carries out the actions it
returns, in order: lease requests and returns on the raylet streams, tasks pushed to
workers on long-lived PushTasks streams (several per message) or a sync actor's call
port, values stored in the memory store, CancelTask calls, actor watches.

Tasks are grouped by scheduling key (function, resource shape, strategy), as Ray does.
Pipelining: a function whose tasks are known to be short (mean run time under
config.PIPELINE_MAX_TASK_SECONDS) may have up to config.PIPELINE_DEPTH tasks in flight
per leased worker while the node is saturated; others get one at a time, so a long
task never holds short ones hostage behind it. An idle lease is returned after
config.LEASE_IDLE_RETURN_S, so back-to-back tasks do not pay a lease round trip each.

Runs on the core worker's event loop; ``new_task`` and ``return_refs`` run in the
submitting thread.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Set

import grpc

from runtime import config, frames, ids
from runtime.core_worker import task_context
from runtime.core_worker.call_connection import CallConnection
from runtime.core_worker.memory_store import Value
from runtime.core_worker.gcs_client import GcsClient
from runtime.core_worker.generators import (GENERATOR_DYNAMIC, DynamicObjectRefGenerator,
                                             item_id)
from runtime.core_worker.owner_actions import (ArgumentLost, ArmIdleTimer, ArmRetry,
                                               CancelLeaseRequest, CancelRemote, CloseLink,
                                               Connect, Fail, FailObjects, Finish, FreeLineage,
                                               PinLineage, Push, RequestLease, ResolveArgs,
                                               Resubmit, RetryLater, ReturnLease, StreamItem,
                                               Warn, WatchActor, WorkerDied)
from runtime.core_worker.owner_records import ActorQueue, KeyState, Lease, PendingTask, WorkerLink
from runtime.core_worker.owner_state import OwnerState, Recorder
from runtime.core_worker.owner_tasks import LOCAL_RAYLET
from runtime.core_worker.raylet_client import RayletClient
from runtime.core_worker.worker_connection import Connection, WorkerConnection
from runtime.exceptions import (ActorDiedError, ActorPlacementGroupRemoved, NodeDiedError, ObjectLostError, RayError,
                                RayTaskError, WorkerCrashedError)
from runtime.object_ref import ObjectRef
from runtime.protocol import common_pb2, core_worker_pb2, core_worker_pb2_grpc, gcs_pb2, raylet_pb2
from runtime.serialization import parse, serialize, serialize_error
from runtime.vocabulary import ACTOR_DEAD, STRATEGY_PLACEMENT_GROUP

log = logging.getLogger("runtime.core_worker")
# How a private cluster's driver waits, when a worker died under a task with no retries
# left, for the raylet's death to show (it reaps the raylet a moment after the worker's
# stream breaks) before calling it the worker's crash.
RAYLET_DEATH_GRACE_S = 0.25
# After call-port failures, how long the caller waits for the GCS to report the actor
# moved or dead before failing what is queued with ActorUnavailableError.
HANDSHAKE_RECHECK_S = 2.0

__all__ = ["PendingTask", "TaskSubmitter", "new_task", "return_refs", "actor_died_error"]


class OwnerHost(Protocol):
    """What the shell needs of its core worker (CoreWorker implements it)."""

    job_id: bytes
    job_config: common_pb2.JobConfig
    address: tuple
    address_proto: common_pb2.Address
    token: str
    session_dir: str
    gcs_address: str
    gcs_client: GcsClient                      # GCS calls that wait out a GCS restart
    raylet: RayletClient                       # the local raylet's stream, current one
    raylet_exit: Optional[Callable[[], Optional[str]]]

    def channel(self, address: str) -> grpc.aio.Channel: ...
    def gcs_stub(self) -> Any: ...
    def registration(self) -> raylet_pb2.RegisterClient: ...
    def wait_for_value(self, ref: ObjectRef, cb: Callable[[bytes, Value], None]) -> None: ...
    def store_returns(self, task: PendingTask, values: List[Value]) -> None: ...
    def add_contained(self, locations: Any) -> None: ...
    def raylet_death(self) -> Optional[BaseException]: ...
    async def wait_raylet_exit(self, timeout: float) -> None: ...
    # lineage (see owner_lineage.py): pins, re-runs, objects that are lost
    def pin_lineage(self, task: PendingTask) -> None: ...
    def unpin_lineage(self, task: PendingTask) -> None: ...
    def hold_args(self, task: PendingTask) -> None: ...
    def slot_ref(self, oid: bytes) -> Optional[Any]: ...
    def fail_objects(self, oids: List[bytes], value: Value) -> None: ...
    def location_lost(self, oid: bytes, store_address: str, why: str) -> None: ...


def new_task(name: str, args: bytes, slots, held: List[bytes], num_returns: int,
             retries_left: int, retry_exceptions) -> PendingTask:
    """A PendingTask with what tasks and actor calls share; callers add the rest.

    Runs in the submitting thread, the only place that knows which task submits this
    one: the I/O loop, where the task is sent, runs in no task of its own."""
    task = PendingTask()
    task.task_id = tid = ids.new_task_id()
    task.parent_task_id = task_context.current.get().task_id or b""
    task.name = name
    task.args = args
    task.slot_refs = slots or None
    task.arg_ids = held
    task.return_ids = [ids.object_id_for_return(tid, i + 1) for i in range(num_returns)]
    task.retries_left = retries_left
    task.retry_exceptions = retry_exceptions or False
    return task


def return_refs(owner, task: PendingTask):
    """What .remote() returns: one ref, None (num_returns=0) or a list."""
    refs = [ObjectRef(oid, owner.address, owner) for oid in task.return_ids]
    if len(refs) == 1:
        return refs[0]
    return refs or None


def actor_died_error(actor_id: bytes, cause: str, error: bytes = b"") -> RayError:
    """ActorDiedError for an actor the GCS reports dead: the cause, and the constructor's
    error (with its remote traceback) when that is what killed it; the GCS's own error
    when it names the death (ActorPlacementGroupRemoved, as Ray raises it)."""
    original = None
    detail = ""
    if error:
        try:
            _k, raised = parse(error)
        except Exception:
            raised = None
        if isinstance(raised, ActorPlacementGroupRemoved):
            return raised
        if raised is not None:
            original = getattr(raised, "cause", None) or raised
            detail = str(raised) if isinstance(raised, RayTaskError) else (
                f"{type(original).__name__}: {original}")
    msg = f"The actor {actor_id.hex()} is dead: {cause}"
    if detail:
        msg += f":\n{detail}"
    return ActorDiedError(msg, actor_id=actor_id.hex(), cause=original)


def _error_value(error) -> Value:
    if isinstance(error, Value):
        return error
    return Value(serialize_error(error).to_bytes(), is_error=True)


class TaskSubmitter:
    """Feeds the owner's state machine and carries out its actions (loop thread)."""

    def __init__(self, host: OwnerHost, recorder: Optional[Recorder] = None) -> None:
        self.host = host
        self.state = OwnerState(recorder=recorder, settings=config)
        self.conns: Dict[WorkerLink, Connection] = {}
        self.remote_raylets: Dict[str, RayletClient] = {}   # other nodes' raylets (spillback)
        self._timers: Dict[Lease, asyncio.TimerHandle] = {}
        self._retry_timers: Dict[KeyState, asyncio.TimerHandle] = {}
        self._oom_timers: Dict[PendingTask, asyncio.TimerHandle] = {}  # OOM retry backoffs
        self._queue: Deque[Any] = deque()
        self._applying = False
        self._background: Set[asyncio.Future] = set()  # asyncio tasks of ours, cancelled at close
        self._handlers: Dict[type, Callable[[Any], None]] = {
            RequestLease: self._request_lease, CancelLeaseRequest: self._cancel_request,
            ReturnLease: self._return_lease, ArmIdleTimer: self._arm_idle_timer,
            Connect: self._connect, CloseLink: self._close_link, ResolveArgs: self._resolve_args,
            Push: self._push, Finish: self._store_result, Fail: self._store_error,
            WorkerDied: self._worker_died, CancelRemote: self._cancel_remote,
            WatchActor: self._watch_actor, Warn: self._warn, FreeLineage: self._free_lineage,
            PinLineage: self._pin_lineage, Resubmit: self._resubmit,
            FailObjects: self._fail_objects, ArgumentLost: self._argument_lost,
            ArmRetry: self._arm_retry, StreamItem: self._stream_item,
            RetryLater: self._retry_later,
        }

    @property
    def tasks(self) -> Dict[bytes, PendingTask]:
        return self.state.tasks

    # -- feeding the state machine -------------------------------------------------------------
    def feed(self, actions: List[Any]) -> None:
        """Carry out `actions` in order; actions of stimuli fed meanwhile (a value already
        here, a connection that fails at once) queue behind them, so what goes out on a
        connection keeps the machine's order."""
        if not actions:
            return
        queue = self._queue
        queue.extend(actions)
        if self._applying:
            return
        self._applying = True
        handlers = self._handlers
        try:
            while queue:
                action = queue.popleft()
                try:
                    handlers[type(action)](action)
                except Exception:
                    log.exception("error carrying out %s", type(action).__name__)
        finally:
            self._applying = False

    def submit(self, task: PendingTask) -> None:
        self.feed(self.state.submit(task))

    def submit_call(self, task: PendingTask) -> None:
        self.feed(self.state.submit_call(task))

    def cancel(self, task_id: bytes, force: bool, recursive: bool = False) -> bool:
        found, actions = self.state.cancel(task_id, force, recursive)
        self.feed(actions)
        return found

    def cancel_children(self, parent_task_id: bytes, force: bool) -> None:
        self.feed(self.state.cancel_children(parent_task_id, force))

    def released(self, oid: bytes) -> None:
        """An owned object lost its last reference."""
        if oid in self.state.lineage:
            self.feed(self.state.references_released((oid,)))

    def on_grant(self, grant: raylet_pb2.LeaseGrant, raylet: str = LOCAL_RAYLET) -> None:
        st = self.state
        rid = grant.request_id
        outcome = grant.WhichOneof("outcome")
        if outcome == "granted":
            g = grant.granted
            w = g.worker
            actions = st.lease_granted(raylet, rid, g.lease_id, w.worker_id, f"{w.ip}:{w.port}",
                                       w.node_id, g.worker_pid, g.gpu_ids)
        elif outcome == "queued":
            actions = st.lease_queued(rid)
        elif outcome == "warning":
            actions = st.lease_warning(rid, grant.warning.message)
        elif outcome == "rejected":
            actions = st.lease_rejected(rid, grant.rejected.message,
                                        grant.rejected.runtime_env_failed,
                                        grant.rejected.placement_group_removed)
        elif outcome == "spillback":
            actions = st.lease_spilled(rid, grant.spillback.raylet_address)
        else:
            return
        self.feed(actions)

    def on_raylet_notice(self, notice: raylet_pb2.WorkerKilled, raylet: str = LOCAL_RAYLET) -> None:
        """A raylet's memory monitor is killing a worker this process leased from it."""
        self.feed(self.state.worker_killed(notice.worker_id, notice.reason))

    # connection handler (WorkerConnection and CallConnection call these)
    def on_result(self, conn: Connection, result: common_pb2.TaskResult) -> None:
        self.feed(self.state.task_result(conn.link, result))

    def on_connection_lost(self, conn: Connection, error: str) -> None:
        link = conn.link
        if self.conns.get(link) is conn:
            del self.conns[link]
        self.feed(self.state.worker_lost(link, error, getattr(conn, "handshake_error", None)))

    # -- the local raylet going away and coming back (CoreWorker._raylet_lost) -------------------
    def on_raylet_lost(self) -> None:
        self.feed(self.state.raylet_lost(LOCAL_RAYLET))

    def on_raylet_restored(self) -> None:
        self.feed(self.state.raylet_restored())

    def on_raylet_gone(self, error: BaseException) -> None:
        """The local raylet is not coming back: fail every task still waiting for a
        worker (tasks running on other nodes' workers finish as usual)."""
        self.feed(self.state.raylet_gone(error))

    def _remote_raylet_lost(self, address: str, reason: str) -> None:
        """Another node's raylet went away: its pending requests are asked again locally
        (its granted workers died with it; their streams report that)."""
        if self.remote_raylets.pop(address, None) is not None:
            log.warning("lost the raylet at %s (%s); its pending lease requests go back to "
                        "the local raylet", address, reason)
            self.feed(self.state.raylet_lost(address))

    # -- actions ----------------------------------------------------------------------------------
    def _raylet(self, raylet: str, open_: bool = False) -> Optional[RayletClient]:
        if raylet == LOCAL_RAYLET:
            return self.host.raylet
        client = self.remote_raylets.get(raylet)
        if (client is None or client.closed) and open_:
            client = RayletClient(self.host.channel(raylet),
                                  functools.partial(self.on_grant, raylet=raylet),
                                  functools.partial(self._remote_raylet_lost, raylet),
                                  functools.partial(self.on_raylet_notice, raylet=raylet))
            self.remote_raylets[raylet] = client
            client.start(self.host.registration())
        return client

    def _request_lease(self, a: RequestLease) -> None:
        ks = a.key
        self._raylet(a.raylet, open_=True).request_lease(raylet_pb2.LeaseRequest(
            request_id=a.request_id, resources=ks.resources, strategy=ks.strategy,
            function_name=ks.name, grant_or_reject=a.raylet != LOCAL_RAYLET,
            retriable=ks.retriable))

    def _cancel_request(self, a: CancelLeaseRequest) -> None:
        client = self._raylet(a.raylet)
        if client is not None:
            client.cancel_request(a.request_id)

    def _return_lease(self, a: ReturnLease) -> None:
        client = self._raylet(a.raylet)
        if client is not None:
            client.return_lease(a.lease_id, kill_worker=a.kill_worker,
                                worker_exiting=a.worker_exiting)

    def _arm_idle_timer(self, a: ArmIdleTimer) -> None:
        lease = a.lease
        self._timers[lease] = asyncio.get_running_loop().call_later(a.delay, self._idle_timer,
                                                                    lease)

    def _idle_timer(self, lease: Lease) -> None:
        self._timers.pop(lease, None)
        self.feed(self.state.lease_idle(lease))

    def _arm_retry(self, a: ArmRetry) -> None:
        ks = a.key
        self._retry_timers[ks] = asyncio.get_running_loop().call_later(a.delay, self._retry_timer,
                                                                       ks)

    def _retry_later(self, a: RetryLater) -> None:
        task = a.task
        self._oom_timers[task] = asyncio.get_running_loop().call_later(a.delay, self._retry_due,
                                                                       task)

    def _retry_due(self, task: PendingTask) -> None:
        self._oom_timers.pop(task, None)
        self.feed(self.state.retry_due(task))

    def _retry_timer(self, ks: KeyState) -> None:
        self._retry_timers.pop(ks, None)
        self.feed(self.state.retry_held(ks))

    def _connect(self, a: Connect) -> None:
        link = a.link
        host = self.host
        if link.call_port:
            conn: Connection = CallConnection(self, link.address, link.worker_id, host.job_config,
                                              host.token, control_address=link.control_address,
                                              handshake_timeout_s=frames.HANDSHAKE_TIMEOUT_S)
        else:
            conn = WorkerConnection(self, host.channel(link.address), link.address, link.worker_id,
                                    host.job_config)
        conn.link = link
        conn.node_id = link.node_id
        conn.pid = link.pid
        conn.concurrency = link.concurrency
        old = self.conns.get(link)
        if old is not None:
            old.close()
        self.conns[link] = conn

    def _close_link(self, a: CloseLink) -> None:
        conn = self.conns.pop(a.link, None)
        if conn is not None:
            conn.close()

    def _resolve_args(self, a: ResolveArgs) -> None:
        resolve_slots(self, a.task)

    def _push(self, a: Push) -> None:
        task = a.task
        conn = self.conns.get(a.link)
        if conn is None:  # its connection failed as it opened: the loss reaches the machine
            return
        host = self.host
        lease = a.lease
        if lease is not None:
            spec = common_pb2.TaskSpec(
                task_id=task.task_id, job_id=host.job_id, function_id=task.function_id,
                name=task.name, args=task.args, return_ids=task.return_ids,
                owner=host.address_proto, attempt=task.attempt, gpu_ids=lease.gpu_ids,
                parent_task_id=task.parent_task_id, resources=task.resources,
                max_calls=task.max_calls)
            strategy = task.strategy
            if strategy.kind == STRATEGY_PLACEMENT_GROUP:
                spec.placement_group_id = strategy.placement_group_id
                spec.capture_child_tasks = strategy.soft
            if task.function_id not in conn.functions_sent:
                spec.function_blob = task.function_blob
                conn.functions_sent.add(task.function_id)
        else:
            spec = common_pb2.TaskSpec(
                task_id=task.task_id, job_id=host.job_id, name=task.name, args=task.args,
                return_ids=task.return_ids, owner=host.address_proto, attempt=task.attempt,
                actor_id=task.actor_id, method_name=task.method_name,
                parent_task_id=task.parent_task_id, concurrency_group=task.concurrency_group)
        if task.arg_values:
            spec.arg_values.extend(task.arg_values)
        if task.generator:
            self._push_generator(task, spec, conn)
        conn.send(spec)

    # -- generator tasks (runtime/core_worker/generators.py) ------------------------------------
    def _push_generator(self, task: PendingTask, spec: common_pb2.TaskSpec,
                        conn: Connection) -> None:
        stream = task.stream
        spec.generator = task.generator
        spec.generator_backpressure = stream.backpressure
        spec.generator_consumed = stream.consumed
        # Back-pressure acks ride the connection the call went on, as TaskSpecs with
        # generator_ack: a PushTasks stream, or a sync actor's call port (whose thread reads
        # them while the generator waits).
        if stream.backpressure:
            post = self.host.post  # type: ignore[attr-defined]
            stream.ack = lambda n: post(self._send_ack, conn, task.task_id, n)
        else:
            stream.ack = None

    def _send_ack(self, conn: Connection, task_id: bytes, consumed: int) -> None:
        if not conn.dead:
            conn.send(common_pb2.TaskSpec(task_id=task_id, generator_ack=consumed))

    def _stream_item(self, a: StreamItem) -> None:
        task, result = a.task, a.result
        loc = result.returns[0]
        if loc.contained:
            self.host.add_contained(loc)
        task.stream.add_item(result.item_index, Value.from_proto(loc), self.host)
        self._close_stream_if_complete(task)

    def _close_stream_if_complete(self, task: PendingTask) -> None:
        if task.stream.complete():
            self.state.stream_closed(task.task_id)

    def _finish_stream(self, task: PendingTask, result: common_pb2.TaskResult,
                       values: List[Value]) -> None:
        """A generator task's final result: items that did not stream (dynamic, or a sync
        actor's call port) follow its return; a dynamic task's return value becomes the
        DynamicObjectRefGenerator of its items."""
        stream = task.stream
        host = self.host
        extra = result.returns[len(task.return_ids):]
        for index, loc in enumerate(extra):
            if loc.contained:
                host.add_contained(loc)
            stream.add_item(index, Value.from_proto(loc), host)
        if task.generator == GENERATOR_DYNAMIC and not result.app_error and task.return_ids:
            n = result.stream_count
            refs = [ObjectRef(item_id(task.task_id, i), host.address, host) for i in range(n)]
            ser = serialize(DynamicObjectRefGenerator(refs))
            data = ser.to_bytes()
            values[0] = Value(data, size=len(data))
            host.refs.add_contained(task.return_ids[0], [
                (item_id(task.task_id, i), host.address) for i in range(n)])
        if result.app_error and result.returns:  # it failed before it could yield
            stream.fail(Value.from_proto(result.returns[0]), host)
        else:
            stream.finish(result.stream_count)
        self._close_stream_if_complete(task)

    def _store_result(self, a: Finish) -> None:
        returns = a.result.returns
        values = [Value.from_proto(loc) for loc in returns]
        for loc in returns:
            if loc.contained:
                self.host.add_contained(loc)
        if a.task.stream is not None:
            self._finish_stream(a.task, a.result, values)
        self.host.store_returns(a.task, values)

    def _store_error(self, a: Fail) -> None:
        value = _error_value(a.error)
        store = self.host.store_returns
        for task in a.tasks:
            if task.stream is not None:
                task.stream.fail(value, self.host)
                self._close_stream_if_complete(task)
            store(task, [value] * len(task.return_ids))

    def _worker_died(self, a: WorkerDied) -> None:
        undecided = []
        remote = []
        for task in a.tasks:
            if self._raylet_death_may_show(task):
                undecided.append(task)
            elif self._remote_raylet_death_may_show(task):
                remote.append(task)
            else:
                self.feed(self.state.fail_tasks([task], self._no_retry_error(task, a.error)))
        if undecided:
            self._spawn(self._decide_after_grace(undecided, a.error))
        if remote:
            self._spawn(self._decide_after_remote_grace(remote, a.error))

    def _remote_raylet_death_may_show(self, task: PendingTask) -> bool:
        """Whether the worker ran on another node whose raylet may be found dead in a
        moment (its node died with it: its stream breaks about when the worker's does)."""
        lease = task.lease
        return (lease is not None and lease.raylet != LOCAL_RAYLET
                and not self.state.raylet_is_dead(lease.raylet))

    async def _decide_after_remote_grace(self, tasks: List[PendingTask], error: str) -> None:
        """As _decide_after_grace, for workers of other nodes: when their raylet's stream
        breaks too within RAYLET_DEATH_GRACE_S, the node died, and that is the error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RAYLET_DEATH_GRACE_S
        raylets = {t.lease.raylet for t in tasks if t.lease is not None}
        while loop.time() < deadline and not all(self.state.raylet_is_dead(r) for r in raylets):
            await asyncio.sleep(0.02)
        for task in tasks:
            self.feed(self.state.fail_tasks([task], self._no_retry_error(task, error)))

    def _raylet_death_may_show(self, task: PendingTask) -> bool:
        """Whether the worker may have died with the local raylet, whose death the
        driver of a private cluster sees moments later (it reaps the raylet), and does
        not see yet."""
        lease = task.lease
        local = lease is None or lease.raylet == LOCAL_RAYLET
        return local and self.host.raylet_exit is not None and self.host.raylet_death() is None

    async def _decide_after_grace(self, tasks: List[PendingTask], error: str) -> None:
        """Fail tasks whose worker died, once RAYLET_DEATH_GRACE_S has shown whether the
        raylet died too: a worker dies with its raylet a moment before the raylet exits,
        and the raylet's death is the error worth reporting."""
        await self.host.wait_raylet_exit(RAYLET_DEATH_GRACE_S)
        for task in tasks:
            self.feed(self.state.fail_tasks([task], self._no_retry_error(task, error)))

    def _no_retry_error(self, task: PendingTask, error: str) -> BaseException:
        """Why a task whose worker died, and that has no retries left, failed: the local
        raylet's death when that is known by now and the worker was the raylet's (it
        died with it), else the worker's crash."""
        lease = task.lease
        if lease is None or lease.raylet == LOCAL_RAYLET:
            death = self.host.raylet_death()
            if death is not None:
                return death
        elif self.state.raylet_is_dead(lease.raylet):
            link = lease.link
            return NodeDiedError(
                f"The node running task {task.name} died: its raylet at {lease.raylet} and its "
                f"worker (pid {link.pid}, node {link.node_id.hex()[:8]}) went away ({error}), "
                f"and the task has no retries left (max_retries). Check that node "
                f"(`agentctl status`, its logs); tasks with retries left run on other nodes.")
        return WorkerCrashedError(
            f"The worker running task {task.name} died unexpectedly ({error}) and the task "
            f"has no retries left (max_retries). Check the worker's log in "
            f"{self.host.session_dir}/logs for the reason (e.g. a segfault or os._exit).")

    def _cancel_remote(self, a: CancelRemote) -> None:
        self._spawn(self._send_cancel(a))

    async def _send_cancel(self, a: CancelRemote) -> None:
        stub = core_worker_pb2_grpc.CoreWorkerStub(self.host.channel(a.address))
        try:
            await stub.CancelTask(core_worker_pb2.CancelRequest(
                task_id=a.task.task_id, force=a.force, recursive=a.recursive), timeout=10)
        except grpc.RpcError as exc:
            log.debug("CancelTask of %s at %s failed: %s", a.task.task_id.hex(), a.address, exc)

    def _warn(self, a: Warn) -> None:
        log.warning("%s", a.message)

    def _free_lineage(self, a: FreeLineage) -> None:
        self.host.unpin_lineage(a.task)

    def _pin_lineage(self, a: PinLineage) -> None:
        self.host.pin_lineage(a.task)

    def _resubmit(self, a: Resubmit) -> None:
        self.host.hold_args(a.task)

    def _fail_objects(self, a: FailObjects) -> None:
        self.host.fail_objects(a.oids, _error_value(a.error))

    def _argument_lost(self, a: ArgumentLost) -> None:
        loc = a.location
        self.host.location_lost(a.oid, loc.store_address, (
            f"a worker running {a.task.name} could not fetch it from the object store of "
            f"node {loc.node_id.hex()[:8]} ({loc.store_address})"))

    # -- actors ---------------------------------------------------------------------------------------
    def _watch_actor(self, a: WatchActor) -> None:
        self._spawn(self._watch_loop(a.actor))

    async def _watch_loop(self, a: ActorQueue) -> None:
        """Learn the actor's state from the GCS (long poll) and report it to the state
        machine, until it stops watching (the actor is alive, dead or unreachable)."""
        st = self.state
        actor_id = a.actor_id
        try:
            while a.watching:
                wait_s = (HANDSHAKE_RECHECK_S if a.watch_handshake_error or a.recheck_alive
                          else 30.0)
                try:  # a restarting GCS is waited for (bounded) by the GCS client
                    reply = await self.host.gcs_client.call(
                        "GetActor", gcs_pb2.GetActorRequest(
                            actor_id=actor_id, newer_than=a.version, timeout_s=wait_s),
                        timeout=wait_s + 30, doing=f"watching actor {actor_id.hex()}",
                        none_on_deadline=True)
                except RayError as exc:
                    self.feed(st.actor_dead(actor_id, actor_died_error(
                        actor_id, f"its state cannot be learnt: {exc}")))
                    return
                if not a.watching:  # killed, or the cluster went, while this waited
                    return
                if reply is None:  # the long poll's deadline passed: ask again
                    continue
                if not reply.found:
                    self.feed(st.actor_dead(actor_id, actor_died_error(
                        actor_id, "the actor is unknown to the GCS")))
                    return
                info = reply.actor
                state = common_pb2.ActorState.Value(info.state)
                death = (actor_died_error(actor_id, info.death_cause, info.death_error)
                         if info.state == ACTOR_DEAD else None)
                self.feed(st.actor_reported(actor_id, info.version, state, info.address,
                                            info.pid, info.is_async, death))
        finally:
            if a.watching:  # cancelled (shutdown) or failed: no verdict came
                st.watch_stopped(actor_id)

    def flights(self) -> List[tuple]:
        """(link, tasks the worker runs now) for every link with tasks in flight: where
        the task events say tasks run."""
        out = []
        for link in self.state.flights():
            conn = self.conns.get(link)
            out.append((link, conn.running_slots() if conn is not None else 0))
        return out

    # -- background tasks and shutdown ---------------------------------------------------------------
    def _spawn(self, coro) -> None:
        """Run coro in the background, kept (asyncio holds tasks weakly) until it ends or
        close() cancels it."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Close every connection and remote raylet stream; cancel and await what runs in
        the background (watches, cancels, grace waits) and the idle timers."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for timers in (self._retry_timers, self._oom_timers):
            for timer in timers.values():
                timer.cancel()
            timers.clear()
        for conn in list(self.conns.values()):
            conn.close()
        self.conns.clear()
        left = list(self._background)
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        while self.remote_raylets:  # one opened meanwhile (a late spillback) is closed too
            _address, client = self.remote_raylets.popitem()
            await client.close()


def resolve_slots(sub: TaskSubmitter, task: PendingTask) -> None:
    """Learn the values of task's slot refs (from this process's memory store, or from
    their owners) and report each to the state machine. While some are missing, the
    task's pending reason (task events) names the first of them, and the next one when
    that arrives; it is cleared once none is. A task run again to rebuild lost objects
    has object ids in task.slot_refs; the host finds their owners."""
    slots = task.slot_refs or []
    recorder = sub.state.recorder
    named: List[Optional[bytes]] = [None]  # the object the reported reason names
    values = task.arg_values

    def name_next() -> None:
        for j, loc in enumerate(values):
            if loc is None:
                oid = slots[j]._id
                if oid != named[0]:  # (the same object may be passed twice)
                    named[0] = oid
                    recorder.reason(task.task_id, f"waiting for argument object {oid.hex()}")
                return

    def make_cb(i: int):
        def cb(oid: bytes, value: Value) -> None:
            actions = sub.state.arg_ready(task, i, value.to_proto(oid))
            if named[0] is not None:  # only a task that had to wait has a reason to change
                if task.waiting == 0:
                    named[0] = None
                    recorder.reason(task.task_id, "")
                elif oid == named[0]:
                    name_next()
            sub.feed(actions)
        return cb

    host = sub.host
    for i, ref in enumerate(slots):
        if type(ref) is bytes:  # a task run again to rebuild objects: ids, not refs
            oid = ref
            ref = host.slot_ref(oid)
            if ref is None:
                err = ObjectLostError(oid.hex(), (
                    f"Object {oid.hex()}, an argument of {task.name}, is no longer known "
                    f"here: it was borrowed from another process and released once the task "
                    f"had run, so the task cannot run again to rebuild its lost results."))
                sub.feed(sub.state.arg_ready(task, i, _error_value(err).to_proto(oid)))
                continue
            slots[i] = ref
        host.wait_for_value(ref, make_cb(i))
    if task.waiting and recorder.enabled:
        name_next()
