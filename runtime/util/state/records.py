"""The state API's tables: nodes, jobs, actors, tasks, workers, objects, placement groups,
cluster events, runtime environments and metrics, each as Ray 2.60's records."""
from __future__ import annotations

import datetime
import json
import logging
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional, \
    Sequence, Tuple, Union

import grpc

from runtime.core_worker.task_events import TASK_STATES
from runtime.exceptions import RaySystemError
from runtime.protocol.common_pb2 import FAILED, FINISHED, RUNNING, SUBMITTED_TO_WORKER
from runtime.rpc_errors import component_error

from runtime.util.state._common import (_apply, _check_id, _connect, DEFAULT_LIMIT,
                                        DEFAULT_RPC_TIMEOUT, Filter, _gcs_call, StateRecord,
                                        _token, _with_defaults)

log = logging.getLogger("runtime.util.state")

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
