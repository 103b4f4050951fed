"""Launching and supervising component processes: the one place that starts them.

Used by ``runtime.init()`` (a private node's GCS, raylet and object store), by the
raylet (worker processes) and by the ``node-agent`` daemon (restarts with backoff,
crash-loop detection). Modelled on Dask's Nanny and trio's subprocess handling:

* a child's stdout and stderr are appended to its own log file (or to two, stdout and
  stderr apart: workers, as Ray's ``worker-*.out``/``.err``), so a crash always leaves
  its traceback somewhere a user can be pointed to, and every crash report quotes both;
* stopping is SIGTERM, a grace period, SIGKILL, then reaping: nothing we started may
  be left running or as a zombie;
* a child dies with us (``PR_SET_PDEATHSIG=SIGKILL`` plus ``RUNTIME_PARENT_PID`` for
  ``runtime.component.die_with_parent``), so a SIGKILLed driver leaves no cluster;
* one monitor thread per :class:`Supervisor` notices exits, reports them through
  ``on_exit`` and restarts what its :class:`RestartPolicy` says to restart.

**No code of ours runs between fork and exec.** Our parents are gRPC processes with
live threads; a ``preexec_fn`` makes CPython fork() for real, and fork() runs every
pthread_atfork handler, gRPC's included, in a child holding a copy of gRPC's threads'
state: children died of SIGSEGV/SIGABRT unless GRPC_ENABLE_FORK_SUPPORT=false happened
to be set before gRPC was imported. Without ``preexec_fn`` (and without uid/gid
changes) CPython spawns with vfork()+exec, which runs no fork handlers, so it does
not matter what gRPC is doing or how the environment is set. What the preexec did
moved out of the child: the parent-death signal is armed by ``setpriv --pdeathsig
KILL`` (util-linux) in front of argv, and again by every component itself
(``runtime.component.die_with_parent``, which also catches a parent that died
before); the log header is written by the parent.

Every spawn happens on one long-lived thread (see :class:`_Spawner`): Linux sends
the parent-death signal when the *thread* that created a child exits, not the
process, so a child started from a short-lived RPC handler thread would otherwise be
SIGKILLed as soon as that thread finished.
"""
from __future__ import annotations

import collections
import datetime
import errno
import enum
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, TypeVar

try:
    from runtime.component import PARENT_PID_ENV
except Exception:  # pragma: no cover - only while the package is mid-refactor
    # Same value as runtime.component.PARENT_PID_ENV; keep the two in sync.
    PARENT_PID_ENV = "RUNTIME_PARENT_PID"

__all__ = [
    "ComponentStartError",
    "ManagedProcess",
    "ProcessSpec",
    "ProcessState",
    "RestartPolicy",
    "Supervisor",
    "describe_exit",
]

logger = logging.getLogger("runtime.supervisor")

#: Log lines quoted in errors and failure reasons.
TAIL_LINES = 20
#: How often wait_ready() looks for the ready file: short, because start-up
#: latency of every component (and so of runtime.init()) includes it.
READY_POLL_S = 0.005
#: How long to wait for the kernel to reap a SIGKILLed child before giving up
#: loudly (only a process stuck in uninterruptible sleep takes this long).
REAP_TIMEOUT_S = 10.0

_T = TypeVar("_T")


class ProcessState(enum.Enum):
    """Where a :class:`ManagedProcess` is in its life cycle."""

    STARTING = "starting"
    """Spawned, but its ready file has not appeared yet (only with a ready_file)."""
    RUNNING = "running"
    """Alive and, if it has a ready file, serving."""
    BACKOFF = "backoff"
    """Exited unexpectedly; a restart is scheduled after the current backoff delay."""
    EXITED = "exited"
    """Exited with status 0 on its own and is not restarted."""
    FAILED = "failed"
    """Exited abnormally without a restart policy, or crash-looped; see failure_reason."""
    STOPPED = "stopped"
    """Stopped on request (stop(), stop_all()) or never started; never restarted."""


