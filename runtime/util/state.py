"""The state API (``ray.util.state``): what the cluster is doing, as lists of records.

Data comes from the GCS (nodes, jobs, actors, placement groups, task events, cluster
events, metrics), the raylets (workers, each node's log files through its LogService and
its runtime environments through its RuntimeEnvService) and the core workers themselves
(objects). Each record is a dict that
also allows attribute access (``a["state"]`` and ``a.state``), so code written for
either style of Ray's state API works. Records carry the fields of Ray 2.60's
``*State`` dataclasses (None where this runtime does not know the value) and a few
of ours; ``detail=False`` returns them all too (a superset of Ray's short form).

Filters are Ray's ``[(key, predicate, value)]`` with predicates ``=`` and
``!=``; values are compared as strings, case-insensitively for states.

A component that cannot be asked raises an error from runtime.exceptions naming it
and its address (ClusterConnectionError when unreachable), never a raw gRPC error.
As in Ray, a raylet that fails to answer fails list_workers/list_objects unless
``raise_on_missing_output=False``, which returns what the others answered.

Our additions, not in Ray's API: ``list_metrics()`` (what ``runtime.util.metrics``
recorded, per process) and ``StateApiClient.list("metrics")``.
"""
from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import logging
import re
import time
from collections import defaultdict
from typing import Any, Callable, Dict, Generator, Iterable, List, Optional, \
    Sequence, Tuple, Union

import grpc

from runtime.core_worker.task_events import TASK_STATES
from runtime.core_worker.task_logs import INDEX_SUFFIX, RECORD_ACTOR_CALLS_ENV, \
    worker_log_stem
from runtime.exceptions import RaySystemError
from runtime.protocol.common_pb2 import FAILED, FINISHED, RUNNING, SUBMITTED_TO_WORKER
from runtime.rpc_errors import component_error

log = logging.getLogger("runtime.util.state")

DEFAULT_LIMIT = 100
#: Seconds each call to the GCS, a raylet or a worker may take (Ray's default).
DEFAULT_RPC_TIMEOUT = 30
DEFAULT_LOG_LIMIT = 1000
Filter = Tuple[str, str, Any]
_HEX = re.compile(r"^[0-9a-fA-F]+$")


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


def _connect(address: Optional[str]) -> None:
    """Ray's ``address`` argument. None or "auto": this process's cluster (connecting
    first, as Ray's API does). Another address: connect there when nothing is connected
    yet; a process already connected elsewhere cannot query a second cluster."""
    from runtime.api import _ensure_initialized, init, is_initialized

    if address in (None, "", "auto"):
        return
    if not is_initialized():
        init(address=address)
        return
    here = _ensure_initialized().gcs_address

    def norm(a: str) -> str:
        return a.replace("localhost:", "127.0.0.1:").rstrip("/")

    if norm(address) != norm(here):
        raise ValueError(f"this process is connected to the cluster whose GCS is at {here}, "
                         f"so the state API cannot query {address!r} from it: pass "
                         f"address=None, or call shutdown() first")


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


def _with_defaults(rec: dict, defaults: Dict[str, Any]) -> dict:
    """rec with Ray's fields it lacks (a fresh dict: raytop's records stay as they are)."""
    out = dict(defaults)
    out.update(rec)
    return out


def _check_id(kind: str, id: str) -> str:
    if not isinstance(id, str) or not _HEX.match(id):
        raise ValueError(f"{kind} id must be a hex string (as list_{kind}s() shows it), "
                         f"got {id!r}")
    return id.lower()


# -- nodes, jobs ------------------------------------------------------------------------------------
#: NodeState fields this runtime does not record.
_NODE_DEFAULTS = {"end_time_ms": None}


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


def list_nodes(address: Optional[str] = None, filters: Optional[Sequence[Filter]] = None,
               limit: int = DEFAULT_LIMIT, timeout: float = DEFAULT_RPC_TIMEOUT,
               detail: bool = False, raise_on_missing_output: bool = True,
               _explain: bool = False) -> List[StateRecord]:
    _connect(address)
    recs = (_with_defaults(n, _NODE_DEFAULTS) for n in _node_records(timeout))
    return _apply(recs, filters, limit)


def list_jobs(address: Optional[str] = None, filters: Optional[Sequence[Filter]] = None,
              limit: int = DEFAULT_LIMIT, timeout: float = DEFAULT_RPC_TIMEOUT,
              detail: bool = False, raise_on_missing_output: bool = True,
              _explain: bool = False) -> List[StateRecord]:
    """Jobs submitted through the jobs API (type SUBMISSION, with the last driver each
    started), then drivers started by hand (type DRIVER), with Ray's JobDetails fields."""
    from runtime.protocol import common_pb2
    from runtime.util import job_details

    _connect(address)
    drivers = list(_gcs_call("GetAllJobs", common_pb2.Empty(), "listing jobs", timeout).jobs)
    submitted = _gcs_call("ListSubmittedJobs", common_pb2.Empty(), "listing submitted jobs",
                          timeout).jobs
    last = job_details.last_drivers(drivers)
    recs = [job_details.details(j, last.get(j.submission_id)) for j in submitted]
    for d in sorted(drivers, key=lambda d: d.job_id.hex()):
        if not d.submission_id:
            rec = job_details.driver_details(d)
            rec.update(namespace=d.namespace, is_dead=d.is_dead)
            recs.append(rec)
    return _apply(recs, filters, limit)


