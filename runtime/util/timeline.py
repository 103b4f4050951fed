"""``runtime.timeline()`` (Ray's ``ray.timeline``): task executions as Chrome trace
events, from the task events the GCS keeps (runtime/gcs/task_events.py).

Ray builds its timeline from profile events that workers record when
``RAY_PROFILING=1``. Here every owner already reports each task's RUNNING and
FINISHED/FAILED times (the worker's own start and end, carried back in the
result), so the timeline needs no switch: one complete ("X") event per attempt
that ran to an end, with Ray's layout - a row group per node (``pid``: the node's
IP), a row per worker (``tid``: ``worker:<worker id>``), times in microseconds -
and the task's ids in ``args``. Open the file in chrome://tracing or Perfetto.

Only tasks still in the GCS's window (``RUNTIME_TASK_EVENTS_MAX_TASKS``, the most
recent 10,000 by default) appear, and owners send events about once a second, so a
task that ended a moment ago may not be there yet.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

from runtime.protocol.common_pb2 import FAILED, FINISHED, RUNNING

#: Chrome's color names (catapult's color scheme), as Ray colors task boxes.
_COLOR_OK = "generic_work"
_COLOR_FAILED = "terrible"


def task_trace_events(rec: Dict[str, Any], states: Sequence[int], times: Sequence[float]
                      ) -> List[Dict[str, Any]]:
    """The complete events of one task: rec is its state-API record (node_ip, worker_id,
    names, ids), states/times its events. Each FINISHED or FAILED closes the attempt
    begun by the latest RUNNING before it; an attempt that never started (failed while
    pending) or never ended (still running, or its worker died) has no event."""
    out: List[Dict[str, Any]] = []
    start: Optional[float] = None
    for state, at in zip(states, times):
        if state == RUNNING:
            start = at if start is None else max(start, at)
        elif state in (FINISHED, FAILED):
            if start is not None:
                name = rec.get("name") or rec.get("func_or_class_name") or "task"
                out.append({
                    "cat": f"task::{rec.get('func_or_class_name') or name}",
                    "name": f"task::{name}",
                    "pid": rec.get("node_ip") or rec.get("node_id") or "unknown node",
                    "tid": f"worker:{rec.get('worker_id') or rec.get('worker_pid') or '?'}",
                    "ts": start * 1e6,
                    "dur": max(0.0, at - start) * 1e6,
                    "ph": "X",
                    "cname": _COLOR_OK if state == FINISHED else _COLOR_FAILED,
                    "args": {"task_id": rec.get("task_id"), "name": name,
                             "func_or_class_name": rec.get("func_or_class_name"),
                             "type": rec.get("type"), "job_id": rec.get("job_id"),
                             "actor_id": rec.get("actor_id"),
                             "attempt_number": rec.get("attempt_number"),
                             "node_id": rec.get("node_id"), "worker_id": rec.get("worker_id"),
                             "worker_pid": rec.get("worker_pid"),
                             "state": "FINISHED" if state == FINISHED else "FAILED",
                             "error_type": rec.get("error_type") if state == FAILED else None},
                })
            start = None
    return out


def timeline(filename: Optional[str] = None) -> Optional[List[Dict[str, Any]]]:
    """Every task execution in the GCS's window as Chrome trace events: the list, or,
    given a filename, the list written there as JSON (and None returned), as Ray does."""
    from runtime.util.state import records as state

    reply = state._tasks(0, state.DEFAULT_RPC_TIMEOUT)
    node_ips = state._node_ips(state.DEFAULT_RPC_TIMEOUT)
    events: List[Dict[str, Any]] = []
    for t in reply.tasks:
        if not t.states:
            continue
        events.extend(task_trace_events(state.task_record(t, node_ips), list(t.states),
                                        list(t.times)))
    events.sort(key=lambda e: e["ts"])
    if filename is None:
        return events
    with open(filename, "w") as fh:
        json.dump(events, fh)
    return None


__all__ = ["timeline", "task_trace_events"]
