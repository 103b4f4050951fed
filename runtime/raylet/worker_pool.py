"""The raylet's worker processes: how each is started, for which runtime environment.

The scheduler (scheduler.py) decides when an environment is set up and how many workers
of it start; this module carries that out. It keeps what each environment hash means
(learnt from the lease requests that carry it), sets an environment up once on this node
(runtime/runtime_env/installer.py, bounded by its ``setup_timeout_seconds``), and builds
the process spec of a worker: the environment's interpreter (a pip venv's python), its
variables, its working directory, and its two log files (stdout ``worker-<id>.out``,
stderr ``worker-<id>.err``, Ray's names).

A setup may also be asked for before any task needs it: ``init()`` of a job whose
runtime_env has ``eager_install`` (Ray's default) asks every node (``prepare``, through
runtime_env_service.py). Whoever asks while a setup of the same environment runs waits
for that one: an environment is never set up twice at once. The outcome of each is
kept for ``list_runtime_envs()`` (``states``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import grpc

from runtime.core_worker.task_logs import worker_log_stem
from runtime.protocol import common_pb2, gcs_pb2
from runtime.rpc_errors import gcs_error
from runtime.runtime_env.context import make_resolved
from runtime.runtime_env.installer import EnvSetupError, Installer, WorkerLaunch
from runtime.runtime_env.packaging import PACKAGE_NS
from runtime.supervisor import ProcessSpec

__all__ = ["WorkerPool", "EnvState"]

log = logging.getLogger("runtime.raylet")

#: done(env hash, None on success or why it failed), called on the raylet's loop.
SetupDone = Callable[[str, Optional[str]], None]


@dataclass
class EnvState:
    """The last finished setup of one environment on this node (Ray's RuntimeEnvState)."""

    serialized: str
    success: bool
    error: Optional[str]
    creation_time_ms: float
    """When it was first set up successfully (or when the last attempt failed)."""


class WorkerPool:
    def __init__(self, args: Any, gcs: Callable[[], Any]) -> None:
        """``gcs()``: the raylet's GCS client (a GcsClient, or an aio GcsStub), once it
        has one."""
        self.args = args
        self._gcs = gcs
        self.envs: Dict[str, str] = {}          # runtime_env hash -> its JSON
        self.launches: Dict[str, WorkerLaunch] = {}
        self._setups: Dict[str, asyncio.Task] = {}
        self._waiters: Dict[str, List[SetupDone]] = {}  # env -> who waits for its setup
        self.states: Dict[str, EnvState] = {}          # env -> its last finished setup
        self.node = f"{args.node_id[:8]} ({args.node_ip}, raylet pid {os.getpid()})"
        self.installer = Installer(os.path.join(args.session_dir, "runtime_resources"),
                                   os.path.join(args.session_dir, "logs"), self.node,
                                   self._fetch)

    def learn(self, info: common_pb2.RuntimeEnvInfo) -> str:
        """The hash of a lease request's runtime_env, remembering what it means."""
        env = info.hash
        if env and env not in self.envs:
            self.envs[env] = info.serialized
        return env

    # -- setting an environment up -------------------------------------------------------------------
    def setup(self, env: str, done: SetupDone) -> None:
        """Set `env` up in the background, then call done(env, error). A setup of `env`
        already running is joined, not repeated."""
        self._waiters.setdefault(env, []).append(done)
        if env not in self._setups:
            self._setups[env] = asyncio.ensure_future(self._setup(env))

    def prepare(self, info: common_pb2.RuntimeEnvInfo) -> bool:
        """Set an environment up ahead of its tasks (eager_install); False when a setup
        of it was already running (this one joins it)."""
        env = self.learn(info)
        running = env in self._setups
        self.setup(env, _nobody)
        return not running

    async def _setup(self, env: str) -> None:
        """Run on each SetupEnv, even for an environment set up before: what is cached on
        disk is found again at once, and what a failed worker start broke is remade."""
        error: Optional[str] = None
        serialized = self.envs.get(env, "")
        resolved = make_resolved(json.loads(serialized) if serialized else {}, env)
        timeout = resolved.setup_timeout_s()
        try:
            self.launches[env] = await asyncio.wait_for(
                self.installer.prepare(resolved.env, env, serialized), timeout)
        except asyncio.TimeoutError:
            error = (f"setting it up on node {self.node} took longer than its "
                     f"setup_timeout_seconds ({timeout:g} s); raise it with runtime_env "
                     f"{{'config': {{'setup_timeout_seconds': ...}}}} (-1: no limit)")
        except EnvSetupError as exc:
            error = str(exc)
        except Exception as exc:  # a bug here must still fail the requests, not hang them
            log.exception("setting up runtime_env %s failed", env)
            error = f"{type(exc).__name__}: {exc} (node {self.node})"
        finally:
            self._setups.pop(env, None)
        if error is not None:
            log.warning("runtime_env %s could not be set up: %s", env, error)
            error = f"The runtime_env could not be set up: {error}"
            for path in (resolved.env.get("config") or {}).get("log_files") or []:
                error += f"\n--- {path} (config log_files) ---\n{_log_tail(path)}"
        self._record(env, serialized, error)
        for done in self._waiters.pop(env, []):
            try:
                done(env, error)
            except Exception:  # one waiter's bug must not leave the others waiting
                log.exception("a waiter of runtime_env %s failed", env)

    def _record(self, env: str, serialized: str, error: Optional[str]) -> None:
        before = self.states.get(env)
        if error is None and before is not None and before.success:
            return  # found again in the cache: it was made when first recorded
        self.states[env] = EnvState(serialized, error is None, error, time.time() * 1000)

    async def _fetch(self, key: bytes) -> Optional[bytes]:
        gcs = self._gcs()
        if gcs is None:
            raise EnvSetupError(f"node {self.node} is not connected to the GCS yet")
        request = gcs_pb2.KvRequest(ns=PACKAGE_NS, key=key)
        doing = f"fetching the runtime_env package {key.decode()}"
        try:
            if hasattr(gcs, "call"):  # a GcsClient: it rides out a GCS restart
                reply = await gcs.call("KvGet", request, timeout=120, doing=doing)
            else:
                reply = await gcs.KvGet(request, timeout=120)
        except grpc.RpcError as exc:
            raise EnvSetupError(str(gcs_error(self.args.gcs_address, exc, doing))) from None
        return reply.value if reply.found else None

    # -- starting workers -----------------------------------------------------------------------------
    def worker_spec(self, env: str, raylet_address: str) -> Tuple[ProcessSpec, str]:
        """The process spec of a new worker of runtime_env `env` (set up already), and the
        startup token it registers with."""
        token = secrets.token_hex(8)
        worker_id = os.urandom(28)
        a = self.args
        launch = self.launches.get(env) if env else None
        argv = [launch.python if launch else sys.executable, "-m", "runtime.worker",
                "--raylet-address", raylet_address, "--node-id", a.node_id, "--node-ip",
                a.node_ip, "--store-address", a.store_address, "--gcs-address", a.gcs_address,
                "--session-dir", a.session_dir, "--startup-token", token,
                "--worker-id", worker_id.hex()]
        environ = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if launch is not None:
            environ.update(launch.env)
        name = worker_log_stem(worker_id.hex())
        logs = os.path.join(a.session_dir, "logs")
        spec = ProcessSpec(name=name, argv=argv, env=environ,
                           cwd=launch.cwd if launch else None,
                           log_path=os.path.join(logs, f"{name}.out"),
                           err_path=os.path.join(logs, f"{name}.err"),
                           stop_grace_s=2.0)
        return spec, token

    async def close(self) -> None:
        """Cancel setups in progress and stop their commands."""
        tasks = list(self._setups.values()) + self.installer.tasks()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self.installer.close)


def _nobody(env: str, error: Optional[str]) -> None:
    """The waiter of an eager setup: its outcome is kept in WorkerPool.states."""


def _log_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 4096))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot be read on this node: {exc})"