# -- actors ------------------------------------------------------------------------------------------
#: ActorState fields this runtime does not record.
_ACTOR_DEFAULTS = {"serialized_runtime_env": None, "placement_group_id": None,
                   "num_restarts_due_to_lineage_reconstruction": 0, "call_site": None,
                   "label_selector": None}


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


def _actor_state(a) -> dict:
    return _with_defaults(actor_record(a), _ACTOR_DEFAULTS)


def list_actors(address: Optional[str] = None, filters: Optional[Sequence[Filter]] = None,
                limit: int = DEFAULT_LIMIT, timeout: float = DEFAULT_RPC_TIMEOUT,
                detail: bool = False, raise_on_missing_output: bool = True,
                _explain: bool = False) -> List[StateRecord]:
    from runtime.protocol import common_pb2

    _connect(address)
    actors = _gcs_call("ListActors", common_pb2.Empty(), "listing actors", timeout).actors
    return _apply((_actor_state(a) for a in actors), filters, limit)


def _actor_info(id: str, timeout: float):
    from runtime.protocol import gcs_pb2

    reply = _gcs_call("GetActor", gcs_pb2.GetActorRequest(actor_id=bytes.fromhex(id)),
                      f"looking up actor {id}", timeout)
    return reply.actor if reply.found else None


def get_actor(id: str, address: Optional[str] = None, timeout: float = DEFAULT_RPC_TIMEOUT,
              _explain: bool = False) -> Optional[StateRecord]:
    """The actor's record, or None when the GCS does not know it."""
    _connect(address)
    info = _actor_info(_check_id("actor", id), timeout)
    return StateRecord(_actor_state(info)) if info is not None else None


def summarize_actors(address: Optional[str] = None, timeout: float = DEFAULT_RPC_TIMEOUT,
                     raise_on_missing_output: bool = True, _explain: bool = False
                     ) -> Dict[str, Any]:
    """Counts per class and state (Ray's ActorSummaries, under "cluster")."""
    from runtime.protocol import common_pb2

    _connect(address)
    actors = _gcs_call("ListActors", common_pb2.Empty(), "listing actors", timeout).actors
    summary: Dict[str, Dict[str, Any]] = {}
    for a in actors:
        entry = summary.setdefault(a.class_name, {"class_name": a.class_name,
                                                  "state_counts": {}})
        entry["state_counts"][a.state] = entry["state_counts"].get(a.state, 0) + 1
    return {"cluster": {"summary": summary, "total_actors": len(actors),
                        "summary_by": "class"}}


# -- tasks --------------------------------------------------------------------------------------------
#: TaskState fields this runtime does not record. task_log_info is None: the ranges are in
#: the worker's index on its node, read by get_log(task_id=...) only.
_TASK_DEFAULTS = {"runtime_env_info": None, "profiling_data": None, "task_log_info": None,
                  "is_debugger_paused": None, "call_site": None, "label_selector": None}


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


def _task_state(t, node_ips: Optional[Dict[bytes, str]] = None) -> dict:
    return _with_defaults(task_record(t, node_ips), _TASK_DEFAULTS)


def _tasks(limit: int = 0, timeout: float = DEFAULT_RPC_TIMEOUT, filter: str = ""):
    from runtime.protocol import gcs_pb2

    return _gcs_call("ListTasks", gcs_pb2.ListTasksRequest(limit=limit, filter=filter),
                     "listing tasks", timeout)


def _node_ips(timeout: float) -> Dict[bytes, str]:
    return {bytes.fromhex(n["node_id"]): n["node_ip"] for n in _node_records(timeout)}


def list_tasks(address: Optional[str] = None, filters: Optional[Sequence[Filter]] = None,
               limit: int = DEFAULT_LIMIT, timeout: float = DEFAULT_RPC_TIMEOUT,
               detail: bool = False, raise_on_missing_output: bool = True,
               _explain: bool = False) -> List[StateRecord]:
    """The most recent tasks first. Task events reach the GCS in batches about once
    a second, so a task submitted just now may not be listed yet."""
    _connect(address)
    reply = _tasks(0 if filters else limit, timeout)
    node_ips = _node_ips(timeout)
    return _apply((_task_state(t, node_ips) for t in reply.tasks), filters, limit)


def _task_records(task_id: str, timeout: float) -> List[Any]:
    reply = _tasks(0, timeout, filter=f"task_id=={task_id}")
    return [t for t in reply.tasks if t.task_id.hex() == task_id]


def get_task(id: Union[str, Any], address: Optional[str] = None,
             timeout: float = DEFAULT_RPC_TIMEOUT, _explain: bool = False
             ) -> Optional[StateRecord]:
    """The task's record (``id`` a task id's hex or an ObjectRef the task returns), or
    None. The GCS keeps one record per task, that of its latest attempt, so this never
    returns Ray's list of attempts."""
    _connect(address)
    task_id = id if isinstance(id, str) else id.task_id().hex()
    found = _task_records(_check_id("task", task_id), timeout)
    if not found:
        return None
    return StateRecord(_task_state(found[0], _node_ips(timeout)))


