#!/usr/bin/env python3
"""docs/compatibility.md: every public name of Ray 2.60's core API, and what the runtime
does with it. Generated, and checked by tests/test_compat.py, so it cannot go stale.

Three steps, each a mode:

* ``--extract`` runs under a Python that has Ray installed (a separate venv: ``python -m
  venv /tmp/rayvenv && /tmp/rayvenv/bin/pip install ray==2.60.0``) and writes
  scripts/ray_api_2.60.json: each module's public names (its ``__all__``, or the public
  names it defines), their kind and their parameters. That file is committed; nothing
  else here needs Ray.
* ``--write`` (run with the project's venv) imports ``runtime`` and writes the document.
* ``--check`` (the default) regenerates it in memory and fails, with a diff, if the
  committed document differs: adding, removing or changing a public name, or a note
  below, without regenerating the document fails the test suite.

A name's status is decided by the code where it can be: missing in ``runtime`` is "not
supported"; present but without some of Ray's parameters (and no ``**kwargs``) is
"differs" with the parameters named. What code cannot tell (a parameter that is accepted
but behaves differently, a function that exists only to raise) is a hand-written note
in NOTES below; a note for a name Ray 2.60 does not have is an error.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_FILE = os.path.join(ROOT, "scripts", "ray_api_2.60.json")
DOC_FILE = os.path.join(ROOT, "docs", "compatibility.md")

# The modules listed, and their counterpart in this runtime.
MODULES: List[Tuple[str, str]] = [
    ("ray", "runtime"),
    ("ray.util", "runtime.util"),
    ("ray.util.queue", "runtime.util.queue"),
    ("ray.util.multiprocessing", "runtime.util.multiprocessing"),
    ("ray.util.scheduling_strategies", "runtime.util.scheduling_strategies"),
    ("ray.exceptions", "runtime.exceptions"),
    ("ray.runtime_context", "runtime.runtime_context"),
    ("ray.util.state", "runtime.util.state"),
    ("ray.runtime_env", "runtime.runtime_env"),
]
# Public attributes of ``ray`` that scripts use but its __all__ leaves out.
EXTRA_NAMES = {"ray": ["ClusterID", "exceptions", "job_config", "runtime_context",
                       "runtime_env"]}
# Classes whose methods are listed too: their methods are the API.
MEMBERS_OF = {"ray": ["ObjectRef"], "ray.util": ["ActorPool"], "ray.util.queue": ["Queue"],
              "ray.util.multiprocessing": ["Pool"], "ray.runtime_context": ["RuntimeContext"]}
# Ray's libraries, re-exported by ``ray`` but outside the core API (and not importable
# without their own dependencies): listed, never imported.
LIBRARIES = {"autoscaler", "data", "workflow", "widgets", "internal", "client"}

SUPPORTED, DIFFERS, NOT_SUPPORTED = "supported", "differs", "not supported"

# What the code cannot tell. Key: "module:name"; value: (status, how).
NOTES: Dict[str, Tuple[str, str]] = {
    # -- ray ---------------------------------------------------------------------------------
    "ray:init": (DIFFERS, "`address` is None (private cluster), \"auto\", or \"host:port\" "
                          "of a GCS; no `ray://` client. Keywords Ray accepts but this runtime "
                          "cannot honour (dashboard, local_mode, job_config, logging_config, "
                          "_system_config, cgroup isolation...) raise a clear error when set"),
    "ray:ObjectRef.call_site": (NOT_SUPPORTED, "call sites are not recorded"),
    "ray:ObjectRef.job_id": (NOT_SUPPORTED, "object ids do not embed the job id"),
    "ray:ObjectRef.task_id": (DIFFERS, "returns a TaskID that is also `bytes` (equal to the "
                                       "raw id); Ray's is not"),
    "ray:TaskID": (DIFFERS, "a `bytes` subclass with Ray's methods; task ids are random, so "
                            "`job_id()`/`actor_id()` are absent"),
    "ray:FunctionID": (DIFFERS, "20 bytes (the SHA-1 of the function's pickle); Ray's are 28"),
    "ray:ActorClassID": (DIFFERS, "20 bytes (the SHA-1 of the class's pickle); Ray's are 28"),
    "ray:java_function": (NOT_SUPPORTED, "no cross-language workers"),
    "ray:java_actor_class": (NOT_SUPPORTED, "no cross-language workers"),
    "ray:cpp_function": (NOT_SUPPORTED, "no cross-language workers"),
    "ray:client": (NOT_SUPPORTED, "no Ray Client; drivers attach with init(address=...)"),
    "ray:ClientBuilder": (NOT_SUPPORTED, "no Ray Client; drivers attach with init(address=...)"),
    # -- ray.util ----------------------------------------------------------------------------
    "ray.util:ActorPool": (DIFFERS, "an actor is free again as soon as its call completes, "
                                    "not when its result is fetched: an ordered map() keeps "
                                    "every actor busy"),
    "ray.util:get_node_instance_id": (NOT_SUPPORTED, "no cloud instance metadata"),
    "ray.util:connect": (NOT_SUPPORTED, "no Ray Client"),
    "ray.util:disconnect": (NOT_SUPPORTED, "no Ray Client"),
    "ray.util:collective": (NOT_SUPPORTED, "no collective communication library"),
    "ray.util:iter": (NOT_SUPPORTED, "ParallelIterator (deprecated in Ray) is not provided"),
    "ray.util:pdb": (NOT_SUPPORTED, "no remote debugger"),
    "ray.util:ray_debugpy": (NOT_SUPPORTED, "no remote debugger"),
    "ray.util:accelerators": (DIFFERS, "the accelerator type names; no `tpu` helpers"),
    "ray.util:inspect_serializability": (DIFFERS, "same search and return value; the printed "
                                                  "report is worded differently, uncoloured"),
    # -- ray.util.multiprocessing ------------------------------------------------------------
    "ray.util.multiprocessing:Pool": (DIFFERS, "joblib's BatchedCalls are run as plain "
                                               "callables (no object-store caching of their "
                                               "arguments)"),
    "ray.util.multiprocessing:Pool.imap": (DIFFERS, "at most 4 × processes chunks run ahead "
                                                    "of the next result (Ray does not bound "
                                                    "the reorder buffer)"),
    # -- ray.exceptions ----------------------------------------------------------------------
    "ray.exceptions:LocalRayletDiedError": (DIFFERS, "the runtime raises its subclass "
                                                     "RayletDiedError"),
    "ray.exceptions:ObjectFreedError": (
        DIFFERS, "raised by get() after ray._private.internal_api.free(); a task given a "
                 "freed ref as an argument fails with it bare, not wrapped in RayTaskError"),
    "ray.exceptions:ObjectRefStreamEndOfStreamError": (
        DIFFERS, "exported, never raised: iteration ends with StopIteration / "
                 "StopAsyncIteration, as Ray's public ObjectRefGenerator does (Ray raises it "
                 "only from internal helpers)"),
    "ray.exceptions:ObjectReconstructionFailedError": (
        DIFFERS, "raised with Ray 2.60's `reason` as its ErrorType name (a string)"),
    "ray.exceptions:CrossLanguageError": (DIFFERS, "defined, never raised"),
    # -- ray.runtime_context -----------------------------------------------------------------
    "ray.runtime_context:RuntimeContext.get_temp_dir": (
        DIFFERS, "the per-user session root (not /tmp/ray)"),
    # -- ray.runtime_env ---------------------------------------------------------------------
    "ray.runtime_env:RuntimeEnv": (
        DIFFERS, "working_dir, py_modules, excludes, pip, env_vars, config; local paths are "
                 "also accepted per task/actor; remote URIs, conda, container, image_uri, uv, "
                 "py_executable, hooks, nsight and plugins are refused with a clear error"),
    "ray.runtime_env:RuntimeEnvConfig": (
        DIFFERS, "eager_install sets up the job's pip, working_dir and py_modules on every "
                 "node alive at init() (nodes that join later set it up on first use); "
                 "log_files are shown in the setup error"),
    # -- ray.util.state ----------------------------------------------------------------------
    "ray.util.state:get_log": (
        DIFFERS, "a task's lines are known for its latest attempt only; a component's "
                 "(raylet, GCS ...) stdout and stderr share one .log, so suffix does not "
                 "apply to it"),
    "ray.util.state:list_runtime_envs": (
        DIFFERS, "ref_cnt is None; an env is listed once its setup on the node ended"),
    "ray.util.state:get_task": (DIFFERS, "returns one record (the latest attempt), never "
                                         "Ray's list of attempts"),
    "ray.util.state:get_job": (DIFFERS, "also accepts a driver's job id"),
    "ray.util.state:StateApiClient": (DIFFERS, "talks gRPC to the GCS; cookies or headers "
                                               "raise"),
    "ray.util.state:summarize_objects": (DIFFERS, "call sites are not recorded (shown as "
                                                  "disabled)"),
    "ray:ObjectRefGenerator": (
        DIFFERS, "made by the runtime, not by users (no `generator_ref`, `worker` parameters); "
                 "`wait()` on a generator is not supported"),
    "ray:timeline": (DIFFERS, "one event per task attempt, no profiling sub-events"),
}


# -- extraction (under Ray) ---------------------------------------------------------------------
def _params(obj: Any) -> Optional[Dict[str, Any]]:
    """Parameter names of a callable, and whether it takes *args/**kwargs; None when the
    signature cannot be read (builtins, Cython)."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    names = [p.name for p in sig.parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]
    return {"names": names,
            "varargs": any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()),
            "varkw": any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())}


def _kind(obj: Any) -> str:
    if isinstance(obj, property):
        return "property"
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if callable(obj):
        return "function"
    return "constant"


def _describe(obj: Any) -> Dict[str, Any]:
    kind = _kind(obj)
    entry: Dict[str, Any] = {"kind": kind}
    if kind in ("class", "function"):
        entry["params"] = _params(obj)
    return entry


def extract() -> Dict[str, Any]:
    import ray

    out: Dict[str, Any] = {"ray_version": ray.__version__, "modules": {}}
    for ray_name, _ in MODULES:
        mod = importlib.import_module(ray_name)
        names = list(getattr(mod, "__all__", None) or [
            n for n in dir(mod) if not n.startswith("_")
            and getattr(getattr(mod, n), "__module__", None) == ray_name])
        names += [n for n in EXTRA_NAMES.get(ray_name, []) if n not in names]
        entries: Dict[str, Any] = {}
        for name in dict.fromkeys(names):
            if ray_name == "ray" and name in LIBRARIES:
                entries[name] = {"kind": "library"}
                continue
            try:
                obj = getattr(mod, name)
            except AttributeError:  # in __all__, but needs an optional part (cpp_function)
                entries[name] = {"kind": "optional"}
                continue
            entries[name] = _describe(obj)
            if name in MEMBERS_OF.get(ray_name, []):
                for member, value in inspect.getmembers(obj):
                    if member.startswith("_"):
                        continue
                    entries[f"{name}.{member}"] = _describe(value)
        out["modules"][ray_name] = entries
    return out


# -- the document (under the runtime) -------------------------------------------------------------
def _lookup(module: Any, dotted: str) -> Tuple[bool, Any]:
    obj = module
    for part in dotted.split("."):
        try:
            obj = getattr(obj, part)
        except Exception:  # AttributeError, or a lazy import failing
            return False, None
    return True, obj


def status_of(ray_module: str, name: str, entry: Dict[str, Any],
              runtime_module: Optional[Any]) -> Tuple[str, str]:
    note = NOTES.get(f"{ray_module}:{name}")
    if entry["kind"] == "library" and note is None:
        return NOT_SUPPORTED, "a Ray library, outside the core API"
    found, obj = (False, None) if runtime_module is None else _lookup(runtime_module, name)
    if not found:
        return NOT_SUPPORTED, note[1] if note else ""
    if note is not None:
        return note
    want = entry.get("params")
    if want and entry["kind"] in ("class", "function"):
        have = _params(obj)
        if have is not None and not have["varkw"]:
            missing = [n for n in want["names"]
                       if n not in have["names"] and not n.startswith("_")]
            if missing:
                return DIFFERS, "no parameter " + ", ".join(f"`{n}`" for n in missing)
    return SUPPORTED, ""


def render(api: Dict[str, Any]) -> str:
    sys.path.insert(0, ROOT)
    lines = [
        "# Compatibility with Ray " + api["ray_version"],
        "",
        "Generated by `scripts/compat.py --write` from `scripts/ray_api_2.60.json` (the public",
        "names of Ray's core modules, extracted from Ray itself) and the `runtime` package;",
        "`tests/test_compat.py` fails when this file is out of date. Statuses: **supported**;",
        "**differs** (how is said); **not supported** (the name does not exist here, or only",
        "raises).",
        "",
    ]
    totals = {SUPPORTED: 0, DIFFERS: 0, NOT_SUPPORTED: 0}
    sections = []
    for ray_module, runtime_name in MODULES:
        entries = api["modules"].get(ray_module, {})
        try:
            runtime_module = importlib.import_module(runtime_name)
        except ImportError:
            runtime_module = None
        rows = []
        for name in sorted(entries, key=str.lower):
            status, how = status_of(ray_module, name, entries[name], runtime_module)
            totals[status] += 1
            rows.append(f"| `{name}` | {entries[name]['kind']} | {status} | {how} |")
        where = f"`{runtime_name}`" if runtime_module is not None else f"(no `{runtime_name}`)"
        sections += [f"## `{ray_module}` → {where}", "",
                     "| name | kind | status | how it differs |", "| --- | --- | --- | --- |",
                     *rows, ""]
    lines += [f"In all: {totals[SUPPORTED]} supported, {totals[DIFFERS]} differ, "
              f"{totals[NOT_SUPPORTED]} not supported.", ""]
    return "\n".join(lines + sections)


def _check_notes(api: Dict[str, Any]) -> List[str]:
    known = {f"{m}:{n}" for m, entries in api["modules"].items() for n in entries}
    return [f"NOTES has {key!r}, which Ray {api['ray_version']} does not have"
            for key in NOTES if key not in known]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--extract", action="store_true",
                      help="(under Ray) write scripts/ray_api_2.60.json")
    mode.add_argument("--write", action="store_true", help="write docs/compatibility.md")
    mode.add_argument("--check", action="store_true",
                      help="fail if docs/compatibility.md is out of date (the default)")
    args = p.parse_args(argv)
    if args.extract:
        api = extract()
        with open(API_FILE, "w") as fh:
            json.dump(api, fh, indent=1, sort_keys=True)
            fh.write("\n")
        print(f"wrote {API_FILE}")
        return 0
    with open(API_FILE) as fh:
        api = json.load(fh)
    problems = _check_notes(api)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    text = render(api)
    if args.write:
        with open(DOC_FILE, "w") as fh:
            fh.write(text)
        print(f"wrote {DOC_FILE}")
        return 0
    try:
        with open(DOC_FILE) as fh:
            current = fh.read()
    except FileNotFoundError:
        current = ""
    if current != text:
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(),
                                    "docs/compatibility.md (committed)",
                                    "docs/compatibility.md (generated)", lineterm="")
        print("\n".join(diff), file=sys.stderr)
        print("docs/compatibility.md is out of date: run `python scripts/compat.py --write` "
              "and commit it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
