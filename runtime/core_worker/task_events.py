"""Task events, owner side: every task's state changes, batched to the GCS.

The owner of a task sees all its transitions (the worker's start and end times
come back in the result), so no worker ever sends an event of its own. Events
are appended to three parallel lists (a few hundred nanoseconds each) and
flushed as one columnar TaskEventBatch per second, or sooner when many pile
up; if the GCS cannot keep up, the oldest are dropped and counted, never
buffered without bound.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, List, Optional

import grpc

from runtime import config
from runtime.protocol import gcs_pb2, gcs_pb2_grpc

if TYPE_CHECKING:
    from runtime.core_worker.core_worker import CoreWorker

log = logging.getLogger("runtime.core_worker")

TASK_STATES = ["PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "SUBMITTED_TO_WORKER",
               "RUNNING", "FINISHED", "FAILED"]
PENDING_ARGS_AVAIL, PENDING_NODE_ASSIGNMENT, SUBMITTED_TO_WORKER, RUNNING, FINISHED, FAILED = range(6)
_MAX_BUFFERED = 200_000


class TaskEventBuffer:
    def __init__(self, cw: "CoreWorker", enabled: bool) -> None:
        self.cw = cw
        self.enabled = enabled
        self.task_ids: List[bytes] = []
        self.states: List[int] = []
        self.times: List[float] = []
        self.statics: List[tuple] = []
        self.outcomes: List[tuple] = []
        self.dropped = 0
        self._task: Optional[asyncio.Task] = None
        self._kick = None

    def start(self) -> None:
        if self.enabled:
            self._kick = asyncio.Event()
            self._task = asyncio.ensure_future(self._flush_loop())

    # -- recording (loop thread) ------------------------------------------------------------------
    def new_task(self, task, kind: str, state: int) -> None:
        if not self.enabled:
            return
        # Plain tuples here; protobuf messages are built once per flush, off the task's path.
        self.statics.append((task.task_id, task.name, kind, task.actor_id,
                             self._parent(task), task.resources))
        self.event(task.task_id, state)

    def _parent(self, task) -> bytes:
        """The task that submitted `task`, captured in the submitting thread: this runs on
        the loop thread, which is in no task of its own."""
        return task.parent_task_id or b""

    def event(self, task_id: bytes, state: int, when: Optional[float] = None) -> None:
        if not self.enabled:
            return
        self.task_ids.append(task_id)
        self.states.append(state)
        self.times.append(when or time.time())
        if len(self.task_ids) > _MAX_BUFFERED:
            self._drop_oldest()
        elif len(self.task_ids) >= 20_000 and self._kick is not None:
            self._kick.set()

    def outcome(self, task_id: bytes, worker_id: bytes, pid: int, node_id: bytes, attempt: int,
                error_type: str = "", error_message: str = "") -> None:
        if not self.enabled:
            return
        self.outcomes.append((task_id, worker_id, pid, node_id, error_type, error_message,
                              attempt))

    def _drop_oldest(self) -> None:
        n = len(self.task_ids) // 2
        self.dropped += n
        del self.task_ids[:n], self.states[:n], self.times[:n]

    # -- flushing ------------------------------------------------------------------------------------
    async def _flush_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), config.TASK_EVENTS_FLUSH_S)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            await self.flush()

    async def flush(self) -> None:
        if not (self.task_ids or self.statics or self.outcomes):
            return
        batch = gcs_pb2.TaskEventBatch(job_id=self.cw.job_id, node_id=self.cw.node_id,
                                       dropped=self.dropped)
        batch.task_ids.extend(self.task_ids)
        batch.states.extend(self.states)
        batch.times.extend(self.times)
        for task_id, name, kind, actor_id, parent, resources in self.statics:
            batch.statics.add(task_id=task_id, name=name, type=kind, actor_id=actor_id,
                              parent_task_id=parent, resources=resources or {},
                              func_or_class_name=name)
        for task_id, worker_id, pid, node_id, etype, emsg, attempt in self.outcomes:
            batch.outcomes.add(task_id=task_id, worker_id=worker_id, worker_pid=pid,
                               node_id=node_id, error_type=etype, error_message=emsg[:2000],
                               attempt=attempt)
        self.task_ids, self.states, self.times, self.statics, self.outcomes = [], [], [], [], []
        self.dropped = 0
        try:
            stub = gcs_pb2_grpc.GcsStub(self.cw.channel(self.cw.gcs_address))
            await stub.AddTaskEvents(batch, timeout=10)
        except grpc.RpcError as exc:
            log.debug("could not send %d task events: %s", len(batch.task_ids), exc)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