def summarize_tasks(address: Optional[str] = None, timeout: float = DEFAULT_RPC_TIMEOUT,
                    raise_on_missing_output: bool = True, _explain: bool = False
                    ) -> Dict[str, Any]:
    """Counts per function name and state, like `ray summary tasks`."""
    _connect(address)
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


#: WorkerState fields this runtime does not record.
_WORKER_DEFAULTS = {"exit_detail": None, "worker_launch_time_ms": None,
                    "worker_launched_time_ms": None, "start_time_ms": None,
                    "end_time_ms": None, "debugger_port": None, "num_paused_threads": None}


def _worker_records(timeout: float, raise_on_missing_output: bool) -> List[dict]:
    recs = []
    for node, stats in _raylet_stats(timeout, raise_on_missing_output, "listing workers"):
        for w in stats.workers:
            recs.append(_with_defaults(
                {"worker_id": w.worker_id.hex() or None, "is_alive": True,
                 "worker_type": "DRIVER" if w.is_driver else "WORKER",
                 "node_id": node["node_id"], "ip": node["node_ip"], "pid": w.pid,
                 "port": w.port, "leased": w.leased, "blocked": w.blocked,
                 "job_id": w.job_id.hex() or None, "exit_type": None}, _WORKER_DEFAULTS))
    return recs


def list_workers(address: Optional[str] = None, filters: Optional[Sequence[Filter]] = None,
                 limit: int = DEFAULT_LIMIT, timeout: float = DEFAULT_RPC_TIMEOUT,
                 detail: bool = False, raise_on_missing_output: bool = True,
                 _explain: bool = False) -> List[StateRecord]:
    """The live workers and drivers of every live node (raylets know no dead ones)."""
    _connect(address)
    return _apply(_worker_records(timeout, raise_on_missing_output), filters, limit)


def get_worker(id: str, address: Optional[str] = None, timeout: float = DEFAULT_RPC_TIMEOUT,
               _explain: bool = False) -> Optional[StateRecord]:
    """A live worker's (or driver's) record, or None."""
    _connect(address)
    wid = _check_id("worker", id)
    found = [w for w in _worker_records(timeout, True) if w["worker_id"] == wid]
    return StateRecord(found[0]) if found else None


#: A worker the raylet listed a moment ago may have exited since: its objects went with
#: it, so (as Ray's raylets do) it is left out rather than failing the whole listing.
_WORKER_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def _object_records(timeout: float, raise_on_missing_output: bool) -> List[dict]:
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
                # call_site: Ray's value when creation sites are not recorded (its default).
                recs.append({"object_id": o.object_id.hex(), "object_size": o.size,
                             "task_status": o.task_status, "reference_type": ref_type,
                             "call_site": "disabled",
                             "type": "DRIVER" if owned.is_driver else "WORKER",
                             "pid": owned.pid, "ip": owned.ip, "in_object_store": o.in_store,
                             "node_id": node["node_id"]})
    return recs


def list_objects(address: Optional[str] = None, filters: Optional[Sequence[Filter]] = None,
                 limit: int = DEFAULT_LIMIT, timeout: float = DEFAULT_RPC_TIMEOUT,
                 detail: bool = False, raise_on_missing_output: bool = True,
                 _explain: bool = False) -> List[StateRecord]:
    _connect(address)
    return _apply(_object_records(timeout, raise_on_missing_output), filters, limit)


def get_objects(id: str, address: Optional[str] = None, timeout: float = DEFAULT_RPC_TIMEOUT,
                _explain: bool = False) -> List[StateRecord]:
    """Every record of the object (one per process that references it; [] if none)."""
    _connect(address)
    oid = _check_id("object", id)
    return _apply(_object_records(timeout, True), [("object_id", "=", oid)], None)


def summarize_objects(address: Optional[str] = None, timeout: float = DEFAULT_RPC_TIMEOUT,
                      raise_on_missing_output: bool = True, _explain: bool = False
                      ) -> Dict[str, Any]:
    """Ray's ObjectSummaries, grouped by call site (under "cluster"). Creation sites are
    not recorded, so every object is under "disabled" and ``callsite_enabled`` is False,
    as in Ray by default."""
    _connect(address)
    summary: Dict[str, Dict[str, Any]] = {}
    workers: Dict[str, set] = defaultdict(set)
    nodes: Dict[str, set] = defaultdict(set)
    total_size_mb = 0.0
    objects = _object_records(timeout, raise_on_missing_output)
    for o in objects:
        key = o["call_site"]
        entry = summary.setdefault(key, {"total_objects": 0, "total_size_mb": 0.0,
                                         "total_num_workers": 0, "total_num_nodes": 0,
                                         "task_state_counts": {}, "ref_type_counts": {}})
        entry["total_objects"] += 1
        counts = entry["task_state_counts"]
        counts[o["task_status"]] = counts.get(o["task_status"], 0) + 1
        refs = entry["ref_type_counts"]
        refs[o["reference_type"]] = refs.get(o["reference_type"], 0) + 1
        if o["object_size"] != -1:
            entry["total_size_mb"] += o["object_size"] / 1024 ** 2
            total_size_mb += o["object_size"] / 1024 ** 2
        workers[key].add(o["pid"])
        nodes[key].add(o["ip"])
    for key, entry in summary.items():
        entry["total_num_workers"] = len(workers[key])
        entry["total_num_nodes"] = len(nodes[key])
    return {"cluster": {"summary": summary, "total_objects": len(objects),
                        "total_size_mb": total_size_mb,
                        "callsite_enabled": "disabled" not in summary,
                        "summary_by": "callsite"}}


