"""The state API (``ray.util.state``): what the cluster is doing, as lists of records.

Data comes from the GCS (nodes, jobs, actors, placement groups, task events),
the raylets (workers) and the core workers themselves (objects). Each record
is a dict that also allows attribute access (``a["state"]`` and ``a.state``),
so code written for either style of Ray's state API works.

Filters are Ray's ``[(key, predicate, value)]`` with predicates ``=`` and
``!=``; values are compared as strings, case-insensitively for states.

A component that cannot be asked raises an error from runtime.exceptions naming it
and its address (ClusterConnectionError when unreachable), never a raw gRPC error.
As in Ray, a raylet that fails to answer fails list_workers/list_objects unless
``raise_on_missing_output=False``, which returns what the others answered.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import grpc

from runtime.core_worker.task_events import TASK_STATES
from runtime.protocol.common_pb2 import FAILED, FINISHED, RUNNING, SUBMITTED_TO_WORKER
from runtime.rpc_errors import component_error

log = logging.getLogger("runtime.util.state")

DEFAULT_LIMIT = 100
#: Seconds each call to the GCS, a raylet or a worker may take (Ray's default).
DEFAULT_RPC_TIMEOUT = 30
Filter = Tuple[str, str, Any]


class StateRecord(dict):
    """A dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _gcs_call(method: str, request: Any, doing: str, timeout: float) -> Any:
    """One GCS call; a failure raises an error naming the GCS and its address."""
    from runtime.api import _gcs_call

    return _gcs_call(method, request, doing, timeout=timeout)


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
def _node_records(timeout: float = DEFAULT_RPC_TIMEOUT) -> List[dict]:
    from runtime.protocol import common_pb2

    out = []
    for n in _gcs_call("GetAllNodes", common_pb2.Empty(), "listing nodes", timeout).nodes:
        out.append({"node_id": n.node_id.hex(), "node_ip": n.node_ip, "is_head_node": n.is_head,
                    "state": "ALIVE" if n.alive else "DEAD", "node_name": n.hostname,
                    "resources_total": dict(n.resources_total),
                    "resources_available": dict(n.resources_available),
                    "labels": dict(n.labels), "start_time_ms": int(n.start_time * 1000),
                    "state_message": n.death_reason, "raylet_port": n.raylet_port,
                    "object_store_port": n.store_port, "raylet_pid": n.raylet_pid})
    return out


def list_nodes(filters: Optional[Sequence[Filter]] = None, limit: int = DEFAULT_LIMIT,
               timeout: float = DEFAULT_RPC_TIMEOUT, **_ignored) -> List[StateRecord]:
    return _apply(_node_records(timeout), filters, limit)


def list_jobs(filters: Optional[Sequence[Filter]] = None, limit: int = DEFAULT_LIMIT,
              timeout: float = DEFAULT_RPC_TIMEOUT, **_ignored) -> List[StateRecord]:
    from runtime.protocol import common_pb2

    recs = []
    for j in _gcs_call("GetAllJobs", common_pb2.Empty(), "listing jobs", timeout).jobs:
        recs.append({"job_id": j.job_id.hex(), "type": "DRIVER",
                     "status": "SUCCEEDED" if j.is_dead else "RUNNING",
                     "entrypoint": j.entrypoint, "start_time": int(j.start_time * 1000),
                     "end_time": int(j.end_time * 1000) if j.end_time else None,
                     "driver_info": {"pid": str(j.driver_pid), "node_ip_address": j.driver_ip},
                     "namespace": j.namespace, "is_dead": j.is_dead})
    return _apply(recs, filters, limit)


# -- actors ------------------------------------------------------------------------------------------
def actor_record(a) -> dict:
    """The state-API record of an ActorInfo (the GCS filters these, raytop shows them)."""
    return {"actor_id": a.actor_id.hex(), "class_name": a.class_name, "state": a.state,
            "job_id": a.job_id.hex(), "name": a.name, "ray_namespace": a.namespace,
            "node_id": a.node_id.hex() if a.node_id else None,
            "node_ip": a.address.ip or None, "pid": a.pid or None,
            "address": f"{a.address.ip}:{a.address.port}" if a.address.port else None,
            "num_restarts": a.num_restarts, "max_restarts": a.max_restarts,
            "death_cause": a.death_cause or None, "is_detached": a.detached,
            "required_resources": dict(a.resources), "repr_name": a.class_name,
            "pending_reason": a.pending_reason or None,
            "start_time_ms": int(a.start_time * 1000), "end_time_ms": int(a.end_time * 1000)}



