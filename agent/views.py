"""Turning supervisor snapshots, options and errors into API messages and one-line text."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

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
    if opts.HasField("dashboard_port"):
        out["dashboard_port"] = opts.dashboard_port
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


# ---- raytop's tables: the columns of every view -----------------------------------------------
# A view's rows are records (dicts with Ray's state-API field names where Ray has one);
# a Column says which field it shows, sorts and filters on and how it is written.
# Titles double as filter keys, in any case (`STATE=PENDING`); `node=` reads a node's id
# and its IP in every view, whichever its NODE column shows (runtime/util/query.py).

def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return ""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None or seconds < 0:
        return ""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_amount(used: float, total: float, unit: str = "") -> str:
    if unit == "bytes":
        return f"{fmt_bytes(used)}/{fmt_bytes(total)}"
    return f"{used:g}/{total:g}"


def fmt_resources(res: Dict[str, float]) -> str:
    shown = {k: v for k, v in res.items() if "_group_" not in k}
    return "{" + ", ".join(f"{k}: {fmt_bytes(v) if k == 'memory' else f'{v:g}'}"
                           for k, v in sorted(shown.items())) + "}"


def fmt_time(ts: Optional[float]) -> str:
    if not ts:
        return ""
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _first_line(text: Optional[str], width: int = 160) -> str:
    if not text:
        return ""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= width else line[:width - 1] + "…"


@dataclass(frozen=True)
class Column:
    title: str
    field: str                                        # sorted and filtered on
    cell: Optional[Callable[[Dict[str, Any]], str]] = None  # the text (default: the field)

    def text(self, rec: Dict[str, Any]) -> str:
        if self.cell is not None:
            return self.cell(rec)
        v = rec.get(self.field)
        if v is None:
            return ""
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)


def _short(field: str, n: int = 8) -> Callable[[Dict[str, Any]], str]:
    return lambda r: (r.get(field) or "")[:n]


def _reason_or(other: str) -> Callable[[Dict[str, Any]], str]:
    return lambda r: _first_line(r.get("pending_reason") or r.get(other))


def _task_detail(r: Dict[str, Any]) -> str:
    if r.get("pending_reason"):
        return _first_line(r["pending_reason"])
    if r.get("error_type"):
        return _first_line(f"{r['error_type']}: {_first_line(r.get('error_message'))}")
    return ""


COLUMNS: Dict[str, Tuple[Column, ...]] = {
    "nodes": (
        Column("NODE", "node_id", _short("node_id")),
        Column("IP", "node_ip"),
        Column("ROLE", "role"),
        Column("STATE", "state"),
        Column("CPU", "cpu", lambda r: fmt_amount(r["cpu_used"], r["cpu_total"])),
        Column("GPU", "gpu", lambda r: fmt_amount(r["gpu_used"], r["gpu_total"])),
        Column("MEM", "mem", lambda r: fmt_amount(r["mem_used"], r["mem_total"], "bytes")),
        Column("STORE", "store", lambda r: fmt_amount(r["store_used"], r["store_total"], "bytes")),
        Column("TASKS", "running_tasks"),
        Column("ACTORS", "actors"),
        Column("UPTIME", "uptime_s", lambda r: fmt_duration(r.get("uptime_s"))),
    ),
    "actors": (
        Column("ID", "actor_id", _short("actor_id")),
        Column("CLASS", "class_name"),
        Column("NAME", "name"),
        Column("NAMESPACE", "ray_namespace"),
        Column("STATE", "state"),
        Column("NODE", "node_ip"),
        Column("PID", "pid"),
        Column("RESTARTS", "num_restarts"),
        Column("REASON", "pending_reason", _reason_or("death_cause")),
    ),
    "tasks": (
        Column("ID", "task_id", _short("task_id")),
        Column("FUNCTION", "func_or_class_name"),
        Column("STATE", "state"),
        Column("NODE", "node_ip"),
        Column("PID", "worker_pid"),
        Column("DURATION", "duration_s", lambda r: fmt_duration(r.get("duration_s"))),
        Column("ATTEMPT", "attempt_number"),
        Column("ERROR", "error_message", _task_detail),
    ),
    "jobs": (
        Column("JOB", "job_id"),
        Column("TYPE", "type"),
        Column("STATUS", "status"),
        Column("DRIVER", "driver_pid"),
        Column("IP", "driver_ip"),
        Column("ENTRYPOINT", "entrypoint", lambda r: _first_line(r.get("entrypoint"), 80)),
        Column("STARTED", "start_time", lambda r: fmt_time(r.get("start_time"))),
        Column("DURATION", "duration_s", lambda r: fmt_duration(r.get("duration_s"))),
    ),
    "pgs": (
        Column("ID", "placement_group_id", _short("placement_group_id")),
        Column("NAME", "name"),
        Column("STATE", "state"),
        Column("STRATEGY", "strategy"),
        Column("BUNDLES", "bundles_text"),
        Column("NODES", "nodes_text"),
        Column("REASON", "pending_reason", lambda r: _first_line(r.get("pending_reason"))),
    ),
    "objects": (
        Column("OBJECT", "object_id", _short("object_id", 16)),
        Column("SIZE", "object_size", lambda r: fmt_bytes(r.get("object_size"))),
        Column("OWNER", "pid"),
        Column("NODE", "ip"),
        Column("WHERE", "where"),
        Column("SPILLED", "spilled"),
        Column("REFERENCE", "reference_type"),
        Column("TASK", "task_status"),
    ),
    "procs": (
        Column("COMPONENT", "component"),
        Column("PID", "pid"),
        Column("STATE", "state"),
        Column("RESTARTS", "restarts"),
        Column("CPU%", "cpu_percent", lambda r: "" if r.get("cpu_percent") is None
               else f"{r['cpu_percent']:.1f}"),
        Column("RSS", "rss_bytes", lambda r: fmt_bytes(r.get("rss_bytes"))),
        Column("UPTIME", "uptime_s", lambda r: fmt_duration(r.get("uptime_s"))),
        Column("LAST EXIT", "last_exit", lambda r: _first_line(
            r.get("failure_reason") and brief_reason(r["failure_reason"]) or r.get("last_exit"))),
        Column("BY", "supervised_by"),
    ),
    "events": (
        Column("TIME", "time", lambda r: fmt_time(r.get("time"))),
        Column("SEVERITY", "severity"),
        Column("KIND", "kind"),
        Column("SUBJECT", "subject", lambda r: (r.get("subject") or "")[:24]),
        Column("STATE", "state"),
        Column("NODE", "node_ip"),
        Column("MESSAGE", "message", lambda r: _first_line(r.get("message"))
               + (f"  (×{r['count']})" if (r.get("count") or 1) > 1 else "")),
    ),
    "logs": (
        Column("COMPONENT", "component"),
        Column("NODE", "node_ip"),
        Column("SIZE", "size", lambda r: fmt_bytes(r.get("size"))),
        Column("MODIFIED", "mtime", lambda r: fmt_time(r.get("mtime"))),
        Column("PATH", "path"),
    ),
}

#: The field of each view's records that names a row (Describe and actions take it).
KEY_FIELD = {"nodes": "node_id", "actors": "actor_id", "tasks": "task_id", "jobs": "job_id",
             "pgs": "placement_group_id", "objects": "object_id", "procs": "component",
             "events": "seq", "logs": "component"}
VIEWS = tuple(COLUMNS)


def column_aliases(view: str) -> Dict[str, str]:
    """Filter keys raytop users type (column titles; the filter ignores case) -> record fields."""
    return {c.title.lower().replace(" ", "_").rstrip("%"): c.field for c in COLUMNS[view]}


def sort_field(view: str, sort: str) -> str:
    """The record field a sort by `sort` (a column title or a field) means."""
    if not sort:
        return ""
    for c in COLUMNS[view]:
        if c.title.lower() == sort.lower():
            return c.field
    return sort


def table_rows(view: str, records: List[Dict[str, Any]],
               numbers: Optional[Callable[[Dict[str, Any]], Dict[str, float]]] = None
               ) -> List[agent_pb2.Row]:
    cols = COLUMNS[view]
    key = KEY_FIELD[view]
    out = []
    for r in records:
        row = agent_pb2.Row(key=str(r.get(key) or ""), cells=[c.text(r) for c in cols])
        if numbers is not None:
            row.numbers.update(numbers(r))
        out.append(row)
    return out


def describe_fields(rec: Dict[str, Any]) -> List[agent_pb2.Field]:
    """Every field of a record, nested ones flattened one level ("events" as lines)."""
    out = []
    for k, v in rec.items():
        if isinstance(v, dict):
            text = fmt_resources(v) if v and all(isinstance(x, (int, float)) for x in v.values()) \
                else ", ".join(f"{a}={b}" for a, b in v.items())
        elif isinstance(v, list):
            text = "\n".join(", ".join(f"{a}={b}" for a, b in x.items()) if isinstance(x, dict)
                             else str(x) for x in v)
        elif v is None:
            text = ""
        else:
            text = str(v)
        out.append(agent_pb2.Field(name=k, value=text))
    return out


def make_table(view: str, records: List[Dict[str, Any]], filter_text: str, sort: str,
               descending: bool, limit: int, out: agent_pb2.Table,
               numbers: Optional[Callable[[Dict[str, Any]], Dict[str, float]]] = None,
               aliases: Optional[Dict[str, str]] = None) -> None:
    """Filter, sort and cut records into out (query.FilterError if the filter is bad)."""
    from runtime.util import query

    fields = set(records[0]) if records else None
    flt = query.parse(filter_text, fields, {**column_aliases(view), **(aliases or {})}, view)
    rows, matched = query.apply(records, flt, sort_field(view, sort), descending, limit)
    out.columns.extend(c.title for c in COLUMNS[view])
    out.rows.extend(table_rows(view, rows, numbers))
    out.total = len(records)
    out.matched = matched
