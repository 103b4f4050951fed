"""Task events, GCS side: a bounded window of the most recent tasks.

At most config.TASK_EVENTS_MAX_TASKS tasks are kept (oldest evicted first, and
counted as dropped), so a million tasks cannot exhaust the GCS's memory.
Records are kept compact (tuples, interned strings, arrays) rather than as
protobuf messages, which would each keep their whole batch's arena alive.
"""
from __future__ import annotations

import sys
import time
from array import array
from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple

from runtime.core_worker.task_events import TASK_STATES
from runtime.protocol import gcs_pb2
from runtime.protocol.common_pb2 import FINISHED, SUBMITTED_TO_WORKER

#: Fields of a task record (runtime/util/state.py task_dict) a filter may name, and
#: raytop's column titles for them.
TASK_FIELDS = ("task_id", "name", "state", "job_id", "type", "actor_id", "func_or_class_name",
               "parent_task_id", "node_id", "node_ip", "worker_id", "worker_pid", "error_type",
               "error_message", "attempt_number", "required_resources", "language",
               "placement_group_id", "pending_reason", "duration_s", "creation_time_ms",
               "start_time_ms", "end_time_ms")
TASK_ALIASES = {"id": "task_id", "function": "func_or_class_name", "func": "func_or_class_name",
                "node": "node_ip", "pid": "worker_pid", "error": "error_message",
                "duration": "duration_s", "reason": "pending_reason", "job": "job_id",
                "attempt": "attempt_number", "actor": "actor_id"}


class _Record:
    __slots__ = ("job_id", "static", "outcome", "states", "times", "reason")

    def __init__(self, job_id: bytes) -> None:
        self.job_id = job_id
        self.static: Tuple = ()
        self.outcome: Tuple = ()
        self.states = bytearray()
        self.times = array("d")
        self.reason = ""  # the owner's: why it waits (TaskEventBatch.reasons)


#: Why a pending task waits (the GCS joins the raylets' reasons to the record).
ReasonFor = Callable[["_Record"], str]


class _Context:
    __slots__ = ("node_ips", "reason_for", "now")

    def __init__(self, node_ips: Dict[bytes, str], reason_for: Optional[ReasonFor],
                 now: float) -> None:
        self.node_ips = node_ips
        self.reason_for = reason_for
        self.now = now


def _outcome(i: int, default=None):
    return lambda t: (t.rec.outcome[i] or default) if t.rec.outcome else default


def _static(i: int, default=""):
    return lambda t: (t.rec.static[i] or default) if t.rec.static else default


def _reason(t: "_Lazy") -> Optional[str]:
    rec, ctx = t.rec, t.ctx
    if ctx.reason_for is None or not rec.states or rec.states[-1] >= SUBMITTED_TO_WORKER:
        return None
    return ctx.reason_for(rec) or None


_GETTERS: Dict[str, Callable[["_Lazy"], object]] = {
    "state": lambda t: TASK_STATES[t.rec.states[-1]] if t.rec.states else "NIL",
    "task_id": lambda t: t.tid.hex(),
    "job_id": lambda t: t.rec.job_id.hex(),
    "name": _static(0),
    "type": _static(1, "NORMAL_TASK"),
    "func_or_class_name": _static(6),
    "node_id": lambda t: t.rec.outcome[0].hex() if t.rec.outcome and t.rec.outcome[0] else None,
    "node_ip": lambda t: (t.ctx.node_ips.get(t.rec.outcome[0])
                          if t.rec.outcome and t.rec.outcome[0] else None),
    "worker_pid": _outcome(2),
    "error_type": _outcome(3),
    "error_message": _outcome(4),
    "attempt_number": _outcome(5, 0),
    "pending_reason": _reason,
}


