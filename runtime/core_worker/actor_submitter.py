"""The caller's side of actors: creating them (through the GCS) and calling them.

Each (caller, actor) pair has one ordered queue and, while the actor is alive,
one PushTasks stream to the actor's worker: calls go out in submission order,
several per message. When the stream breaks the caller asks the GCS what
became of the actor (restarting, or dead and why) and either resends calls
that still have retries (max_task_retries) or fails them with the reason.

A connection to a sync actor's call port that fails before the port accepted its
hello ran none of its calls: they go back to the front of the queue, retries
untouched, and the caller dials the same port again at once (the actor did not
die; asking the GCS would only wait out a long poll). After HANDSHAKE_ATTEMPTS
such failures in a row the caller asks the GCS whether the actor moved or died
(waiting at most HANDSHAKE_RECHECK_S for news); if it is still alive at that
address, what is queued fails with ActorUnavailableError naming the actor and the
handshake error, and the next call dials again.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Set

import grpc

from runtime import frames, ids
from runtime.actor import ActorClass, ActorHandle
from runtime.core_worker import task_events as te
from runtime.core_worker.call_connection import CallConnection
from runtime.core_worker.memory_store import Value
from runtime.core_worker.submitter import (PendingTask, new_task, push, record_result,
                                           resolve_slots, return_refs)
from runtime.core_worker.task_args import prepare_args
from runtime.core_worker.worker_connection import Connection, WorkerConnection
from runtime.exceptions import (ActorAlreadyExistsError, ActorDiedError, ActorUnavailableError, RayActorError,
                                RayletDiedError, RayTaskError)
from runtime.object_ref import ObjectRef
from runtime.options import placed_resources, strategy_proto, task_resources
from runtime.protocol import common_pb2, gcs_pb2, gcs_pb2_grpc
from runtime.serialization import NONE_BYTES, parse, serialize_error

if TYPE_CHECKING:
    from runtime.core_worker.core_worker import CoreWorker

log = logging.getLogger("runtime.core_worker")
HANDLE_INDEX = b"\xff\xff\xff\xff"
# Call-port connections that may fail in a row before the hello is accepted, and how
# long the caller then waits for the GCS to report the actor moved or dead.
HANDSHAKE_ATTEMPTS = 3
HANDSHAKE_RECHECK_S = 2.0
# How many calls an async actor is taken to run at once, for task events (RUNNING).
ASYNC_ACTOR_CONCURRENCY = 1000


def handle_object_id(actor_id: bytes) -> bytes:
    return actor_id + bytes(ids.TASK_ID_SIZE - len(actor_id)) + HANDLE_INDEX


class _Actor:
    __slots__ = ("actor_id", "state", "version", "conn", "queue", "limbo", "death", "watching",
                 "address", "endpoint", "handshake_failures", "redial", "pid", "is_async")

    def __init__(self, actor_id: bytes) -> None:
        self.actor_id = actor_id
        self.state = "PENDING_CREATION"
        self.version = 0
        self.conn: Optional[Connection] = None
        self.queue: Deque[PendingTask] = deque()
        self.limbo: List[PendingTask] = []   # in flight when the stream broke
        self.death: Optional[Value] = None
        self.watching = False
        self.address = ""
        self.endpoint: Optional[common_pb2.Address] = None  # where it was last seen alive
        self.handshake_failures = 0  # in a row, on the call port; reset by any result
        self.redial = False  # the next call dials `endpoint` again (it is alive there)
        self.pid = 0  # of the actor's process, as the GCS last reported it (task events)
        self.is_async = False


class ActorSubmitter:
    def __init__(self, cw: "CoreWorker") -> None:
        self.cw = cw
        self.actors: Dict[bytes, _Actor] = {}
        self.handle_objects: Dict[bytes, tuple] = {}  # handle oid -> (actor_id, detached, pinned)
        self._background: Set[asyncio.Task] = set()  # GCS calls in flight, cancelled at close

    def gcs(self) -> gcs_pb2_grpc.GcsStub:
        return self.cw.gcs_stub()

    def _cluster_gone(self) -> Optional[RayletDiedError]:
        """The error to fail actor work with once a private cluster lost its raylet."""
        err = self.cw.raylet_error
        return err if err is not None and self.cw.owns_cluster else None

    # -- creation (user thread) ------------------------------------------------------------------
    def create(self, ac: ActorClass, args: tuple, kwargs: dict, opts: Dict[str, Any]) -> ActorHandle:
        cw = self.cw
        gone = self._cluster_gone()
        if gone is not None:
            raise RayletDiedError(str(gone), address=gone.address, pid=gone.pid)
        actor_id = ids.random_id(ids.ACTOR_ID_SIZE)
        others = task_resources({k: v for k, v in opts.items() if k != "num_cpus"})
        others.pop("CPU", None)
        if opts.get("num_cpus") is not None:
            place = dict(others)
            if opts["num_cpus"]:
                place["CPU"] = float(opts["num_cpus"])
            hold = dict(place)
        else:  # Ray's default: 1 CPU to place the actor, none held while it lives
            place = dict(others, CPU=1.0)
            hold = dict(others)
        strategy = strategy_proto(opts.get("scheduling_strategy"))
        if strategy.kind == "PLACEMENT_GROUP":
            place = placed_resources(place, strategy)
            hold = placed_resources(hold, strategy) if hold else {}
        blob, slots, held = prepare_args(cw, getattr(ac._cls, "__init__", ac._cls), ac._name,
                                         args, kwargs)
        arg_values = []
        if slots:
            cw._block_until(slots, len(slots), None)
            arg_values = [cw.memory.get(r._id).to_proto(r._id) for r in slots]
        namespace = opts.get("namespace") or cw.namespace
        detached = opts.get("lifetime") == "detached"
        max_task_retries = opts.get("max_task_retries") or 0
        spec = gcs_pb2.ActorSpec(
            actor_id=actor_id, job_id=cw.job_id, class_name=ac._name, class_blob=ac._blob,
            class_id=ac._class_id, args=blob, arg_values=arg_values, owner=cw.address_proto,
            name=opts.get("name") or "", namespace=namespace, detached=detached,
            get_if_exists=bool(opts.get("get_if_exists")),
            max_restarts=opts.get("max_restarts") or 0,
            max_concurrency=opts.get("max_concurrency") or (1000 if ac._is_async else 1),
            placement_resources=place, hold_resources=hold,
            strategy=strategy, job_config=cw.job_config,
            is_async=ac._is_async, method_names=ac._methods, max_task_retries=max_task_retries)
        reply = cw.gcs_call("RegisterActor", spec, doing=f"creating actor {ac._name}")
        if not reply.ok:
            if reply.HasField("existing"):
                return self.handle_from_info(reply.existing, ac)
            raise ActorAlreadyExistsError(reply.error)  # the GCS's only refusal: a taken name
        hoid = handle_object_id(actor_id)
        pinned = (list(slots), held)
        if held:
            cw.refs.add_submitted(held)
        handle_ref = ObjectRef(hoid, cw.address, cw)
        cw.memory._values[hoid] = Value(NONE_BYTES, size=len(NONE_BYTES))
        self.handle_objects[hoid] = (actor_id, detached, pinned)
        return ActorHandle(actor_id, ac._name, ac._methods, ac._method_options, max_task_retries,
                           ac._is_async, handle_ref)

    def handle_from_info(self, info: gcs_pb2.ActorInfo, ac: Optional[ActorClass] = None) -> ActorHandle:
        methods = list(info.method_names)
        method_options = ac._method_options if ac is not None else {}
        return ActorHandle(info.actor_id, info.class_name, methods, method_options,
                           info.max_task_retries, info.is_async, None)

    def on_handle_freed(self, hoid: bytes) -> None:
        """Loop thread: no handle to the actor is left anywhere; destroy it unless detached."""
        actor_id, detached, (slots, held) = self.handle_objects.pop(hoid)
        if held:
            self.cw.refs.remove_submitted(held)
        if not detached:
            self._spawn(self._kill(actor_id, True, "all handles to the actor went out of scope"))

    def _spawn(self, coro) -> None:
        """Run coro in the background, kept (asyncio holds tasks weakly) until it ends or
        close() cancels it."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _kill(self, actor_id: bytes, no_restart: bool, reason: str) -> None:
        try:
            await self.gcs().KillActor(gcs_pb2.KillActorRequest(
                actor_id=actor_id, no_restart=no_restart, reason=reason), timeout=10)
        except grpc.RpcError as exc:
            log.debug("KillActor failed: %s", exc)

    # -- calls (user thread) ------------------------------------------------------------------------
    def call(self, handle: ActorHandle, method: str, args: tuple, kwargs: dict,
             opts: Dict[str, Any]):
        cw = self.cw
        num_returns = opts.get("num_returns")
        num_returns = 1 if num_returns is None else num_returns
        name = f"{handle._class_name}.{method}"
        blob, slots, held = prepare_args(cw, None, name, args, kwargs)
        if handle._handle_ref is not None:
            # A call in flight keeps its actor in scope: `A.remote().f.remote()` must run f.
            held = held + [handle._handle_ref._id]
        mtr = opts.get("max_task_retries")
        task = new_task(name, blob, slots, held, num_returns,
                        handle._max_task_retries if mtr is None else mtr,
                        opts.get("retry_exceptions"))
        task.actor_id = handle._actor_id
        task.method_name = method
        task.function_id = b""
        task.function_blob = b""
        task.key = None
        task.resources = {}
        refs = return_refs(cw, task)
        if held:
            cw.refs.add_submitted(held)
        cw.post(self._submit, task)
        return refs

    # -- loop thread ----------------------------------------------------------------------------------
    def _actor(self, actor_id: bytes) -> _Actor:
        a = self.actors.get(actor_id)
        if a is None:
            a = self.actors[actor_id] = _Actor(actor_id)
            gone = self._cluster_gone()
            if gone is not None:
                a.death = Value(serialize_error(gone).to_bytes(), is_error=True)
                a.state = "DEAD"
        return a

    def _submit(self, task: PendingTask) -> None:
        a = self._actor(task.actor_id)
        self.cw.submitter.tasks[task.task_id] = task
        self.cw.task_events.new_task(task, "ACTOR_TASK", te.PENDING_ARGS_AVAIL)
        if a.death is not None:
            self.cw.submitter.finish_task(task, [a.death] * len(task.return_ids))
            return
        if task.slot_refs:
            resolve_slots(self.cw, task, lambda _t: self._pump(a))
        a.queue.append(task)
        self._pump(a)

    def _pump(self, a: _Actor) -> None:
        if a.conn is None or a.conn.dead:
            if not (a.redial and a.queue and a.endpoint is not None):
                self._watch(a)
                return
            a.redial = False
            self._connect(a, a.endpoint)
        while a.queue:
            task = a.queue[0]
            if task.cancelled:
                a.queue.popleft()
                continue
            if task.waiting:
                break  # keep submission order: later calls wait for this one's arguments
            a.queue.popleft()
            for loc in task.arg_values:
                if loc.is_error:
                    self.cw.submitter.finish_task(task, [Value.from_proto(loc)] * len(task.return_ids))
                    break
            else:
                self._send(a, task)

    def _send(self, a: _Actor, task: PendingTask) -> None:
        conn = a.conn
        spec = common_pb2.TaskSpec(
            task_id=task.task_id, job_id=self.cw.job_id, name=task.name, args=task.args,
            return_ids=task.return_ids, owner=self.cw.address_proto, attempt=task.attempt,
            actor_id=task.actor_id, method_name=task.method_name,
            parent_task_id=task.parent_task_id)
        push(self.cw, conn, task, spec)

    def _watch(self, a: _Actor, handshake_error: str = "") -> None:
        if not a.watching and a.death is None:
            a.watching = True
            self._spawn(self._watch_loop(a, handshake_error))

    async def _watch_loop(self, a: _Actor, handshake_error: str = "") -> None:
        """Learn the actor's state from the GCS (long poll) and act on it. With
        `handshake_error`, this caller could not get through to the actor's call port:
        wait only briefly for news, and if there is none, fail what is queued."""
        try:
            while a.death is None:
                wait_s = HANDSHAKE_RECHECK_S if handshake_error else 30.0
                try:
                    reply = await self.gcs().GetActor(gcs_pb2.GetActorRequest(
                        actor_id=a.actor_id, newer_than=a.version, timeout_s=wait_s),
                        timeout=wait_s + 30)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        continue
                    self._dead(a, f"its state cannot be learnt: the GCS at {self.cw.gcs_address} "
                                  f"is unreachable ({exc.code().name}: {exc.details()})", b"")
                    return
                if a.death is not None:  # killed, or the cluster went, while this waited
                    return
                if not reply.found:
                    self._dead(a, "the actor is unknown to the GCS", b"")
                    return
                info = reply.actor
                if handshake_error:
                    if info.version == a.version:  # no news: alive where it was
                        self._unreachable(a, handshake_error)
                        return
                    handshake_error = ""  # it moved, restarts or died: an ordinary watch
                    a.handshake_failures = 0
                a.version = info.version
                a.state = info.state
                if info.state == "DEAD":
                    self._dead(a, info.death_cause, info.death_error)
                    return
                if info.state == "ALIVE":
                    a.pid = info.pid
                    a.is_async = info.is_async
                    self._connect(a, info.address)
                    self._resend_limbo(a)
                    self._pump(a)
                    return
        finally:
            a.watching = False

    def _connect(self, a: _Actor, address: common_pb2.Address) -> None:
        """Open the connection to the actor's worker: its call port when it has one."""
        a.endpoint = address
        addr = f"{address.ip}:{address.port}"
        a.address = addr
        if address.task_port:
            a.conn = CallConnection(self, f"{address.ip}:{address.task_port}", address.worker_id,
                                    self.cw.job_config, self.cw.token, control_address=addr,
                                    handshake_timeout_s=frames.HANDSHAKE_TIMEOUT_S)
        else:
            a.conn = WorkerConnection(self, self.cw.channel(addr), addr, address.worker_id,
                                      self.cw.job_config)
            if a.is_async:
                # It runs up to max_concurrency calls at once (Ray's default 1000): the
                # caller does not know the actor's own limit, so it takes the default.
                a.conn.concurrency = ASYNC_ACTOR_CONCURRENCY
        a.conn.node_id = address.node_id
        a.conn.pid = a.pid

    def _unreachable(self, a: _Actor, error: str) -> None:
        """The actor is alive (the GCS says so) but its call port would not take this
        caller's connection, HANDSHAKE_ATTEMPTS times in a row: fail what is queued (none
        of it ran) and let the next call dial again."""
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
        value = Value(serialize_error(err).to_bytes(), is_error=True)
        for task in pending:
            self.cw.submitter.finish_task(task, [value] * len(task.return_ids))

    def _resend_limbo(self, a: _Actor) -> None:
        limbo, a.limbo = a.limbo, []
        failed = []
        for task in reversed(limbo):
            if task.retries_left != 0:
                task.retries_left -= 1 if task.retries_left > 0 else 0
                task.attempt += 1
                a.queue.appendleft(task)
            else:
                failed.append(task)
        for task in reversed(failed):
            err = RayActorError(
                f"The actor {a.actor_id.hex()} died unexpectedly before finishing this call "
                f"({task.name}); it was restarted, but the call has no retries left "
                f"(max_task_retries).", actor_id=a.actor_id.hex())
            v = Value(serialize_error(err).to_bytes(), is_error=True)
            self.cw.submitter.finish_task(task, [v] * len(task.return_ids))

    def _dead(self, a: _Actor, cause: str, error: bytes) -> None:
        original = None
        detail = ""
        if error:
            try:
                _k, raised = parse(error)
            except Exception:
                raised = None
            if raised is not None:
                original = getattr(raised, "cause", None) or raised
                # The constructor's error, with its remote traceback when there is one.
                detail = str(raised) if isinstance(raised, RayTaskError) else (
                    f"{type(original).__name__}: {original}")
        msg = f"The actor {a.actor_id.hex()} is dead: {cause}"
        if detail:
            msg += f":\n{detail}"
        err = ActorDiedError(msg, actor_id=a.actor_id.hex(), cause=original)
        a.death = Value(serialize_error(err).to_bytes(), is_error=True)
        a.state = "DEAD"
        pending = a.limbo + list(a.queue)
        a.limbo, a.queue = [], deque()
        for task in pending:
            self.cw.submitter.finish_task(task, [a.death] * len(task.return_ids))

    def mark_killed(self, actor_id: bytes, reason: str) -> None:
        """Loop thread: kill() returned; current, pending and future calls fail at once
        (the worker may take a moment to die, and must not run calls meanwhile)."""
        a = self._actor(actor_id)
        if a.conn is not None:
            a.limbo.extend(a.conn.inflight.values())
            a.conn.inflight.clear()
            a.conn.close()
            a.conn = None
        self._dead(a, reason, b"")

    def on_cluster_gone(self, error: Exception) -> None:
        """Loop thread: the private cluster lost its raylet, and with it every actor's
        worker: fail the calls in flight and pending, now and from now on."""
        death = Value(serialize_error(error).to_bytes(), is_error=True)
        for a in self.actors.values():
            if a.conn is not None:
                a.limbo.extend(a.conn.inflight.values())
                a.conn.inflight.clear()
                a.conn.close()
                a.conn = None
            a.death = death
            a.state = "DEAD"
            pending = a.limbo + list(a.queue)
            a.limbo, a.queue = [], deque()
            for task in pending:
                self.cw.submitter.finish_task(task, [death] * len(task.return_ids))

    def close(self) -> None:
        for a in self.actors.values():
            if a.conn is not None:
                a.conn.close()
                a.conn = None
        for task in list(self._background):
            task.cancel()

    # -- connection handler (WorkerConnection or CallConnection) ---------------------------------------
    def on_result(self, conn: Connection, result: common_pb2.TaskResult) -> None:
        task = conn.inflight.pop(result.task_id, None)
        if task is None:
            return
        a = self.actors.get(task.actor_id)
        if a is not None and a.handshake_failures:
            a.handshake_failures = 0
        record_result(self.cw, conn, task, result)
        values = [Value.from_proto(loc) for loc in result.returns]
        for loc in result.returns:
            if loc.contained:
                self.cw.refs.add_contained(loc.object_id, [
                    (c.object_id, (c.owner.ip, c.owner.port, c.owner.worker_id))
                    for c in loc.contained])
        self.cw.submitter.finish_task(task, values)

    def on_connection_lost(self, conn: Connection, error: str) -> None:
        conn.dead = True
        handshake_error = getattr(conn, "handshake_error", None)
        for a in self.actors.values():
            if a.conn is not conn:
                continue
            a.conn = None
            sent = list(conn.inflight.values())
            conn.inflight.clear()
            if handshake_error is None:
                a.limbo.extend(sent)
                self._watch(a)
                return
            # The port never accepted the connection: none of these calls ran. They go
            # back in front of the queue, in order, their retries untouched.
            for task in sent:
                task.conn = None  # queued again: cancel() finishes it at once
            a.queue.extendleft(reversed(sent))
            a.handshake_failures += 1
            if a.handshake_failures < HANDSHAKE_ATTEMPTS:
                log.info("the call port of actor %s failed before accepting this caller (%s); "
                         "dialling it again", a.actor_id.hex()[:8], handshake_error)
                a.redial = True
                self._pump(a)
            else:
                self._watch(a, handshake_error)
            return