# -- placement groups ------------------------------------------------------------------------------
def _pg_state(entry: Dict[str, Any]) -> dict:
    """placement_group_table()'s entry as Ray's PlacementGroupState: bundles as a list
    of {bundle_id, node_id, unit_resources}."""
    rec = dict(entry)
    nodes = entry.get("bundles_to_node_id") or {}
    rec["bundles"] = [{"bundle_id": {"placement_group_id": entry["placement_group_id"],
                                     "bundle_index": i},
                       "node_id": nodes.get(i) or None, "unit_resources": dict(res)}
                      for i, res in sorted(entry["bundles"].items())]
    return rec


def list_placement_groups(address: Optional[str] = None,
                          filters: Optional[Sequence[Filter]] = None,
                          limit: int = DEFAULT_LIMIT, timeout: float = DEFAULT_RPC_TIMEOUT,
                          detail: bool = False, raise_on_missing_output: bool = True,
                          _explain: bool = False) -> List[StateRecord]:
    from runtime.util.placement_group import placement_group_table

    _connect(address)
    table = placement_group_table()
    return _apply((_pg_state(e) for e in table.values()), filters, limit)


def get_placement_group(id: str, address: Optional[str] = None,
                        timeout: float = DEFAULT_RPC_TIMEOUT, _explain: bool = False
                        ) -> Optional[StateRecord]:
    from runtime.util.placement_group import placement_group_table

    _connect(address)
    entry = placement_group_table().get(_check_id("placement_group", id))
    return StateRecord(_pg_state(entry)) if entry else None


# -- get_node, get_job ---------------------------------------------------------------------------
def get_node(id: str, address: Optional[str] = None, timeout: float = DEFAULT_RPC_TIMEOUT,
             _explain: bool = False) -> Optional[StateRecord]:
    _connect(address)
    nid = _check_id("node", id)
    found = [n for n in _node_records(timeout) if n["node_id"] == nid]
    return StateRecord(_with_defaults(found[0], _NODE_DEFAULTS)) if found else None


def get_job(id: str, address: Optional[str] = None, timeout: float = DEFAULT_RPC_TIMEOUT,
            _explain: bool = False) -> Optional[StateRecord]:
    """A job by its submission id, as in Ray; also, beyond Ray, a driver's job id (hex),
    since drivers started by hand have no submission id."""
    _connect(address)
    for rec in list_jobs(limit=0, timeout=timeout):
        if id in (rec.get("submission_id"), rec.get("job_id")):
            return rec
    return None


# -- cluster events --------------------------------------------------------------------------------
def list_cluster_events(address: Optional[str] = None,
                        filters: Optional[Sequence[Filter]] = None,
                        limit: int = DEFAULT_LIMIT, timeout: float = DEFAULT_RPC_TIMEOUT,
                        detail: bool = False, raise_on_missing_output: bool = True,
                        _explain: bool = False) -> List[StateRecord]:
    """The GCS's event log (nodes joining and dying, actors and processes failing ...),
    oldest first, as Ray's ClusterEventState with what else we know in custom_fields."""
    from runtime.protocol import gcs_pb2

    _connect(address)
    reply = _gcs_call("ListClusterEvents", gcs_pb2.ClusterEventsRequest(),
                      "listing cluster events", timeout)
    recs = []
    for e in reply.events:
        recs.append({"severity": e.severity, "source_type": (e.source or "gcs").upper(),
                     "time": datetime.datetime.fromtimestamp(e.time).strftime(
                         "%Y-%m-%d %H:%M:%S"),
                     "message": e.message, "event_id": str(e.seq),
                     "custom_fields": {"kind": e.kind, "subject": e.subject,
                                       "state": e.state, "node_id": e.node_id.hex() or None,
                                       "node_ip": e.node_ip or None, "pid": e.pid or None,
                                       "count": e.count, "last_time": e.last_time or None}})
    return _apply(recs, filters, limit)


# -- logs (each node's LogService, on its raylet's port) --------------------------------------------
def _log_node(node_id: Optional[str], node_ip: Optional[str], timeout: float) -> dict:
    """The live node whose logs to read, by id or IP."""
    nodes = _node_records(timeout)
    if node_id:
        nid = _check_id("node", node_id)
        found = [n for n in nodes if n["node_id"] == nid]
        if not found:
            raise ValueError(f"no node {node_id} in the cluster; list_nodes() shows them")
    else:
        found = [n for n in nodes if n["node_ip"] == node_ip and n["state"] == "ALIVE"] or \
            [n for n in nodes if n["node_ip"] == node_ip]
        if not found:
            raise ValueError(f"no node with IP {node_ip} in the cluster; list_nodes() shows "
                             f"them")
        if len(found) > 1:
            raise ValueError(f"{len(found)} live nodes have IP {node_ip} "
                             f"({', '.join(n['node_id'][:8] for n in found)}): pass node_id")
    node = found[0]
    if node["state"] != "ALIVE":
        raise ValueError(f"node {node['node_id']} ({node['node_ip']}) is dead"
                         f"{': ' + node['state_message'] if node['state_message'] else ''}; "
                         f"only live nodes' logs can be read")
    return node


