"""Task submission: from .remote() to a result in the owner's memory store.

Runs on the core worker's event loop. Tasks are grouped by scheduling key
(function, resource shape, strategy), as Ray does. For each key the submitter
leases workers from the raylet (one message on the Connect stream) and pushes
tasks straight to them on a long-lived PushTasks stream, several per message.

Pipelining: a function whose tasks are known to be short (mean run time under
config.PIPELINE_MAX_TASK_SECONDS) may have up to config.PIPELINE_DEPTH tasks in
flight per leased worker; others (and functions never seen before) get one at
a time, so a long task never holds short ones hostage behind it.

An idle lease is returned after config.LEASE_IDLE_RETURN_S, so back-to-back
tasks do not pay a lease round trip each.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import deque
from typing import TYPE_CHECKING, Deque, Dict, List, Optional

import grpc

from runtime import config, ids
from runtime.core_worker import task_context
from runtime.core_worker import task_events as te
from runtime.core_worker.memory_store import Value
from runtime.exceptions import TaskCancelledError, TaskUnschedulableError, WorkerCrashedError
from runtime.core_worker.worker_connection import WorkerConnection
from runtime.protocol import common_pb2, core_worker_pb2, core_worker_pb2_grpc, raylet_pb2
from runtime.serialization import parse, serialize_error
from runtime.object_ref import ObjectRef

if TYPE_CHECKING:
    from runtime.core_worker.core_worker import CoreWorker

log = logging.getLogger("runtime.core_worker")
MAX_LEASE_REQUESTS_PER_KEY = 10
# How long a private cluster's driver waits, when a worker died under a task with no
# retries left, for the raylet's death to show (it reaps the raylet a moment after the
# worker's stream breaks) before calling it the worker's crash.
RAYLET_DEATH_GRACE_S = 0.25


class PendingTask:
    """A task from submission until its result is stored (owner side)."""

    __slots__ = ("task_id", "function_id", "function_blob", "name", "args", "slot_refs",
                 "arg_values", "arg_ids", "return_ids", "key", "resources", "strategy",
                 "retries_left", "retry_exceptions", "attempt", "cancelled", "force_cancel",
                 "conn", "lease", "state", "waiting", "actor_id", "method_name",
                 "parent_task_id", "pushed_at", "placed_attempt", "running_attempt")

    def __init__(self) -> None:
        self.arg_values: List[common_pb2.ObjectLocation] = []
        self.attempt = 0
        self.cancelled = False
        self.force_cancel = False
        self.conn: Optional[WorkerConnection] = None
        self.lease: Optional[LeaseState] = None
        self.state = "PENDING_ARGS_AVAIL"
        self.waiting = 0
        self.actor_id = b""
        self.method_name = ""
        # The attempt whose place, and whose RUNNING, task events reported (task_events.py).
        self.placed_attempt = -1
        self.running_attempt = -1


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


def return_refs(cw, task: PendingTask):
    """What .remote() returns: one ref, None (num_returns=0) or a list."""
    refs = [ObjectRef(oid, cw.address, cw) for oid in task.return_ids]
    if len(refs) == 1:
        return refs[0]
    return refs or None


def push(cw, conn: WorkerConnection, task: PendingTask, spec: common_pb2.TaskSpec) -> None:
    """Send a task on its worker's stream and record that it went."""
    if task.arg_values:
        spec.arg_values.extend(task.arg_values)
    task.conn = conn
    task.state = "SUBMITTED_TO_WORKER"
    cw.task_events.submitted(task)
    conn.inflight[task.task_id] = task
    conn.send(spec)


class LeaseState:
    __slots__ = ("lease_id", "key", "conn", "inflight", "gpu_ids", "idle_timer", "dead", "raylet")

    def __init__(self, lease_id: int, key, conn: "WorkerConnection", gpu_ids: List[int],
                 raylet) -> None:
        self.raylet = raylet  # the raylet that granted it (another node's after spillback)
        self.lease_id = lease_id
        self.key = key
        self.conn = conn
        self.inflight = 0
        self.gpu_ids = list(gpu_ids)
        self.idle_timer: Optional[asyncio.TimerHandle] = None
        self.dead = False