_ACTIVE_STATES = (ProcessState.STARTING, ProcessState.RUNNING, ProcessState.BACKOFF)


@dataclass
class RestartPolicy:
    """What to do when a process exits without having been asked to stop."""

    restart: bool = False
    """Restart on any unexpected exit (status 0 included: a server should not exit)."""
    backoff_initial_s: float = 0.5
    """First restart delay; it doubles on each further exit, up to backoff_max_s."""
    backoff_max_s: float = 30.0
    stable_after_s: float = 60.0
    """A process that ran at least this long before exiting restarts after the
    initial delay again: it was healthy, this is a new problem."""
    crash_loop_failures: int = 5
    """This many unexpected exits within crash_loop_window_s mark the process FAILED
    and stop restarts (restarting it again would only hide the problem). 0 disables."""
    crash_loop_window_s: float = 60.0


@dataclass
class ProcessSpec:
    """How to run one component process."""

    name: str
    """Unique within a Supervisor, e.g. "gcs", "raylet", "object_store", "worker-1a2b3c4d"."""
    argv: list[str]
    log_path: str
    """stdout and stderr are appended here (parent directories are created), stdout
    only when err_path is set."""
    env: dict[str, str] | None = None
    """Merged over os.environ."""
    cwd: str | None = None
    ready_file: str | None = None
    """The child writes JSON such as {"pid": .., "port": ..} here once it serves
    (runtime.component.announce_ready); wait_ready() returns it."""
    die_with_parent: bool = True
    """PR_SET_PDEATHSIG=SIGKILL in the child (armed by ``setpriv`` before argv runs)
    and RUNTIME_PARENT_PID=<our pid> in its environment. When False, an inherited
    RUNTIME_PARENT_PID is removed so the child does not watch a grandparent that is
    not its parent."""
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    stop_grace_s: float = 5.0
    """Time between SIGTERM and SIGKILL in stop()."""
    log_max_bytes: int = 50 * 1024 * 1024
    """At each (re)start a log larger than this is rotated to log_path.1, .2, ...
    (0 disables rotation)."""
    log_backups: int = 3
    """Rotated logs kept; 0 means an oversized log is simply deleted."""
    err_path: str | None = None
    """When set, stderr is appended here instead of to log_path (rotated alike, with the
    same header): Ray keeps a worker's streams apart, and get_log(suffix="err") reads
    this file."""

    def log_paths(self) -> list[str]:
        """The files the process writes: stderr's first when apart (a crash's traceback
        is there)."""
        return [self.err_path, self.log_path] if self.err_path else [self.log_path]


def describe_exit(returncode: int | None) -> str:
    """Human wording for a Popen returncode: "exit status 1", "killed by signal SIGKILL"."""
    if returncode is None:
        return "still running"
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = str(-returncode)
    return f"killed by signal {name}"


def _format_tail(lines: list[str]) -> str:
    if not lines:
        return "    (log is empty)"
    return "\n".join("    " + line for line in lines)


class ComponentStartError(RuntimeError):
    """A component could not be started or exited / hung before it was ready.

    The message names the component, its pid, its exit status and quotes the last
    lines of its log, because that is what a user needs to fix it (a bare
    "raylet failed to start" sends them hunting through the session directory).
    """

    def __init__(self, name: str, pid: int | None, returncode: int | None, reason: str,
                 log_path: str, log_tail: list[str]) -> None:
        self.name = name
        self.pid = pid
        self.returncode = returncode
        self.reason = reason
        self.log_path = log_path
        self.log_tail = list(log_tail)
        who = f"{name} (pid {pid})" if pid is not None else name
        status = "" if returncode is None else f" ({describe_exit(returncode)})"
        many = sum(not line.startswith("--- ") for line in self.log_tail)
        super().__init__(
            f"{who} {reason}{status}; last {many} lines of {log_path}:\n"
            f"{_format_tail(self.log_tail)}")


# --------------------------------------------------------------------------------------
# Spawning helpers


