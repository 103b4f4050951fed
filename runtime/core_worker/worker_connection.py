"""One PushTasks stream to one worker process (and what every connection to a worker has).

Tasks are appended to an outbox and written as batches (everything queued
since the last write goes in one message); results are read and handed to the
handler. Used by task submission (leased workers), actor calls (the actor's
worker) and the GCS (actor creation).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Dict, List, Optional

import grpc

from runtime.protocol import common_pb2, core_worker_pb2, core_worker_pb2_grpc

log = logging.getLogger("runtime.core_worker")


class Connection:
    """What the task and actor submitters and the GCS see of a connection to a worker:
    tasks sent and not yet answered, and a way to send more."""

    def __init__(self, handler, address: str, worker_id: bytes,
                 job_config: common_pb2.JobConfig, control_address: str = "") -> None:
        """handler.on_result(conn, result) / handler.on_connection_lost(conn, error).
        `control_address` is the worker's gRPC port when `address` is a sync actor's
        call port (runtime/core_worker/call_connection.py), which carries calls only."""
        self.handler = handler
        self.address = address
        self.control_address = control_address or address
        self.worker_id = worker_id
        self.job_config = job_config
        self.inflight: Dict[bytes, object] = {}
        self.functions_sent: set = set()
        self.out: List[common_pb2.TaskSpec] = []
        self._job_sent = False
        self.dead = False
        # Where the worker is, for task events (runtime/core_worker/task_events.py): from
        # the lease grant, or the actor's entry in the GCS.
        self.node_id = b""
        self.pid = 0
        self.concurrency = 1      # in-flight tasks the worker runs at once (async actors: all)
        self.last_end = 0.0       # when the worker finished the last task answered here
        self.link = None          # the owner's record of it (owner_state.WorkerLink)

    def running_slots(self) -> int:
        """How many of the oldest in-flight tasks the worker is running now: it runs them
        in the order they were sent, `concurrency` at a time."""
        return self.concurrency

    def _take_batch(self) -> core_worker_pb2.TaskBatch:
        """Everything queued since the last write, as one TaskBatch."""
        batch = core_worker_pb2.TaskBatch(tasks=self.out)
        self.out = []
        if not self._job_sent:
            self._job_sent = True
            batch.job_config.CopyFrom(self.job_config)
        return batch


class WorkerConnection(Connection):
    """One PushTasks stream to one worker process, shared by the leases on it."""

    def __init__(self, handler, channel, address: str, worker_id: bytes,
                 job_config: common_pb2.JobConfig) -> None:
        super().__init__(handler, address, worker_id, job_config)
        self.stub = core_worker_pb2_grpc.CoreWorkerStub(channel)
        self.call = self.stub.PushTasks()
        self._writing = False
        self.writer: Optional[asyncio.Future] = None
        self.reader = asyncio.ensure_future(self._read())

    def send(self, spec: common_pb2.TaskSpec) -> None:
        """Queue a task; it goes out at once if no write is in flight, else with everything
        queued meanwhile when the current write completes (batching comes for free)."""
        self.out.append(spec)
        if not self._writing:
            self._writing = True
            self._start_write()

    def _start_write(self) -> None:
        if self.dead or not self.out:
            self._writing = False
            return
        self.writer = asyncio.ensure_future(self._write(self._take_batch()))

    async def _write(self, batch) -> None:
        try:
            await self.call.write(batch)
        except (asyncio.CancelledError, asyncio.InvalidStateError, grpc.RpcError, grpc.aio.UsageError):
            self._writing = False
            return  # the reader reports the failure
        self._start_write()

    async def _read(self) -> None:
        error = "the worker's task stream ended"
        try:
            async for batch in self.call:
                for result in batch.results:
                    self.handler.on_result(self, result)
        except asyncio.CancelledError:
            return
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # pragma: no cover - defensive
            log.exception("error reading results from %s", self.address)
            error = repr(exc)
        self.dead = True
        if self.writer is not None:
            self.writer.cancel()
        self.call.cancel()
        self.handler.on_connection_lost(self, error)

    def close(self) -> None:
        self.dead = True
        if self.writer is not None:
            self.writer.cancel()
        self.reader.cancel()
        self.call.cancel()