class KeyState:
    __slots__ = ("queue", "leases", "requests", "resources", "strategy", "function_id", "name",
                 "warned", "queued_requests")

    def __init__(self, resources: Dict[str, float], strategy: common_pb2.SchedulingStrategy,
                 function_id: bytes, name: str) -> None:
        self.queue: Deque[PendingTask] = deque()
        self.leases: List[LeaseState] = []
        self.requests: set = set()
        self.resources = resources
        self.strategy = strategy
        self.function_id = function_id
        self.name = name
        self.warned = False
        # Requests the raylet said wait for busy resources: while there are any, more
        # workers are not coming soon, so short tasks may be pipelined.
        self.queued_requests: set = set()


def resolve_slots(cw, task: PendingTask, done) -> None:
    """Fill task.arg_values with the values of its slot refs, then call done(task).

    task.waiting counts the slots still missing (actor calls use it to keep order).
    While some are missing, the task's pending reason (task events) names the first
    of them, and the next one when that arrives; it is cleared once none is."""
    slots = task.slot_refs
    task.waiting = len(slots)
    task.arg_values = [None] * len(slots)  # type: ignore[list-item]
    named: List[Optional[bytes]] = [None]  # the object the reported reason names

    def name_next() -> None:
        for j, loc in enumerate(task.arg_values):
            if loc is None:
                oid = slots[j]._id
                if oid != named[0]:  # (the same object may be passed twice)
                    named[0] = oid
                    cw.task_events.reason(task.task_id, f"waiting for argument object {oid.hex()}")
                return

    def make_cb(i: int):
        def cb(oid: bytes, value: Value) -> None:
            task.arg_values[i] = value.to_proto(oid)
            task.waiting -= 1
            if named[0] is not None:  # only a task that had to wait has a reason to change
                if task.waiting == 0:
                    named[0] = None
                    cw.task_events.reason(task.task_id, "")
                elif oid == named[0]:
                    name_next()
            if task.waiting == 0:
                done(task)
        return cb

    for i, ref in enumerate(slots):
        cw.wait_for_value(ref, make_cb(i))
    if task.waiting and cw.task_events.enabled:
        name_next()


