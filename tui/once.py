"""``raytop --once``: the cluster in plain text (or one JSON document), for scripts.

Nodes, actors and the task summary, from the same agent views as the UI. When the
cluster cannot be reached it prints one line naming what was tried and exits 1.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Sequence

from runtime.protocol import agent_pb2

from tui.source import Query, Source, SourceError

__all__ = ["run_once", "print_readonly_token", "format_table"]

#: Columns --once leaves out of the text tables (long, or meaningless without colour).
_TEXT_WIDTH_CAP = 60


def format_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(c) for c in columns]
    cut = [[(c if len(c) <= _TEXT_WIDTH_CAP else c[:_TEXT_WIDTH_CAP - 1] + "…") for c in r]
           for r in rows]
    for r in cut:
        for i, cell in enumerate(r[:len(widths)]):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cut]
    return "\n".join(lines)


def _records(table: agent_pb2.Table) -> List[Dict[str, str]]:
    cols = [c.lower().replace(" ", "_").replace("%", "_pct") for c in table.columns]
    out = []
    for row in table.rows:
        rec: Dict[str, Any] = {"key": row.key, **dict(zip(cols, row.cells))}
        if row.numbers:
            rec["numbers"] = dict(row.numbers)
        out.append(rec)
    return out


def run_once(source: Source, *, as_json: bool = False, limit: int = 1000) -> int:
    try:
        nodes = source.view(Query("nodes", limit=limit))
        if nodes.error and not nodes.table.columns:
            raise SourceError(nodes.error)
        actors = source.view(Query("actors", limit=limit))
        tasks = source.view(Query("tasks", limit=1))
    except SourceError as exc:
        print(f"raytop: cannot reach the cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        source.close()
    c = nodes.cluster
    if as_json:
        doc = {
            "source": source.label,
            "time": nodes.time,
            "cluster": {"nodes_alive": c.nodes_alive, "nodes_dead": c.nodes_dead,
                        "nodes_draining": c.nodes_draining, "total": dict(c.total),
                        "available": dict(c.available),
                        "object_store_used": c.object_store_used,
                        "object_store_total": c.object_store_total,
                        "pending": [{"shape": dict(d.shape), "count": d.count,
                                     "infeasible": d.infeasible, "reason": d.reason,
                                     "function": d.function_name} for d in c.pending]},
            "nodes": _records(nodes.table),
            "actors": {"total": actors.table.total, "rows": _records(actors.table),
                       "placement": _records(actors.aux)},
            "tasks": {"total": tasks.table.total, "summary": _records(tasks.aux)},
            "errors": [e for e in (nodes.error, actors.error, tasks.error) if e],
        }
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    total, avail = dict(c.total), dict(c.available)
    cpu = total.get("CPU", 0.0)
    print(f"cluster via {source.label}: {c.nodes_alive} nodes alive, {c.nodes_dead} dead; "
          f"CPU {cpu - avail.get('CPU', 0.0):g}/{cpu:g} used")
    for d in c.pending:
        shape = "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(d.shape.items())) + "}"
        print(f"pending: {d.count}× {shape} {d.function_name}: {d.reason}")
    for title, reply in (("NODES", nodes), ("ACTORS", actors)):
        t = reply.table
        shown = f"{len(t.rows)} of {t.matched}" if len(t.rows) < t.matched else f"{t.matched}"
        print(f"\n{title} ({shown})")
        print(format_table(list(t.columns), [list(r.cells) for r in t.rows]))
    print(f"\nTASKS (summary of the {tasks.table.total} most recent)")
    print(format_table(list(tasks.aux.columns), [list(r.cells) for r in tasks.aux.rows]))
    for e in (nodes.error, actors.error, tasks.error):
        if e:
            print(f"\nwarning: {e}")
    return 0


def print_readonly_token(socket: str | None) -> int:
    """The read-only token, from this machine's agent (its unix socket: owner only)."""
    from agent.client import AgentClient, AgentNotRunning, connect

    try:
        client: AgentClient = connect(socket)
    except AgentNotRunning as exc:
        print(f"raytop: {exc}", file=sys.stderr)
        return 1
    with client:
        reply = client.status(local_only=True)
    if not reply.readonly_token:
        print("raytop: this agent runs no cluster yet (no token): start or join one first",
              file=sys.stderr)
        return 1
    print(reply.readonly_token)
    return 0
