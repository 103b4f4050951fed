"""The state API (``ray.util.state``): what the cluster is doing, as lists of records.

Data comes from the GCS (nodes, jobs, actors, placement groups, task events),
the raylets (workers) and the core workers themselves (objects). Each record
is a dict that also allows attribute access (``a["state"]`` and ``a.state``),
so code written for either style of Ray's state API works.

Filters are Ray's ``[(key, predicate, value)]`` with predicates ``=`` and
``!=``; values are compared as strings, case-insensitively for states.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import grpc

from runtime.core_worker.task_events import TASK_STATES

DEFAULT_LIMIT = 100
Filter = Tuple[str, str, Any]


class StateRecord(dict):
    """A dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _gcs():
    from runtime.api import _gcs

    return _gcs()


def _token() -> str:
    from runtime.api import _ensure_initialized

    return _ensure_initialized().token


def _apply(records: Iterable[dict], filters: Optional[Sequence[Filter]], limit: Optional[int]
           ) -> List[StateRecord]:
    out: List[StateRecord] = []
    preds = []
    for f in filters or ():
        if len(f) != 3:
            raise ValueError(f"a filter is (key, predicate, value), got {f!r}")
        key, op, value = f
        if op not in ("=", "!="):
            raise ValueError(f"unsupported filter predicate {op!r}: use '=' or '!='")
        preds.append((key, op, str(value).lower() if value is not None else "none"))
    for r in records:
        ok = True
        for key, op, value in preds:
            if key not in r:
                raise ValueError(f"cannot filter on {key!r}: records have {sorted(r)}")
            actual = str(r[key]).lower()
            if (actual == value) != (op == "="):
                ok = False
                break
        if ok:
            out.append(StateRecord(r))
            if limit and len(out) >= limit:
                break
    return out


# -- nodes, jobs ------------------------------------------------------------------------------------
def _node_records() -> List[dict]:
    from runtime.protocol import common_pb2

    out = []
    for n in _gcs().GetAllNodes(common_pb2.Empty(), timeout=10).nodes:
        out.append({"node_id": n.node_id.hex(), "node_ip": n.node_ip, "is_head_node": n.is_head,
                    "state": "ALIVE" if n.alive else "DEAD", "node_name": n.hostname,
                    "resources_total": dict(n.resources_total),
                    "resources_available": dict(n.resources_available),
                    "labels": dict(n.labels), "start_time_ms": int(n.start_time * 1000),
                    "state_message": n.death_reason, "raylet_port": n.raylet_port,
                    "object_store_port": n.store_port, "raylet_pid": n.raylet_pid})
    return out


def list_nodes(filters: Optional[Sequence[Filter]] = None, limit: int = DEFAULT_LIMIT,
               **_ignored) -> List[StateRecord]:
    return _apply(_node_records(), filters, limit)


def list_jobs(filters: Optional[Sequence[Filter]] = None, limit: int = DEFAULT_LIMIT,
              **_ignored) -> List[StateRecord]:
    from runtime.protocol import common_pb2

    recs = []
    for j in _gcs().GetAllJobs(common_pb2.Empty(), timeout=10).jobs:
        recs.append({"job_id": j.job_id.hex(), "type": "DRIVER",
                     "status": "SUCCEEDED" if j.is_dead else "RUNNING",
                     "entrypoint": j.entrypoint, "start_time": int(j.start_time * 1000),
                     "end_time": int(j.end_time * 1000) if j.end_time else None,
                     "driver_info": {"pid": str(j.driver_pid), "node_ip_address": j.driver_ip},
                     "namespace": j.namespace, "is_dead": j.is_dead})
    return _apply(recs, filters, limit)


# -- actors ------------------------------------------------------------------------------------------
def _actor_record(a) -> dict:
    return {"actor_id": a.actor_id.hex(), "class_name": a.class_name, "state": a.state,
            "job_id": a.job_id.hex(), "name": a.name, "ray_namespace": a.namespace,
            "node_id": a.node_id.hex() if a.node_id else None, "pid": a.pid or None,
            "address": f"{a.address.ip}:{a.address.port}" if a.address.port else None,
            "num_restarts": a.num_restarts, "max_restarts": a.max_restarts,
            "death_cause": a.death_cause or None, "is_detached": a.detached,
            "required_resources": dict(a.resources), "repr_name": a.class_name,
            "pending_reason": a.pending_reason or None,
            "start_time_ms": int(a.start_time * 1000), "end_time_ms": int(a.end_time * 1000)}


def list_actors(filters: Optional[Sequence[Filter]] = None, limit: int = DEFAULT_LIMIT,
                **_ignored) -> List[StateRecord]:
    from runtime.protocol import common_pb2

    actors = _gcs().ListActors(common_pb2.Empty(), timeout=10).actors
    return _apply((_actor_record(a) for a in actors), filters, limit)


def get_actor(id: str, **_ignored) -> Optional[StateRecord]:
    from runtime.protocol import gcs_pb2

    reply = _gcs().GetActor(gcs_pb2.GetActorRequest(actor_id=bytes.fromhex(id)), timeout=10)
    return StateRecord(_actor_record(reply.actor)) if reply.found else None


