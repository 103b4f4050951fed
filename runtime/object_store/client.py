"""Talking to a node's object store, and reading and writing object files directly.

The store hands out file paths; the bytes never travel over gRPC. A writer calls
``create`` (which reserves room and makes the file), ``write_object`` and
``seal``; a reader calls ``get`` and ``map_object``, which maps the file
read-only, so values deserialized with pickle protocol 5 buffers over the
mapping (numpy arrays) are zero-copy views of shared memory.

A mapping stays valid after the store unlinks the file (on Delete or when it
spills the object): the kernel keeps the pages until the last mapping is gone.
A process maps each object file once, however many values it reads from it
(see ``map_object``).

Every StoreClient call that fails raises an error of ``runtime.exceptions``
(ValueError for a rejected argument) naming the store's address and node, never
a gRPC error; ``read`` alone, a stream, leaves its errors to its caller.
"""
from __future__ import annotations

import asyncio
import functools
import mmap
import os
import sys
import weakref
from typing import Any, Awaitable, Iterable, Sequence, TypeVar

import grpc

from runtime import rpc
from runtime.object_store.reclaim import process_identity
from runtime.protocol import common_pb2, object_store_pb2, object_store_pb2_grpc

_T = TypeVar("_T")

# Linux accepts at most IOV_MAX (1024) buffers per writev call.
_IOV_MAX = 1024
# Writes above this size run in a thread in StoreClient.put, off the event loop.
_THREAD_WRITE_BYTES = 1 << 20
# Extra seconds the RPC deadline of a Get allows beyond its wait.
_GET_RPC_SLACK_S = 30.0


