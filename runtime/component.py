"""What every component process (GCS, raylet, object store, worker) does at start.

A component is started by the supervisor (runtime/supervisor.py) with its stdout
and stderr appended to its log file in the session directory, the cluster token
in the environment, and a ready file to write once it serves. It dies with its
parent: a private cluster must never outlive a SIGKILLed driver. Whatever serves
(every component, and a driver's core worker) raises its open-file limit first
(`raise_open_file_limit`, called by `rpc.make_server`).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

from runtime.rpc import TOKEN_ENV

PARENT_PID_ENV = "RUNTIME_PARENT_PID"
# What the soft open-file limit is raised to where the hard limit is unlimited (Linux never
# allows more than fs.nr_open, 1,048,576 by default).
_NOFILE_WHEN_UNLIMITED = 1 << 20
log = logging.getLogger("runtime.component")
_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2


def token_from_env() -> str:
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        sys.exit(f"{os.path.basename(sys.argv[0])}: no cluster token in ${TOKEN_ENV}; "
                 "components are started by runtime.init() or node-agent, not by hand")
    return token


def setup_logging(component: str, node_id_hex: str, level: str | int = "INFO") -> logging.Logger:
    """Log lines name the component, node and PID, as errors must (DEVELOPERS.md)."""
    fmt = (f"%(asctime)s %(levelname)s {component} node={node_id_hex[:8]} "
           f"pid=%(process)d %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    return logging.getLogger(component)


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now.

    A server spends an fd on every connection it accepts, before anything is known of the
    peer: with the usual soft limit of 1,024, a thousand bare connections (no token needed)
    leave it unable to accept its own clients, or to open a file. The hard limit is what
    the administrator allows (systemd's default is 524,288), and raising the soft limit up
    to it needs no privilege. Idempotent; a failure leaves the limit as it was.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _NOFILE_WHEN_UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.debug("open-file limit stays at %d (raising it to %d failed: %s)", soft, target, exc)
        return soft
    log.debug("open-file limit raised from %d to %d (pid %d)", soft, target, os.getpid())
    return target


def announce_ready(path: str | None, **info) -> None:
    """Atomically write {"pid": ..., **info} to path so the supervisor sees us serving."""
    if not path:
        return
    info.setdefault("pid", os.getpid())
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(info, fh)
    os.replace(tmp, path)


def _prctl() -> Optional[Callable[..., int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    return fn


def arm_parent_death_signal(signum: int = signal.SIGKILL) -> bool:
    """PR_SET_PDEATHSIG for this process: the kernel sends signum when the thread that
    created us exits. False where that is not available (not Linux).

    The supervisor also arms it (through setpriv) before our argv runs; arming it
    here as well keeps components safe where setpriv is missing, and never needs
    code between fork and exec in the parent."""
    fn = _prctl()
    if fn is None:
        return False
    return fn(_PR_SET_PDEATHSIG, ctypes.c_ulong(int(signum)), ctypes.c_ulong(0),
              ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


def parent_death_signal() -> int:
    """The armed parent-death signal (0: none), for tests and diagnostics."""
    fn = _prctl()
    if fn is None:
        return 0
    sig = ctypes.c_int(0)
    if fn(_PR_GET_PDEATHSIG, ctypes.byref(sig), ctypes.c_ulong(0), ctypes.c_ulong(0),
          ctypes.c_ulong(0)) != 0:
        return 0
    return sig.value


def die_with_parent(on_parent_death: Optional[Callable[[], None]] = None,
                    interval: float = 0.5) -> None:
    """Exit when the parent process (named by $RUNTIME_PARENT_PID) is gone.

    Arms PR_SET_PDEATHSIG=SIGKILL first and only then compares getppid() with the
    expected parent: a parent that died before the signal was armed is caught by the
    comparison, one that dies later by the signal. A watcher thread also checks every
    `interval` seconds, for kernels without the signal and so that on_parent_death
    (e.g. the object store's cleanup) gets its chance where the signal is not armed.
    """
    expected = int(os.environ.get(PARENT_PID_ENV, "0") or 0)
    if not expected:
        return
    arm_parent_death_signal()
    if os.getppid() != expected:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != expected:
                if on_parent_death is not None:
                    try:
                        on_parent_death()
                    except Exception:
                        pass
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def install_stop_handler(stop) -> None:
    """SIGTERM/SIGINT call stop() once (from the signal handler's thread)."""
    fired = []

    def handler(signum, frame):
        if fired:
            return
        fired.append(signum)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
