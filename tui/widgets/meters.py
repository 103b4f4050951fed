"""The cluster's meters (raytop's top lines) and the bits they are drawn with: bars,
sparklines, compact amounts. Pure functions, so a worker thread can prepare them."""
from __future__ import annotations

from typing import Dict, List, Sequence

from textual.markup import escape

from runtime.protocol import agent_pb2

__all__ = ["bar", "sparkline", "compact", "meters_markup"]

_EIGHTHS = " ▏▎▍▌▋▊▉█"
_SPARK = "▁▂▃▄▅▆▇█"
GiB = 1024 ** 3


def bar(frac: float, width: int, *, empty: bool = False, used: bool = True) -> str:
    """A horizontal bar of width cells, frac full, in eighths: the used part
    (used=True) or the rest of the cells (used=False, drawn with ``·``)."""
    frac = min(1.0, max(0.0, frac))
    eighths = round(frac * width * 8)
    full, part = divmod(eighths, 8)
    filled = "█" * full + (_EIGHTHS[part] if part else "")
    if used:
        return filled
    return "·" * (width - len(filled)) if empty else " " * (width - len(filled))


def sparkline(values: Sequence[float], width: int) -> str:
    """values (fractions 0..1, oldest first) in width cells; each cell the maximum of
    its share of the samples, so a short spike stays visible."""
    if not values or width <= 0:
        return ""
    n = len(values)
    if n <= width:
        buckets: List[Sequence[float]] = [[v] for v in values]
    else:
        buckets = [values[i * n // width:(i + 1) * n // width] or [values[-1]]
                   for i in range(width)]
    out = []
    for b in buckets:
        v = min(1.0, max(0.0, max(b)))
        out.append(_SPARK[min(len(_SPARK) - 1, int(v * len(_SPARK)))])
    return "".join(out)


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == int(v) else f"{v:.1f}"


def compact(used: float, total: float, *, bytes_: bool = False) -> str:
    """3/16, or 1.2/8G for bytes (the unit of the total)."""
    if not bytes_:
        return f"{used:g}/{total:g}"
    for unit, size in (("T", 1024 ** 4), ("G", GiB), ("M", 1024 ** 2), ("K", 1024)):
        if total >= size:
            return f"{_num(used / size)}/{_num(total / size)}{unit}"
    return f"{used:.0f}/{total:.0f}B"


def _meter(label: str, used: float, total: float, *, bytes_: bool = False) -> str:
    if not total:
        return f"[$text-muted]{label} –[/]"
    frac = used / total
    color = "$error" if frac >= 0.9 else "$warning" if frac >= 0.7 else "$accent"
    return (f"[b]{label}[/] [{color}]{bar(frac, 10)}[/][$panel-lighten-2]"
            f"{bar(frac, 10, empty=True, used=False)}[/] {compact(used, total, bytes_=bytes_)}")


def _shape(shape: Dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shape.items())) + "}"


def meters_markup(c: agent_pb2.ClusterSummary) -> str:
    """Two or three lines: the nodes and totals, then the pending demand with its reasons."""
    total, avail = dict(c.total), dict(c.available)

    def used(name: str) -> float:
        return max(0.0, total.get(name, 0.0) - avail.get(name, 0.0))

    nodes = f"[b]nodes[/] [$success]{c.nodes_alive} alive[/]"
    if c.nodes_draining:
        nodes += f" · [$warning]{c.nodes_draining} draining[/]"
    if c.nodes_dead:
        nodes += f" · [$error]{c.nodes_dead} dead[/]"
    line1 = "   ".join([
        nodes, _meter("CPU", used("CPU"), total.get("CPU", 0.0)),
        _meter("GPU", used("GPU"), total.get("GPU", 0.0)),
        _meter("MEM", used("memory"), total.get("memory", 0.0), bytes_=True),
        _meter("STORE", float(c.object_store_used), float(c.object_store_total), bytes_=True)])
    if not c.pending:
        return line1 + "\n[b]pending[/] [$text-muted]nothing waits for resources[/]"
    parts = []
    for d in sorted(c.pending, key=lambda d: (not d.infeasible, -d.count))[:3]:
        what = f"{d.count}× {_shape(dict(d.shape))}"
        if d.function_name:
            what += f" {d.function_name}"
        reason = d.reason or ("infeasible" if d.infeasible else "waiting")
        color = "$error" if d.infeasible else "$warning"
        parts.append(f"[{color}]{escape(what)}[/]: {escape(reason)}")
    more = f"  [$text-muted](+{len(c.pending) - 3} more)[/]" if len(c.pending) > 3 else ""
    return line1 + "\n[b]pending[/] " + "  │  ".join(parts) + more