class _Spawner:
    """Runs every Popen on one long-lived daemon thread.

    PR_SET_PDEATHSIG fires when the thread that forked the child exits (Linux tracks
    the parent thread), so children must be forked by a thread that lives as long as
    the process. The thread is started lazily and re-created after a fork.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset_after_fork)

    def _reset_after_fork(self) -> None:
        # Only the forking thread survives a fork; the old spawner is gone.
        self._lock = threading.Lock()
        self._queue = queue.SimpleQueue()
        self._thread = None

    def call(self, fn: Callable[[], _T]) -> _T:
        if threading.current_thread() is self._thread:
            return fn()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, args=(self._queue,),
                                                name="supervisor-spawner", daemon=True)
                self._thread.start()
        fut: Future = Future()
        self._queue.put((fn, fut))
        return fut.result()

    @staticmethod
    def _run(q: queue.SimpleQueue) -> None:
        while True:
            fn, fut = q.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller, which re-raises it
                fut.set_exception(exc)


_spawner = _Spawner()
_setpriv_lock = threading.Lock()
_setpriv_checked = False
_setpriv_prefix: list[str] = []


def _pdeathsig_prefix() -> list[str]:
    """``[setpriv, --pdeathsig, KILL, --]``, or [] where no setpriv can do that.

    setpriv execs argv in the same process, so the child keeps its pid, and
    PR_SET_PDEATHSIG survives the exec. Checked once per process: util-linux's
    setpriv has --pdeathsig since 2.33; busybox's and older ones do not.
    """
    global _setpriv_checked, _setpriv_prefix
    with _setpriv_lock:
        if _setpriv_checked:
            return _setpriv_prefix
        _setpriv_checked = True
        if not sys.platform.startswith("linux"):
            return _setpriv_prefix
        path = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
        usage = b""
        if path:
            try:
                usage = subprocess.run([path, "--help"], stdin=subprocess.DEVNULL,
                                       capture_output=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                pass
        if b"--pdeathsig" in usage:
            _setpriv_prefix = [path, "--pdeathsig", "KILL", "--"]
        else:
            logger.warning(
                "no setpriv with --pdeathsig (util-linux) found; children that are not our "
                "components will outlive this process if it is killed (components still "
                "die with it: they arm the signal themselves)")
        return _setpriv_prefix


def _check_executable(argv0: str, env: dict[str, str], cwd: str | None) -> None:
    """Raise FileNotFoundError/PermissionError as exec would, before we spawn.

    The child execs through setpriv, so a missing program would otherwise only show
    as setpriv's exit status 127; the caller wants the error from spawn itself.
    """
    if os.sep in argv0:
        path = argv0 if os.path.isabs(argv0) else os.path.join(cwd or os.getcwd(), argv0)
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv0)
        if not os.access(path, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), argv0)
    elif shutil.which(argv0, path=env.get("PATH", os.defpath)) is None:
        raise FileNotFoundError(errno.ENOENT, f"{os.strerror(errno.ENOENT)} (not on PATH "
                                f"{env.get('PATH', os.defpath)!r})", argv0)


def _log_header(name: str, pid: int, started_iso: str) -> bytes:
    return f"=== {name} started pid {pid} at {started_iso} ===\n".encode()


def _rotate_log(path: str, max_bytes: int, backups: int) -> None:
    """Rotate path -> path.1 -> ... -> path.<backups> when it is larger than max_bytes."""
    if max_bytes <= 0:
        return
    try:
        if os.path.getsize(path) <= max_bytes:
            return
    except OSError:
        return
    try:
        if backups <= 0:
            os.unlink(path)
            return
        for i in range(backups - 1, 0, -1):
            src = f"{path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{path}.{i + 1}")
        os.replace(path, f"{path}.1")
    except OSError as exc:  # a full disk must not stop the component from starting
        logger.warning("could not rotate log %s: %s", path, exc)


def _read_ready(path: str) -> dict | None:
    """The ready file's JSON object, or None if it is absent or not complete yet."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_tail(path: str, n: int) -> list[str]:
    if n <= 0:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            chunk = max(64 * 1024, n * 1024)
            start = max(0, size - chunk)
            fh.seek(start)
            data = fh.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:]  # probably cut in the middle
    return lines[-n:]


