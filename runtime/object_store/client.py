"""Talking to a node's object store, and reading and writing object files directly.

The store hands out file paths; the bytes never travel over gRPC. A writer calls
``create`` (which reserves room and makes the file), ``write_object`` and
``seal``; a reader calls ``get`` and ``map_object``, which maps the file
read-only, so values deserialized with pickle protocol 5 buffers over the
mapping (numpy arrays) are zero-copy views of shared memory.

A mapping stays valid after the store unlinks the file (on Delete or when it
spills the object): the kernel keeps the pages until the last mapping is gone.
"""
from __future__ import annotations

import asyncio
import mmap
import os
from typing import Iterable, Sequence

import grpc

from runtime import rpc
from runtime.protocol import common_pb2, object_store_pb2, object_store_pb2_grpc

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


def map_object(path: str, size: int) -> memoryview:
    """A read-only, zero-copy view of an object file (shm or spill file).

    The view keeps the mapping alive, and the mapping outlives the file's
    unlinking; the file descriptor is closed at once.
    """
    if size == 0:
        return memoryview(b"")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        file_size = os.fstat(fd).st_size
        if file_size < size:
            # Mapping past the end would SIGBUS on access instead of raising.
            raise ValueError(f"object file {path} has {file_size} bytes, expected {size}")
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return memoryview(mapping)


def _full_error(message: str) -> Exception:
    from runtime.exceptions import ObjectStoreFullError  # imported late: written separately

    return ObjectStoreFullError(message)


class StoreClient:
    """Asyncio client of one object store ("ip:port"), authenticated with the cluster token.

    The channel is opened on first use, inside the caller's event loop.
    """

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self._token = token
        self._channel: grpc.aio.Channel | None = None
        self._stub: object_store_pb2_grpc.ObjectStoreStub | None = None

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
        reply = await self._get_stub().Create(
            object_store_pb2.CreateRequest(object_id=object_id, size=size, owner=owner))
        if reply.full:
            raise _full_error(reply.message)
        return reply.path

    async def seal(self, object_ids: Iterable[bytes]) -> None:
        """Make written objects immutable and readable; wakes Gets waiting for them."""
        await self._get_stub().Seal(object_store_pb2.ObjectIds(object_ids=list(object_ids)))

    def read(self, object_id: bytes, timeout_s: float = 30.0):
        """Stream of Chunks with the object's bytes (for copying it to another node)."""
        return self._get_stub().Read(object_store_pb2.StoreGetRequest(
            object_ids=[object_id], timeout_s=timeout_s))

    async def get(self, object_ids: Iterable[bytes],
                  timeout_s: float) -> list[object_store_pb2.StoreObject]:
        """Locate objects, waiting up to timeout_s (< 0: forever) for unsealed or unknown ones.

        One StoreObject per id, in order; found=False when it was not sealed in
        time; spilled=True when path is the spill file (no room to restore it).
        """
        ids = list(object_ids)
        deadline = None if timeout_s < 0 else timeout_s + _GET_RPC_SLACK_S
        reply = await self._get_stub().Get(
            object_store_pb2.StoreGetRequest(object_ids=ids, timeout_s=timeout_s),
            timeout=deadline)
        return list(reply.objects)

    async def delete(self, object_ids: Iterable[bytes]) -> None:
        """Free objects (shm and spill files); unknown ids are ignored."""
        await self._get_stub().Delete(object_store_pb2.ObjectIds(object_ids=list(object_ids)))

    async def stats(self) -> object_store_pb2.StoreStats:
        return await self._get_stub().Stats(common_pb2.Empty())

    async def put(self, object_id: bytes, chunks: Sequence[bytes | bytearray | memoryview],
                  owner: common_pb2.Address | None = None) -> str:
        """create + write_object + seal; large writes run in a thread. Returns the path.

        Writes nothing when the object already existed (a retried put: objects
        are immutable once sealed, and it may be mapped by readers).
        """
        views = [_byte_view(c) for c in chunks]
        size = sum(v.nbytes for v in views)
        reply = await self._get_stub().Create(
            object_store_pb2.CreateRequest(object_id=object_id, size=size, owner=owner))
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