class _Lazy:
    """A task's state-API record (runtime/util/state.py task_dict) whose fields are
    computed when asked: a filter on the state reads one field, not twenty."""

    __slots__ = ("tid", "rec", "ctx", "_full")

    def __init__(self, tid: bytes, rec: "_Record", ctx: _Context) -> None:
        self.tid = tid
        self.rec = rec
        self.ctx = ctx
        self._full: Optional[dict] = None

    def get(self, key: str, default=None):
        getter = _GETTERS.get(key)
        if getter is not None:
            return getter(self)
        return self.full().get(key, default)

    def values(self):
        """What free text is searched in: the fields a person reads (not the times)."""
        return [getter(self) for getter in _GETTERS.values()]

    def full(self) -> dict:
        if self._full is None:
            from runtime.util.state.records import task_dict

            rec, ctx = self.rec, self.ctx
            self._full = task_dict(self.tid, rec.job_id, rec.static, rec.outcome, rec.states,
                                   rec.times, pending_reason=_reason(self) or "",
                                   node_ips=ctx.node_ips, events=False, now=ctx.now)
        return self._full


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
        for r in batch.reasons:
            self._record(r.task_id, job).reason = intern(r.reason)
        for oc in batch.outcomes:
            self._record(oc.task_id, job).outcome = (
                oc.node_id, oc.worker_id, oc.worker_pid, oc.error_type, oc.error_message,
                oc.attempt)
        if batch.placed_task_ids:
            self._place(batch, job)

    def _place(self, batch: gcs_pb2.TaskEventBatch, job: bytes) -> None:
        """Where tasks out on a worker are, kept as a provisional outcome (no error) until
        their real outcome comes. Applied after the batch's outcomes: a retry's placement
        replaces the failed attempt's outcome, while a late placement never replaces the
        outcome of its own (or a later) attempt."""
        workers = [(w.node_id, w.worker_id, w.worker_pid) for w in batch.workers]
        for tid, index, attempt in zip(batch.placed_task_ids, batch.placed_workers,
                                       batch.placed_attempts):
            rec = self._record(tid, job)
            old = rec.outcome
            if old and (old[5] > attempt or (old[5] == attempt and rec.states
                                             and rec.states[-1] >= FINISHED)):  # or FAILED
                continue
            node, worker, pid = workers[index]
            rec.outcome = (node, worker, pid, "", "", attempt)

    def list(self, limit: int, job_id: bytes = b"", *,
             reason_for: Optional[ReasonFor] = None) -> gcs_pb2.ListTasksReply:
        reply = gcs_pb2.ListTasksReply(dropped=self.dropped, total_seen=self.total_seen,
                                       total=len(self.tasks))
        n = 0
        for tid in reversed(self.tasks):  # most recent first
            rec = self.tasks[tid]
            if job_id and rec.job_id != job_id:
                continue
            self._add(reply, tid, rec, reason_for)
            n += 1
            if limit and n >= limit:
                break
        reply.matched = n
        return reply

    def query(self, req: gcs_pb2.ListTasksRequest, node_ips: Dict[bytes, str],
              reason_for: Optional[ReasonFor] = None) -> gcs_pb2.ListTasksReply:
        """ListTasks with a filter, a sort or a summary, done here so that only the `limit`
        records asked for travel. Each task is a state-API record whose fields are
        computed only when the filter or the sort asks for them (_Lazy), so the filter
        means here what it means in raytop at a fraction of the cost of whole records."""
        from runtime.util import query

        if not (req.filter or req.sort or req.summary):
            return self.list(req.limit, req.job_id, reason_for=reason_for)
        reply = gcs_pb2.ListTasksReply(dropped=self.dropped, total_seen=self.total_seen,
                                       total=len(self.tasks))
        try:
            flt = query.parse(req.filter, TASK_FIELDS, TASK_ALIASES, "tasks")
        except query.FilterError as exc:
            reply.error = str(exc)
            return reply
        ctx = _Context(node_ips, reason_for, time.time())
        matched = []
        counts: Dict[Tuple[str, str], Dict[str, int]] = {}
        for tid in reversed(self.tasks):
            rec = self.tasks[tid]
            if req.job_id and rec.job_id != req.job_id:
                continue
            lazy = _Lazy(tid, rec, ctx)
            if flt and not flt.matches(lazy):
                continue
            matched.append(lazy)
            if req.summary:
                static = rec.static
                key = ((static[6] or static[0], static[1] or "NORMAL_TASK") if static
                       else ("", "NORMAL_TASK"))
                state = TASK_STATES[rec.states[-1]] if rec.states else "NIL"
                by_state = counts.get(key)
                if by_state is None:
                    by_state = counts[key] = {}
                by_state[state] = by_state.get(state, 0) + 1
        reply.matched = len(matched)
        if req.sort:
            field = TASK_ALIASES.get(req.sort.lower(), req.sort)
            present = [m for m in matched if m.get(field) not in (None, "")]
            present.sort(key=query.sort_key(field), reverse=req.descending)
            matched = present + [m for m in matched if m.get(field) in (None, "")]
        for m in matched[:req.limit] if req.limit else matched:
            self._add(reply, m.tid, m.rec, reason_for)
        for (func, kind), by_state in sorted(counts.items()):
            reply.summary.add(func_or_class_name=func, type=kind, state_counts=by_state)
        return reply

    @staticmethod
    def _add(reply: gcs_pb2.ListTasksReply, tid: bytes, rec: _Record,
             reason_for: Optional[ReasonFor]) -> None:
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
        if reason_for is not None and rec.states and rec.states[-1] < SUBMITTED_TO_WORKER:
            r.pending_reason = reason_for(rec)