def _read_tails(spec: ProcessSpec, n: int) -> list[str]:
    """The last n lines of the process's log; with stderr apart, those of each file, each
    under a line naming it (stderr first)."""
    if not spec.err_path:
        return _read_tail(spec.log_path, n)
    out: list[str] = []
    for path in spec.log_paths():
        out.append(f"--- {path} ---")
        out.extend(_read_tail(path, n) or ["(empty)"])
    return out


def _paths_text(spec: ProcessSpec) -> str:
    return " and ".join(spec.log_paths())


# --------------------------------------------------------------------------------------


class ManagedProcess:
    """One supervised child process and its history across restarts.

    Usable on its own (start / wait_ready / stop), but exits are only reported and
    restarts only happen while a :class:`Supervisor` monitors it. ``pid`` is the pid
    of the live process, None once it exited (so nobody signals a recycled pid);
    ``last_pid`` keeps the most recent one for messages.
    """

    def __init__(self, spec: ProcessSpec, *, lock: threading.RLock | None = None) -> None:
        self.spec = spec
        self._lock = lock if lock is not None else threading.RLock()
        self._popen: subprocess.Popen | None = None
        self._exit_recorded = True  # nothing to record until start()
        self._stop_requested = False
        self._start_mono: float | None = None
        self._restart_at: float | None = None
        self._backoff = spec.restart.backoff_initial_s
        self._failures: collections.deque[float] = collections.deque()
        self._notify: list[int] = []  # unexpected exit codes the monitor has to report
        self.pid: int | None = None
        self.last_pid: int | None = None
        self.state = ProcessState.STOPPED
        self.start_time: float | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.last_exit_time: float | None = None
        self.failure_reason = ""
        self.info: dict = {}

    def __repr__(self) -> str:
        return (f"<ManagedProcess {self.spec.name} pid={self.pid} state={self.state.value} "
                f"restarts={self.restarts}>")

    @property
    def name(self) -> str:
        return self.spec.name

    # ---- starting

    def start(self) -> None:
        """Spawn the process (after removing a stale ready file and rotating the log).

        Raises ComponentStartError when it cannot be executed at all (missing
        binary, bad cwd) and RuntimeError when it is already running.
        """
        with self._lock:
            self._refresh_locked()
            if self._popen is not None and self._popen.returncode is None:
                raise RuntimeError(f"{self.spec.name} is already running as pid {self.pid}")
            self._stop_requested = False
            self._restart_at = None
            self._spawn_locked()

    def _spawn_locked(self) -> None:
        spec = self.spec
        log_dir = os.path.dirname(os.path.abspath(spec.log_path))
        os.makedirs(log_dir, exist_ok=True)
        for path in spec.log_paths():
            _rotate_log(path, spec.log_max_bytes, spec.log_backups)
        if spec.ready_file:
            os.makedirs(os.path.dirname(os.path.abspath(spec.ready_file)), exist_ok=True)
            try:  # a file left by an earlier run would make us think it is ready
                os.unlink(spec.ready_file)
            except FileNotFoundError:
                pass
        env = dict(os.environ)
        env.update(spec.env or {})
        if spec.die_with_parent:
            env[PARENT_PID_ENV] = str(os.getpid())
        elif PARENT_PID_ENV not in (spec.env or {}):
            env.pop(PARENT_PID_ENV, None)
        started_iso = datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")
        argv = list(spec.argv)
        if spec.die_with_parent:
            argv = _pdeathsig_prefix() + argv
        fds: list[int] = []
        try:
            for path in (spec.log_path, spec.err_path):
                if path:
                    fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                       | os.O_CLOEXEC, 0o644))
            if not spec.argv:
                raise ValueError("empty argv")
            _check_executable(spec.argv[0], env, spec.cwd)

            def spawn() -> subprocess.Popen:
                # No preexec_fn, ever: with one CPython forks for real (module doc).
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fds[0],
                                         stderr=fds[-1], cwd=spec.cwd, env=env,
                                         close_fds=True, start_new_session=False)
                header = _log_header(spec.name, popen.pid, started_iso)
                for fd in fds:
                    try:  # at once: the child is still loading its interpreter
                        os.write(fd, header)
                    except OSError as exc:
                        logger.warning("could not write the log header of %s: %s", spec.name,
                                       exc)
                return popen

            popen = _spawner.call(spawn)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            msg = f"could not be started: {exc} (argv {spec.argv!r}, cwd {spec.cwd!r})"
            for fd in fds:
                try:
                    os.write(fd, f"=== {spec.name} {msg} ===\n".encode())
                except OSError:
                    pass
            logger.error("%s %s", spec.name, msg)
            raise ComponentStartError(spec.name, None, None, msg, _paths_text(spec),
                                      _read_tails(spec, TAIL_LINES)) from exc
        finally:
            for fd in fds:
                os.close(fd)  # the child has its own copy; ours would leak per spawn
        self._popen = popen
        self._exit_recorded = False
        self.pid = self.last_pid = popen.pid
        self.start_time = time.time()
        self._start_mono = time.monotonic()
        self.info = {}
        self.state = ProcessState.STARTING if spec.ready_file else ProcessState.RUNNING
        logger.info("spawned %s pid %d: %s (log %s)", spec.name, popen.pid,
                    " ".join(spec.argv), _paths_text(spec))

    def wait_ready(self, timeout: float) -> dict:
        """Wait until the ready file appears and return its contents.

        Raises ComponentStartError (with the log tail) when the process exits first
        or the timeout passes; on timeout the process is left running (the caller,
        e.g. Supervisor.spawn, decides whether to stop it). Without a ready_file it
        only checks that the process is alive and returns {"pid": pid}.
        """
        with self._lock:
            popen = self._popen
            if popen is None:
                raise RuntimeError(f"{self.spec.name} was never started")
        path = self.spec.ready_file
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._refresh_locked()
                rc = popen.returncode
            if rc is not None:
                raise self._start_error(popen, rc, "exited before it was ready")
            if not path:
                info = {"pid": popen.pid}
            else:
                info = _read_ready(path)
            if info is not None:
                with self._lock:
                    if self._popen is popen:
                        self.info = info
                        if self.state is ProcessState.STARTING:
                            self.state = ProcessState.RUNNING
                            logger.info("%s pid %d is ready: %s", self.spec.name, popen.pid, info)
                return info
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._start_error(
                    popen, None, f"did not write its ready file {path} within {timeout:g}s "
                    "(still running)")
            time.sleep(min(READY_POLL_S, remaining))

    def _start_error(self, popen: subprocess.Popen, rc: int | None,
                     reason: str) -> ComponentStartError:
        return ComponentStartError(self.spec.name, popen.pid, rc, reason,
                                   _paths_text(self.spec), self.tail_log(TAIL_LINES))

    # ---- observing

    def poll(self) -> int | None:
        """Returncode of the current process (negative = signal), None while it runs
        or if it was never started. Reaps it if it exited."""
        with self._lock:
            self._refresh_locked()
            return None if self._popen is None else self._popen.returncode

    def tail_log(self, n: int = TAIL_LINES) -> list[str]:
        """The last n lines of the log (current file only, not rotated backups); with
        stderr apart, the last n of each file, each under a ``--- path ---`` line."""
        return _read_tails(self.spec, n)

    def snapshot(self) -> dict:
        """JSON-friendly status (state as its string value) for status commands / RPCs."""
        with self._lock:
            alive = self.state in (ProcessState.STARTING, ProcessState.RUNNING)
            uptime = (time.monotonic() - self._start_mono
                      if alive and self._start_mono is not None else None)
            return {
                "name": self.spec.name,
                "pid": self.pid,
                "last_pid": self.last_pid,
                "state": self.state.value,
                "restarts": self.restarts,
                "start_time": self.start_time,
                "uptime": uptime,
                "last_exit": self.last_exit,
                "last_exit_time": self.last_exit_time,
                "failure_reason": self.failure_reason,
                "log_path": self.spec.log_path,
                "err_path": self.spec.err_path,
            }

    # ---- stopping

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM, wait up to grace (default spec.stop_grace_s), SIGKILL, reap.

        Idempotent; cancels a pending restart; marks the process STOPPED unless it
        had already ended as EXITED/FAILED (that state, and its reason, is kept).
        Returns the returncode, or None if it never ran.
        """
        _stop_processes([self], self.spec.stop_grace_s if grace is None else grace)
        with self._lock:
            return self.last_exit if self._popen is not None else None

    def kill(self) -> None:
        """SIGKILL the process now (force-cancel). Not a stop: the monitor reports the
        exit through on_exit and the restart policy applies."""
        with self._lock:
            self._refresh_locked()
            popen = self._popen
            if popen is None or popen.returncode is not None:
                return
            logger.warning("killing %s pid %d (SIGKILL)", self.spec.name, popen.pid)
            try:
                popen.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _begin_stop_locked(self) -> subprocess.Popen | None:
        """Mark stop requested and SIGTERM; the Popen to wait for, or None if not alive."""
        self._stop_requested = True
        self._restart_at = None
        if self.state is ProcessState.BACKOFF:
            logger.info("%s: pending restart cancelled by stop", self.spec.name)
        self._refresh_locked()
        popen = self._popen
        if popen is None or popen.returncode is not None:
            if self.state in _ACTIVE_STATES:
                self.state = ProcessState.STOPPED
            return None
        logger.info("stopping %s pid %d (SIGTERM)", self.spec.name, popen.pid)
        try:
            popen.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        return popen

    # ---- exit bookkeeping (all under the lock)

    def _refresh_locked(self, now: float | None = None) -> None:
        """Reap the process if it exited and record the exit exactly once."""
        popen = self._popen
        if popen is None or self._exit_recorded:
            return
        rc = popen.poll()
        if rc is not None:
            self._record_exit_locked(rc, time.monotonic() if now is None else now)

    def _record_exit_locked(self, rc: int, now: float) -> None:
        self._exit_recorded = True
        pid = self.pid
        self.pid = None
        self.last_exit = rc
        self.last_exit_time = time.time()
        ran = now - self._start_mono if self._start_mono is not None else 0.0
        if self._stop_requested:
            logger.info("%s pid %s stopped: %s", self.spec.name, pid, describe_exit(rc))
            if self.state in _ACTIVE_STATES:
                self.state = ProcessState.STOPPED
            return
        level = logging.INFO if rc == 0 and not self.spec.restart.restart else logging.WARNING
        logger.log(level, "%s pid %s exited: %s after %.1fs", self.spec.name, pid,
                   describe_exit(rc), ran)
        self._notify.append(rc)
        self._after_exit_locked(now, ran, rc, f"last exit status {rc}"
                                + ("" if rc >= 0 else f" ({describe_exit(rc)})"))

    def _after_exit_locked(self, now: float, ran: float, rc: int | None, last: str) -> None:
        """Apply the restart policy to an unexpected exit (or a failed restart)."""
        policy = self.spec.restart
        if not policy.restart:
            if rc == 0:
                self.state = ProcessState.EXITED
                self.failure_reason = ""
            else:
                self.state = ProcessState.FAILED
                what = describe_exit(rc) if rc is not None else last
                self.failure_reason = (f"{self.spec.name} {what}; last log lines:\n"
                                       f"{_format_tail(self.tail_log(TAIL_LINES))}")
            return
        if ran >= policy.stable_after_s:
            self._backoff = policy.backoff_initial_s  # it was healthy: a fresh problem
        self._failures.append(now)
        while self._failures and self._failures[0] < now - policy.crash_loop_window_s:
            self._failures.popleft()
        if policy.crash_loop_failures > 0 and len(self._failures) >= policy.crash_loop_failures:
            self.state = ProcessState.FAILED
            self.failure_reason = (
                f"crash loop: {len(self._failures)} exits in {policy.crash_loop_window_s:g}s; "
                f"{last}; last log lines:\n{_format_tail(self.tail_log(TAIL_LINES))}")
            logger.error("%s is crash-looping (%d exits in %gs), not restarting it again; "
                         "%s; log %s", self.spec.name, len(self._failures),
                         policy.crash_loop_window_s, last, _paths_text(self.spec))
            return
        delay = self._backoff
        self._backoff = min(self._backoff * 2, policy.backoff_max_s)
        self._restart_at = now + delay
        self.state = ProcessState.BACKOFF
        logger.warning("%s will be restarted in %.2fs (%s)", self.spec.name, delay, last)

    def _tick_locked(self, now: float) -> list[int]:
        """One monitor step: notice exits, readiness and due restarts. Returns the
        unexpected exit codes to report through on_exit."""
        recorded_before = self._exit_recorded
        self._refresh_locked(now)
        just_exited = self._exit_recorded and not recorded_before
        if (self.state is ProcessState.STARTING and self.spec.ready_file
                and self._popen is not None and self._popen.returncode is None):
            info = _read_ready(self.spec.ready_file)
            if info is not None:
                self.info = info
                self.state = ProcessState.RUNNING
                logger.info("%s pid %d is ready: %s", self.spec.name, self._popen.pid, info)
        if (self.state is ProcessState.BACKOFF and not just_exited and not self._stop_requested
                and self._restart_at is not None and now >= self._restart_at):
            self._restart_locked(now)
        notify, self._notify = self._notify, []
        return notify

    def _restart_locked(self, now: float) -> None:
        self._restart_at = None
        self.restarts += 1
        logger.warning("restarting %s (restart #%d)", self.spec.name, self.restarts)
        try:
            self._spawn_locked()
        except ComponentStartError as exc:
            self._after_exit_locked(now, 0.0, None, f"last restart failed: {exc.reason}")


def _stop_processes(procs: list[ManagedProcess], grace: float | None) -> None:
    """Stop several processes together: SIGTERM all (in the given order), wait for
    all against one deadline, SIGKILL the leftovers, reap everything.

    grace None means each process's own spec.stop_grace_s. Locks are not held while
    waiting, so the monitor keeps running (and its heartbeat keeps moving).
    """
    started = time.monotonic()
    pending: list[tuple[ManagedProcess, subprocess.Popen, float]] = []
    for proc in procs:
        with proc._lock:
            popen = proc._begin_stop_locked()
        if popen is not None:
            g = proc.spec.stop_grace_s if grace is None else grace
            pending.append((proc, popen, started + max(0.0, g)))
    for _proc, popen, deadline in pending:
        try:
            popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc, popen, deadline in pending:
        if popen.poll() is None:
            logger.warning("%s pid %d did not exit within %.1fs of SIGTERM; sending SIGKILL",
                           proc.spec.name, popen.pid, deadline - started)
            try:
                popen.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc, popen, _ in pending:
        try:
            popen.wait(timeout=REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # Only a process in uninterruptible sleep survives SIGKILL; the monitor
            # keeps polling and reaps it when the kernel lets go.
            logger.error("%s pid %d survived SIGKILL for %.0fs (uninterruptible sleep?); "
                         "it will be reaped when it exits", proc.spec.name, popen.pid,
                         REAP_TIMEOUT_S)
        with proc._lock:
            proc._refresh_locked()


class Supervisor:
    """Starts component processes and watches them from one monitor thread.

    on_exit(proc, returncode) is called from the monitor thread, without the lock
    held, for every exit not requested through stop()/stop_all() (kill() included),
    after the restart policy was applied (so proc.state is already BACKOFF, FAILED
    or EXITED). Exceptions from it are logged and ignored.
    """

    def __init__(self, on_exit: Callable[[ManagedProcess, int], None] | None = None,
                 poll_interval: float = 0.1) -> None:
        self._lock = threading.RLock()
        self._procs: list[ManagedProcess] = []  # in start order
        self._on_exit = on_exit
        self._poll_interval = poll_interval
        self._closing = False
        self._stop_event = threading.Event()
        self._heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="supervisor-monitor", daemon=True)
        self._thread.start()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- processes

    def spawn(self, spec: ProcessSpec, wait_ready: float | None = None) -> ManagedProcess:
        """Start a process and monitor it; with wait_ready, also wait that long for
        its ready file. If it is not ready it is stopped, forgotten and the
        ComponentStartError re-raised, so a failed start leaves nothing behind.

        A name still in use by a live (or restart-pending) process is a ValueError;
        an ended process of the same name is replaced.
        """
        with self._lock:
            if self._closing:
                raise RuntimeError(f"supervisor is closed; cannot spawn {spec.name}")
            old = self.get(spec.name)
            if old is not None:
                if old.state in _ACTIVE_STATES:
                    raise ValueError(f"a process named {spec.name!r} is already supervised "
                                     f"(pid {old.pid}, state {old.state.value})")
                self._procs.remove(old)
            proc = ManagedProcess(spec, lock=self._lock)
            proc.start()
            self._procs.append(proc)
        if wait_ready is not None:
            try:
                proc.wait_ready(wait_ready)
            except ComponentStartError:
                proc.stop()
                self.remove(proc)
                raise
        return proc

    def processes(self) -> list[ManagedProcess]:
        """All monitored processes, in start order."""
        with self._lock:
            return list(self._procs)

    def get(self, name: str) -> ManagedProcess | None:
        with self._lock:
            for proc in self._procs:
                if proc.spec.name == name:
                    return proc
            return None

    def remove(self, proc: ManagedProcess) -> None:
        """Stop monitoring proc. It is stopped first if still alive or restart-pending,
        so removing never leaves an unwatched child behind."""
        proc.stop()  # idempotent; keeps an EXITED/FAILED state as it is
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)

    def stop_all(self, grace: float | None = 5.0) -> None:
        """Stop every process, newest first: SIGTERM all, wait up to grace (None: each
        spec's stop_grace_s) against one deadline, SIGKILL leftovers, reap all.
        Pending restarts are cancelled. Idempotent; processes stay listed (STOPPED)."""
        with self._lock:
            procs = list(reversed(self._procs))
        _stop_processes(procs, grace)

    def close(self) -> None:
        """stop_all, then stop the monitor thread. Idempotent; spawn() fails afterwards."""
        with self._lock:
            self._closing = True
        self.stop_all()
        self._stop_event.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 10 * self._poll_interval))

    def heartbeat(self) -> float:
        """time.monotonic() of the monitor loop's last iteration; a stale value means
        the monitor is stuck (the node-agent's systemd watchdog checks it)."""
        return self._heartbeat

    # ---- monitor

    def _run(self) -> None:
        while True:
            self._heartbeat = time.monotonic()
            try:
                self._tick()
            except Exception:  # the monitor must outlive any bug in one iteration
                logger.exception("supervisor monitor iteration failed; continuing")
            if self._stop_event.wait(self._poll_interval):
                return

    def _tick(self) -> None:
        now = time.monotonic()
        events: list[tuple[ManagedProcess, int]] = []
        with self._lock:
            for proc in list(self._procs):
                try:
                    events.extend((proc, rc) for rc in proc._tick_locked(now))
                except Exception:
                    logger.exception("supervising %s failed; continuing", proc.spec.name)
        if self._on_exit is None:
            return
        for proc, rc in events:
            try:
                self._on_exit(proc, rc)
            except Exception:
                logger.exception("on_exit callback failed for %s (last pid %s, %s); ignoring",
                                 proc.spec.name, proc.last_pid, describe_exit(rc))
