"""inspect_serializability: find what makes a value unpicklable, as Ray's ray.util has it.

A task's function, arguments or actor class must pickle to travel; when one does not,
cloudpickle names only the innermost type ("cannot pickle '_thread.lock' object"), not
*where* it hides. This walks the value the way cloudpickle would (a function's
globals and closure variables, an object's attributes), printing each step and
collecting the innermost members that fail.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Optional, Set, TextIO, Tuple

import cloudpickle

__all__ = ["inspect_serializability", "FailureTuple"]


class FailureTuple:
    """One value that failed to serialize: what, how it was reached, and its parent."""

    def __init__(self, obj: Any, name: Optional[str], parent: Any) -> None:
        self.obj = obj
        self.name = name
        self.parent = parent

    def __repr__(self) -> str:
        return f"FailTuple({self.name} [obj={self.obj}, parent={self.parent}])"


class _Printer:
    def __init__(self, out: Optional[TextIO]) -> None:
        self.out = out
        self.level = 0

    def print(self, msg: str) -> None:
        print("    " * self.level + msg, file=self.out or sys.stdout)


def inspect_serializability(base_obj: Any, name: Optional[str] = None, depth: int = 3,
                            print_file: Optional[TextIO] = None
                            ) -> Tuple[bool, Set[FailureTuple]]:
    """(whether base_obj serializes, the innermost members found not to), printing the
    search to ``print_file`` (default stdout). ``depth`` bounds how far it descends."""
    printer = _Printer(print_file)
    banner = f"Checking Serializability of {_short(base_obj)}"
    printer.print("=" * min(len(banner), 80))
    printer.print(banner)
    printer.print("=" * min(len(banner), 80))
    failures: Set[FailureTuple] = set()
    ok = _inspect(base_obj, name, depth, None, failures, printer)
    if not ok:
        printer.print("=" * min(len(banner), 80))
        if failures:
            printer.print("Variable: \n\n\t" + "\n\t".join(str(f) for f in failures)
                          + "\n\nwas found to be non-serializable. There may be other "
                            "non-serializable variables that were not found.")
            printer.print("Consider removing these objects from the function's or class's "
                          "scope, or creating them inside the task or actor instead.")
        printer.print("=" * min(len(banner), 80))
    return ok, failures


def _short(obj: Any, limit: int = 80) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _serializes(obj: Any) -> Tuple[bool, str]:
    try:
        cloudpickle.dumps(obj)
        return True, ""
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def _inspect(obj: Any, name: Optional[str], depth: int, parent: Any, failures: Set[FailureTuple],
             printer: _Printer) -> bool:
    """Whether obj serializes; if not, descend into its members and record the innermost
    failing ones (obj itself when none of its members fails, or at the depth limit)."""
    if name is not None:
        printer.print(f"Serializing '{name}' {_short(obj)}...")
    ok, why = _serializes(obj)
    if ok:
        return True
    printer.print(f"!!! FAIL serialization: {why}")
    found = False
    if depth > 0:
        printer.level += 1
        try:
            for member_name, member in _members(obj, printer):
                if not _inspect(member, member_name, depth - 1, obj, failures, printer):
                    found = True
        finally:
            printer.level -= 1
    if not found:
        failures.add(FailureTuple(obj, name, parent))
    return False


def _members(obj: Any, printer: _Printer):
    """What pickling obj also pickles: a function's referenced globals and closure
    variables, or an object's (or class's) attributes."""
    if inspect.isfunction(obj):
        closure = inspect.getclosurevars(obj)
        if closure.globals:
            printer.print(f"Detected {len(closure.globals)} global variables. "
                          f"Checking serializability...")
            yield from closure.globals.items()
        if closure.nonlocals:
            printer.print(f"Detected {len(closure.nonlocals)} nonlocal variables. "
                          f"Checking serializability...")
            yield from closure.nonlocals.items()
        return
    if inspect.ismethod(obj):
        yield "__self__", obj.__self__
        yield "__func__", obj.__func__
        return
    if isinstance(obj, dict):
        yield from ((str(k), v) for k, v in obj.items())
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        yield from ((f"[{i}]", v) for i, v in enumerate(obj))
        return
    try:
        members = inspect.getmembers(obj)
    except Exception:
        return
    for member_name, member in members:
        if member_name.startswith("__") and member_name.endswith("__"):
            continue
        if inspect.isbuiltin(member):
            continue
        yield member_name, member
