"""Task events, owner side: every task's state changes, batched to the GCS.

The owner of a task sees all its transitions (the worker's start and end times
come back in the result), so no worker ever sends an event of its own. Events
are appended to three parallel lists (a few hundred nanoseconds each) and
flushed as one columnar TaskEventBatch per second, or sooner when many pile
up; if the GCS cannot keep up, the oldest are dropped and counted, never
buffered without bound.

Where tasks run is learnt at flush time, not per task: each flush walks the
owner's connections to workers, and every task still in flight on one is sent
once per attempt with that worker's node, id and pid (placed_* columns, each
worker once per batch). The tasks a worker is running at that moment (the
oldest in flight on a leased worker or a sync actor; all of them on an async
actor) get their RUNNING event then, timed from when they were pushed or when
the worker finished the one before. So a task that lasts past a flush shows
RUNNING where it runs, and a short one costs nothing more than before: its
result carries the real start time and its outcome the place.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, List, Optional, Tuple

import grpc

from runtime import config, vocabulary
from runtime.protocol import common_pb2, gcs_pb2
from runtime.serialization import parse
from runtime.vocabulary import (FAILED, FINISHED, PENDING_NODE_ASSIGNMENT, RUNNING,
                                SUBMITTED_TO_WORKER)

log = logging.getLogger("runtime.core_worker")

#: Task state names by their number in TaskEventBatch.states (common.proto's TaskState).
TASK_STATES = list(vocabulary.TASK_STATES)
_MAX_BUFFERED = 200_000


class TaskEventBuffer:
    """The owner state machine's recorder (owner_state.Recorder) and its flusher.

    ``flights()`` lists (link, running slots) for the links with tasks in flight,
    ``ident()`` gives (job id, node id) at flush time, and ``send(batch)`` delivers a
    batch to the GCS."""

    def __init__(self, enabled: bool, *, flights: Callable[[], List[Tuple[Any, int]]],
                 ident: Callable[[], Tuple[bytes, bytes]],
                 send: Callable[[gcs_pb2.TaskEventBatch], Awaitable[Any]]) -> None:
        self.enabled = enabled
        self._flights = flights
        self._ident = ident
        self._send = send
        self.task_ids: List[bytes] = []
        self.states: List[int] = []
        self.times: List[float] = []
        self.statics: List[tuple] = []
        self.outcomes: List[tuple] = []
        self.reasons: List[tuple] = []    # (task id, why it waits, or "" once it does not)
        self.requeued: List[tuple] = []   # (task id, attempt): out on no worker any more
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

    def submitted(self, task) -> None:
        """The task was pushed to a worker (its place is sampled at flush time)."""
        if self.enabled:
            task.pushed_at = now = time.time()
            self.event(task.task_id, SUBMITTED_TO_WORKER, now)

    def reason(self, task_id: bytes, why: str) -> None:
        """Why a task still waits as only its owner knows it ("" once it does not)."""
        if self.enabled:
            self.reasons.append((task_id, why))

    def requeued_task(self, task) -> None:
        """A task back in its queue for another attempt (its worker died, or it raised and
        retries): pending again, and on no worker until it is pushed again."""
        if not self.enabled:
            return
        self.event(task.task_id, PENDING_NODE_ASSIGNMENT)
        self.requeued.append((task.task_id, task.attempt))

    def outcome(self, task_id: bytes, worker_id: bytes, pid: int, node_id: bytes, attempt: int,
                error_type: str = "", error_message: str = "") -> None:
        if not self.enabled:
            return
        self.outcomes.append((task_id, worker_id, pid, node_id, error_type, error_message,
                              attempt))

    def result(self, task, link, result: common_pb2.TaskResult, node_id: bytes) -> None:
        """A result from a worker: when the task ran and how it ended."""
        if not self.enabled:
            return
        link.last_end = result.end_time
        if task.running_attempt != task.attempt:  # else reported at a flush while it ran
            self.event(task.task_id, RUNNING, result.start_time or None)
        failed = result.app_error
        self.event(task.task_id, FAILED if failed else FINISHED, result.end_time or None)
        etype = emsg = ""
        if failed and result.returns:
            etype, emsg = _describe_error(result.returns[0].inline_data)
        self.outcome(task.task_id, link.worker_id, result.worker_pid, link.node_id or node_id,
                     task.attempt, etype, emsg)

    def failed(self, task, error, node_id: bytes) -> None:
        """A task failed without a result from a worker (cancelled, its worker or actor
        died, a dependency failed): where it last was, if anywhere, and why."""
        if not self.enabled:
            return
        if isinstance(error, BaseException):
            etype, emsg = _describe_exception(error)
        else:
            etype, emsg = _describe_error(error.data) if error.data else ("", "")
        self.event(task.task_id, FAILED)
        link = task.link  # None: it never reached a worker, so it ran nowhere
        self.outcome(task.task_id, link.worker_id if link else b"", link.pid if link else 0,
                     (link.node_id or node_id) if link else b"", task.attempt, etype, emsg)

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

    def _sample_placements(self) -> tuple:
        """(task ids, worker indexes, attempts, workers): where the tasks out on workers
        are, for those not yet reported in their current attempt, and RUNNING events
        for those the workers are running now (see the module's docstring)."""
        tids: List[bytes] = []
        where: List[int] = []
        attempts: List[int] = []
        workers: List[tuple] = []
        if self.requeued:  # first: the same task may be out again, on a worker, by now
            workers.append((b"", b"", 0))
            for tid, attempt in self.requeued:
                tids.append(tid)
                where.append(0)
                attempts.append(attempt)
            self.requeued = []
        for link, running in self._flights():
            index = -1
            last_end = link.last_end
            for i, task in enumerate(link.inflight.values()):
                attempt = task.attempt
                if task.placed_attempt != attempt:
                    task.placed_attempt = attempt
                    if index < 0:
                        index = len(workers)
                        workers.append((link.node_id, link.worker_id, link.pid))
                    tids.append(task.task_id)
                    where.append(index)
                    attempts.append(attempt)
                if i < running and task.running_attempt != attempt:
                    task.running_attempt = attempt
                    pushed = getattr(task, "pushed_at", 0.0)
                    started = pushed if running > 1 else max(pushed, last_end)
                    self.event(task.task_id, RUNNING, started or None)
        return tids, where, attempts, workers

    async def flush(self) -> None:
        if not self.enabled:
            return
        placed = self._sample_placements()
        if not (self.task_ids or self.statics or self.outcomes or self.reasons or placed[0]):
            return
        job_id, node_id = self._ident()
        batch = gcs_pb2.TaskEventBatch(job_id=job_id, node_id=node_id, dropped=self.dropped)
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
        for task_id, why in self.reasons:
            batch.reasons.add(task_id=task_id, reason=why)
        tids, where, attempts, workers = placed
        if tids:
            batch.placed_task_ids.extend(tids)
            batch.placed_workers.extend(where)
            batch.placed_attempts.extend(attempts)
            for node_id, worker_id, pid in workers:
                batch.workers.add(node_id=node_id, worker_id=worker_id, worker_pid=pid)
        self.task_ids, self.states, self.times, self.statics, self.outcomes = [], [], [], [], []
        self.reasons = []
        self.dropped = 0
        try:
            await self._send(batch)
        except grpc.RpcError as exc:
            log.debug("could not send %d task events: %s", len(batch.task_ids), exc)

    async def close(self) -> None:
        """Stop the flush loop (cancelled and awaited)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except BaseException:  # cancelled: that is the point
                pass


def _describe_exception(err: BaseException) -> Tuple[str, str]:
    name = type(err).__name__
    if name.startswith("RayTaskError") and getattr(err, "cause", None) is not None:
        name = "TASK_EXECUTION_EXCEPTION"
    elif name == "OutOfMemoryError":
        name = "OUT_OF_MEMORY"  # Ray's error_type for a task the memory monitor killed
    return name, str(err).strip()


def _describe_error(data: bytes) -> Tuple[str, str]:
    try:
        _kind, err = parse(data)
    except Exception:
        return "UNKNOWN", ""
    return _describe_exception(err)