def _log_error(node: dict, address: str, exc: grpc.RpcError, doing: str) -> Exception:
    """The error for a failed LogService call: what the node said for a refused or
    missing file, else the raylet named (as every component error is)."""
    code = exc.code()
    where = f"node {node['node_id'][:8]} ({address})"
    if code == grpc.StatusCode.NOT_FOUND:
        return FileNotFoundError(f"{exc.details()} [{where}]")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(f"{exc.details()} [{where}]")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionError(f"{exc.details()} [{where}]")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return RaySystemError(f"the raylet of {where} serves no logs (no LogService: it "
                              f"runs an older runtime); read them on that host, in its "
                              f"session directory's logs/")
    return component_error(f"raylet of node {node['node_id'][:8]}", address, exc, doing)


def _log_stub(node: dict):
    from runtime import rpc
    from runtime.protocol import log_service_pb2_grpc

    address = f"{node['node_ip']}:{node['raylet_port']}"
    ch = rpc.sync_channel(address, _token())
    return address, ch, log_service_pb2_grpc.LogServiceStub(ch)


def _list_log_files(node: dict, glob: str, timeout: float) -> List[Any]:
    from runtime.protocol import log_service_pb2

    address, ch, stub = _log_stub(node)
    try:
        return list(stub.ListLogs(log_service_pb2.ListLogsRequest(glob=glob),
                                  timeout=timeout).files)
    except grpc.RpcError as exc:
        raise _log_error(node, address, exc, "listing logs") from None
    finally:
        ch.close()


def _log_category(name: str) -> Optional[str]:
    """Ray's log groups (its log manager's), for this runtime's file names; None for a
    file that is not a log (a worker's index of task ranges)."""
    if name.startswith("worker-"):
        if name.endswith(INDEX_SUFFIX):
            return None
        return "worker_err" if name.endswith(".err") else "worker_out"
    if name.startswith("job-driver-"):
        return "driver"
    for prefix, group in (("raylet", "raylet"), ("gcs", "gcs_server"), ("agent", "agent"),
                          ("node-agent", "agent"), ("dashboard", "dashboard")):
        if name.startswith(prefix):
            return group
    return "internal"


def list_logs(address: Optional[str] = None, node_id: Optional[str] = None,
              node_ip: Optional[str] = None, glob_filter: Optional[str] = None,
              timeout: float = DEFAULT_RPC_TIMEOUT) -> Dict[str, List[str]]:
    """The node's log files by group (Ray's "raylet", "gcs_server", "worker_out",
    "worker_err", "driver", "agent", "internal"), filtered by glob_filter."""
    if not node_id and not node_ip:
        raise ValueError("list_logs needs node_id or node_ip (list_nodes() shows them)")
    _connect(address)
    node = _log_node(node_id, node_ip, timeout)
    out: Dict[str, List[str]] = defaultdict(list)
    for f in _list_log_files(node, glob_filter or "*", timeout):
        group = _log_category(f.name)
        if group is not None:
            out[group].append(f.name)
    return dict(out)


_ANSI = re.compile(rb"\x1b[^m]*m")


