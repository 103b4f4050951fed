"""Task events, GCS side: a bounded window of the most recent tasks.

At most config.TASK_EVENTS_MAX_TASKS tasks are kept (oldest evicted first, and
counted as dropped), so a million tasks cannot exhaust the GCS's memory.
Records are kept compact (tuples, interned strings, arrays) rather than as
protobuf messages, which would each keep their whole batch's arena alive.
"""
from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from typing import Dict, Tuple

from runtime.protocol import gcs_pb2


class _Record:
    __slots__ = ("job_id", "static", "outcome", "states", "times")

    def __init__(self, job_id: bytes) -> None:
        self.job_id = job_id
        self.static: Tuple = ()
        self.outcome: Tuple = ()
        self.states = bytearray()
        self.times = array("d")


class TaskEventStore:
    def __init__(self, max_tasks: int) -> None:
        self.max_tasks = max_tasks
        self.tasks: "OrderedDict[bytes, _Record]" = OrderedDict()
        self.dropped = 0
        self.total_seen = 0
        self._shapes: Dict[Tuple, Dict[str, float]] = {}

    def _record(self, task_id: bytes, job_id: bytes) -> _Record:
        rec = self.tasks.get(task_id)
        if rec is None:
            rec = self.tasks[task_id] = _Record(job_id)
            self.total_seen += 1
            if len(self.tasks) > self.max_tasks:
                self.tasks.popitem(last=False)
                self.dropped += 1
        return rec

    def _shape(self, resources) -> Dict[str, float]:
        key = tuple(sorted(resources.items()))
        shape = self._shapes.get(key)
        if shape is None:
            if len(self._shapes) > 10_000:
                self._shapes.clear()
            shape = self._shapes[key] = dict(key)
        return shape

    def add(self, batch: gcs_pb2.TaskEventBatch) -> None:
        self.dropped += batch.dropped
        job = batch.job_id
        intern = sys.intern
        for st in batch.statics:
            self._record(st.task_id, job).static = (
                intern(st.name), intern(st.type), st.actor_id, st.parent_task_id,
                self._shape(st.resources), st.placement_group_id, intern(st.func_or_class_name))
        for tid, state, t in zip(batch.task_ids, batch.states, batch.times):
            rec = self._record(tid, job)
            rec.states.append(state)
            rec.times.append(t)
        for oc in batch.outcomes:
            self._record(oc.task_id, job).outcome = (
                oc.node_id, oc.worker_id, oc.worker_pid, oc.error_type, oc.error_message,
                oc.attempt)

    def list(self, limit: int, job_id: bytes = b"") -> gcs_pb2.ListTasksReply:
        reply = gcs_pb2.ListTasksReply(dropped=self.dropped, total_seen=self.total_seen)
        n = 0
        for tid in reversed(self.tasks):  # most recent first
            rec = self.tasks[tid]
            if job_id and rec.job_id != job_id:
                continue
            r = reply.tasks.add(task_id=tid, job_id=rec.job_id, states=list(rec.states),
                                times=list(rec.times))
            if rec.static:
                name, kind, actor_id, parent, res, pg, func = rec.static
                r.static.task_id = tid
                r.static.name = name
                r.static.type = kind
                r.static.actor_id = actor_id
                r.static.parent_task_id = parent
                r.static.resources.update(res)
                r.static.placement_group_id = pg
                r.static.func_or_class_name = func
            if rec.outcome:
                node, worker, pid, etype, emsg, attempt = rec.outcome
                r.outcome.task_id = tid
                r.outcome.node_id = node
                r.outcome.worker_id = worker
                r.outcome.worker_pid = pid
                r.outcome.error_type = etype
                r.outcome.error_message = emsg
                r.outcome.attempt = attempt
            n += 1
            if limit and n >= limit:
                break
        return reply
