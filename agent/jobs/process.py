"""One job's entrypoint as a process group: start it, learn how it ended, stop it.

The agent starts ``setpriv --pdeathsig HUP -- /bin/sh -c WRAPPER`` in a new
session (no code of ours runs between fork and exec, see runtime/supervisor.py).
The wrapper, the group's leader, runs the entrypoint with ``/bin/sh -c`` and
writes its exit status to a file:

* The status survives a stolen wait: the agent is a child subreaper whose
  housekeeping reaps zombies it does not supervise, so waitpid alone could lose
  the exit code; the file cannot.
* The group dies with the agent: when the agent dies, however it dies, the
  wrapper gets SIGHUP (the parent-death signal) and SIGKILLs its process group.
  It ignores SIGTERM itself, so a stop (SIGTERM to the group) reaches the
  entrypoint and leaves the wrapper to record how it ended.

As under Ray (which blocks SIGINT in job drivers) the entrypoint runs with SIGINT
ignored: it is an asynchronous command of a non-interactive shell.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
from typing import Dict, Optional

log = logging.getLogger("agent.jobs")

_WRAPPER = ('/bin/sh -c "$1" </dev/null & child=$!; trap "" TERM; trap "kill -9 0" HUP; '
            'wait "$child"; rc=$?; echo "$rc" > "$2.tmp" && mv "$2.tmp" "$2"; exit "$rc"')
_POLL_S = 0.05


def _setpriv() -> list:
    path = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    return [path, "--pdeathsig", "HUP", "--"] if path else []


class JobProcess:
    """The running entrypoint of one job. Create and use it on one event loop."""

    def __init__(self, entrypoint: str, env: Dict[str, str], cwd: str, log_path: str,
                 status_path: str) -> None:
        self.entrypoint = entrypoint
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.status_path = status_path
        self.pid = 0
        self._popen: Optional[subprocess.Popen] = None
        self._exited = asyncio.Event()
        self._pidfd = -1

    def start(self) -> int:
        """Spawn the group; OSError when it cannot be (bad cwd, no /bin/sh)."""
        try:
            os.unlink(self.status_path)
        except FileNotFoundError:
            pass
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            argv = _setpriv() + ["/bin/sh", "-c", _WRAPPER, "job", self.entrypoint,
                                 self.status_path]
            # No preexec_fn: CPython then uses vfork+exec (see runtime/supervisor.py).
            self._popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                           cwd=self.cwd, env=self.env, close_fds=True,
                                           start_new_session=True)
        finally:
            os.close(fd)
        self.pid = self._popen.pid
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(self.pid)
            loop.add_reader(self._pidfd, self._on_exit)
        except (AttributeError, OSError):  # no pidfds (old kernel): poll instead
            self._pidfd = -1
            self._poller = loop.create_task(self._poll())
        return self.pid

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self._exited.set()

    async def _poll(self) -> None:
        while True:
            try:
                with open(f"/proc/{self.pid}/stat") as fh:
                    state = fh.read().rpartition(")")[2].split()[0]
            except OSError:
                break
            if state in ("Z", "X"):
                break
            await asyncio.sleep(_POLL_S)
        self._exited.set()

    async def wait(self) -> Optional[int]:
        """The entrypoint's exit status as the shell reports it (128+N when killed by
        signal N); None when the wrapper was killed before it could record one."""
        await self._exited.wait()
        # The wrapper is a zombie now, so its pid (the group id) is still reserved:
        # nothing else can be in the group we kill.
        self.signal_group(signal.SIGKILL)
        rc = self._read_status()
        try:
            reaped = self._popen.poll() if self._popen is not None else None
        except ChildProcessError:
            reaped = None
        if rc is None and reaped is not None and reaped >= 0 and os.path.exists(self.status_path):
            rc = self._read_status()
        return rc

    def _read_status(self) -> Optional[int]:
        try:
            with open(self.status_path) as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        return self.pid != 0 and not self._exited.is_set()

    def signal_group(self, sig: int) -> bool:
        if not self.pid:
            return False
        try:
            os.killpg(self.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    async def stop(self, grace_s: float) -> None:
        """SIGTERM to the whole group, then SIGKILL after grace_s if it still runs."""
        if not self.running():
            return
        self.signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._exited.wait(), grace_s)
        except asyncio.TimeoutError:
            log.info("job process group %d still running %gs after SIGTERM; SIGKILL", self.pid,
                     grace_s)
            self.signal_group(signal.SIGKILL)

    def close(self) -> None:
        if self._pidfd >= 0:
            try:
                asyncio.get_running_loop().remove_reader(self._pidfd)
            except RuntimeError:
                pass
            os.close(self._pidfd)
            self._pidfd = -1
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.cancel()