def list_actors(filters: Optional[Sequence[Filter]] = None, limit: int = DEFAULT_LIMIT,
                timeout: float = DEFAULT_RPC_TIMEOUT, **_ignored) -> List[StateRecord]:
    from runtime.protocol import common_pb2

    actors = _gcs_call("ListActors", common_pb2.Empty(), "listing actors", timeout).actors
    return _apply((actor_record(a) for a in actors), filters, limit)


def get_actor(id: str, timeout: float = DEFAULT_RPC_TIMEOUT, **_ignored
              ) -> Optional[StateRecord]:
    from runtime.protocol import gcs_pb2

    reply = _gcs_call("GetActor", gcs_pb2.GetActorRequest(actor_id=bytes.fromhex(id)),
                      f"looking up actor {id}", timeout)
    return StateRecord(actor_record(reply.actor)) if reply.found else None


# -- tasks --------------------------------------------------------------------------------------------
def task_dict(task_id: bytes, job_id: bytes, static: Sequence, outcome: Sequence,
              states: Sequence[int], times: Sequence[float], *, pending_reason: str = "",
              node_ips: Optional[Dict[bytes, str]] = None, events: bool = True,
              now: Optional[float] = None) -> dict:
    """The state-API record of a task, from the GCS's compact form: static is
    (name, type, actor_id, parent_task_id, resources, placement_group_id,
    func_or_class_name) or (), outcome (node_id, worker_id, worker_pid, error_type,
    error_message, attempt) or (). The GCS builds these to filter tasks where they
    are; events=False leaves out the per-state timeline (filters do not need it)."""
    name, kind, actor_id, parent, resources, pg, func = static or ("", "", b"", b"", {}, b"", "")
    node, worker, pid, etype, emsg, attempt = outcome or (b"", b"", 0, "", "", 0)
    state = TASK_STATES[states[-1]] if states else "NIL"
    start = end = submitted = None
    for s, tm in zip(states, times):
        if s == RUNNING and start is None:
            start = tm
        elif s in (FINISHED, FAILED) and end is None:
            end = tm
        elif s == SUBMITTED_TO_WORKER and submitted is None:
            submitted = tm
    # Owners learn when a task started only when it ends: a task still out on a worker
    # counts from its submission.
    began = start if start is not None else submitted
    if began is not None:
        duration = (end if end is not None else (now or time.time())) - began
    else:
        duration = None
    rec = {"task_id": task_id.hex(), "name": name, "state": state,
           "job_id": job_id.hex(), "type": kind or "NORMAL_TASK",
           "actor_id": actor_id.hex() if actor_id else None,
           "func_or_class_name": func, "parent_task_id": parent.hex() or None,
           "node_id": node.hex() if node else None,
           "node_ip": (node_ips or {}).get(node) if node else None,
           "worker_id": worker.hex() if worker else None,
           "worker_pid": pid or None, "error_type": etype or None,
           "error_message": emsg or None, "attempt_number": attempt,
           "required_resources": dict(resources), "language": "PYTHON",
           "placement_group_id": pg.hex() or None,
           "pending_reason": pending_reason or None,
           "duration_s": round(duration, 3) if duration is not None else None,
           "creation_time_ms": int(times[0] * 1000) if times else None,
           "start_time_ms": int(start * 1000) if start else None,
           "end_time_ms": int(end * 1000) if end else None}
    if events:
        rec["events"] = [{"state": TASK_STATES[s], "created_ms": int(tm * 1000)}
                         for s, tm in zip(states, times)]
    return rec


def task_record(t, node_ips: Optional[Dict[bytes, str]] = None) -> dict:
    """The state-API record of a TaskRecord (gcs.proto)."""
    st, oc = t.static, t.outcome
    static = (st.name, st.type, st.actor_id, st.parent_task_id, st.resources,
              st.placement_group_id, st.func_or_class_name)
    outcome = (oc.node_id, oc.worker_id, oc.worker_pid, oc.error_type, oc.error_message,
               oc.attempt)
    return task_dict(t.task_id, t.job_id, static, outcome, list(t.states), list(t.times),
                     pending_reason=t.pending_reason, node_ips=node_ips)



def _tasks(limit: int = 0, timeout: float = DEFAULT_RPC_TIMEOUT):
    from runtime.protocol import gcs_pb2

    return _gcs_call("ListTasks", gcs_pb2.ListTasksRequest(limit=limit), "listing tasks", timeout)


