"""The runtime environment this process runs in, and what tasks it submits inherit.

* In a driver it is the job's: ``init(runtime_env=...)``, resolved (local paths uploaded)
  when the driver connects. The driver itself does not run in it, as in Ray.
* In a worker it is the environment the raylet started the worker for, handed over in
  ``RUNTIME_WORKER_ENV`` together with what the node made of it (its sys.path entries and
  working directory). A worker only ever runs tasks of that environment.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from runtime.protocol import common_pb2
from runtime.runtime_env.runtime_env import DEFAULT_SETUP_TIMEOUT_SECONDS

__all__ = ["ResolvedEnv", "EMPTY", "WORKER_ENV_VAR", "JOB_ENV_VAR", "OVERRIDE_JOB_ENV_VAR",
           "WorkerSetup", "current", "set_current", "worker_setup", "load_worker_env"]

#: How a worker learns its environment from the raylet (read and removed at start).
WORKER_ENV_VAR = "RUNTIME_WORKER_ENV"
#: A submitted job's runtime_env (JSON), set by the job server for its driver: init()
#: merges it with its own (Ray: RAY_JOB_CONFIG_JSON_ENV_VAR), and
#: RUNTIME_OVERRIDE_JOB_RUNTIME_ENV=1 lets init()'s win a conflict.
JOB_ENV_VAR = "RUNTIME_JOB_RUNTIME_ENV"
OVERRIDE_JOB_ENV_VAR = "RUNTIME_OVERRIDE_JOB_RUNTIME_ENV"


@dataclass(frozen=True)
class ResolvedEnv:
    """A runtime_env as it travels: no local paths (packages are gcs:// URIs), its hash
    (what workers are pooled by; "" when it needs no special worker) and its JSON."""

    env: Dict[str, Any]
    hash: str
    serialized: str
    info: common_pb2.RuntimeEnvInfo = field(compare=False, repr=False,
                                            default_factory=common_pb2.RuntimeEnvInfo)

    def setup_timeout_s(self) -> Optional[float]:
        """RuntimeEnvConfig.setup_timeout_seconds; None when it is -1 (no limit)."""
        value = (self.env.get("config") or {}).get("setup_timeout_seconds",
                                                   DEFAULT_SETUP_TIMEOUT_SECONDS)
        return None if value == -1 else float(value)


EMPTY = ResolvedEnv({}, "", "")


def make_resolved(env: Dict[str, Any], env_hash: str) -> ResolvedEnv:
    if not env:
        return EMPTY
    serialized = json.dumps(env, sort_keys=True)
    info = common_pb2.RuntimeEnvInfo(hash=env_hash, serialized=serialized) if env_hash else \
        common_pb2.RuntimeEnvInfo()
    return ResolvedEnv(env, env_hash, serialized, info)


@dataclass(frozen=True)
class WorkerSetup:
    """What the node made of this worker's environment."""

    sys_path: Tuple[str, ...] = ()  # py_modules and working_dir, first on sys.path
    working_dir: str = ""           # the worker's current directory
    pip: bool = False               # it runs in a venv of the environment's pip packages


_current: ResolvedEnv = EMPTY
_setup = WorkerSetup()


def current() -> ResolvedEnv:
    return _current


def set_current(env: ResolvedEnv) -> None:
    global _current
    _current = env


def worker_setup() -> WorkerSetup:
    return _setup


def load_worker_env() -> None:
    """Worker start: take the environment the raylet set up for this process."""
    global _current, _setup
    raw = os.environ.pop(WORKER_ENV_VAR, None)
    if not raw:
        return
    info = json.loads(raw)
    env = json.loads(info["serialized"]) if info.get("serialized") else {}
    _current = make_resolved(env, info.get("hash", ""))
    _setup = WorkerSetup(tuple(info.get("sys_path") or ()), info.get("working_dir") or "",
                         bool(info.get("pip")))
