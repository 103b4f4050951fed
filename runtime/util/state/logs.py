"""get_log and list_logs: each node's log files, read through its LogService on the raylet's
port (a task's own lines through the worker's task index, runtime/core_worker/task_logs.py)."""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Any, Dict, Generator, List, Optional, \
    Tuple, Union

import grpc

from runtime import config
from runtime.core_worker.task_logs import INDEX_SUFFIX, RECORD_ACTOR_CALLS_ENV, \
    worker_log_stem
from runtime.exceptions import RaySystemError
from runtime.rpc_errors import component_error

from runtime.util.state._common import (_check_id, _connect, DEFAULT_RPC_TIMEOUT, _gcs_call,
                                        _token)
from runtime.util.state.records import (_actor_info, _node_records, task_record, _task_records)

log = logging.getLogger("runtime.util.state")

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
                                    f"{attempt_number}): the GCS has no record of it yet. Task "
                                    f"events reach it about a second after the task (its owner "
                                    f"flushes them every {config.TASK_EVENTS_FLUSH_S:g} s), and "
                                    f"old ones leave its window of "
                                    f"{config.TASK_EVENTS_MAX_TASKS} tasks; try again shortly")
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
