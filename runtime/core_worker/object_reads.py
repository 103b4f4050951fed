"""The read side of the core worker: get() and wait(), values learnt from their owners,
copies pulled from other nodes' object stores, the recovery of lost objects (and the
lineage pins that make it possible), and free().

ObjectReads is a mixin of CoreWorker (core_worker.py), which keeps the process's
lifecycle, its connections and loop plumbing (run, post, spawn, and _block_until, where
a user thread waits for values), put() and the glue of task submission. The methods
here work on the core worker's memory store, reference table, object-store clients and
submitter through ``self``; what they run on (a user thread or the loop thread) is said
in each docstring. What to do about a lost object is decided by the owner's state
machine (owner_lineage.py); this module notices losses and carries out its pins.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import grpc

from runtime.core_worker import task_context
from runtime.core_worker.memory_store import Value
from runtime.core_worker.object_pull import ObjectPuller, PullFailed, holders_of
from runtime.core_worker.owner_records import PendingTask
from runtime.core_worker.reference_table import Owner
from runtime.exceptions import ObjectFreedError, ObjectLostError, OwnerDiedError, RayTaskError
from runtime.object_ref import ObjectRef
from runtime.object_store.client import map_object
from runtime.object_store.store import object_file_name
from runtime.protocol import core_worker_pb2
from runtime.serialization import KIND_ERROR, parse, serialize_error

log = logging.getLogger("runtime.core_worker")

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



def _freed_value(oid: bytes) -> Value:
    """The value a freed object has from now on: its ObjectFreedError, as Ray stores
    OBJECT_FREED in its memory store."""
    err = ObjectFreedError(oid.hex(), (
        f"Object {oid.hex()} was freed with free() (ray._private.internal_api.free) and "
        f"cannot be read or reconstructed. Call free() only once no task or get() needs "
        f"the object any more."))
    return Value(serialize_error(err).to_bytes(), is_error=True)



class ObjectReads:
    """The read side of a CoreWorker; see the module docstring."""

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

    # -- copies pulled from other nodes' object stores -----------------------------------------
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

    # -- the owner's answer to readers (CoreWorker service) ----------------------------------
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
