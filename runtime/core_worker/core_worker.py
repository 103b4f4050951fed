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

The read side (get/wait, values learnt from owners, copies pulled from other nodes'
stores, the recovery of lost objects, free()) is ObjectReads (object_reads.py), a mixin
of CoreWorker. This module keeps the lifecycle, the connections (raylet, GCS, owners,
object stores), the loop plumbing, put() and the glue of task submission and execution.
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
from runtime.core_worker.object_pull import ObjectPuller
from runtime.core_worker.object_reads import ObjectReads
from runtime.core_worker.raylet_client import RayletClient
from runtime.core_worker.reference_table import ReferenceTable, RefEntry
from runtime.core_worker.submitter import PendingTask, TaskSubmitter
from runtime.core_worker.task_events import TaskEventBuffer
from runtime.exceptions import GetTimeoutError, RayletDiedError
from runtime.object_ref import ObjectRef
from runtime.object_store.client import StoreClient, write_object
from runtime.protocol import (common_pb2, core_worker_pb2, core_worker_pb2_grpc, gcs_pb2_grpc,
                              raylet_pb2)
from runtime.core_worker.gcs_client import GcsClient
from runtime.serialization import KIND_ERROR, Serialized, serialize, serialize_error

log = logging.getLogger("runtime.core_worker")

DRIVER = "driver"
WORKER = "worker"
Owner = Tuple[str, int, bytes]


async def _await(make):
    return await make()


def _describe_connect_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, asyncio.TimeoutError):
        return "registration timed out"
    return str(exc) or type(exc).__name__


class CoreWorker(ObjectReads, core_worker_pb2_grpc.CoreWorkerServicer):
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

    async def _seal(self, store: StoreClient, oid: bytes) -> None:
        try:
            await store.seal([oid])
        except Exception as exc:
            log.warning("could not seal object %s: %s", oid.hex(), exc)

    # -- a user thread waiting for values (get/wait: object_reads.py) ------------------------
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
    # (GetObjectStatus, the owner's answer to readers, is ObjectReads': object_reads.py)
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
