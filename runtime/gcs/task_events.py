"""Task events, GCS side: a bounded window of the most recent tasks.

At most config.TASK_EVENTS_MAX_TASKS tasks are kept (oldest evicted first, and
counted as dropped), so a million tasks cannot exhaust the GCS's memory.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List

from runtime.protocol import gcs_pb2


class _Record:
    __slots__ = ("job_id", "static", "outcome", "states", "times")

    def __init__(self, job_id: bytes) -> None:
        self.job_id = job_id
        self.static = None
        self.outcome = None
        self.states: List[int] = []
        self.times: List[float] = []


class TaskEventStore:
    def __init__(self, max_tasks: int) -> None:
        self.max_tasks = max_tasks
        self.tasks: "OrderedDict[bytes, _Record]" = OrderedDict()
        self.dropped = 0
        self.total_seen = 0

    def _record(self, task_id: bytes, job_id: bytes) -> _Record:
        rec = self.tasks.get(task_id)
        if rec is None:
            rec = self.tasks[task_id] = _Record(job_id)
            self.total_seen += 1
            if len(self.tasks) > self.max_tasks:
                self.tasks.popitem(last=False)
                self.dropped += 1
        return rec

    def add(self, batch: gcs_pb2.TaskEventBatch) -> None:
        self.dropped += batch.dropped
        job = batch.job_id
        for st in batch.statics:
            self._record(st.task_id, job).static = st
        for tid, state, t in zip(batch.task_ids, batch.states, batch.times):
            rec = self._record(tid, job)
            rec.states.append(state)
            rec.times.append(t)
        for oc in batch.outcomes:
            self._record(oc.task_id, job).outcome = oc

    def list(self, limit: int, job_id: bytes = b"") -> gcs_pb2.ListTasksReply:
        reply = gcs_pb2.ListTasksReply(dropped=self.dropped, total_seen=self.total_seen)
        n = 0
        for tid in reversed(self.tasks):  # most recent first
            rec = self.tasks[tid]
            if job_id and rec.job_id != job_id:
                continue
            r = reply.tasks.add(task_id=tid, job_id=rec.job_id, states=rec.states, times=rec.times)
            if rec.static is not None:
                r.static.CopyFrom(rec.static)
            if rec.outcome is not None:
                r.outcome.CopyFrom(rec.outcome)
            n += 1
            if limit and n >= limit:
                break
        return reply