# -- tasks --------------------------------------------------------------------------------------------
def _task_record(t) -> dict:
    st, oc = t.static, t.outcome
    states = list(t.states)
    times = list(t.times)
    state = TASK_STATES[states[-1]] if states else "NIL"
    start = next((tm for s, tm in zip(states, times) if s == 3), None)
    end = next((tm for s, tm in zip(states, times) if s in (4, 5)), None)
    return {"task_id": t.task_id.hex(), "name": st.name, "state": state,
            "job_id": t.job_id.hex(), "type": st.type or "NORMAL_TASK",
            "actor_id": st.actor_id.hex() if st.actor_id else None,
            "func_or_class_name": st.func_or_class_name, "parent_task_id": st.parent_task_id.hex() or None,
            "node_id": oc.node_id.hex() if oc.node_id else None,
            "worker_id": oc.worker_id.hex() if oc.worker_id else None,
            "worker_pid": oc.worker_pid or None, "error_type": oc.error_type or None,
            "error_message": oc.error_message or None, "attempt_number": oc.attempt,
            "required_resources": dict(st.resources), "language": "PYTHON",
            "placement_group_id": st.placement_group_id.hex() or None,
            "events": [{"state": TASK_STATES[s], "created_ms": int(tm * 1000)}
                       for s, tm in zip(states, times)],
            "creation_time_ms": int(times[0] * 1000) if times else None,
            "start_time_ms": int(start * 1000) if start else None,
            "end_time_ms": int(end * 1000) if end else None}


def _tasks(limit: int = 0):
    from runtime.protocol import gcs_pb2

    return _gcs().ListTasks(gcs_pb2.ListTasksRequest(limit=limit), timeout=30)


def list_tasks(filters: Optional[Sequence[Filter]] = None, limit: int = DEFAULT_LIMIT,
               **_ignored) -> List[StateRecord]:
    """The most recent tasks first. Task events reach the GCS in batches about once
    a second, so a task submitted just now may not be listed yet."""
    reply = _tasks(0 if filters else limit)
    return _apply((_task_record(t) for t in reply.tasks), filters, limit)


def summarize_tasks(**_ignored) -> Dict[str, Any]:
    """Counts per function name and state, like `ray summary tasks`."""
    reply = _tasks(0)
    summary: Dict[str, Dict[str, Any]] = {}
    for t in reply.tasks:
        rec = _task_record(t)
        entry = summary.setdefault(rec["func_or_class_name"], {
            "func_or_class_name": rec["func_or_class_name"], "type": rec["type"],
            "state_counts": {}})
        entry["state_counts"][rec["state"]] = entry["state_counts"].get(rec["state"], 0) + 1
    return {"cluster": {"summary": summary, "total_tasks": len(reply.tasks),
                        "total_actor_tasks": sum(1 for t in reply.tasks if t.static.type == "ACTOR_TASK"),
                        "total_actor_scheduled": 0, "summary_by": "func_name",
                        "dropped": reply.dropped}}


# -- workers and objects (asked of every raylet and core worker) -----------------------------------
def _raylet_stats() -> List[Tuple[dict, Any]]:
    from runtime import rpc
    from runtime.protocol import common_pb2, raylet_pb2_grpc

    out = []
    for node in _node_records():
        if node["state"] != "ALIVE":
            continue
        ch = rpc.sync_channel(f"{node['node_ip']}:{node['raylet_port']}", _token())
        try:
            out.append((node, raylet_pb2_grpc.RayletStub(ch).GetNodeStats(common_pb2.Empty(),
                                                                             timeout=10)))
        except grpc.RpcError:
            pass
        finally:
            ch.close()
    return out


def list_workers(filters: Optional[Sequence[Filter]] = None, limit: int = DEFAULT_LIMIT,
                 **_ignored) -> List[StateRecord]:
    recs = []
    for node, stats in _raylet_stats():
        for w in stats.workers:
            recs.append({"worker_id": w.worker_id.hex() or None, "is_alive": True,
                         "worker_type": "DRIVER" if w.is_driver else "WORKER",
                         "node_id": node["node_id"], "ip": node["node_ip"], "pid": w.pid,
                         "port": w.port, "leased": w.leased, "blocked": w.blocked,
                         "job_id": w.job_id.hex() or None, "exit_type": None})
    return _apply(recs, filters, limit)


def list_objects(filters: Optional[Sequence[Filter]] = None, limit: int = DEFAULT_LIMIT,
                 **_ignored) -> List[StateRecord]:
    from runtime import rpc
    from runtime.protocol import common_pb2, core_worker_pb2_grpc

    recs = []
    for node, stats in _raylet_stats():
        for w in stats.workers:
            if not w.port:
                continue
            ch = rpc.sync_channel(f"{node['node_ip']}:{w.port}", _token())
            try:
                owned = core_worker_pb2_grpc.CoreWorkerStub(ch).ListObjects(common_pb2.Empty(),
                                                                            timeout=10)
            except grpc.RpcError:
                continue
            finally:
                ch.close()
            for o in owned.objects:
                ref_type = ("LOCAL_REFERENCE" if o.local_refs else
                            "USED_BY_PENDING_TASK" if o.submitted_refs else
                            "CAPTURED_IN_OBJECT" if o.contained_refs else "BORROWED_BY_OTHERS")
                recs.append({"object_id": o.object_id.hex(), "object_size": o.size,
                             "task_status": o.task_status, "reference_type": ref_type,
                             "type": "DRIVER" if owned.is_driver else "WORKER",
                             "pid": owned.pid, "ip": owned.ip, "in_object_store": o.in_store,
                             "node_id": node["node_id"]})
    return _apply(recs, filters, limit)


def list_placement_groups(filters: Optional[Sequence[Filter]] = None, limit: int = DEFAULT_LIMIT,
                          **_ignored) -> List[StateRecord]:
    from runtime.util.placement_group import placement_group_table

    table = placement_group_table()
    return _apply(table.values(), filters, limit)


__all__ = ["list_nodes", "list_jobs", "list_actors", "get_actor", "list_tasks", "summarize_tasks",
           "list_workers", "list_objects", "list_placement_groups", "StateRecord"]
