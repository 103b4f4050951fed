"""CoreWorker: the per-process runtime (drivers and workers).

Threads: the user's threads call the API (put/get/wait/submit); one event-loop
thread ("runtime-io") does all I/O: the CoreWorker gRPC server, the raylet
stream, task streams to workers, object-store calls. User threads hand work to
the loop through a batched inbox (one wake-up for many submissions) and block
on concurrent futures; values already in the memory store are returned
without touching the loop at all.

When a driver's raylet stream breaks, the driver reconnects (a node agent
restarts a dead raylet at the same address, as a new node) for up to
config.RECONNECT_TIMEOUT_S, asking for its leases again once it is back. If the raylet
does not come back, or is known dead for good (a private cluster's raylet, which
nobody restarts), everything waiting for it fails with RayletDiedError naming
its address and pid. A worker simply exits: its raylet ran it.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import dataclasses
import logging
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import grpc

from runtime import config, ids, rpc
from runtime.core_worker import task_context
from runtime.core_worker.actor_submitter import ActorSubmitter
from runtime.core_worker.borrowers import BorrowerNotifier
from runtime.core_worker.memory_store import MemoryStore, Value
from runtime.core_worker.object_pull import ObjectPuller, PullFailed, holders_of
from runtime.core_worker.raylet_client import RayletClient
from runtime.core_worker.reference_table import ReferenceTable, RefEntry
from runtime.core_worker.submitter import PendingTask, TaskSubmitter
from runtime.core_worker.task_events import TaskEventBuffer
from runtime.exceptions import (GetTimeoutError, ObjectFreedError, ObjectLostError, OwnerDiedError,
                                RayletDiedError, RayTaskError)
from runtime.object_ref import ObjectRef
from runtime.object_store.client import StoreClient, map_object, write_object
from runtime.object_store.store import object_file_name
from runtime.protocol import (common_pb2, core_worker_pb2, core_worker_pb2_grpc, gcs_pb2_grpc,
                              raylet_pb2)
from runtime.core_worker.gcs_client import GcsClient
from runtime.serialization import KIND_ERROR, Serialized, parse, serialize, serialize_error

log = logging.getLogger("runtime.core_worker")

DRIVER = "driver"
WORKER = "worker"
Owner = Tuple[str, int, bytes]
# How many times one get() of a value recovers it (rebuilt, or found elsewhere) after
# failing to read it, before it raises the read's error.
RECOVERY_ATTEMPTS = 3
# How long a read waits for the local store to seal an object it does not have sealed.
# A location is handed out only once its object is sealed (write_to_store waits for the
# seal; pulled copies are sealed before Pull answers), so a store without it has lost it
# (freed, or restarted): waiting long would only delay the owner's answer.
SEALED_GRACE_S = 1.0
# How long free() waits for owners and object stores to drop the values.
FREE_TIMEOUT_S = 30.0


class _SlotRef:
    """An object id and its owner, where code takes an ObjectRef but must not count a
    reference (a lineage re-run's arguments, get() waiting for a lost value again)."""

    __slots__ = ("_id", "_owner")

    def __init__(self, oid: bytes, owner: Owner) -> None:
        self._id = oid
        self._owner = owner

    def hex(self) -> str:
        return self._id.hex()


async def _await(make):
    return await make()


def _freed_value(oid: bytes) -> Value:
    """The value a freed object has from now on: its ObjectFreedError, as Ray stores
    OBJECT_FREED in its memory store."""
    err = ObjectFreedError(oid.hex(), (
        f"Object {oid.hex()} was freed with free() (ray._private.internal_api.free) and "
        f"cannot be read or reconstructed. Call free() only once no task or get() needs "
        f"the object any more."))
    return Value(serialize_error(err).to_bytes(), is_error=True)


def _describe_connect_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, asyncio.TimeoutError):
        return "registration timed out"
    return str(exc) or type(exc).__name__


