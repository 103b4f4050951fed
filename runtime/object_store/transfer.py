"""Moving objects between nodes: each store serves its objects on a transfer port and
pulls other stores' objects into its own shared memory. This module has the protocol, its
decisions and what both sides share; the serving side is transfer_server.py, the pulling
side transfer_pull.py.

A reader on node A whose object lives on node B asks A's store to ``Pull`` it
(gRPC, one call). A's store opens (or reuses) a TCP connection to B's transfer
port, asks for the object from an offset, and B answers with a header and the
raw bytes, sent with ``sendfile`` straight from the object's file. A receives
them into a 4 MiB buffer and ``pwrite``s each chunk into the object file it
created, then seals it. No Python process ever holds more than one chunk.

**Decision (the stores pull, not the core workers).** The store is the one
process per node that sees every reader, so an object that many workers of the
node want is transferred once (the others join the transfer under way), its
counters are the node's, and a reader that exits mid-pull costs nothing. The
bytes no longer pass through a core worker's event loop either.

**Decision (raw TCP, not a gRPC stream).** gRPC-Python copies every message
several times (into the HTTP/2 frames, out of them, into a ``bytes``, into the
protobuf); the old ``Read`` stream moved 0.2-0.5 GB/s here. Measured on this
2-core machine, 1 GiB over loopback from a file in /dev/shm into another:

====================================================  ==========  ================
receiver                                               GB/s        receiver CPU s/GB
====================================================  ==========  ================
``recv_into`` an ``mmap`` of the new file (MAP_POPULATE)  0.9         0.84
``splice`` socket -> pipe -> file                      1.1-2.6     0.60
``recv_into`` a 4 MiB buffer, ``pwrite`` to the file   1.9-2.5     0.39
====================================================  ==========  ================

Writing through the mapping is the slowest: each fresh tmpfs page costs a page
fault. The bounce buffer stays in cache, so its extra copy is cheaper than the
faults; that is what the receiver does. The sender uses ``sendfile`` (no copy
through user space).

**Failures.** Holders are tried in the order the caller gives, those that failed
in the last ``RECENT_FAILURE_S`` seconds last. A holder that refuses the
connection, breaks it, stalls for ``STALL_TIMEOUT_S`` or does not have the object
is recorded with its kind (unreachable, missing, refused) and the next one
resumes at the byte where the last one stopped (objects are immutable). When
every holder failed, the partial copy is deleted and the reply lists each
holder's failure, so the object's owner can decide to rebuild the object.

**The port.** A puller's first frame is the ``frames.hello`` with the cluster
token; nothing else is read before it matches. As on the call port, waiting
connections cost no thread: the store's event loop reads the hellos (with a
deadline and a size limit, at most ``frames.MAX_UNAUTHENTICATED`` waiting, the
oldest pushed out), and only an authenticated connection gets a thread.
"""
from __future__ import annotations

import logging
import socket
import struct
import threading

from runtime.protocol import object_store_pb2

log = logging.getLogger("object_store")

#: Receive buffer of a pull: bytes held in Python memory per transfer.
CHUNK_BYTES = 4 * 1024 * 1024
#: Connecting to a holder and its hello, together.
CONNECT_TIMEOUT_S = 5.0
#: A holder that sends nothing for this long mid-transfer is given up on.
STALL_TIMEOUT_S = 30.0
#: The server closes a connection that has asked for nothing for this long.
SERVER_IDLE_S = 120.0
#: A pooled connection idle for longer is closed rather than reused.
POOL_IDLE_S = 60.0
#: Idle connections kept per holder.
POOL_PER_HOLDER = 4
#: Transfers into this store at once; more Pulls wait for a slot.
MAX_PULLS_AT_ONCE = 8
#: Authenticated connections served at once; more are refused with a reason.
MAX_SERVING = 256
#: A holder that failed this recently is tried after the others.
RECENT_FAILURE_S = 30.0
#: Largest TransferRequest frame (an object id and an offset).
MAX_REQUEST_BYTES = 1024
#: Sending is cut into slices this large when the serve rate is capped.
RATE_SLICE_BYTES = 1024 * 1024

UNREACHABLE = object_store_pb2.HolderFailure.UNREACHABLE
MISSING = object_store_pb2.HolderFailure.MISSING
REFUSED = object_store_pb2.HolderFailure.REFUSED


class HolderError(Exception):
    """One holder could not deliver (the pull goes on with the next)."""

    def __init__(self, kind: int, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        # A pooled connection that failed before any answer: the holder may simply have
        # closed it while idle, so a fresh connection is tried before giving up on it.
        self.stale = stale


class PullCancelled(Exception):
    """The object was deleted while it was being pulled."""


class TransferCounters:
    """The store's transfer figures (StoreStats); bumped from the serving and pulling
    threads, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pulls = 0
        self.pulls_joined = 0
        self.pulls_failed = 0
        self.pull_failovers = 0
        self.pulled_bytes = 0
        self.serves = 0
        self.served_bytes = 0

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


#: What a blocking call on a socket with kernel timeouts raises when one expires.
TIMED_OUT = (socket.timeout, BlockingIOError)


def kernel_timeouts(sock: socket.socket, recv_s: float, send_s: float) -> None:
    """Make sock blocking, with timeouts the kernel applies (SO_RCVTIMEO, SO_SNDTIMEO).

    With Python's own timeouts every call is a poll plus a non-blocking call that
    returns whatever the socket buffer holds; blocking calls move a whole 4 MiB chunk
    (recv with MSG_WAITALL, sendfile of the whole range) per system call instead.
    """
    sock.settimeout(None)
    for opt, seconds in ((socket.SO_RCVTIMEO, recv_s), (socket.SO_SNDTIMEO, send_s)):
        whole = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, opt,
                        struct.pack("ll", whole, int((seconds - whole) * 1e6)))