class TaskSubmitter:
    def __init__(self, cw: "CoreWorker") -> None:
        self.cw = cw
        self.keys: Dict[tuple, KeyState] = {}
        self.tasks: Dict[bytes, PendingTask] = {}
        self.requests: Dict[int, KeyState] = {}
        self.connections: Dict[bytes, WorkerConnection] = {}
        self.fn_time: Dict[bytes, float] = {}
        self.request_raylet: Dict[int, object] = {}   # request id -> raylet holding it
        self.remote_raylets: Dict[str, object] = {}   # other nodes' raylets (spillback)
        self._request_ids = itertools.count(1)
        self._background: set = set()  # asyncio tasks of ours, cancelled at close

    # -- submission -------------------------------------------------------------------------
    def submit(self, task: PendingTask) -> None:
        self.tasks[task.task_id] = task
        self.cw.task_events.new_task(task, "NORMAL_TASK", te.PENDING_ARGS_AVAIL)
        if task.slot_refs:
            self._resolve_args(task)
        else:
            self._enqueue(task)

    def _resolve_args(self, task: PendingTask) -> None:
        resolve_slots(self.cw, task, self._args_ready)

    def _args_ready(self, task: PendingTask) -> None:
        if task.cancelled:
            return
        for loc in task.arg_values:
            if loc.is_error:
                # A failed dependency fails this task with the same error, without running it.
                err = Value.from_proto(loc)
                self.finish_task(task, [err] * len(task.return_ids))
                return
        task.slot_refs = None
        self._enqueue(task)

    def _enqueue(self, task: PendingTask) -> None:
        if self.cw.raylet_error is not None:
            self._fail(task, self.cw.raylet_error)
            return
        ks = self.keys.get(task.key)
        if ks is None:
            ks = self.keys[task.key] = KeyState(task.resources, task.strategy, task.function_id,
                                                task.name)
        task.state = "PENDING_NODE_ASSIGNMENT"
        self.cw.task_events.event(task.task_id, te.PENDING_NODE_ASSIGNMENT)
        ks.queue.append(task)
        self._pump(ks)

    # -- leases and dispatch ------------------------------------------------------------------
    def _depth(self, ks: KeyState) -> int:
        """Tasks in flight per leased worker: one, unless the node is saturated (no more
        workers can be leased now) and this function's tasks are known to be short."""
        if not ks.queued_requests:
            return 1
        t = self.fn_time.get(ks.function_id)
        if t is not None and t < config.PIPELINE_MAX_TASK_SECONDS:
            return config.PIPELINE_DEPTH
        return 1

    def _pump(self, ks: KeyState) -> None:
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
            self._dispatch(task, best)
        if queue:
            if self.cw.raylet_up:  # else they wait for the reconnection (on_raylet_restored)
                want = min(len(queue), MAX_LEASE_REQUESTS_PER_KEY) - len(ks.requests)
                for _ in range(want):
                    self._request_lease(ks)
        elif ks.requests:
            for rid in list(ks.requests):
                self.request_raylet.pop(rid, self.cw.raylet).cancel_request(rid)
                self.requests.pop(rid, None)
            ks.requests.clear()
            ks.queued_requests.clear()
        for lease in ks.leases:
            if lease.inflight == 0 and not queue and lease.idle_timer is None:
                lease.idle_timer = self.cw.loop.call_later(config.LEASE_IDLE_RETURN_S,
                                                           self._return_if_idle, lease)

    def _request_lease(self, ks: KeyState, raylet=None) -> None:
        """Ask the local raylet, or (after a spillback) the raylet it named, which must
        then grant or reject: a request never bounces between nodes."""
        rid = next(self._request_ids)
        ks.requests.add(rid)
        self.requests[rid] = ks
        target = raylet or self.cw.raylet
        self.request_raylet[rid] = target
        target.request_lease(raylet_pb2.LeaseRequest(
            request_id=rid, resources=ks.resources, strategy=ks.strategy, function_name=ks.name,
            grant_or_reject=raylet is not None))

    def _remote_raylet(self, address: str):
        from runtime.core_worker.raylet_client import RayletClient

        client = self.remote_raylets.get(address)
        if client is None or client.closed:
            client = RayletClient(self.cw.channel(address), self.on_grant,
                                  lambda reason, a=address: self._remote_raylet_lost(a, reason))
            self.remote_raylets[address] = client
            client.start(raylet_pb2.RegisterClient(
                worker_id=self.cw.worker_id, is_driver=True, pid=os.getpid(), port=self.cw.port,
                job_id=self.cw.job_id))
        return client

    def _remote_raylet_lost(self, address: str, reason: str) -> None:
        """Another node's raylet went away: its pending requests are asked again locally
        (its granted workers died with it; their streams report that)."""
        client = self.remote_raylets.pop(address, None)
        if client is not None:
            log.warning("lost the raylet at %s (%s); its pending lease requests go back to "
                        "the local raylet", address, reason)
            self._forget_raylet(client)

    # -- the local raylet going away and coming back (driver side of CoreWorker._raylet_lost) -----
    def _forget_raylet(self, raylet) -> None:
        """Drop the requests pending at `raylet` and the leases it granted, so nothing
        waits for an answer that will never come and no task goes to its dying workers;
        then ask again (the queues stay as they are)."""
        touched = []
        for rid in [rid for rid, r in self.request_raylet.items() if r is raylet]:
            del self.request_raylet[rid]
            ks = self.requests.pop(rid, None)
            if ks is not None:
                ks.requests.discard(rid)
                ks.queued_requests.discard(rid)
                touched.append(ks)
        for ks in self.keys.values():
            for lease in [lease for lease in ks.leases if lease.raylet is raylet]:
                lease.dead = True
                if lease.idle_timer is not None:
                    lease.idle_timer.cancel()
                    lease.idle_timer = None
                ks.leases.remove(lease)
                touched.append(ks)
        for ks in {id(k): k for k in touched}.values():
            self._pump(ks)

    def on_raylet_lost(self, raylet) -> None:
        self._forget_raylet(raylet)

    def on_raylet_restored(self) -> None:
        for ks in list(self.keys.values()):
            if ks.queue:
                self._pump(ks)

    def on_raylet_gone(self, error: Exception) -> None:
        """The local raylet is not coming back: fail every task still waiting for a
        worker (tasks running on other nodes' workers finish as usual)."""
        for ks in self.keys.values():
            while ks.queue:
                self._fail(ks.queue.popleft(), error)

    def _fail(self, task: PendingTask, error: Exception) -> None:
        err = Value(serialize_error(error).to_bytes(), is_error=True)
        self.finish_task(task, [err] * len(task.return_ids))

    def on_grant(self, grant: raylet_pb2.LeaseGrant) -> None:
        ks = self.requests.get(grant.request_id)
        if grant.queued:
            if ks is not None:
                ks.queued_requests.add(grant.request_id)
                self._pump(ks)
            return
        if grant.message and not grant.rejected and not grant.lease_id and not grant.retry_at:
            if ks is not None and not ks.warned:
                ks.warned = True
                log.warning("%s", grant.message)
            return
        raylet = self.request_raylet.pop(grant.request_id, self.cw.raylet)
        if ks is None:
            if grant.lease_id:  # cancelled meanwhile: give it back
                raylet.return_lease(grant.lease_id)
            return
        del self.requests[grant.request_id]
        ks.requests.discard(grant.request_id)
        ks.queued_requests.discard(grant.request_id)
        if grant.rejected:
            err = Value(serialize_error(TaskUnschedulableError(grant.message)).to_bytes(),
                        is_error=True)
            while ks.queue:
                t = ks.queue.popleft()
                self.finish_task(t, [err] * len(t.return_ids))
            return
        if grant.retry_at:
            log.debug("lease request for %s spilled back to %s", ks.name, grant.retry_at)
            self._request_lease(ks, self._remote_raylet(grant.retry_at))
            return
        addr = f"{grant.worker.ip}:{grant.worker.port}"
        conn = self.connections.get(grant.worker.worker_id)
        if conn is None or conn.dead:
            conn = self.connections[grant.worker.worker_id] = WorkerConnection(
                self, self.cw.channel(addr), addr, grant.worker.worker_id, self.cw.job_config)
            conn.node_id = grant.worker.node_id
            conn.pid = grant.worker_pid
        lease = LeaseState(grant.lease_id, ks, conn, list(grant.gpu_ids), raylet)
        ks.leases.append(lease)
        self._pump(ks)

    def _dispatch(self, task: PendingTask, lease: LeaseState) -> None:
        if lease.idle_timer is not None:
            lease.idle_timer.cancel()
            lease.idle_timer = None
        conn = lease.conn
        spec = common_pb2.TaskSpec(
            task_id=task.task_id, job_id=self.cw.job_id, function_id=task.function_id,
            name=task.name, args=task.args, return_ids=task.return_ids,
            owner=self.cw.address_proto, attempt=task.attempt, gpu_ids=lease.gpu_ids,
            parent_task_id=task.parent_task_id, resources=task.resources)
        if task.strategy.kind == "PLACEMENT_GROUP":
            spec.placement_group_id = task.strategy.placement_group_id
            spec.capture_child_tasks = task.strategy.soft
        if task.function_id not in conn.functions_sent:
            spec.function_blob = task.function_blob
            conn.functions_sent.add(task.function_id)
        lease.inflight += 1
        task.lease = lease
        push(self.cw, conn, task, spec)

    def _return_if_idle(self, lease: LeaseState) -> None:
        lease.idle_timer = None
        ks = lease.key
        if lease.inflight or ks.queue or lease.dead:
            return
        ks.leases.remove(lease)
        lease.raylet.return_lease(lease.lease_id)

    def return_idle_leases(self) -> None:
        for ks in self.keys.values():
            for lease in list(ks.leases):
                if lease.inflight == 0:
                    if lease.idle_timer is not None:
                        lease.idle_timer.cancel()
                    self._return_if_idle(lease)

    # -- results ---------------------------------------------------------------------------------
    def on_result(self, conn: WorkerConnection, result: common_pb2.TaskResult) -> None:
        task = conn.inflight.pop(result.task_id, None)
        if task is None:
            return
        lease = task.lease
        if lease is not None:
            lease.inflight -= 1
        record_result(self.cw, conn, task, result)
        prev = self.fn_time.get(task.function_id)
        self.fn_time[task.function_id] = (result.exec_seconds if prev is None
                                          else 0.8 * prev + 0.2 * result.exec_seconds)
        if result.app_error and not result.cancelled and self._should_retry_app_error(task, result):
            task.retries_left -= 1 if task.retries_left > 0 else 0
            task.attempt += 1
            log.info("retrying task %s after an application error (attempt %s)", task.name,
                     task.attempt)
            self._requeue(task)
        else:
            values = [Value.from_proto(loc) for loc in result.returns]
            for loc in result.returns:
                if loc.contained:
                    self.cw.refs.add_contained(loc.object_id, [
                        (c.object_id, (c.owner.ip, c.owner.port, c.owner.worker_id))
                        for c in loc.contained])
            self.finish_task(task, values, result.returns)
        if lease is not None and not lease.dead:
            self._pump(lease.key)

    def _should_retry_app_error(self, task: PendingTask, result: common_pb2.TaskResult) -> bool:
        if not task.retry_exceptions or task.retries_left == 0:
            return False
        if task.retry_exceptions is True:
            return True
        try:
            _kind, err = parse(result.returns[0].inline_data)
            cause = getattr(err, "cause", err)
            return isinstance(cause, tuple(task.retry_exceptions))
        except Exception:
            return False

    def _requeue(self, task: PendingTask) -> None:
        task.conn = None
        task.lease = None
        self.cw.task_events.requeued_task(task)
        if self.cw.raylet_error is not None:
            self._fail(task, self.cw.raylet_error)
            return
        ks = self.keys.get(task.key)
        if ks is None:
            self._enqueue(task)
            return
        task.state = "PENDING_NODE_ASSIGNMENT"
        ks.queue.appendleft(task)
        self._pump(ks)

    def finish_task(self, task: PendingTask, values: List[Value], locs=None) -> None:
        if task.state == "FINISHED":
            return  # e.g. cancelled while queued, then failed with its actor: once is all
        cw = self.cw
        if task.state != "FINISHED_AT_WORKER" and values and values[0].is_error:
            _failed_without_result(cw, task, values[0])
        task.state = "FINISHED"
        self.tasks.pop(task.task_id, None)
        for i, oid in enumerate(task.return_ids):
            v = values[i] if i < len(values) else values[-1]
            if oid in cw.refs:
                cw.memory.put(oid, v)
            elif v.in_store:
                cw.delete_stored(oid, v)
        if task.arg_ids:
            cw.refs.remove_submitted(task.arg_ids)

    def on_connection_lost(self, conn: WorkerConnection, error: str) -> None:
        conn.dead = True
        if self.connections.get(conn.worker_id) is conn:
            del self.connections[conn.worker_id]
        touched = set()
        for ks in self.keys.values():
            for lease in list(ks.leases):
                if lease.conn is conn:
                    lease.dead = True
                    if lease.idle_timer is not None:
                        lease.idle_timer.cancel()
                    ks.leases.remove(lease)
                    touched.add(id(ks))
                    # The worker is gone (or unreachable): make sure the raylet never
                    # grants it again, even before it notices the process exit itself.
                    lease.raylet.return_lease(lease.lease_id, kill_worker=True)
        tasks = list(conn.inflight.values())
        conn.inflight.clear()
        undecided = []
        for task in tasks:
            if task.cancelled:
                err = Value(serialize_error(TaskCancelledError(task.task_id.hex())).to_bytes(),
                            is_error=True)
                self.finish_task(task, [err] * len(task.return_ids))
            elif task.retries_left != 0:
                task.retries_left -= 1 if task.retries_left > 0 else 0
                task.attempt += 1
                log.warning("worker %s running %s died (%s); retrying (attempt %s)",
                            conn.address, task.name, error, task.attempt)
                self._requeue(task)
            elif self._raylet_death_may_show(task):
                undecided.append(task)
            else:
                self._fail(task, self._no_retry_error(task, error))
        if undecided:
            self._spawn(self._decide_after_grace(undecided, error))
        for ks in self.keys.values():
            if id(ks) in touched:
                self._pump(ks)

    def _raylet_death_may_show(self, task: PendingTask) -> bool:
        """Whether the worker may have died with the local raylet, whose death the
        driver of a private cluster sees moments later (it reaps the raylet), and does
        not see yet."""
        lease = task.lease
        local = lease is None or lease.raylet is self.cw.raylet
        return local and self.cw.raylet_exit is not None and self.cw.raylet_death() is None

    async def _decide_after_grace(self, tasks: List[PendingTask], error: str) -> None:
        """Fail tasks whose worker died, once RAYLET_DEATH_GRACE_S has shown whether the
        raylet died too: a worker dies with its raylet a moment before the raylet can be
        reaped, and the raylet's death is the error worth reporting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RAYLET_DEATH_GRACE_S
        while self.cw.raylet_death() is None and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for task in tasks:
            if task.state == "FINISHED":
                continue
            if task.cancelled:
                self._fail(task, TaskCancelledError(task.task_id.hex()))
            else:
                self._fail(task, self._no_retry_error(task, error))

    def _no_retry_error(self, task: PendingTask, error: str) -> Exception:
        """Why a task whose worker died, and that has no retries left, failed: the local
        raylet's death when that is known by now and the worker was the raylet's (it
        died with it), else the worker's crash."""
        lease = task.lease
        if lease is None or lease.raylet is self.cw.raylet:
            death = self.cw.raylet_death()
            if death is not None:
                return death
        return WorkerCrashedError(
            f"The worker running task {task.name} died unexpectedly ({error}) and the task "
            f"has no retries left (max_retries). Check the worker's log in "
            f"{self.cw.session_dir}/logs for the reason (e.g. a segfault or os._exit).")

    # -- cancellation ------------------------------------------------------------------------------
    def cancel(self, task_id: bytes, force: bool) -> bool:
        task = self.tasks.get(task_id)
        if task is None:
            return False
        if force and task.actor_id:
            raise ValueError("force=True is not supported for actor calls: an actor has state, "
                             "so a running call is never interrupted; use runtime.kill(actor) "
                             "to stop the actor")
        task.cancelled = True
        err = Value(serialize_error(TaskCancelledError(task_id.hex())).to_bytes(), is_error=True)
        if task.conn is None:
            ks = self.keys.get(task.key)
            if ks is not None and task in ks.queue:
                ks.queue.remove(task)
            self.finish_task(task, [err] * len(task.return_ids))
            return True
        if force and task.lease is not None:
            task.lease.raylet.return_lease(task.lease.lease_id, kill_worker=True)
        else:
            self._spawn(self._cancel_remote(task))
        return True

    def _spawn(self, coro) -> None:
        """Run coro in the background, kept (asyncio holds tasks weakly) until it ends or
        close() cancels it."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel_remote(self, task: PendingTask) -> None:
        conn = task.conn
        if conn is None or conn.dead:
            return
        stub = core_worker_pb2_grpc.CoreWorkerStub(self.cw.channel(conn.control_address))
        try:
            await stub.CancelTask(core_worker_pb2.CancelRequest(task_id=task.task_id), timeout=10)
        except grpc.RpcError:
            pass

    def close(self) -> None:
        for conn in list(self.connections.values()):
            conn.close()
        self.connections.clear()
        for task in list(self._background):
            task.cancel()

    async def close_remote_raylets(self) -> None:
        while self.remote_raylets:  # one opened meanwhile (a late spillback) is closed too
            _address, client = self.remote_raylets.popitem()
            await client.close()


def record_result(cw, conn, task: PendingTask, result: common_pb2.TaskResult) -> None:
    """Task events for a result from a worker: when it ran and how it ended."""
    ev = cw.task_events
    task.state = "FINISHED_AT_WORKER"
    if not ev.enabled:
        return
    conn.last_end = result.end_time
    if task.running_attempt != task.attempt:  # else reported at a flush while it ran
        ev.event(task.task_id, te.RUNNING, result.start_time or None)
    failed = result.app_error
    ev.event(task.task_id, te.FAILED if failed else te.FINISHED, result.end_time or None)
    etype = emsg = ""
    if failed and result.returns:
        etype, emsg = _describe_error(result.returns[0].inline_data)
    ev.outcome(task.task_id, conn.worker_id, result.worker_pid, conn.node_id or cw.node_id,
               task.attempt, etype, emsg)


def _failed_without_result(cw, task: PendingTask, value: Value) -> None:
    ev = cw.task_events
    if not ev.enabled:
        return
    etype, emsg = _describe_error(value.data) if value.data else ("", "")
    ev.event(task.task_id, te.FAILED)
    conn = task.conn  # None: it never reached a worker, so it ran nowhere
    ev.outcome(task.task_id, conn.worker_id if conn else b"", conn.pid if conn else 0,
               (conn.node_id or cw.node_id) if conn else b"", task.attempt, etype, emsg)


def _describe_error(data: bytes) -> tuple:
    try:
        _kind, err = parse(data)
    except Exception:
        return "UNKNOWN", ""
    name = type(err).__name__
    if name.startswith("RayTaskError") or name == "RayTaskError":
        cause = getattr(err, "cause", None)
        name = "TASK_EXECUTION_EXCEPTION" if cause is not None else name
    return name, str(err).strip()