class CoreWorker(core_worker_pb2_grpc.CoreWorkerServicer):
    def __init__(self, *, mode: str, node_id: bytes, node_ip: str, raylet_address: str,
                 store_address: str, gcs_address: str, session_dir: str, token: str,
                 job_id: bytes = b"", worker_id: Optional[bytes] = None, startup_token: str = "",
                 namespace: str = "") -> None:
        self.mode = mode
        self.node_id = node_id
        self.node_ip = node_ip
        self.raylet_address = raylet_address
        self.store_address = store_address
        self.gcs_address = gcs_address
        self.session_dir = session_dir
        self.token = token
        # GCS calls wait out a GCS restart (bounded); a private cluster's does not return.
        self.gcs_client = GcsClient(gcs_address, token, gone=self._gcs_not_coming_back)
        self.job_id = job_id
        self.worker_id = worker_id or ids.random_id(ids.WORKER_ID_SIZE)
        self.startup_token = startup_token
        self._namespace = namespace
        self.job_config = common_pb2.JobConfig(job_id=job_id, namespace=namespace)
        self.port = 0
        self.address: Owner = (node_ip, 0, self.worker_id)
        self.address_proto = common_pb2.Address()
        self.memory = MemoryStore()
        self.refs: ReferenceTable = None  # type: ignore[assignment]  (needs the port)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="runtime-io", daemon=True)
        self._inbox: collections.deque = collections.deque()
        self._inbox_scheduled = False
        self._channels: Dict[str, grpc.aio.Channel] = {}
        self._stubs: Dict[str, core_worker_pb2_grpc.CoreWorkerStub] = {}
        self._stores: Dict[str, StoreClient] = {}
        self._fetching: set = set()
        self._store_deletes: Dict[str, List[bytes]] = {}
        # Owned objects freed with local_only: their copies in other stores (address ->
        # node id), deleted when the object goes out of scope.
        self._freed_elsewhere: Dict[bytes, Dict[str, bytes]] = {}
        self.task_events = TaskEventBuffer(
            config.TASK_EVENTS_ENABLED, flights=lambda: self.submitter.flights(),
            ident=lambda: (self.job_id, self.node_id),
            send=lambda batch: self.gcs_stub().AddTaskEvents(batch, timeout=10))
        self.submitter = TaskSubmitter(self, self.task_events)
        self.actors = ActorSubmitter(self, self.submitter)
        self.current_actor_id: Optional[bytes] = None  # the actor this process hosts
        self._exit_event: Optional[asyncio.Event] = None
        self.borrowers = BorrowerNotifier(self._owner_stub)
        self.raylet: RayletClient = None  # type: ignore[assignment]
        self.server: Optional[grpc.aio.Server] = None
        self.executor = None  # set on workers (runtime/core_worker/executor.py)
        self.output = None  # OutputForwarder on workers (runtime/core_worker/task_output.py)
        self.connected = False
        self.on_raylet_lost: Optional[Callable[[str], None]] = None  # workers: exit
        # Drivers: what is known of the raylet, for errors that name it (its pid comes
        # with its registration ack). raylet_exit (private clusters) says how the raylet
        # ended, or None while it runs; there nobody restarts it, so the driver does not
        # wait for it to come back.
        self.raylet_pid: Optional[int] = None
        self.raylet_exit: Optional[Callable[[], Optional[str]]] = None
        self.owns_cluster = False  # a private cluster: nothing runs once its raylet is gone
        self.raylet_up = False
        self.raylet_error: Optional[RayletDiedError] = None
        self._raylet_recovery: Optional[asyncio.Task] = None
        self._store_node_hex = node_id.hex()  # the store names its files after it
        self._closing = False
        self._blocked_depth = 0
        self._shm_dir = ""
        self._puller: Optional[ObjectPuller] = None  # see _pull
        self._pg_waits: Dict[bytes, asyncio.Task] = {}  # placement groups' ready() refs
        self._background: set = set()  # see spawn()

    # -- the task this thread / asyncio task runs (runtime/core_worker/task_context.py) -----------
    @property
    def current_task_id(self) -> Optional[bytes]:
        return task_context.current.get().task_id

    @current_task_id.setter
    def current_task_id(self, task_id: Optional[bytes]) -> None:
        ctx = task_context.current.get()
        task_context.current.set(dataclasses.replace(ctx, task_id=task_id))

    @property
    def current_task_name(self) -> str:
        return task_context.current.get().name

    @current_task_name.setter
    def current_task_name(self, name: str) -> None:
        ctx = task_context.current.get()
        task_context.current.set(dataclasses.replace(ctx, name=name))

    @property
    def current_gpu_ids(self) -> List[int]:
        return list(task_context.current.get().gpu_ids)

    @current_gpu_ids.setter
    def current_gpu_ids(self, gpu_ids: Sequence[int]) -> None:
        ctx = task_context.current.get()
        task_context.current.set(dataclasses.replace(ctx, gpu_ids=tuple(gpu_ids)))

    @property
    def current_placement_group(self) -> Optional[Tuple[bytes, bool]]:
        """The placement group that tasks submitted now join (capture_child_tasks): that
        of the task this thread runs, or for an actor's calls that of its creation."""
        ctx = task_context.current.get()
        spec = ctx.spec
        if spec is not None and ctx.is_actor and not spec.actor_creation:
            spec = getattr(self.executor, "creation_spec", None)
        if spec is not None and spec.placement_group_id and spec.capture_child_tasks:
            return spec.placement_group_id, True
        return None

    @property
    def namespace(self) -> str:
        """The job's namespace: the driver's own, or (in a worker) that of the job whose
        task or actor runs now, from the job config that came with it."""
        return self._namespace or self.job_config.namespace

    # -- lifecycle ---------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        """Loop thread, after the loop stopped: end what is left on it and close it, so
        its selector and self-pipe (3 fds) do not outlive the core worker."""
        loop = self.loop
        try:
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=1.0))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        except Exception:
            log.debug("core worker loop did not wind down cleanly", exc_info=True)
        finally:
            loop.close()

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        self.run(self._start(), timeout)

    async def _start(self) -> None:
        self._exit_event = asyncio.Event()
        self.server = rpc.make_server(self.token)
        core_worker_pb2_grpc.add_CoreWorkerServicer_to_server(self, self.server)
        self.port = rpc.bind(self.server, self.node_ip, 0)
        await self.server.start()
        self.address = (self.node_ip, self.port, self.worker_id)
        self.address_proto = common_pb2.Address(ip=self.node_ip, port=self.port,
                                                worker_id=self.worker_id, node_id=self.node_id)
        self.refs = ReferenceTable(self.address, self._on_free, self._on_release, self._on_borrow)
        self.submitter.state.node_id = self.node_id
        self.raylet = RayletClient(self.channel(self.raylet_address), self.submitter.on_grant,
                                   self._raylet_lost, on_notice=self.submitter.on_raylet_notice)
        ack = await self.raylet.connect(self.registration())
        if ack.pid:
            self.raylet_pid = ack.pid
        self.raylet_up = True
        self.task_events.start()
        try:
            self._shm_dir = (await self.store_client(self.store_address).stats()).shm_dir
        except Exception:  # the store answers later; reads then go through it
            log.debug("object store stats unavailable", exc_info=True)
        self.connected = True

    def registration(self) -> raylet_pb2.RegisterClient:
        """How this process registers on a raylet's Connect stream."""
        return raylet_pb2.RegisterClient(
            worker_id=self.worker_id, is_driver=self.mode == DRIVER, pid=os.getpid(),
            port=self.port, job_id=self.job_id, startup_token=self.startup_token)

    # -- the raylet going away (drivers) -------------------------------------------------------
    def _raylet_lost(self, reason: str) -> None:
        """Loop thread: the raylet stream broke. A worker exits (its raylet ran it); a
        driver reconnects, and fails what waits for the raylet if it cannot."""
        self.connected = False
        self.raylet_up = False
        if self.mode != DRIVER or self.on_raylet_lost is not None:
            if self.on_raylet_lost is not None:
                self.on_raylet_lost(reason)
            else:
                log.error("%s", reason)
            return
        if self._closing:
            return
        self.submitter.on_raylet_lost()
        if self.raylet_error is not None:  # its death was learnt first (raylet_death)
            return
        log.warning("lost the raylet at %s (%s); reconnecting", self.raylet_address, reason)
        self._raylet_recovery = asyncio.ensure_future(self._recover_raylet(reason))

    async def _recover_raylet(self, reason: str) -> None:
        loop = asyncio.get_running_loop()
        window = config.RECONNECT_TIMEOUT_S
        deadline = loop.time() + window
        delay = 0.05
        last = reason
        while not self._closing:
            if self.raylet_death() is not None:
                return
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                await self._reconnect_raylet(min(left, 2.0))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                last = _describe_connect_error(exc)
            await asyncio.sleep(max(0.0, min(delay, deadline - loop.time())))
            delay = min(delay * 2, 0.5)
        if not self._closing:
            self._raylet_gone(f"is unreachable ({last}) and did not come back within "
                              f"{window:g}s")

    async def _reconnect_raylet(self, timeout: float) -> None:
        old = self.raylet
        await old.close()
        # A fresh channel connects at once; the old one would wait out gRPC's reconnect backoff.
        channel = self._channels.pop(self.raylet_address, None)
        if channel is not None:
            await channel.close()
        client = RayletClient(self.channel(self.raylet_address), self.submitter.on_grant,
                              self._raylet_lost, on_notice=self.submitter.on_raylet_notice)
        try:
            ack = await client.connect(self.registration(), timeout)
        except BaseException:
            await client.close()
            raise
        self.raylet = client
        if ack.pid:
            self.raylet_pid = ack.pid
        if ack.node_id and ack.node_id != self.node_id:
            # A restarted raylet is a new node (its workers died with the old one).
            self.node_id = ack.node_id
            self.address_proto.node_id = ack.node_id
            self.submitter.state.node_id = ack.node_id
        self.raylet_up = True
        self.connected = True
        log.warning("reconnected to the raylet at %s (node %s)", self.raylet_address,
                    self.node_id.hex()[:8])
        self.submitter.on_raylet_restored()

    async def wait_raylet_exit(self, timeout: float) -> None:
        """Loop thread: return once the local raylet has exited, or after `timeout`
        seconds. The driver of a private cluster is the raylet's parent: a pidfd tells
        it the moment the process ends (no polling)."""
        pid = self.raylet_pid
        if self.raylet_exit is None or not pid or self.raylet_death() is not None:
            return
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):  # gone already (reaped), or no pidfd here
            return
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        try:
            loop.add_reader(fd, lambda: ended.done() or ended.set_result(None))
            try:
                await asyncio.wait_for(ended, timeout)
            except asyncio.TimeoutError:
                pass
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    def raylet_death(self) -> Optional[RayletDiedError]:
        """Loop thread: the error to fail work with if the local raylet is known to be
        gone for good, else None. In a private cluster the driver is the raylet's parent
        and can tell at once (a worker that died with it may be noticed before the
        raylet's stream is)."""
        if self.raylet_error is None and self.raylet_exit is not None and not self._closing:
            ended = self.raylet_exit()
            if ended is not None:
                self._raylet_gone(f"died ({ended})")
        return self.raylet_error

    def _raylet_gone(self, what: str) -> None:
        """Loop thread: the raylet is not coming back. Fail what waits for it, and (in a
        private cluster, where nothing can run any more) everything still pending."""
        pid = f" (pid {self.raylet_pid})" if self.raylet_pid else ""
        if self.owns_cluster:
            todo = ("It ran this driver's private cluster, which cannot run tasks or actors "
                    "any more: call runtime.shutdown(), then runtime.init() for a new cluster.")
        else:
            todo = ("Tasks from this driver cannot be scheduled any more; check the node "
                    "(`agentctl status`, the raylet's log in the node's session directory) and "
                    "start the driver again.")
        msg = f"The raylet at {self.raylet_address}{pid} {what}. {todo}"
        log.error("%s", msg)
        self.raylet_error = RayletDiedError(msg, address=self.raylet_address, pid=self.raylet_pid)
        self.submitter.on_raylet_gone(self.raylet_error)
        if self.owns_cluster:
            self.actors.on_cluster_gone(self.raylet_error)
            for oid, task in list(self._pg_waits.items()):
                task.cancel()
                self._fail_value(oid, self.raylet_error)

    def shutdown(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            if self._thread.ident is None and not self.loop.is_closed():
                self.loop.close()  # never started
            return
        try:
            self.run(self._shutdown(), timeout)
        except Exception:
            log.debug("core worker shutdown did not finish cleanly", exc_info=True)
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # already closed
            pass
        self._thread.join(timeout)

    async def _shutdown(self) -> None:
        self._closing = True
        self.connected = False
        recovery = self._raylet_recovery
        if recovery is not None and not recovery.done():
            recovery.cancel()
            try:
                await recovery
            except BaseException:  # cancelled: that is the point
                pass
        if self._exit_event is not None:
            self._exit_event.set()
        await self.task_events.flush()
        await self.task_events.close()
        await self.submitter.close()
        await self.actors.close()
        await self.borrowers.close()
        if self._puller is not None:
            await self._puller.close()
        if self.raylet is not None:
            await self.raylet.close()
        for _ in range(3):  # let request generators observe the close before channels go
            await asyncio.sleep(0)
        if self.server is not None:
            await self.server.stop(0.2)
        for store in self._stores.values():
            await store.close()
        for ch in self._channels.values():
            await ch.close()
        await self.gcs_client.close()

    # -- loop plumbing -------------------------------------------------------------------------------
    def run(self, coro, timeout: Optional[float] = None):
        """Run a coroutine on the loop from a user thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, make: Callable[[], Any], timeout: Optional[float] = None):
        """Make a gRPC call on the loop (calls and channels belong to the loop) and wait."""
        return self.run(_await(make), timeout)

    def post(self, fn: Callable, *args) -> None:
        """Run fn(*args) on the loop soon; many posts share one wake-up.

        The drain runs in an empty context: posts from several threads (tasks) share
        it, so the task context of whichever thread woke the loop must not leak into
        the callbacks, nor into the asyncio tasks they start."""
        if threading.get_ident() == getattr(self._thread, "ident", None):
            fn(*args)
            return
        self._inbox.append((fn, args))
        if not self._inbox_scheduled:
            self._inbox_scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain_inbox, context=contextvars.Context())
            except RuntimeError:  # loop closed during shutdown
                pass

    def _drain_inbox(self) -> None:
        self._inbox_scheduled = False
        inbox = self._inbox
        while inbox:
            fn, args = inbox.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("error in core worker callback %r", fn)

    def spawn(self, coro) -> asyncio.Task:
        """Loop thread: run coro in the background. The task is kept until it ends
        (asyncio holds tasks weakly); whatever is left when the loop stops is cancelled
        and awaited by _close_loop."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def gcs_stub(self) -> gcs_pb2_grpc.GcsStub:
        return self.gcs_client.stub

    def _gcs_not_coming_back(self) -> Optional[str]:
        return ("nobody restarts the GCS of a private cluster (init() without an address)"
                if self.owns_cluster else None)

    def gcs_call(self, method: str, request: Any, timeout: float = 30.0, doing: str = "") -> Any:
        """User thread: one GCS call (made on the loop), waiting out a GCS restart; a
        failure raises an error from runtime.exceptions naming the GCS and its address,
        never a raw gRPC error."""
        return self.call(lambda: self.gcs_client.call(method, request, timeout=timeout,
                                                      doing=doing))

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = rpc.aio_channel(address, self.token)
        return ch

    def _owner_stub(self, owner: Owner) -> core_worker_pb2_grpc.CoreWorkerStub:
        addr = f"{owner[0]}:{owner[1]}"
        stub = self._stubs.get(addr)
        if stub is None:
            stub = self._stubs[addr] = core_worker_pb2_grpc.CoreWorkerStub(self.channel(addr))
        return stub

    def store_client(self, address: str) -> StoreClient:
        c = self._stores.get(address)
        if c is None:
            # The local store's node is known from the start, so its errors name it even
            # when the first stats() (which would tell the client) failed.
            node = self.node_id if address == self.store_address else None
            c = self._stores[address] = StoreClient(address, self.token, node_id=node)
        return c

    # -- reference-table callbacks (any thread) -----------------------------------------------------
    def _on_free(self, oid: bytes, entry: RefEntry) -> None:
        self.post(self._free_owned, oid)

    def _free_owned(self, oid: bytes) -> None:
        """Loop thread: free the value of an owned object nothing references any more, and
        its lineage too unless it is pinned as the argument of a task of the lineage
        (then its entry stays; see reference_table.py)."""
        entry = self.refs.get(oid)
        if entry is not None and entry.total():  # re-referenced meanwhile (e.g. a late result)
            return
        if entry is None and oid in self.actors.handle_objects:
            self.memory.delete(oid)
            self.actors.on_handle_freed(oid)
            return
        if entry is None:
            self.submitter.released(oid)
        elsewhere = self._freed_elsewhere.pop(oid, None)
        if elsewhere:
            for addr in elsewhere:
                self.delete_stored(oid, Value(None, True, b"", addr))
        if entry is not None and self.memory.is_freed(oid):
            return  # lineage keeps the entry: it stays freed, so no re-run rebuilds it
        v = self.memory.delete(oid)
        if v is not None and v.in_store:
            self.delete_stored(oid, v)
            for addr in v.copies or ():
                self.delete_stored(oid, Value(None, True, b"", addr))

    def delete_stored(self, oid: bytes, v: Value) -> None:
        """Loop thread: batch deletes to the store that holds the object."""
        addr = v.store_address or self.store_address
        pending = self._store_deletes.get(addr)
        if pending is None:
            pending = self._store_deletes[addr] = []
            self.spawn(self._flush_deletes(addr))
        pending.append(oid)

    async def _flush_deletes(self, addr: str) -> None:
        await asyncio.sleep(0)
        oids = self._store_deletes.pop(addr, [])
        if oids:
            try:
                await self.store_client(addr).delete(oids)
            except Exception as exc:
                log.warning("could not free %d objects in store %s: %s", len(oids), addr, exc)

    def _on_release(self, oid: bytes, owner: Owner) -> None:
        self.post(self._release_borrowed, oid, owner)

    def _release_borrowed(self, oid: bytes, owner: Owner) -> None:
        if oid in self.refs:
            return
        self.memory.delete(oid)
        self.borrowers.remove(owner, self.address, oid)

    def _on_borrow(self, oid: bytes, owner: Owner) -> None:
        self.post(self.borrowers.add, owner, self.address, oid)

    # -- waiting for values (loop thread) ------------------------------------------------------------
    def wait_for_value(self, ref: ObjectRef, cb: Callable[[bytes, Value], None]) -> None:
        """cb(oid, value) once the value of ref is known here (fetching it from its owner)."""
        oid = ref._id
        memory = self.memory
        memory.add_waiter(oid, cb)
        if oid not in memory:
            if ref._owner[2] != self.worker_id:
                if oid not in self._fetching:
                    self._fetching.add(oid)
                    self.spawn(self._fetch_from_owner(oid, ref._owner))
            else:
                task = self.submitter.state.lineage.get(oid)
                if task is not None and task.done:
                    # Checked after what is being carried out now (its result may be on
                    # its way to the memory store): a finished task's value that is
                    # missing was freed.
                    self.loop.call_soon(self._rebuild_if_freed, oid)

    async def _fetch_from_owner(self, oid: bytes, owner: Owner,
                                lost: Optional[Tuple[str, bytes]] = None) -> None:
        """Learn oid's value (or location) from its owner, by long poll. `lost`: the
        store this process could not read it from (and that store's node), which the
        owner drops before it answers."""
        lost_store = lost[0] if lost else ""
        try:
            while True:
                try:
                    reply = await self._owner_stub(owner).GetObjectStatus(
                        core_worker_pb2.ObjectStatusRequest(object_ids=[oid], timeout_s=30.0,
                                                            lost_store_address=lost_store),
                        timeout=60)
                    lost_store = ""  # the owner has dropped it; later polls just wait
                except grpc.RpcError as exc:
                    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        copy = (f", and its copy in the object store of node {lost[1].hex()[:8]} "
                                f"({lost[0]}) cannot be read" if lost else "")
                        err = OwnerDiedError(oid.hex(), (
                            f"Object {oid.hex()} is lost: its owner (the process at "
                            f"{owner[0]}:{owner[1]}, worker {owner[2].hex()[:8]}) is "
                            f"unreachable ({exc.code().name}){copy}. The process that created "
                            f"the ObjectRef has exited (or its node died), and only the owner "
                            f"can rebuild an object."))
                        self.memory.put(oid, Value(serialize_error(err).to_bytes(), is_error=True))
                        return
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        continue
                    err = ObjectLostError(oid.hex(), (
                        f"Object {oid.hex()} cannot be fetched from its owner at "
                        f"{owner[0]}:{owner[1]}: {exc.code().name}: {exc.details()}"))
                    self.memory.put(oid, Value(serialize_error(err).to_bytes(), is_error=True))
                    return
                if reply.objects:
                    self.memory.put(oid, Value.from_proto(reply.objects[0]))
                    return
                if reply.unknown:
                    err = ObjectLostError(oid.hex(), (
                        f"Object {oid.hex()} is lost: its owner at {owner[0]}:{owner[1]} no longer "
                        f"has it (it was freed or its creating task was lost)."))
                    self.memory.put(oid, Value(serialize_error(err).to_bytes(), is_error=True))
                    return
        finally:
            self._fetching.discard(oid)

    def _wait_ready(self, refs: Sequence[ObjectRef], num: int, fut: concurrent.futures.Future,
                    registered: list, abort_on_error: bool = False) -> None:
        """Loop thread: resolve fut once `num` of refs are ready, or (for get) as soon as
        one of them is an error, which get() raises without waiting for the rest."""
        state = {"left": num}

        def cb(oid: bytes, value: Value) -> None:
            state["left"] -= 1
            if fut.done():
                return
            if state["left"] == 0:
                fut.set_result(None)
            elif abort_on_error and value.is_error:
                fut.set_result(None)
                # After _wait_ready returns: drop the waiters of the refs still pending.
                self.loop.call_soon(self._unregister, registered)

        for ref in refs:
            if fut.done():
                break
            registered.append((ref._id, cb))
            self.wait_for_value(ref, cb)

    def _unregister(self, registered: list) -> None:
        for oid, cb in registered:
            self.memory.remove_waiter(oid, cb)

    # -- API: put ----------------------------------------------------------------------------------------
    def put(self, value: Any, _owner: Optional[Owner] = None) -> ObjectRef:
        ser = serialize(value)
        oid = ids.new_put_id()
        return self.put_serialized(oid, ser)

    def put_serialized(self, oid: bytes, ser: Serialized) -> ObjectRef:
        ref = ObjectRef(oid, self.address, self)
        if ser.contained:
            self.refs.add_contained(oid, [(r._id, r._owner) for r in ser.contained])
        if ser.total_size <= config.INLINE_OBJECT_MAX_BYTES:
            value = Value(ser.to_bytes(), size=ser.total_size)
        else:
            value = self.write_to_store(oid, ser)
        self.memory.put_fresh(oid, value)
        return ref

    def write_to_store(self, oid: bytes, ser: Serialized) -> Value:
        store = self.store_client(self.store_address)
        size = ser.total_size
        path = self.run(store.create(oid, size))
        write_object(path, ser.chunks())
        # Waiting for the seal (~0.3 ms) keeps its RPC from running behind the caller's
        # next step (typically a get() of this very object).
        self.run(self._seal(store, oid))
        return Value(None, True, self.node_id, self.store_address, size,
                     is_error=ser.kind == KIND_ERROR)

    def _owner_to_tell(self, oid: bytes) -> Optional[Owner]:
        """User thread: who must learn of a copy of oid made here: its owner when this
        process holds a ref; for an argument of the running task (a value here, not a
        ref) the task's owner, which holds the ref while the task runs and passes the
        news on to the object's owner (UpdateBorrowers)."""
        owner = self._owner_of(oid)
        if owner is None:
            spec = task_context.current.get().spec
            if spec is not None and spec.owner.port:
                owner = (spec.owner.ip, spec.owner.port, spec.owner.worker_id)
        return owner

    async def _pull(self, oid: bytes, v: Value, owner: Optional[Owner]) -> Tuple[str, int]:
        """Have this node's store copy an object from a store that holds it (the stores
        move the bytes, once per node however many readers ask: object_pull.py) and
        tell `owner` (see _owner_to_tell), so the copy is freed with the original."""
        if self._puller is None:
            self._puller = ObjectPuller(self.store_client(self.store_address))
        result = await self._puller.pull(oid, holders_of(v.store_address, v.copies))
        if isinstance(result, PullFailed):
            # No holder delivered (result.failures: each one unreachable, missing or
            # refused). ObjectLostError makes _read_or_recover tell the owner, whose
            # state machine rebuilds the object or fails it; ObjectStoreFullError
            # (no room here) goes to the caller.
            raise result.error(lambda holder: self._describe_store(holder, v))
        if result.new_copy:
            if owner is not None and owner[2] != self.worker_id:
                self.borrowers.copied(owner, self.address, oid, self.store_address, self.node_id)
            else:
                self._record_copy(oid, self.store_address, self.node_id)
        return result.path, result.size

    @staticmethod
    def _describe_store(holder: str, v: Value) -> str:
        node = v.node_id if holder == v.store_address else (v.copies or {}).get(holder, b"")
        return f"node {node.hex()[:8]} ({holder})" if node else f"the object store at {holder}"

    def _owner_of(self, oid: bytes) -> Optional[Owner]:
        e = self.refs.get(oid)
        return e.owner if e is not None else None

    def _record_copy(self, oid: bytes, store_address: str, node_id: bytes = b"") -> None:
        if self.memory.is_freed(oid):  # copied before free(), and told after it
            elsewhere = self._freed_elsewhere.get(oid)
            if elsewhere is not None and store_address != self.store_address:
                elsewhere[store_address] = node_id  # (local_only) it goes with the object
            else:
                self.delete_stored(oid, Value(None, True, node_id, store_address))
            return
        v = self.memory.get(oid)
        if v is not None and v.in_store:
            if v.copies is None:
                v.copies = {}
            v.copies[store_address] = node_id

    async def _seal(self, store: StoreClient, oid: bytes) -> None:
        try:
            await store.seal([oid])
        except Exception as exc:
            log.warning("could not seal object %s: %s", oid.hex(), exc)

    # -- lost objects and lineage ----------------------------------------------------------------------------
    # What to do about a lost object is decided by the owner's state machine
    # (OwnerState.object_lost: rebuild it from its lineage, or fail it with the reason);
    # this section only notices losses (a read that failed, a borrower's report, a value
    # freed while only lineage kept it) and carries out the lineage's pins.
    def _read_or_recover(self, oid: bytes, v: Value, timeout: Optional[float]) -> Any:
        """User thread: the bytes of in-store value v. A read that fails (its store is
        unreachable, or no longer has it) makes the owner recover the value (rebuild it,
        or point at another copy), and the read is tried again with what it answers."""
        for _attempt in range(RECOVERY_ATTEMPTS):
            try:
                return self.map_from_store(oid, v)
            except ObjectLostError as exc:
                v = self._recover(oid, v, str(exc), timeout)
            if not v.in_store:
                return v.data  # an error, when it cannot be rebuilt
        return self.map_from_store(oid, v)

    def _recover(self, oid: bytes, v: Value, why: str, timeout: Optional[float]) -> Value:
        owner = self._owner_of(oid) or self.address
        self.post(self.location_lost, oid, v.store_address, why)
        self._block_until([_SlotRef(oid, owner)], 1, timeout)  # type: ignore[list-item]
        new = self.memory.get(oid)
        if new is None:  # freed meanwhile
            raise ObjectLostError(oid.hex(), f"Object {oid.hex()} was freed before get() finished")
        return new

    def location_lost(self, oid: bytes, store_address: str, why: str) -> None:
        """Loop thread: oid could not be read from the object store at store_address.
        The owner drops that location: another copy serves if there is one, else the
        state machine rebuilds the object or fails it. A borrower asks the owner again,
        telling it which store failed."""
        v = self.memory.get(oid)
        entry = self.refs.get(oid)
        owned = entry is not None and entry.owned
        node = b""
        if v is not None:
            if not v.in_store:
                return  # an inline value (or error) is never lost
            copies = v.copies
            if store_address != v.store_address:
                if copies and copies.pop(store_address, None) is not None and not copies:
                    v.copies = None  # a copy went; the original still serves
                return  # (else: read from elsewhere since, a newer value)
            node = v.node_id
            if owned and copies:
                addr, node_id = next(iter(copies.items()))
                nv = Value(None, True, node_id, addr, v.size, v.is_error)
                rest = {a: n for a, n in copies.items() if a != addr}
                nv.copies = rest or None
                log.warning("object %s: its copy in the object store at %s is lost; the copy "
                            "at %s serves from now on", oid.hex(), store_address, addr)
                self.memory.put(oid, nv)
                return
            self.memory.delete(oid)
        if owned:
            where = (f"its copy in the object store of node {node.hex()[:8]} ({store_address}) "
                     f"could not be read: {why}")
            self.submitter.feed(self.submitter.state.object_lost(oid, where))
        elif entry is not None and oid not in self._fetching:
            self._fetching.add(oid)
            self.spawn(self._fetch_from_owner(oid, entry.owner, (store_address, node)))

    def _rebuild_if_freed(self, oid: bytes) -> None:
        """Loop thread: someone waits for owned oid, whose task finished, and its value
        is not here: it was freed while only lineage kept it (an argument of a task run
        again), so it is rebuilt like a lost one."""
        if oid in self.memory or not self.memory.has_waiters(oid):
            return
        task = self.submitter.state.lineage.get(oid)
        if task is not None and task.done:
            self.submitter.feed(self.submitter.state.object_lost(
                oid, "its value was freed when only the lineage of a task that took it as an "
                     "argument kept it"))

    def pin_lineage(self, task: PendingTask) -> None:
        """Loop thread (PinLineage): keep the owned arguments of a task of the lineage;
        an argument with lineage of its own by its entry only, any other (a put object)
        with its value, which nothing could rebuild."""
        refs = self.refs
        lineage = self.submitter.state.lineage
        pins = []
        for oid in task.arg_ids:
            if oid in lineage:
                if refs.add_lineage(oid):
                    pins.append((oid, True))
            else:
                entry = refs.get(oid)
                if entry is not None and entry.owned:
                    refs.add_submitted((oid,))
                    pins.append((oid, False))
        task.pins = pins

    def unpin_lineage(self, task: PendingTask) -> None:
        """Loop thread (FreeLineage): undo pin_lineage."""
        pins, task.pins = task.pins, None
        if not pins:
            return
        refs = self.refs
        for oid, lineage_only in pins:
            if lineage_only:
                refs.remove_lineage(oid)
            else:
                refs.remove_submitted((oid,))

    def hold_args(self, task: PendingTask) -> None:
        """Loop thread (Resubmit): a task runs again; it holds its arguments as when it was
        submitted (store_returns releases them)."""
        if task.arg_ids:
            self.refs.add_submitted(task.arg_ids)

    def slot_ref(self, oid: bytes) -> Optional[_SlotRef]:
        """An argument of a task run again, with its owner; None if it is not known here
        any more (a borrowed one this process released)."""
        entry = self.refs.get(oid)
        return _SlotRef(oid, entry.owner) if entry is not None else None

    def fail_objects(self, oids: List[bytes], value: Value) -> None:
        """Loop thread (FailObjects): lost objects that cannot be rebuilt get the error."""
        for oid in oids:
            if oid in self.refs:
                self.memory.put(oid, value)

    # -- API: get / wait -----------------------------------------------------------------------------------
    def get(self, refs: Sequence[ObjectRef], timeout: Optional[float]) -> List[Any]:
        memory = self.memory
        values = [memory.get(r._id) for r in refs]
        missing = [r for r, v in zip(refs, values) if v is None]
        if missing:
            if not any(v is not None and v.is_error for v in values):
                self._block_until(missing, len(missing), timeout, abort_on_error=True)
                values = [memory.get(r._id) for r in refs]
            if any(v is None for v in values):
                # Woken early by a failure: raise it (the first in the list), as Ray does.
                for r, v in zip(refs, values):
                    if v is not None and v.is_error:
                        self._materialize(r._id, v)
        return [self._materialize(r._id, v, timeout) for r, v in zip(refs, values)]

    def _block_until(self, refs: Sequence[ObjectRef], num: int, timeout: Optional[float],
                     for_get: bool = True, abort_on_error: bool = False) -> bool:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        registered: list = []
        self.post(self._wait_ready, refs, num, fut, registered, abort_on_error)
        blocked = self.mode == WORKER and self.current_task_id is not None
        if blocked:
            self._set_blocked(True)
        try:
            fut.result(timeout)
            return True
        except concurrent.futures.TimeoutError:
            self.post(self._unregister, registered)
            if for_get and timeout is not None:
                pending = [r for r in refs if r._id not in self.memory]
                if pending:
                    raise GetTimeoutError(
                        f"get() timed out after {timeout:g}s; {len(pending)} of {len(refs)} "
                        f"objects not ready, e.g. {pending[0].hex()}") from None
            return False
        finally:
            if blocked:
                self._set_blocked(False)

    def _set_blocked(self, blocked: bool) -> None:
        """Lend this worker's CPU to the node while it waits (nested tasks must not deadlock)."""
        self._blocked_depth += 1 if blocked else -1
        if (blocked and self._blocked_depth == 1) or (not blocked and self._blocked_depth == 0):
            self.post(self.raylet.set_blocked, blocked)

    def _materialize(self, oid: bytes, v: Value, timeout: Optional[float] = None) -> Any:
        if v is None:
            raise ObjectLostError(oid.hex(), f"Object {oid.hex()} was freed before get() finished")
        if v.in_store:
            data = self._read_or_recover(oid, v, timeout)
        else:
            data = v.data
        kind, value = parse(data)
        if kind == KIND_ERROR:
            if isinstance(value, RayTaskError):
                raise value.as_instanceof_cause()
            raise value
        return value

    def map_from_store(self, oid: bytes, v: Value) -> memoryview:
        # Local: in this node's store (the node id changes when the raylet restarts;
        # the store, and its address, stay).
        local = not v.node_id or v.node_id == self.node_id or v.store_address == self.store_address
        if self._shm_dir and local:
            # Fast path: sealed objects live at a known path; map it without asking the
            # store. A spilled object is not there: then the store restores it.
            try:
                return map_object(os.path.join(self._shm_dir, object_file_name(
                    self._store_node_hex, oid)), v.size)
            except (FileNotFoundError, ValueError):
                pass
        if not local:
            path, size = self.run(self._pull(oid, v, self._owner_to_tell(oid)))
            return map_object(path, size)
        store = self.store_client(self.store_address)
        (obj,) = self.run(store.get([oid], SEALED_GRACE_S))
        if not obj.found:
            raise ObjectLostError(oid.hex(), (
                f"Object {oid.hex()} is not in the object store at {self.store_address}; it was "
                f"freed or the store restarted."))
        return map_object(obj.path, obj.size)

    def wait(self, refs: Sequence[ObjectRef], num_returns: int, timeout: Optional[float]
             ) -> Tuple[List[ObjectRef], List[ObjectRef]]:
        memory = self.memory
        ready_n = sum(1 for r in refs if r._id in memory)
        if ready_n < num_returns and timeout != 0:
            pending = [r for r in refs if r._id not in memory]
            self._block_until(pending, num_returns - ready_n, timeout, for_get=False)
        ready, not_ready = [], []
        for r in refs:
            if len(ready) < num_returns and r._id in memory:
                ready.append(r)
            else:
                not_ready.append(r)
        return ready, not_ready

    def ref_future(self, ref: ObjectRef) -> concurrent.futures.Future:
        out: concurrent.futures.Future = concurrent.futures.Future()

        def on_ready(oid: bytes, value: Value) -> None:
            if value.in_store:
                threading.Thread(target=self._resolve_future, args=(out, oid, value),
                                 daemon=True).start()
            else:
                self._resolve_future(out, oid, value)

        self.post(self.wait_for_value, ref, on_ready)
        out._runtime_ref = ref  # keep the ref (and so the value) alive until resolved
        return out

    def _resolve_future(self, out: concurrent.futures.Future, oid: bytes, value: Value) -> None:
        try:
            out.set_result(self._materialize(oid, value))
        except BaseException as exc:
            out.set_exception(exc)

    # -- API: free() (runtime/_private/internal_api.py) ----------------------------------------------------
    # As in Ray, free() is the owner's to carry out: the caller frees the objects it owns
    # and sends the others to their owners (FreeObjects, Ray's DeleteObjects), and marks
    # them freed in its own memory store too. The owner makes ObjectFreedError the value
    # for good (MemoryStore.mark_freed: no later result or re-run replaces it) and deletes
    # the copies; borrowers learn the error when they ask it (GetObjectStatus), or when a
    # copy they knew of is gone (location_lost asks it again).
    def free_objects(self, refs: Sequence[ObjectRef], local_only: bool) -> None:
        """User thread: free() of `refs`; returns once their owners and stores dropped
        the values (or after FREE_TIMEOUT_S, logging what did not answer)."""
        targets = [(r._id, r._owner) for r in refs]
        self.run(self._free_objects(targets, local_only), FREE_TIMEOUT_S + 5)

    async def _free_objects(self, targets: List[Tuple[bytes, Owner]], local_only: bool) -> None:
        only_store = self.store_address if local_only else ""
        mine: List[bytes] = []
        by_owner: Dict[Owner, List[bytes]] = {}
        for oid, owner in targets:
            if owner[2] == self.worker_id:
                mine.append(oid)
            else:
                by_owner.setdefault(owner, []).append(oid)
                self.memory.mark_freed(oid, _freed_value(oid))
        waits = [self._free_owned_now(mine, only_store)]
        waits.extend(self._free_at_owner(owner, oids, only_store)
                     for owner, oids in by_owner.items())
        await asyncio.gather(*waits)

    async def _free_owned_now(self, oids: List[bytes], only_store: str) -> None:
        """Loop thread: free owned objects: ObjectFreedError becomes their value, and their
        copies are deleted (with `only_store`, only the one there: the others go when the
        object goes out of scope). An object already out of scope is skipped, as in Ray."""
        deletes: Dict[str, List[bytes]] = {}
        for oid in oids:
            entry = self.refs.get(oid)
            if entry is None or not entry.owned:
                continue
            old = self.memory.mark_freed(oid, _freed_value(oid))
            elsewhere = self._freed_elsewhere.setdefault(oid, {}) if only_store else None
            if old is None or not old.in_store:
                continue  # inline, or its task has not returned (store_returns drops it)
            places = dict(old.copies or {})
            places[old.store_address or self.store_address] = old.node_id
            for addr, node_id in places.items():
                if elsewhere is not None and addr != only_store:
                    elsewhere[addr] = node_id
                else:
                    deletes.setdefault(addr, []).append(oid)
        await asyncio.gather(*(self._delete_now(addr, ids_) for addr, ids_ in deletes.items()))

    async def _delete_now(self, addr: str, oids: List[bytes]) -> None:
        try:
            await asyncio.wait_for(self.store_client(addr).delete(oids), FREE_TIMEOUT_S)
        except Exception as exc:  # the store (or its node) is gone: so are the copies
            log.warning("free(): could not delete %d objects in the object store at %s: %s",
                        len(oids), addr, exc)

    async def _free_at_owner(self, owner: Owner, oids: List[bytes], only_store: str) -> None:
        request = core_worker_pb2.FreeObjectsRequest(object_ids=oids,
                                                     only_store_address=only_store)
        try:
            await self._owner_stub(owner).FreeObjects(request, timeout=FREE_TIMEOUT_S)
        except grpc.RpcError as exc:  # the owner is gone: its objects are lost anyway
            log.warning("free(): the owner of %d objects (the process at %s:%s, worker %s) "
                        "did not take the request: %s: %s", len(oids), owner[0], owner[1],
                        owner[2].hex()[:8], exc.code().name, exc.details())

    # -- API: tasks ------------------------------------------------------------------------------------------
    def submit(self, task: PendingTask) -> None:
        if task.arg_ids:
            self.refs.add_submitted(task.arg_ids)
        self.post(self.submitter.submit, task)

    def cancel(self, ref: ObjectRef, force: bool, recursive: bool = True) -> None:
        async def cancel() -> None:  # after the submission the caller posted before
            self.submitter.cancel(ref.task_id(), force, recursive)

        self.run(cancel(), timeout=30)

    def arg_locations(self, refs: Sequence[ObjectRef]) -> List[common_pb2.ObjectLocation]:
        """User thread: wait until every ref's value is known here; their locations."""
        self._block_until(refs, len(refs), None)
        return [self.memory.get(r._id).to_proto(r._id) for r in refs]

    # -- the executor's host (executor.ExecutorHost) ---------------------------------------------------
    def enter_job(self, job: common_pb2.JobConfig) -> None:
        """A worker now runs the tasks of `job` (from its stream's first batch)."""
        self.job_id = job.job_id
        self.job_config = job

    def host_actor(self, actor_id: bytes) -> None:
        """This worker's process hosts `actor_id` from now on (its creation task runs)."""
        self.current_actor_id = actor_id

    def exit_soon(self, delay: float) -> None:
        """exit_actor(): leave the process `delay` seconds from now, once the exit notice
        and the failing result have had their chance to go out (any thread)."""
        self.post(self.loop.call_later, delay, os._exit, 0)

    def results_must_wait(self) -> bool:
        """Borrower registrations (and what the task printed) go out before its result."""
        out = self.output
        return self.borrowers.has_pending() or (out is not None and out.has_pending())

    async def flush_before_results(self) -> None:
        await self.borrowers.flush()
        if self.output is not None:
            await self.output.flush()

    def add_borrower_at(self, owner: Owner, borrower: Owner, oid: bytes) -> None:
        """Any thread: register `borrower` with `oid`'s owner (ordered, batched)."""
        self.post(self.borrowers.add, owner, borrower, oid)

    # -- the submitter's host (submitter.OwnerHost) ---------------------------------------------------
    def store_returns(self, task: PendingTask, values: List[Value]) -> None:
        """Loop thread: a task is over. Its return values go into the memory store
        (those nobody references any more are freed at once), and the references it
        held on its arguments are released."""
        refs = self.refs
        memory = self.memory
        freed = memory.freed
        again = task.attempt > 0  # a retry, or a run to rebuild lost objects
        for i, oid in enumerate(task.return_ids):
            v = values[i] if i < len(values) else values[-1]
            e = refs.get(oid)
            if freed and oid in freed:  # free() while the task ran: the value is dropped
                if v.in_store:
                    self.delete_stored(oid, v)
            elif e is not None and (not e.lineage or e.total()):  # (only lineage: not wanted)
                if again:
                    old = memory.get(oid)
                    if old is not None and old.in_store and old.store_address != v.store_address:
                        self.delete_stored(oid, old)  # the copy this run replaces
                memory.put(oid, v)
            elif v.in_store:
                self.delete_stored(oid, v)
        if task.arg_ids:
            refs.remove_submitted(task.arg_ids)

    def add_contained(self, loc: common_pb2.ObjectLocation) -> None:
        """Loop thread: a returned value holds refs: they live as long as it does."""
        self.refs.add_contained(loc.object_id, [
            (c.object_id, (c.owner.ip, c.owner.port, c.owner.worker_id)) for c in loc.contained])

    # -- placement groups ----------------------------------------------------------------------------
    def placement_group_ready_ref(self, pg) -> ObjectRef:
        """An owned ref that gets `pg` as its value once the GCS reports it CREATED."""
        oid = ids.new_put_id()
        ref = ObjectRef(oid, self.address, self)
        self.post(self._start_pg_wait, oid, pg)
        return ref

    def _start_pg_wait(self, oid: bytes, pg) -> None:
        if self.owns_cluster and self.raylet_error is not None:
            self._fail_value(oid, self.raylet_error)  # nothing can be placed any more
            return
        task = self._pg_waits[oid] = asyncio.ensure_future(self._await_pg(oid, pg))
        task.add_done_callback(lambda _t: self._pg_waits.pop(oid, None))

    def _fail_value(self, oid: bytes, error: Exception) -> None:
        self.memory.put(oid, Value(serialize_error(error).to_bytes(), is_error=True))

    async def _await_pg(self, oid: bytes, pg) -> None:
        from runtime.exceptions import PlacementGroupSchedulingError, RayError
        from runtime.protocol import gcs_pb2

        version = 0
        while oid in self.refs:
            try:
                reply = await self.gcs_client.call(
                    "GetPlacementGroup", gcs_pb2.PlacementGroupRequest(
                        placement_group_id=pg.id.binary(), newer_than=version, timeout_s=30),
                    timeout=60, doing=f"waiting for placement group {pg.id.hex()}")
            except RayError as err:  # the GCS is gone for good, or refused the call
                self.memory.put(oid, Value(serialize_error(err).to_bytes(), is_error=True))
                return
            info = reply.info
            if not reply.found or info.state == "REMOVED":
                err = PlacementGroupSchedulingError(
                    f"placement group {pg.id.hex()} was removed before it was created")
                self.memory.put(oid, Value(serialize_error(err).to_bytes(), is_error=True))
                return
            if info.state == "CREATED":
                self.memory.put(oid, Value(serialize(pg).to_bytes()))
                return
            version = info.version

    # -- CoreWorker service ---------------------------------------------------------------------------------
    async def GetObjectStatus(self, request, context):
        reply = core_worker_pb2.ObjectStatusReply()
        if request.lost_store_address:
            for oid in request.object_ids:
                self.location_lost(oid, request.lost_store_address,
                                   "a process that borrows it could not read it there")
        waits = []
        for oid in request.object_ids:
            v = self.memory.get(oid)
            if v is not None:
                reply.objects.append(v.to_proto(oid))
            elif oid in self.refs and self.refs.get(oid).owned:
                waits.append(oid)
            else:
                reply.unknown.append(oid)
        if waits and not reply.objects:
            fut = self.loop.create_future()

            def cb(oid: bytes, value: Value) -> None:
                if not fut.done():
                    fut.set_result((oid, value))

            for oid in waits:
                self.memory.add_waiter(oid, cb)
                task = self.submitter.state.lineage.get(oid)
                if task is not None and task.done:
                    self.loop.call_soon(self._rebuild_if_freed, oid)
            try:
                oid, value = await asyncio.wait_for(fut, request.timeout_s or 30.0)
                reply.objects.append(value.to_proto(oid))
            except asyncio.TimeoutError:
                pass
            finally:
                for oid in waits:
                    self.memory.remove_waiter(oid, cb)
        return reply

    async def UpdateBorrowers(self, request, context):
        b = request.borrower
        borrower = (b.ip, b.port, b.worker_id)
        for oid in request.add:
            self.refs.add_borrower(oid, borrower)
        for oid in request.copies:
            entry = self.refs.get(oid)
            if entry is not None and not entry.owned:
                # A copy of an argument of a task this process submitted, made by its
                # worker: the object's owner is the one to free it (see _owner_to_tell).
                self.borrowers.copied(entry.owner, self.address, oid,
                                      request.copy_store_address, request.copy_node_id)
            else:
                self._record_copy(oid, request.copy_store_address, request.copy_node_id)
        for oid in request.remove:
            self.refs.remove_borrower(oid, borrower)
        return common_pb2.Empty()

    async def PushTasks(self, request_iterator, context):
        if self.executor is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this process is a driver; it does not execute tasks")
        async for batch in self.executor.serve_stream(request_iterator):
            yield batch

    async def CancelTask(self, request, context):
        found = self.executor.cancel(request.task_id, request.force) if self.executor else False
        if request.recursive:  # the tasks it submitted are this process's to cancel
            self.submitter.cancel_children(request.task_id, request.force)
        return core_worker_pb2.CancelReply(found=found)

    async def WaitForExit(self, request, context):
        await self._exit_event.wait()
        return common_pb2.Empty()

    async def ListObjects(self, request, context):
        reply = core_worker_pb2.OwnedObjects(pid=os.getpid(), ip=self.node_ip,
                                             worker_id=self.worker_id,
                                             is_driver=self.mode == DRIVER)
        for oid, counts in self.refs.snapshot().items():
            if not counts["owned"] or oid in self.actors.handle_objects:
                continue
            if not (counts["local"] or counts["submitted"] or counts["borrowers"]
                    or counts["contained"]):
                continue  # only the lineage of a task keeps it: its value is freed
            v = self.memory.get(oid)
            reply.objects.add(object_id=oid, size=v.size if v else 0,
                              in_store=bool(v and v.in_store), local_refs=counts["local"],
                              submitted_refs=counts["submitted"], borrowers=counts["borrowers"],
                              contained_refs=counts["contained"],
                              task_status="FINISHED" if v is not None else "PENDING")
        return reply

    async def FreeObjects(self, request, context):
        await self._free_owned_now(list(request.object_ids), request.only_store_address)
        return common_pb2.Empty()

    async def PrintLines(self, request, context):
        from runtime.core_worker.task_output import print_lines

        print_lines(request)
        return common_pb2.Empty()

    async def Exit(self, request, context):
        if self.executor is not None:
            self.executor.request_exit()
        return common_pb2.Empty()
