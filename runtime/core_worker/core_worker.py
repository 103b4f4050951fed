"""CoreWorker: the per-process runtime (drivers and workers).

Threads: the user's threads call the API (put/get/wait/submit); one event-loop
thread ("runtime-io") does all I/O: the CoreWorker gRPC server, the raylet
stream, task streams to workers, object-store calls. User threads hand work to
the loop through a batched inbox (one wake-up for many submissions) and block
on concurrent futures; values already in the memory store are returned
without touching the loop at all.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import grpc

from runtime import config, ids, rpc
from runtime.core_worker.borrowers import BorrowerNotifier
from runtime.core_worker.memory_store import MemoryStore, Value
from runtime.core_worker.raylet_client import RayletClient
from runtime.core_worker.reference_table import ReferenceTable, RefEntry
from runtime.core_worker.submitter import PendingTask, TaskSubmitter
from runtime.exceptions import (GetTimeoutError, ObjectLostError, OwnerDiedError, RayTaskError)
from runtime.object_ref import ObjectRef
from runtime.object_store.client import StoreClient, map_object, write_object
from runtime.object_store.store import object_file_name
from runtime.protocol import (common_pb2, core_worker_pb2, core_worker_pb2_grpc, raylet_pb2)
from runtime.serialization import KIND_ERROR, Serialized, parse, serialize, serialize_error

log = logging.getLogger("runtime.core_worker")

DRIVER = "driver"
WORKER = "worker"
Owner = Tuple[str, int, bytes]


async def _await(make):
    return await make()


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
        self.job_id = job_id
        self.worker_id = worker_id or ids.random_id(ids.WORKER_ID_SIZE)
        self.startup_token = startup_token
        self.namespace = namespace
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
        self.submitter = TaskSubmitter(self)
        from runtime.core_worker.actor_submitter import ActorSubmitter

        self.actors = ActorSubmitter(self)
        from runtime.core_worker.task_events import TaskEventBuffer

        self.task_events = TaskEventBuffer(self, config.TASK_EVENTS_ENABLED)
        self.current_actor_id: Optional[bytes] = None
        self.current_placement_group: Optional[Tuple[bytes, bool]] = None
        self._exit_event: Optional[asyncio.Event] = None
        self.borrowers = BorrowerNotifier(self._owner_stub)
        self.raylet: RayletClient = None  # type: ignore[assignment]
        self.server: Optional[grpc.aio.Server] = None
        self.executor = None  # set on workers (runtime/core_worker/executor.py)
        self.current_task_id: Optional[bytes] = None
        self.current_task_name = ""
        self.output = None  # OutputForwarder on workers (runtime/core_worker/task_output.py)
        self.current_gpu_ids: List[int] = []
        self.connected = False
        self.on_raylet_lost: Optional[Callable[[str], None]] = None
        self._blocked_depth = 0
        self._shm_dir = ""
        self._pulls: Dict[bytes, asyncio.Future] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

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
        self.raylet = RayletClient(self.channel(self.raylet_address), self.submitter.on_grant,
                                   self._raylet_lost)
        await self.raylet.connect(raylet_pb2.RegisterClient(
            worker_id=self.worker_id, is_driver=self.mode == DRIVER, pid=os.getpid(), port=self.port,
            job_id=self.job_id, startup_token=self.startup_token))
        self.task_events.start()
        try:
            self._shm_dir = (await self.store_client(self.store_address).stats()).shm_dir
        except Exception:  # the store answers later; reads then go through it
            log.debug("object store stats unavailable", exc_info=True)
        self.connected = True

    def _raylet_lost(self, reason: str) -> None:
        self.connected = False
        if self.on_raylet_lost is not None:
            self.on_raylet_lost(reason)
        else:
            log.error("%s", reason)

    def shutdown(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.run(self._shutdown(), timeout)
        except Exception:
            log.debug("core worker shutdown did not finish cleanly", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)

    async def _shutdown(self) -> None:
        self.connected = False
        if self._exit_event is not None:
            self._exit_event.set()
        await self.task_events.flush()
        self.task_events.close()
        self.submitter.close()
        await self.submitter.close_remote_raylets()
        self.actors.close()
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

    # -- loop plumbing -------------------------------------------------------------------------------
    def run(self, coro, timeout: Optional[float] = None):
        """Run a coroutine on the loop from a user thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, make: Callable[[], Any], timeout: Optional[float] = None):
        """Make a gRPC call on the loop (calls and channels belong to the loop) and wait."""
        return self.run(_await(make), timeout)

    def post(self, fn: Callable, *args) -> None:
        """Run fn(*args) on the loop soon; many posts share one wake-up."""
        if threading.get_ident() == getattr(self._thread, "ident", None):
            fn(*args)
            return
        self._inbox.append((fn, args))
        if not self._inbox_scheduled:
            self._inbox_scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain_inbox)
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
            c = self._stores[address] = StoreClient(address, self.token)
        return c

    # -- reference-table callbacks (any thread) -----------------------------------------------------
    def _on_free(self, oid: bytes, entry: RefEntry) -> None:
        self.post(self._free_owned, oid)

    def _free_owned(self, oid: bytes) -> None:
        if oid in self.refs:  # re-referenced meanwhile (e.g. a late result)
            return
        if oid in self.actors.handle_objects:
            self.memory.delete(oid)
            self.actors.on_handle_freed(oid)
            return
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
            asyncio.ensure_future(self._flush_deletes(addr))
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
        self.memory.add_waiter(oid, cb)
        if oid not in self.memory and ref._owner[2] != self.worker_id and oid not in self._fetching:
            self._fetching.add(oid)
            asyncio.ensure_future(self._fetch_from_owner(oid, ref._owner))

    async def _fetch_from_owner(self, oid: bytes, owner: Owner) -> None:
        try:
            while True:
                try:
                    reply = await self._owner_stub(owner).GetObjectStatus(
                        core_worker_pb2.ObjectStatusRequest(object_ids=[oid], timeout_s=30.0),
                        timeout=60)
                except grpc.RpcError as exc:
                    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        err = OwnerDiedError(oid.hex(), (
                            f"Object {oid.hex()} is lost: its owner (pid-less address "
                            f"{owner[0]}:{owner[1]}) is unreachable ({exc.code().name}); the "
                            f"process that created the ObjectRef has exited."))
                        self.memory.put(oid, Value(serialize_error(err).to_bytes(), is_error=True))
                        return
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        continue
                    raise
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
                    registered: list) -> None:
        """Loop thread: resolve fut once `num` of refs are ready."""
        state = {"left": num}

        def cb(oid: bytes, value: Value) -> None:
            state["left"] -= 1
            if state["left"] == 0 and not fut.done():
                fut.set_result(None)

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
        # A fresh id has no waiters: a plain store is enough (and visible at once).
        self.memory._values[oid] = value
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

    async def _pull(self, oid: bytes, v: Value) -> Tuple[str, int]:
        """Copy an object from another node's store into ours (once, however many readers
        ask at the same time) and tell its owner, who frees the copy with the original."""
        fut = self._pulls.get(oid)
        if fut is None:
            fut = self._pulls[oid] = asyncio.ensure_future(self._pull_once(oid, v))
            fut.add_done_callback(lambda _f: self._pulls.pop(oid, None))
        return await asyncio.shield(fut)

    async def _pull_once(self, oid: bytes, v: Value) -> Tuple[str, int]:
        local = self.store_client(self.store_address)
        (have,) = await local.get([oid], 0.0)
        if have.found:
            return have.path, have.size
        path = None
        fd = -1
        try:
            async for chunk in self.store_client(v.store_address).read(oid):
                if not chunk.found:
                    raise ObjectLostError(oid.hex(), (
                        f"Object {oid.hex()} is no longer in the object store of node "
                        f"{v.node_id.hex()[:8]} ({v.store_address}); it was freed or that "
                        f"node's store restarted."))
                if path is None:
                    path = await local.create(oid, chunk.size)
                    fd = os.open(path, os.O_WRONLY)
                if chunk.data:
                    os.pwrite(fd, chunk.data, chunk.offset)
        except grpc.RpcError as exc:
            raise ObjectLostError(oid.hex(), (
                f"Object {oid.hex()} cannot be fetched from node {v.node_id.hex()[:8]} "
                f"({v.store_address}): {exc.code().name}; that node may be down.")) from None
        finally:
            if fd >= 0:
                os.close(fd)
        await local.seal([oid])
        owner = self._owner_of(oid)
        if owner is not None and owner[2] != self.worker_id:
            self.borrowers.copied(owner, self.address, oid, self.store_address)
        else:
            self._record_copy(oid, self.store_address)
        return path, v.size

    def _owner_of(self, oid: bytes) -> Optional[Owner]:
        e = self.refs.get(oid)
        return e.owner if e is not None else None

    def _record_copy(self, oid: bytes, store_address: str) -> None:
        v = self.memory.get(oid)
        if v is not None and v.in_store:
            if v.copies is None:
                v.copies = set()
            v.copies.add(store_address)

    async def _seal(self, store: StoreClient, oid: bytes) -> None:
        try:
            await store.seal([oid])
        except Exception as exc:
            log.warning("could not seal object %s: %s", oid.hex(), exc)

    # -- API: get / wait -----------------------------------------------------------------------------------
    def get(self, refs: Sequence[ObjectRef], timeout: Optional[float]) -> List[Any]:
        memory = self.memory
        values = [memory.get(r._id) for r in refs]
        missing = [r for r, v in zip(refs, values) if v is None]
        if missing:
            self._block_until(missing, len(missing), timeout)
            values = [memory.get(r._id) for r in refs]
        return [self._materialize(r._id, v) for r, v in zip(refs, values)]

    def _block_until(self, refs: Sequence[ObjectRef], num: int, timeout: Optional[float],
                     for_get: bool = True) -> bool:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        registered: list = []
        self.post(self._wait_ready, refs, num, fut, registered)
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

    def _materialize(self, oid: bytes, v: Value) -> Any:
        if v is None:
            raise ObjectLostError(oid.hex(), f"Object {oid.hex()} was freed before get() finished")
        if v.in_store:
            data = self.map_from_store(oid, v)
        else:
            data = v.data
        kind, value = parse(data)
        if kind == KIND_ERROR:
            if isinstance(value, RayTaskError):
                raise value.as_instanceof_cause()
            raise value
        return value

    def map_from_store(self, oid: bytes, v: Value) -> memoryview:
        if self._shm_dir and (not v.node_id or v.node_id == self.node_id):
            # Fast path: sealed objects live at a known path; map it without asking the
            # store. A spilled object is not there: then the store restores it.
            try:
                return map_object(os.path.join(self._shm_dir, object_file_name(
                    self.node_id.hex(), oid)), v.size)
            except (FileNotFoundError, ValueError):
                pass
        if v.node_id and v.node_id != self.node_id:
            path, size = self.run(self._pull(oid, v))
            return map_object(path, size)
        store = self.store_client(self.store_address)
        (obj,) = self.run(store.get([oid], 30.0))
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

    # -- API: tasks ------------------------------------------------------------------------------------------
    def submit(self, task: PendingTask) -> None:
        if task.arg_ids:
            self.refs.add_submitted(task.arg_ids)
        self.post(self.submitter.submit, task)

    def cancel(self, ref: ObjectRef, force: bool) -> None:
        async def cancel() -> None:  # after the submission the caller posted before
            self.submitter.cancel(ref.task_id(), force)

        self.run(cancel(), timeout=30)

    # -- placement groups ----------------------------------------------------------------------------
    def placement_group_ready_ref(self, pg) -> ObjectRef:
        """An owned ref that gets `pg` as its value once the GCS reports it CREATED."""
        oid = ids.new_put_id()
        ref = ObjectRef(oid, self.address, self)
        self.post(lambda: asyncio.ensure_future(self._await_pg(oid, pg)))
        return ref

    async def _await_pg(self, oid: bytes, pg) -> None:
        from runtime.exceptions import PlacementGroupSchedulingError
        from runtime.protocol import gcs_pb2, gcs_pb2_grpc

        stub = gcs_pb2_grpc.GcsStub(self.channel(self.gcs_address))
        version = 0
        while oid in self.refs:
            try:
                reply = await stub.GetPlacementGroup(gcs_pb2.PlacementGroupRequest(
                    placement_group_id=pg.id.binary(), newer_than=version, timeout_s=30), timeout=60)
            except grpc.RpcError:
                await asyncio.sleep(1.0)
                continue
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
            self._record_copy(oid, request.copy_store_address)
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
            v = self.memory.get(oid)
            reply.objects.add(object_id=oid, size=v.size if v else 0,
                              in_store=bool(v and v.in_store), local_refs=counts["local"],
                              submitted_refs=counts["submitted"], borrowers=counts["borrowers"],
                              contained_refs=counts["contained"],
                              task_status="FINISHED" if v is not None else "PENDING")
        return reply

    async def PrintLines(self, request, context):
        from runtime.core_worker.task_output import print_lines

        print_lines(request)
        return common_pb2.Empty()

    async def Exit(self, request, context):
        if self.executor is not None:
            self.executor.request_exit()
        return common_pb2.Empty()
