"""The call port of a sync actor: each caller's calls run on the thread that reads them.

On the worker's gRPC server a call crosses threads twice (the event loop reads
it, the main thread runs it, the loop writes the result) and pays gRPC-Python's
per-message cost on top; together most of a sync actor call's latency. Here each
caller has one TCP connection (runtime/frames.py) served by one thread that reads
a batch of calls, runs them one at a time (under `Executor.actor_lock`, shared
by every caller) and writes the results: one read, one run, one write.

Only sync actors with max_concurrency 1 open one: async and threaded actors run
calls concurrently on their own loop or pool, and tasks never come here. The
port goes to the GCS in the creation result; the GCS publishes it in the actor's
address (`Address.task_port`) and callers connect to it. Cancels, borrower
updates and everything else still use the worker's gRPC port.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Optional

from google.protobuf.message import DecodeError

from runtime import frames
from runtime.protocol import common_pb2, core_worker_pb2

if TYPE_CHECKING:
    from runtime.core_worker.executor import Executor

log = logging.getLogger("runtime.worker")
# A long batch of calls sends back what has finished at least this often.
PARTIAL_RESULTS_S = 0.002


class _CallStream:
    """What Executor.execute needs to know of the connection a call came on."""

    __slots__ = ("job",)

    def __init__(self) -> None:
        self.job: Optional[common_pb2.JobConfig] = None


class ActorCallServer:
    def __init__(self, executor: "Executor") -> None:
        cw = executor.cw
        self.executor = executor
        self.token = cw.token
        family, kind, proto, _name, addr = socket.getaddrinfo(
            cw.node_ip, 0, type=socket.SOCK_STREAM)[0]
        self.sock = socket.socket(family, kind, proto)
        self.sock.bind(addr)
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, name="actor-calls", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer), name="actor-caller",
                             daemon=True).start()

    def _serve(self, sock: socket.socket, peer) -> None:
        try:
            frames.tune(sock)
            sock.settimeout(frames.HANDSHAKE_TIMEOUT_S)
            payload = frames.recv_frame(sock, limit=frames.MAX_HELLO_BYTES)
            reason = "no hello" if payload is None else frames.check_hello(payload, self.token)
            if reason is not None:
                log.warning("refused an actor call connection from %s: %s", peer, reason)
                sock.sendall(frames.frame(reason.encode()))
                return
            sock.settimeout(None)
            sock.sendall(frames.frame(b""))
            self._calls(sock)
        except (OSError, frames.FrameError, DecodeError) as exc:
            log.debug("actor call connection from %s ended: %s", peer, exc)
        finally:
            sock.close()

    def _calls(self, sock: socket.socket) -> None:
        ex = self.executor
        stream = _CallStream()
        while True:
            payload = frames.recv_frame(sock)
            if payload is None:
                return
            batch = core_worker_pb2.TaskBatch.FromString(payload)
            if batch.HasField("job_config"):
                stream.job = batch.job_config
            results = []
            started = time.perf_counter()
            last = len(batch.tasks) - 1
            for i, spec in enumerate(batch.tasks):
                results.append(ex.execute_call(spec, stream))
                if i == last or time.perf_counter() - started >= PARTIAL_RESULTS_S:
                    if ex.must_flush():
                        ex.cw.run(ex.flush())
                    sock.sendall(frames.frame(
                        core_worker_pb2.ResultBatch(results=results).SerializeToString()))
                    results = []
                    started = time.perf_counter()