def list_tasks(filters: Optional[Sequence[Filter]] = None, limit: int = DEFAULT_LIMIT,
               timeout: float = DEFAULT_RPC_TIMEOUT, **_ignored) -> List[StateRecord]:
    """The most recent tasks first. Task events reach the GCS in batches about once
    a second, so a task submitted just now may not be listed yet."""
    reply = _tasks(0 if filters else limit, timeout)
    node_ips = {bytes.fromhex(n["node_id"]): n["node_ip"] for n in _node_records(timeout)}
    return _apply((task_record(t, node_ips) for t in reply.tasks), filters, limit)


def summarize_tasks(timeout: float = DEFAULT_RPC_TIMEOUT, **_ignored) -> Dict[str, Any]:
    """Counts per function name and state, like `ray summary tasks`."""
    reply = _tasks(0, timeout)
    summary: Dict[str, Dict[str, Any]] = {}
    for t in reply.tasks:
        rec = task_record(t)
        entry = summary.setdefault(rec["func_or_class_name"], {
            "func_or_class_name": rec["func_or_class_name"], "type": rec["type"],
            "state_counts": {}})
        entry["state_counts"][rec["state"]] = entry["state_counts"].get(rec["state"], 0) + 1
    return {"cluster": {"summary": summary, "total_tasks": len(reply.tasks),
                        "total_actor_tasks": sum(1 for t in reply.tasks if t.static.type == "ACTOR_TASK"),
                        "total_actor_scheduled": 0, "summary_by": "func_name",
                        "dropped": reply.dropped}}


# -- workers and objects (asked of every raylet and core worker) -----------------------------------
def _raylet_stats(timeout: float, raise_on_missing_output: bool, doing: str
                  ) -> List[Tuple[dict, Any]]:
    """GetNodeStats of every live node's raylet. One that fails raises an error naming
    it (Ray's raise_on_missing_output) or, when told not to, is left out with a
    warning."""
    from runtime import rpc
    from runtime.protocol import common_pb2, raylet_pb2_grpc

    out = []
    for node in _node_records(timeout):
        if node["state"] != "ALIVE":
            continue
        address = f"{node['node_ip']}:{node['raylet_port']}"
        ch = rpc.sync_channel(address, _token())
        try:
            out.append((node, raylet_pb2_grpc.RayletStub(ch).GetNodeStats(common_pb2.Empty(),
                                                                             timeout=timeout)))
        except grpc.RpcError as exc:
            err = component_error(f"raylet of node {node['node_id'][:8]}", address, exc, doing)
            if raise_on_missing_output:
                raise err from None
            log.warning("leaving node %s out (raise_on_missing_output=False): %s",
                        node["node_id"][:8], err)
        finally:
            ch.close()
    return out


def list_workers(filters: Optional[Sequence[Filter]] = None, limit: int = DEFAULT_LIMIT,
                 timeout: float = DEFAULT_RPC_TIMEOUT, raise_on_missing_output: bool = True,
                 **_ignored) -> List[StateRecord]:
    recs = []
    for node, stats in _raylet_stats(timeout, raise_on_missing_output, "listing workers"):
        for w in stats.workers:
            recs.append({"worker_id": w.worker_id.hex() or None, "is_alive": True,
                         "worker_type": "DRIVER" if w.is_driver else "WORKER",
                         "node_id": node["node_id"], "ip": node["node_ip"], "pid": w.pid,
                         "port": w.port, "leased": w.leased, "blocked": w.blocked,
                         "job_id": w.job_id.hex() or None, "exit_type": None})
    return _apply(recs, filters, limit)


#: A worker the raylet listed a moment ago may have exited since: its objects went with
#: it, so (as Ray's raylets do) it is left out rather than failing the whole listing.
_WORKER_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def list_objects(filters: Optional[Sequence[Filter]] = None, limit: int = DEFAULT_LIMIT,
                 timeout: float = DEFAULT_RPC_TIMEOUT, raise_on_missing_output: bool = True,
                 **_ignored) -> List[StateRecord]:
    from runtime import rpc
    from runtime.protocol import common_pb2, core_worker_pb2_grpc

    recs = []
    for node, stats in _raylet_stats(timeout, raise_on_missing_output, "listing objects"):
        for w in stats.workers:
            if not w.port:
                continue
            address = f"{node['node_ip']}:{w.port}"
            ch = rpc.sync_channel(address, _token())
            try:
                owned = core_worker_pb2_grpc.CoreWorkerStub(ch).ListObjects(common_pb2.Empty(),
                                                                            timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() in _WORKER_GONE:
                    continue
                err = component_error(f"worker pid {w.pid}", address, exc, "listing objects")
                if raise_on_missing_output:
                    raise err from None
                log.warning("leaving the objects of worker pid %d out "
                            "(raise_on_missing_output=False): %s", w.pid, err)
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