def _resolve_log(node_id: Optional[str], node_ip: Optional[str], filename: Optional[str],
                 actor_id: Optional[str], task_id: Optional[str], pid: Optional[int],
                 submission_id: Optional[str], attempt_number: int, timeout: float,
                 suffix: str = "out") -> Tuple[dict, str, int, Optional[Tuple[bytes, int, bool]]]:
    """(node, file name, pid, (task id, attempt, is an actor call) or None) of the log to
    read: Ray's order,
    actor, then task, then submission, then pid, then file name. A worker's stdout is
    worker-<id[:8]>.out and its stderr .err; a task's lines are its range in them."""
    if actor_id:
        info = _actor_info(_check_id("actor", actor_id), timeout)
        if info is None:
            raise ValueError(f"Actor ID {actor_id} not found.")
        if not info.node_id:
            raise FileNotFoundError(f"actor {actor_id} has no worker yet (state {info.state}"
                                    f"{': ' + info.pending_reason if info.pending_reason else ''})")
        node = _log_node(info.node_id.hex(), None, timeout)
        if info.address.worker_id:
            return node, f"{worker_log_stem(info.address.worker_id.hex())}.{suffix}", 0, None
        return node, "", info.pid, None
    if task_id:
        found = _task_records(_check_id("task", task_id), timeout)
        if not found:
            raise FileNotFoundError(f"Could not find log file for task: {task_id} (attempt "
                                    f"{attempt_number}): the GCS has no record of it (it may "
                                    f"have left the task-event window)")
        rec = task_record(found[0])
        if attempt_number != rec["attempt_number"]:
            raise FileNotFoundError(
                f"task {task_id} is at attempt {rec['attempt_number']}; only the worker of "
                f"its latest attempt is known: pass attempt_number={rec['attempt_number']}")
        if not rec["node_id"] or not (rec["worker_id"] or rec["worker_pid"]):
            raise FileNotFoundError(f"task {task_id} has not run on a worker (state "
                                    f"{rec['state']}), so it has no log")
        node = _log_node(rec["node_id"], None, timeout)
        task = (bytes.fromhex(rec["task_id"]), rec["attempt_number"],
                rec["type"] == "ACTOR_TASK")
        if rec["worker_id"]:
            return node, f"{worker_log_stem(rec['worker_id'])}.{suffix}", 0, task
        return node, "", rec["worker_pid"], task
    if submission_id:
        from runtime.protocol import gcs_pb2

        reply = _gcs_call("GetSubmittedJob", gcs_pb2.SubmittedJobRequest(
            submission_id=submission_id), f"looking up job {submission_id}", timeout)
        if not reply.found:
            raise ValueError(f"no submitted job {submission_id!r}; list_jobs() shows them")
        if reply.job.driver_node_id:
            node = _log_node(reply.job.driver_node_id, None, timeout)
        else:  # entrypoints run on the head (the job server's node)
            heads = [n for n in _node_records(timeout) if n["is_head_node"]]
            if not heads:
                raise FileNotFoundError(f"job {submission_id} names no node, and the cluster "
                                        f"has no head node")
            node = _log_node(heads[0]["node_id"], None, timeout)
        return node, f"job-driver-{submission_id}.log", 0, None
    node = _log_node(node_id, node_ip, timeout)
    if pid and not filename:
        return node, "", int(pid), None
    return node, filename or "", 0, None


def get_log(address: Optional[str] = None, node_id: Optional[str] = None,
            node_ip: Optional[str] = None, filename: Optional[str] = None,
            actor_id: Optional[str] = None, task_id: Optional[str] = None,
            pid: Optional[int] = None, follow: bool = False, tail: int = -1,
            timeout: float = DEFAULT_RPC_TIMEOUT, suffix: str = "out",
            encoding: Optional[str] = "utf-8", errors: Optional[str] = "strict",
            submission_id: Optional[str] = None, attempt_number: int = 0,
            _interval: Optional[float] = None, filter_ansi_code: bool = False
            ) -> Generator[Union[str, bytes], None, None]:
    """The lines of a log file (each with its newline), read from its node's LogService:
    by file name on a node (``filename`` with ``node_id`` or ``node_ip``), or the log of
    an actor's, a task's or a pid's worker, or of a submitted job's driver.

    ``tail`` > 0 gives the last lines only (-1: all); ``follow`` keeps yielding what is
    appended until the generator is closed. ``encoding=None`` yields bytes.

    A worker's stdout and stderr are two files (``suffix`` "out", "err"), as in Ray. A
    task's log is what it wrote to them while it ran (a task still running: up to now;
    ``follow``: until it ends), an actor's the whole of its worker's. As in Ray, an
    actor call's own lines are known only when the actor's worker runs with
    RUNTIME_ENABLE_RECORD_ACTOR_TASK_LOGGING=1 (or Ray's variable), and the concurrent
    calls of a threaded or async actor share the files, so each one's range holds what
    the others wrote meanwhile.

    Differences from Ray: only the task's latest attempt is known; a component's (raylet,
    GCS ...) stdout and stderr share its one ``.log``, so ``suffix`` does not apply to
    them."""
    if suffix not in ("out", "err"):
        raise ValueError(f"Invalid suffix: {suffix}. Must be one of 'out' or 'err'.")
    if node_id and node_ip:
        raise ValueError("Both node_id and node_ip are given. Only one of them can be "
                         f"provided. Given node id: {node_id}, given node ip: {node_ip}")
    if not (actor_id or task_id or pid or filename or submission_id):
        raise ValueError("None of actor_id, task_id, pid, submission_id or filename is "
                         "provided. At least one of them is required to fetch logs.")
    if not (node_id or node_ip) and not (actor_id or task_id or submission_id):
        raise ValueError("node_id or node_ip must be provided as constructor arguments when "
                         "no actor or task_id is supplied as arguments.")
    from runtime.protocol import log_service_pb2

    _connect(address)
    node, name, by_pid, task = _resolve_log(node_id, node_ip, filename, actor_id, task_id,
                                            pid, submission_id, attempt_number, timeout, suffix)
    request = log_service_pb2.ReadLogRequest(filename=name, pid=by_pid, suffix=suffix,
                                             tail_lines=tail if tail > 0 else 0,
                                             from_end=tail == 0, follow=follow,
                                             interval_s=_interval or 0.0)
    if task is not None:
        request.task_id, request.task_attempt = task[0], task[1]
    address, ch, stub = _log_stub(node)

    def emit(raw: bytes) -> Union[str, bytes]:
        if filter_ansi_code:
            raw = _ANSI.sub(b"", raw)
        return raw if encoding is None else raw.decode(encoding, errors or "strict")

    stream = stub.ReadLog(request, timeout=None if follow else timeout)
    try:
        carry = b""
        for chunk in stream:
            if not chunk.data:
                continue
            *lines, carry = (carry + chunk.data).split(b"\n")
            for line in lines:
                yield emit(line + b"\n")
        if carry:
            yield emit(carry)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED and follow:
            return
        err = _log_error(node, address, exc, f"reading log {name or f'of pid {by_pid}'}")
        if task is not None and task[2] and isinstance(err, FileNotFoundError):
            err = FileNotFoundError(
                f"{err}. The output of actor calls is not cut per call unless the actor's "
                f"worker has {RECORD_ACTOR_CALLS_ENV}=1 in its environment (Ray's "
                f"RAY_ENABLE_RECORD_ACTOR_TASK_LOGGING, off by default there too); "
                f"get_log(actor_id=...) reads the actor's whole log")
        raise err from None
    finally:
        stream.cancel()
        ch.close()


