"""Turning supervisor snapshots, options and errors into API messages and one-line text."""
from __future__ import annotations

from typing import Any, Dict, List

import grpc

from runtime.protocol import agent_pb2
from runtime.supervisor import describe_exit

def short_rpc_reason(exc: grpc.RpcError) -> str:
    details = (exc.details() or "") if hasattr(exc, "details") else str(exc)
    code = exc.code() if hasattr(exc, "code") else None
    low = details.lower()
    if "connection refused" in low:
        return "connection refused"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or "deadline" in low:
        return "no answer before the deadline"
    if "no route" in low:
        return "no route to host"
    return f"{code.name if code else 'error'}: {details.splitlines()[0] if details else ''}"


def last_log_line(lines: List[str]) -> str:
    """The last meaningful line of a log tail: usually the exception that killed
    the process (the supervisor's "=== started ===" markers are skipped)."""
    for line in reversed(lines):
        line = line.strip()
        if line and not line.startswith("==="):
            return line
    return ""


def brief_reason(reason: str) -> str:
    """One line from a multi-line failure reason: its first line plus the last
    line of the log it quotes."""
    lines = reason.splitlines()
    if not lines:
        return ""
    head = lines[0].strip().removesuffix("; last log lines:").rstrip(":;")
    last = last_log_line(lines[1:])
    return f"{head}: {last}" if last else head


def options_dict(opts: agent_pb2.NodeOptions) -> Dict[str, Any]:
    """NodeOptions -> the JSON-friendly dict kept in the state file (only set fields)."""
    out: Dict[str, Any] = {}
    if opts.node_ip:
        out["node_ip"] = opts.node_ip
    if opts.gcs_port:
        out["gcs_port"] = opts.gcs_port
    for name in ("num_cpus", "num_gpus", "object_store_memory", "memory"):
        if opts.HasField(name):
            out[name] = getattr(opts, name)
    if opts.resources:
        out["resources"] = dict(opts.resources)
    return out


def process_info(snap: Dict[str, Any], supervised_by: str = "agent") -> agent_pb2.ProcessInfo:
    info = agent_pb2.ProcessInfo(
        component=snap["name"], pid=snap["pid"] or 0, state=snap["state"],
        restarts=snap["restarts"], uptime_s=snap["uptime"] if snap["uptime"] is not None else -1,
        start_time=snap["start_time"] or 0.0, failure_reason=snap["failure_reason"] or "",
        log_path=snap["log_path"], supervised_by=supervised_by)
    if snap["last_exit"] is not None:
        info.has_last_exit = True
        info.last_exit_code = snap["last_exit"]
        info.last_exit = describe_exit(snap["last_exit"])
    return info


def cpu_summary(total: Dict[str, float], available: Dict[str, float]) -> str:
    cpus = total.get("CPU", 0.0)
    used = cpus - available.get("CPU", 0.0)
    return f"{used:g}/{cpus:g} CPU"
