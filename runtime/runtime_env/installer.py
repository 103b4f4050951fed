"""On a node: turn a resolved runtime_env into what a worker process is started with.

Each resource is made once per node and kept in the node's cache,
``<session>/runtime_resources/``:

* ``working_dir/<package>/``: the working_dir package, unpacked; the worker starts there;
* ``py_modules/<package>/``: a py_modules package, unpacked (or a wheel installed there
  with ``pip install --target``); it goes on the worker's sys.path;
* ``pip/<hash>/venv``: a virtual environment per distinct pip requirement set, made with
  ``python -m venv --system-site-packages`` and the node's own pip. A ``.pth`` file adds
  the raylet's site directories after the venv's own, so the runtime (and whatever the
  node has installed) stays importable while the requirements take precedence.

Concurrent requests for one resource share its making; a resource nobody waits for any
more (its setup timed out) is cancelled, its processes killed. Setup commands run under
a Supervisor like every child of ours, their output in
``<session>/logs/runtime_env_setup-<resource>.log``; a failure carries the tail of it.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import site
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional

import psutil

from runtime.runtime_env.context import WORKER_ENV_VAR
from runtime.runtime_env.packaging import (extract_zip, is_package_uri, max_package_bytes,
                                           package_key, wheel_name)
from runtime.supervisor import ManagedProcess, ProcessSpec, Supervisor, describe_exit

__all__ = ["EnvSetupError", "WorkerLaunch", "Installer", "PIP_DEFAULT_OPTIONS"]

log = logging.getLogger("runtime.runtime_env")
#: Ray's default pip_install_options.
PIP_DEFAULT_OPTIONS = ["--disable-pip-version-check", "--no-cache-dir"]
#: How much of a failed command's output an error carries.
TAIL_LINES = 40
TAIL_BYTES = 8000
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class EnvSetupError(Exception):
    """A runtime_env could not be set up on this node; the message says why."""


@dataclass(frozen=True)
class WorkerLaunch:
    """How to start a worker of one environment."""

    python: str
    env: Dict[str, str]
    cwd: Optional[str]


class _Shared:
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task
        self.waiters = 0


def _runtime_root() -> str:
    """The directory the runtime package is imported from (this file is
    <root>/runtime/runtime_env/installer.py)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Installer:
    """The node's cache of runtime_env resources (one per raylet)."""

    def __init__(self, root: str, log_dir: str, node: str,
                 fetch: Callable[[bytes], Awaitable[Optional[bytes]]]) -> None:
        self.root = root
        self.log_dir = log_dir
        self.node = node  # names the node in errors
        self.fetch = fetch  # package key -> bytes (None: not stored)
        self._shared: Dict[tuple, _Shared] = {}
        self._exits: Dict[str, asyncio.Future] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._supervisor: Optional[Supervisor] = None

    # -- the environment ------------------------------------------------------------------------
    async def prepare(self, env: Dict[str, Any], env_hash: str, serialized: str) -> WorkerLaunch:
        """Make (or find) what `env` needs on this node; how to start its workers."""
        self._loop = asyncio.get_running_loop()
        sys_path: List[str] = []
        for uri in env.get("py_modules") or []:
            sys_path.append(await self._resource(("py_modules", uri), self._py_module, uri))
        working_dir = ""
        if env.get("working_dir"):
            uri = env["working_dir"]
            working_dir = await self._resource(("working_dir", uri), self._working_dir, uri)
            sys_path.append(working_dir)
        python = sys.executable
        if env.get("pip"):
            pip = env["pip"]
            key = hashlib.sha256(json.dumps([pip, sys.version], sort_keys=True).encode()
                                 ).hexdigest()[:16]
            python = await self._resource(("pip", key), self._pip_env, pip, key)
        out: Dict[str, str] = {}
        for name, value in (env.get("env_vars") or {}).items():
            out[name] = _VAR.sub(lambda m: os.environ.get(m.group(1), ""), value)
        path = list(sys_path)
        root = _runtime_root()
        if root not in site.getsitepackages():
            path.append(root)  # `-m runtime.worker` must import wherever the worker starts
        existing = out.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        out["PYTHONPATH"] = os.pathsep.join(path + ([existing] if existing else []))
        out[WORKER_ENV_VAR] = json.dumps({"hash": env_hash, "serialized": serialized,
                                          "sys_path": sys_path, "working_dir": working_dir,
                                          "pip": bool(env.get("pip"))})
        return WorkerLaunch(python, out, working_dir or None)

    async def _resource(self, key: tuple, make: Callable[..., Awaitable[str]], *args: Any) -> str:
        """Make a resource once, however many environments wait for it; a resource that
        failed is made again for the next request, one nobody waits for is cancelled."""
        entry = self._shared.get(key)
        if entry is None:
            entry = self._shared[key] = _Shared(asyncio.ensure_future(make(*args)))
        entry.waiters += 1
        try:
            return await asyncio.shield(entry.task)
        except BaseException:
            task = entry.task
            failed = task.done() and (task.cancelled() or task.exception() is not None)
            if (failed or entry.waiters == 1) and self._shared.get(key) is entry:
                del self._shared[key]
                if not task.done():
                    task.cancel()
            raise
        finally:
            entry.waiters -= 1

    # -- resources ------------------------------------------------------------------------------
    async def _package_bytes(self, uri: str) -> bytes:
        data = await self.fetch(package_key(uri))
        if data is None:
            raise EnvSetupError(f"the package {uri} is not in the GCS's KV store (it is "
                                f"uploaded by the driver; was the GCS restarted since?). "
                                f"Submit the task again to upload it again")
        return data

    async def _working_dir(self, uri: str) -> str:
        if not is_package_uri(uri):
            raise EnvSetupError(f"working_dir {uri!r} is not a package of this cluster")
        dest = os.path.join(self.root, "working_dir", uri.rsplit("/", 1)[-1][:-len(".zip")])
        if not os.path.isdir(dest):
            data = await self._package_bytes(uri)
            await asyncio.to_thread(extract_zip, data, dest, max_package_bytes())
        return dest

    async def _py_module(self, uri: str) -> str:
        if not is_package_uri(uri):
            raise EnvSetupError(f"py_modules entry {uri!r} is not a package of this cluster")
        name = uri.rsplit("/", 1)[-1]
        if not name.endswith(".whl"):
            dest = os.path.join(self.root, "py_modules", name[:-len(".zip")])
            if not os.path.isdir(dest):
                data = await self._package_bytes(uri)
                await asyncio.to_thread(extract_zip, data, dest, max_package_bytes())
            return dest
        dest = os.path.join(self.root, "py_modules", name[:-len(".whl")])
        if os.path.isdir(dest):
            return dest
        self._need_pip("a py_modules wheel")
        data = await self._package_bytes(uri)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".wheel-", dir=os.path.dirname(dest))
        try:
            wheel = os.path.join(tmp, wheel_name(uri))
            with open(wheel, "wb") as fh:
                fh.write(data)
            target = os.path.join(tmp, "target")
            await self._run(f"wheel-{name[:24]}", [sys.executable, "-m", "pip", "install",
                                                   *PIP_DEFAULT_OPTIONS, "--target", target,
                                                   wheel], "pip install (py_modules wheel)")
            os.rename(target, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def _need_pip(self, what: str) -> None:
        if importlib.util.find_spec("pip") is None:
            raise EnvSetupError(f"{what} needs pip, which the node's Python ({sys.executable}) "
                                f"does not have; install pip for it")

    async def _pip_env(self, pip: Dict[str, Any], key: str) -> str:
        env_dir = os.path.join(self.root, "pip", key)
        venv = os.path.join(env_dir, "venv")
        python = os.path.join(venv, "bin", "python")
        ready = os.path.join(env_dir, ".ready")
        if os.path.exists(ready):
            return python
        self._need_pip("runtime_env 'pip'")
        shutil.rmtree(env_dir, ignore_errors=True)  # what a killed raylet left half made
        os.makedirs(env_dir)
        try:
            await self._run(f"venv-{key}", [sys.executable, "-m", "venv", "--system-site-packages",
                                            "--without-pip", venv], "python -m venv")
            self._link_parent_site(venv)
            requirements = os.path.join(env_dir, "requirements.txt")
            with open(requirements, "w", encoding="utf-8") as fh:
                fh.write("\n".join(pip["packages"]) + "\n")
            pip_cmd = [sys.executable, "-m", "pip", "--python", python]
            if pip.get("pip_version"):
                await self._run(f"pip-{key}", pip_cmd + ["install", *PIP_DEFAULT_OPTIONS,
                                                         "pip" + pip["pip_version"]],
                                "pip install pip" + pip["pip_version"])
                pip_cmd = [python, "-m", "pip"]
            options = pip.get("pip_install_options")
            options = PIP_DEFAULT_OPTIONS if options is None else options
            await self._run(f"pip-{key}", pip_cmd + ["install", *options, "-r", requirements],
                            "pip install " + " ".join(pip["packages"]), cwd=env_dir)
            if pip.get("pip_check"):
                await self._run(f"pip-{key}", pip_cmd + ["check"], "pip check")
            with open(ready, "w") as fh:
                fh.write("ok\n")
        except BaseException:
            shutil.rmtree(env_dir, ignore_errors=True)
            raise
        return python

    @staticmethod
    def _link_parent_site(venv: str) -> None:
        """Make the raylet's site directories (the runtime, the node's packages) importable
        in the venv, after its own."""
        purelib = sysconfig.get_path("purelib", vars={"base": venv, "platbase": venv})
        dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
        lines = ["import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs)] if dirs else []
        root = _runtime_root()
        if root not in dirs:
            lines.append(root)
        os.makedirs(purelib, exist_ok=True)
        with open(os.path.join(purelib, "_runtime_node_site.pth"), "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")

    # -- setup commands -----------------------------------------------------------------------------
    def _on_exit(self, proc: ManagedProcess, returncode: int) -> None:
        """Supervisor's monitor thread: a setup command ended."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._exited, proc.spec.name, returncode)

    def _exited(self, name: str, returncode: int) -> None:
        fut = self._exits.pop(name, None)
        if fut is not None and not fut.done():
            fut.set_result(returncode)

    async def _run(self, name: str, argv: List[str], what: str, cwd: Optional[str] = None) -> None:
        """Run one setup command to its end; EnvSetupError with its output if it fails."""
        if self._supervisor is None:
            self._supervisor = Supervisor(on_exit=self._on_exit)
        name = f"runtime-env-{name}"
        log_path = os.path.join(self.log_dir, f"runtime_env_setup-{name[len('runtime-env-'):]}.log")
        try:
            start = os.path.getsize(log_path)
        except OSError:
            start = 0
        fut = self._exits[name] = asyncio.get_running_loop().create_future()
        spec = ProcessSpec(name=name, argv=argv, log_path=log_path, cwd=cwd, stop_grace_s=1.0,
                           log_max_bytes=0)
        try:
            proc = self._supervisor.spawn(spec)
        except Exception as exc:
            self._exits.pop(name, None)
            raise EnvSetupError(f"could not start `{what}`: {exc}") from None
        try:
            returncode = await fut
        except asyncio.CancelledError:
            _kill_tree(proc)
            raise
        finally:
            self._exits.pop(name, None)
            self._supervisor.remove(proc)
        if returncode != 0:
            raise EnvSetupError(f"`{what}` failed ({describe_exit(returncode)}) on node "
                                f"{self.node}; its output ({log_path}):\n"
                                f"{_tail(log_path, start)}")

    def close(self) -> None:
        """Stop every setup in progress (blocking: the raylet calls it off its loop)."""
        for entry in list(self._shared.values()):
            if not entry.task.done():
                entry.task.cancel()
        if self._supervisor is not None:
            self._supervisor.close()

    def tasks(self) -> List[asyncio.Task]:
        return [e.task for e in self._shared.values()]


def _kill_tree(proc: ManagedProcess) -> None:
    """Kill a setup command and what it started (pip runs builds in subprocesses)."""
    pid = proc.pid
    if pid is None:
        return
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        children = []
    proc.kill()
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass


def _tail(path: str, start: int) -> str:
    """The end of what a command wrote to its log since `start`, without our headers."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
    except OSError as exc:
        return f"(its log cannot be read: {exc})"
    data = data[-TAIL_BYTES:]
    lines = [ln for ln in data.decode(errors="replace").splitlines()
             if not ln.startswith("=== runtime-env-")]
    return "\n".join(lines[-TAIL_LINES:]) or "(no output)"