# -- runtime environments (each node's RuntimeEnvService, on its raylet's port) ------------------
#: RuntimeEnvState fields this runtime does not record.
_RUNTIME_ENV_DEFAULTS = {"ref_cnt": None}


def _runtime_env_records(timeout: float, raise_on_missing_output: bool) -> List[dict]:
    from runtime import rpc
    from runtime.protocol import runtime_env_pb2, runtime_env_pb2_grpc

    recs = []
    for node in _node_records(timeout):
        if node["state"] != "ALIVE":
            continue
        address = f"{node['node_ip']}:{node['raylet_port']}"
        ch = rpc.sync_channel(address, _token())
        try:
            reply = runtime_env_pb2_grpc.RuntimeEnvServiceStub(ch).ListRuntimeEnvs(
                runtime_env_pb2.ListRuntimeEnvsRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                err: Exception = RaySystemError(
                    f"the raylet of node {node['node_id'][:8]} ({address}) does not list its "
                    f"runtime environments (no RuntimeEnvService: it runs an older runtime)")
            else:
                err = component_error(f"raylet of node {node['node_id'][:8]}", address, exc,
                                      "listing runtime environments")
            if raise_on_missing_output:
                raise err from None
            log.warning("leaving node %s out (raise_on_missing_output=False): %s",
                        node["node_id"][:8], err)
            continue
        finally:
            ch.close()
        for e in reply.envs:
            try:
                env = json.loads(e.serialized) if e.serialized else {}
            except ValueError:
                env = {"serialized": e.serialized}
            env.pop("config", None)  # setup options, not part of the environment's identity
            recs.append(_with_defaults(
                {"runtime_env": env, "success": e.success,
                 "creation_time_ms": e.creation_time_ms or None,
                 "node_id": node["node_id"], "error": e.error or None}, _RUNTIME_ENV_DEFAULTS))
    return recs


def list_runtime_envs(address: Optional[str] = None, filters: Optional[Sequence[Filter]] = None,
                      limit: int = DEFAULT_LIMIT, timeout: float = DEFAULT_RPC_TIMEOUT,
                      detail: bool = False, raise_on_missing_output: bool = True,
                      _explain: bool = False) -> List[StateRecord]:
    """The runtime environments each live node has set up, or failed to (Ray's fields:
    runtime_env, success, creation_time_ms, node_id, error; ref_cnt is None). An
    environment is listed once its setup on the node ended: after its first task or
    actor there, or after init()'s eager install (``config.eager_install``, the default)."""
    _connect(address)
    return _apply(_runtime_env_records(timeout, raise_on_missing_output), filters, limit)


# -- metrics (runtime.util.metrics; not in Ray's state API) ---------------------------------------
def list_metrics(address: Optional[str] = None, filters: Optional[Sequence[Filter]] = None,
                 limit: Optional[int] = None, timeout: float = DEFAULT_RPC_TIMEOUT
                 ) -> List[StateRecord]:
    """What ``runtime.util.metrics`` recorded, one record per process, metric and tag
    set: name, type (COUNTER, GAUGE, HISTOGRAM), description, tags, value (counters,
    gauges) or boundaries/buckets/sum/count (histograms), and where: node_id, node_ip,
    pid, worker_id, job_id, timestamp (of the process's last push, about every 2 s).

    Our addition: Ray exports metrics to Prometheus instead. Processes that exited keep
    their last values here."""
    from runtime.protocol import gcs_pb2
    from runtime.util import metrics

    _connect(address)

    def get(key: bytes) -> Optional[bytes]:
        reply = _gcs_call("KvGet", gcs_pb2.KvRequest(ns=metrics.KV_NAMESPACE, key=key),
                          "reading metrics", timeout)
        return reply.value if reply.found else None

    rows = [row for rec in metrics.stored_records(get) for row in metrics.flatten(rec)]
    return _apply(rows, filters, limit)


# -- StateApiClient -------------------------------------------------------------------------------
class StateResource(enum.Enum):
    ACTORS = "actors"
    JOBS = "jobs"
    PLACEMENT_GROUPS = "placement_groups"
    NODES = "nodes"
    WORKERS = "workers"
    TASKS = "tasks"
    OBJECTS = "objects"
    RUNTIME_ENVS = "runtime_envs"
    CLUSTER_EVENTS = "cluster_events"


class SummaryResource(enum.Enum):
    ACTORS = "actors"
    TASKS = "tasks"
    OBJECTS = "objects"


@dataclasses.dataclass
class ListApiOptions:
    """Ray's list options (``server_timeout_multiplier`` is accepted; there is no server
    in between here, so the whole timeout is the calls')."""

    limit: int = DEFAULT_LIMIT
    timeout: float = DEFAULT_RPC_TIMEOUT
    detail: bool = False
    filters: Optional[List[Filter]] = dataclasses.field(default_factory=list)
    exclude_driver: bool = True
    server_timeout_multiplier: float = 0.8

    def __post_init__(self) -> None:
        if self.filters is None:
            self.filters = []
        for f in self.filters:
            if len(f) != 3 or f[1] not in ("=", "!="):
                raise ValueError(f"Unsupported filter {f!r}: a filter is (key, predicate, "
                                 "value) with predicate '=' or '!='.")


@dataclasses.dataclass
class GetApiOptions:
    timeout: float = DEFAULT_RPC_TIMEOUT


@dataclasses.dataclass
class SummaryApiOptions:
    timeout: float = DEFAULT_RPC_TIMEOUT
    filters: Optional[List[Filter]] = dataclasses.field(default_factory=list)
    summary_by: Optional[str] = None


_LISTS: Dict[str, Callable[..., List[StateRecord]]] = {
    "actors": list_actors, "jobs": list_jobs, "placement_groups": list_placement_groups,
    "nodes": list_nodes, "workers": list_workers, "tasks": list_tasks,
    "objects": list_objects, "cluster_events": list_cluster_events,
    "runtime_envs": list_runtime_envs}
_GETS: Dict[str, Callable[..., Any]] = {
    "actors": get_actor, "jobs": get_job, "placement_groups": get_placement_group,
    "nodes": get_node, "workers": get_worker, "tasks": get_task, "objects": get_objects}
_SUMMARIES: Dict[str, Callable[..., Dict[str, Any]]] = {
    "actors": summarize_actors, "tasks": summarize_tasks, "objects": summarize_objects}


def _resource_name(resource: Union[str, enum.Enum], known: Iterable[str]) -> str:
    name = resource.value if isinstance(resource, enum.Enum) else str(resource)
    name = name.replace("-", "_")
    if name not in known:
        raise ValueError(f"unsupported resource {name!r} here: use one of "
                         f"{', '.join(sorted(known))}")
    return name


class StateApiClient:
    """Ray's client object for the state API: ``get``, ``list`` and ``summary`` by
    resource (a StateResource/SummaryResource or its name). It queries this process's
    cluster (``address`` as the functions take it); ``cookies`` and ``headers`` are for
    Ray's HTTP server, which this runtime does not have, so giving them is an error."""

    def __init__(self, address: Optional[str] = None, cookies: Optional[Dict[str, Any]] = None,
                 headers: Optional[Dict[str, Any]] = None) -> None:
        if cookies or headers:
            raise ValueError("StateApiClient talks gRPC to the GCS with the cluster token; "
                             "it sends no HTTP cookies or headers: leave them out")
        _connect(address)

    def get(self, resource: Union[StateResource, str], id: str,
            options: Optional[GetApiOptions] = None, _explain: bool = False) -> Any:
        fn = _GETS[_resource_name(resource, _GETS)]
        return fn(id, timeout=(options or GetApiOptions()).timeout)

    def list(self, resource: Union[StateResource, str], options: Optional[ListApiOptions] = None,
             raise_on_missing_output: bool = True, _explain: bool = False
             ) -> List[StateRecord]:
        options = options or ListApiOptions()
        name = _resource_name(resource, set(_LISTS) | {"metrics"})
        if name == "metrics":
            return list_metrics(filters=options.filters, limit=options.limit,
                                timeout=options.timeout)
        return _LISTS[name](filters=options.filters, limit=options.limit, timeout=options.timeout,
                  detail=options.detail, raise_on_missing_output=raise_on_missing_output)

    def summary(self, resource: Union[SummaryResource, str], *,
                options: Optional[SummaryApiOptions] = None,
                raise_on_missing_output: bool = True, _explain: bool = False
                ) -> Dict[str, Any]:
        fn = _SUMMARIES[_resource_name(resource, _SUMMARIES)]
        return fn(timeout=(options or SummaryApiOptions()).timeout,
                  raise_on_missing_output=raise_on_missing_output)


__all__ = ["list_nodes", "list_jobs", "list_actors", "get_actor", "list_tasks", "get_task",
           "summarize_tasks", "summarize_actors", "summarize_objects", "list_workers",
           "get_worker", "list_objects", "get_objects", "list_placement_groups",
           "get_placement_group", "get_node", "get_job", "list_cluster_events", "list_logs",
           "get_log", "list_runtime_envs", "list_metrics", "StateApiClient", "StateResource", "SummaryResource",
           "ListApiOptions", "GetApiOptions", "SummaryApiOptions", "StateRecord"]