def _byte_view(chunk: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of any contiguous buffer (numpy arrays, PickleBuffer.raw(), ...)."""
    view = memoryview(chunk)
    if view.format == "B" and view.ndim == 1:
        return view
    if not view.contiguous:
        raise ValueError("object chunks must be contiguous buffers "
                         "(use PickleBuffer.raw() or numpy.ascontiguousarray)")
    return view.cast("B")


def write_object(path: str, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
    """Write chunks back to back into the object file the store created.

    One pwritev per up to 1024 chunks, resuming after partial writes (the kernel
    writes at most ~2 GiB per call), so a large value is written at memory speed
    without being joined into one Python buffer first.
    """
    views = [v for v in (_byte_view(c) for c in chunks) if v.nbytes]
    total = sum(v.nbytes for v in views)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        file_size = os.fstat(fd).st_size
        if total > file_size:
            raise ValueError(f"{total} bytes do not fit in object file {path} "
                             f"of {file_size} bytes (created with a smaller size)")
        offset = 0
        i = 0
        while i < len(views):
            batch = views[i:i + _IOV_MAX]
            written = os.pwritev(fd, batch, offset)
            if written <= 0:
                raise OSError(f"pwritev wrote {written} bytes to {path} at offset {offset}")
            offset += written
            # Skip the fully written chunks; keep the unwritten tail of a partial one.
            while written and i < len(views):
                n = views[i].nbytes
                if written >= n:
                    written -= n
                    i += 1
                else:
                    views[i] = views[i][written:]
                    written = 0
    finally:
        os.close(fd)


# The live mapping of each object file in this process, by (device, inode, size); held
# weakly, so a mapping is unmapped when its last view goes.
_mappings: dict[tuple[int, int, int], weakref.ref] = {}
# Before Python 3.13 every mmap object keeps a dup of the file descriptor open for
# its lifetime; from 3.13 on it need not, so many live objects cost no descriptors.
_MMAP_OPTIONS: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def _forget_mapping(key: tuple[int, int, int], ref: weakref.ref) -> None:
    if _mappings.get(key) is ref:
        _mappings.pop(key, None)


def map_object(path: str, size: int) -> memoryview:
    """A read-only, zero-copy view of an object file (shm or spill file).

    Two reads of one object in a process share one mapping (two get()s of a
    large array return views of the same memory, not twice the memory). The
    mapping is found by the file's inode, not its name: a mapping pins its
    inode, so while it lives no other file can have that inode, and an object
    freed and created again under the same id (a new file) is mapped afresh.
    The view keeps the mapping alive, and the mapping outlives the file's
    unlinking; the file descriptor is closed at once.
    """
    if size == 0:
        return memoryview(b"")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_size < size:
            # Mapping past the end would SIGBUS on access instead of raising.
            raise ValueError(f"object file {path} has {st.st_size} bytes, expected {size}")
        key = (st.st_dev, st.st_ino, size)
        ref = _mappings.get(key)
        mapping = ref() if ref is not None else None
        if mapping is None:
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                                **_MMAP_OPTIONS)
            _mappings[key] = weakref.ref(mapping, functools.partial(_forget_mapping, key))
    finally:
        os.close(fd)
    return memoryview(mapping)


def _full_error(message: str) -> Exception:
    from runtime.exceptions import ObjectStoreFullError  # imported late: written separately

    return ObjectStoreFullError(message)


_creator_message: object_store_pb2.Creator | None = None


def _creator() -> object_store_pb2.Creator:
    """This process as the writer of the objects it creates (built once per process)."""
    global _creator_message
    if _creator_message is None or _creator_message.pid != os.getpid():
        pid, start_time, pid_namespace = process_identity()
        _creator_message = object_store_pb2.Creator(pid=pid, start_time=start_time,
                                                    pid_namespace=pid_namespace)
    return _creator_message


class StoreClient:
    """Asyncio client of one object store ("ip:port"), authenticated with the cluster token.

    The channel is opened on first use, inside the caller's event loop. node_id
    (hex or bytes) names the store's node in errors; a stats() call learns it
    from the store too.
    """

    def __init__(self, address: str, token: str, node_id: bytes | str | None = None) -> None:
        self.address = address
        self._token = token
        self.node_id = node_id.hex() if isinstance(node_id, bytes) else (node_id or "")
        self._channel: grpc.aio.Channel | None = None
        self._stub: object_store_pb2_grpc.ObjectStoreStub | None = None

    def _failure(self, call: str, exc: grpc.RpcError) -> Exception:
        """The runtime error for a failed call, naming this store and its node."""
        from runtime.exceptions import AuthenticationError, ClusterConnectionError, RaySystemError

        node = f"node {self.node_id[:12]}" if self.node_id else "node not known yet"
        # grpc.aio.AioRpcError has code() and details() but is no grpc.Call.
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        details = (exc.details() if callable(getattr(exc, "details", None)) else None) or str(exc)
        if code is grpc.StatusCode.UNAVAILABLE:
            return ClusterConnectionError(
                f"object store at {self.address} is gone ({node}): {call} failed: {details}. "
                "Its process exited or cannot be reached, and the objects it held are lost. "
                "Under node-agent it is restarted at the same address (see `agentctl status`); "
                "a private cluster must be restarted (runtime.shutdown(), then runtime.init()).")
        if code is grpc.StatusCode.UNAUTHENTICATED:
            return AuthenticationError(f"object store at {self.address} ({node}) refused "
                                       f"{call}: {details}")
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return ValueError(f"object store at {self.address} ({node}) rejected {call}: "
                              f"{details}")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return ClusterConnectionError(
                f"object store at {self.address} ({node}) did not answer {call} in time: "
                f"{details}. The store process may be overloaded or hung; its log is "
                "<session>/logs/object_store.log.")
        name = code.name if code is not None else type(exc).__name__
        return RaySystemError(f"object store at {self.address} ({node}) failed {call}: "
                              f"{name}: {details}")

    async def _call(self, call: str, awaitable: Awaitable[_T]) -> _T:
        try:
            return await awaitable
        except grpc.RpcError as exc:
            raise self._failure(call, exc) from None

    def _get_stub(self) -> object_store_pb2_grpc.ObjectStoreStub:
        if self._stub is None:
            self._channel = rpc.aio_channel(self.address, self._token)
            self._stub = object_store_pb2_grpc.ObjectStoreStub(self._channel)
        return self._stub

    async def create(self, object_id: bytes, size: int,
                     owner: common_pb2.Address | None = None) -> str:
        """Reserve `size` bytes and return the path of the file to write them into.

        Raises ObjectStoreFullError (with the store's explanation) when there is
        no room even after spilling. An id created before returns its existing
        path (idempotent retries).
        """
        reply = await self._create(object_id, size, owner)
        if reply.full:
            raise _full_error(reply.message)
        return reply.path

    def _create(self, object_id: bytes, size: int,
                owner: common_pb2.Address | None) -> Awaitable[object_store_pb2.CreateReply]:
        # The creator lets the store free the object if this process dies before Seal.
        return self._call("Create", self._get_stub().Create(object_store_pb2.CreateRequest(
            object_id=object_id, size=size, owner=owner, creator=_creator())))

    async def seal(self, object_ids: Iterable[bytes]) -> None:
        """Make written objects immutable and readable; wakes Gets waiting for them."""
        await self._call("Seal", self._get_stub().Seal(
            object_store_pb2.ObjectIds(object_ids=list(object_ids))))

    async def pull(self, object_id: bytes, holders: Sequence[str],
                   timeout_s: float = 0.0) -> object_store_pb2.PullReply:
        """Have this store copy object_id from one of `holders` (other stores' addresses).

        The reply says how it went (see PullReply): a failed pull is a reply with
        ok=False and each holder's failure, not an exception; exceptions mean this
        store itself could not be asked.
        """
        return await self._call("Pull", self._get_stub().Pull(object_store_pb2.PullRequest(
            object_id=object_id, holders=list(holders), timeout_s=timeout_s)))

    async def get(self, object_ids: Iterable[bytes],
                  timeout_s: float) -> list[object_store_pb2.StoreObject]:
        """Locate objects, waiting up to timeout_s (< 0: forever) for unsealed or unknown ones.

        One StoreObject per id, in order; found=False when it was not sealed in
        time; spilled=True when path is the spill file (no room to restore it).
        """
        ids = list(object_ids)
        deadline = None if timeout_s < 0 else timeout_s + _GET_RPC_SLACK_S
        reply = await self._call("Get", self._get_stub().Get(
            object_store_pb2.StoreGetRequest(object_ids=ids, timeout_s=timeout_s),
            timeout=deadline))
        return list(reply.objects)

    async def delete(self, object_ids: Iterable[bytes]) -> None:
        """Free objects (shm and spill files); unknown ids are ignored."""
        await self._call("Delete", self._get_stub().Delete(
            object_store_pb2.ObjectIds(object_ids=list(object_ids))))

    async def stats(self) -> object_store_pb2.StoreStats:
        """The store's counters; also tells this client the store's node id."""
        reply = await self._call("Stats", self._get_stub().Stats(common_pb2.Empty()))
        if reply.node_id:
            self.node_id = reply.node_id
        return reply

    async def list_objects(self, object_ids: Iterable[bytes] = (),
                           limit: int = 0) -> list[object_store_pb2.StoreObjectInfo]:
        """What the store holds of object_ids (or, with none, its largest objects), at
        most `limit` (0: the store's default); ids it does not hold are left out."""
        reply = await self._call("List", self._get_stub().List(
            object_store_pb2.ListObjectsRequest(object_ids=list(object_ids), limit=limit)))
        if reply.node_id:
            self.node_id = reply.node_id
        return list(reply.objects)

    async def put(self, object_id: bytes, chunks: Sequence[bytes | bytearray | memoryview],
                  owner: common_pb2.Address | None = None) -> str:
        """create + write_object + seal; large writes run in a thread. Returns the path.

        Writes nothing when the object already existed (a retried put: objects
        are immutable once sealed, and it may be mapped by readers).
        """
        views = [_byte_view(c) for c in chunks]
        size = sum(v.nbytes for v in views)
        reply = await self._create(object_id, size, owner)
        if reply.full:
            raise _full_error(reply.message)
        if not reply.exists:
            if size > _THREAD_WRITE_BYTES:
                await asyncio.to_thread(write_object, reply.path, views)
            else:
                write_object(reply.path, views)
        await self.seal([object_id])
        return reply.path

    async def get_buffers(self, object_ids: Sequence[bytes], timeout_s: float,
                          attempts: int = 3) -> list[memoryview | None]:
        """get + map_object: a read-only view per id, None when not found in time.

        A path can vanish between Get and mapping when another request spills
        the object meanwhile; such ids are asked for again.
        """
        out: list[memoryview | None] = [None] * len(object_ids)
        pending = list(range(len(object_ids)))
        for attempt in range(attempts):
            objects = await self.get([object_ids[i] for i in pending], timeout_s)
            retry = []
            for i, obj in zip(pending, objects):
                if not obj.found:
                    continue
                try:
                    out[i] = map_object(obj.path, obj.size)
                except FileNotFoundError:
                    if attempt == attempts - 1:
                        raise
                    retry.append(i)
            if not retry:
                break
            pending = retry
        return out

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
