"""Tunables in one place. Each can be overridden by an environment variable named
``RUNTIME_<NAME>`` (e.g. ``RUNTIME_INLINE_OBJECT_MAX_BYTES``) so tests and operators
can change them without code changes; children inherit the environment.

A few also answer to Ray's own variable (``RAY_memory_usage_threshold``,
``RAY_memory_monitor_refresh_ms``, ``RAY_task_oom_retries``): a Ray user sets those when
starting Ray, and a script moved over keeps its settings. The ``RUNTIME_`` name wins
when both are set."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional


def _env(name: str, default, cast=None):
    raw = os.environ.get("RUNTIME_" + name)
    if raw is None:
        return default
    return (cast or type(default))(raw)


def ray_env(name: str, ray_name: str, default: Any, cast: Callable[[str], Any],
            expected: str, valid: Optional[Callable[[Any], bool]] = None,
            environ: Optional[dict] = None) -> Any:
    """``RUNTIME_<name>``, else Ray's ``ray_name``, else `default`. A value that does not
    parse or is out of range is refused naming the variable, its value and what it
    should be, rather than surfacing later as a bare ValueError in some component."""
    env = os.environ if environ is None else environ
    for var in ("RUNTIME_" + name, ray_name):
        raw = env.get(var)
        if raw is None:
            continue
        try:
            value = cast(raw.strip())
        except ValueError:
            value = None
        if value is None or (valid is not None and not valid(value)):
            raise ValueError(f"the environment variable {var}={raw!r} is not valid: expected "
                             f"{expected}. Fix or unset it.")
        return value
    return default


# Values up to this size travel inline in RPCs and live in the owner's memory;
# larger ones go to the node's shared-memory object store (Ray: 100 KiB).
INLINE_OBJECT_MAX_BYTES: int = _env("INLINE_OBJECT_MAX_BYTES", 100 * 1024)
# Default object store size when none is given: 30% of RAM, capped (as Ray does).
OBJECT_STORE_FRACTION: float = _env("OBJECT_STORE_FRACTION", 0.3)
OBJECT_STORE_MAX_DEFAULT: int = _env("OBJECT_STORE_MAX_DEFAULT", 200 * 1024**3)
# Default retries for tasks whose worker died (Ray: 3).
DEFAULT_MAX_RETRIES: int = _env("DEFAULT_MAX_RETRIES", 3)
# Tasks of a function whose mean run time is below this may be pipelined to a
# leased worker, several in flight at once; slower ones go one at a time so a
# long task never holds short ones hostage behind it.
PIPELINE_MAX_TASK_SECONDS: float = _env("PIPELINE_MAX_TASK_SECONDS", 0.002)
PIPELINE_DEPTH: int = _env("PIPELINE_DEPTH", 16)
# An idle lease is returned to the raylet after this long without work
# (it is returned at once if the raylet asks for it).
LEASE_IDLE_RETURN_S: float = _env("LEASE_IDLE_RETURN_S", 0.2)
# Workers started with the node (one per CPU up to this many); more start on demand.
PRESTART_MAX_WORKERS: int = _env("PRESTART_MAX_WORKERS", 8)
# Idle task workers above the node's CPU count are stopped after this long.
IDLE_WORKER_KILL_S: float = _env("IDLE_WORKER_KILL_S", 1.0)
# How often a raylet reports its resources to the GCS, and when the GCS calls
# a silent node dead.
RESOURCE_REPORT_INTERVAL_S: float = _env("RESOURCE_REPORT_INTERVAL_S", 0.5)
NODE_DEATH_TIMEOUT_S: float = _env("NODE_DEATH_TIMEOUT_S", 10.0)
# A node whose raylet sent no report for this long, and whose raylet port refuses
# connections (nothing listens there: the raylet process is gone) or answers as another
# node, is dead without waiting for NODE_DEATH_TIMEOUT_S. 0 turns this probe off.
NODE_REFUSED_DEATH_S: float = _env("NODE_REFUSED_DEATH_S", 2.0)
# How long a GCS call waits for an unreachable GCS (one that is restarting) before it
# fails with an error naming the GCS and its address (Ray: gcs_rpc_server_reconnect_timeout_s).
GCS_RECONNECT_TIMEOUT_S: float = _env("GCS_RECONNECT_TIMEOUT_S", 60.0)
# Where the GCS keeps its tables when whoever starts it names no --storage-path: a SQLite
# file under the session directory (this relative name), or ":memory:" for none.
GCS_STORAGE: str = _env("GCS_STORAGE", "gcs/gcs_state.sqlite3")
# SQLite's synchronous mode for the GCS store: FULL (a commit is on disk before the GCS
# replies; survives power loss) or NORMAL (survives the GCS process dying, not the host).
GCS_STORAGE_SYNC: str = _env("GCS_STORAGE_SYNC", "FULL")
# How long to wait for a component process to come up.
COMPONENT_START_TIMEOUT_S: float = _env("COMPONENT_START_TIMEOUT_S", 30.0)
# Warn about tasks that cannot be placed anywhere after this long.
INFEASIBLE_WARNING_S: float = _env("INFEASIBLE_WARNING_S", 1.0)
# Largest gRPC message (inline values are small; this bounds malformed peers).
GRPC_MAX_MESSAGE_BYTES: int = _env("GRPC_MAX_MESSAGE_BYTES", 512 * 1024 * 1024)
# Task events: on by default (RUNTIME_TASK_EVENTS=0 turns them off), flushed to the
# GCS this often; the GCS keeps the most recent TASK_EVENTS_MAX_TASKS tasks.
TASK_EVENTS_ENABLED: bool = _env("TASK_EVENTS", 1, int) != 0
TASK_EVENTS_FLUSH_S: float = _env("TASK_EVENTS_FLUSH_S", 1.0)
TASK_EVENTS_MAX_TASKS: int = _env("TASK_EVENTS_MAX_TASKS", 10_000)
# How long a driver waits for a component that went away to come back: it reconnects
# to its raylet (a node agent restarts a dead raylet at the same address within a few
# seconds) before failing what waits for it with RayletDiedError; a placement group's
# ready() waits this long for an unreachable GCS.
RECONNECT_TIMEOUT_S: float = _env("RECONNECT_TIMEOUT_S", 7.0)
# Root of session directories (one per cluster started on this machine). Empty means
# this user's default: $XDG_RUNTIME_DIR/runtime-cluster when that is a private directory
# of ours, else /tmp/runtime-cluster-<uid> (runtime.private_fs.default_session_root).
# Whatever it is, it must be a directory of ours that nobody else can write.
SESSION_ROOT: str = _env("SESSION_ROOT", "")
# Session directories of clusters that have exited, kept (newest first) for their logs
# when a new session is created; older ones are removed. Live sessions are never removed.
SESSIONS_KEPT: int = _env("SESSIONS_KEPT", 10)
# A gRPC server closes a connection that has carried no call for this long (0: never),
# so connections that authenticate nothing (a flood of bare HTTP/2 prefaces, peers that
# vanished) do not pile up. Open streams count as calls: Raylet.Connect, PushTasks and
# WaitForExit keep theirs. A client's next call reconnects, transparently.
GRPC_MAX_CONNECTION_IDLE_S: float = _env("GRPC_MAX_CONNECTION_IDLE_S", 60.0)
# Mode of the object store's shared-memory files (octal). 0600: only the store's user
# maps them. The packaged agent sets 0660 so that members of its group (whose drivers
# already run code as the service user) can put and get large objects.
STORE_FILE_MODE: int = _env("STORE_FILE_MODE", 0o600, lambda raw: int(raw, 8))
# The memory monitor of each raylet (Ray's): every MEMORY_MONITOR_REFRESH_MS (0 turns it
# off) it compares the node's memory use with MEMORY_USAGE_THRESHOLD (a fraction of the
# node's memory, or of its cgroup's limit) and, above it, kills one leased worker.
MEMORY_USAGE_THRESHOLD: float = ray_env(
    "MEMORY_USAGE_THRESHOLD", "RAY_memory_usage_threshold", 0.95, float,
    "a number from 0 to 1 (the fraction of the node's memory above which the memory "
    "monitor kills a worker)", lambda v: 0.0 <= v <= 1.0)
MEMORY_MONITOR_REFRESH_MS: int = ray_env(
    "MEMORY_MONITOR_REFRESH_MS", "RAY_memory_monitor_refresh_ms", 250, int,
    "a whole number of milliseconds >= 0 (how often the memory monitor checks; 0 turns "
    "it off)", lambda v: v >= 0)
# How often a task the memory monitor killed runs again (its max_retries is not used;
# max_retries=0 means never). -1: without limit, as Ray 2.60.
TASK_OOM_RETRIES: int = ray_env(
    "TASK_OOM_RETRIES", "RAY_task_oom_retries", -1, int,
    "a whole number >= -1 (how often a task killed for memory runs again; -1: no limit)",
    lambda v: v >= -1)
