"""What the agent remembers across its own restarts, in its state directory.

    <state_dir>/state.json   role, head address, the start options given by agentctl
    <state_dir>/token        the cluster token (0600)
    <state_dir>/agent.lock   held (flock) by the running agent; holds its pid

Why persist: the agent may be restarted at any time (crash, upgrade, reboot,
``systemctl restart``); it must come back as the same kind of node in the same
cluster without anyone typing the join command again. Files are written to a
temporary name, fsynced and renamed, so a crash mid-write leaves the old state.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from runtime.private_fs import ensure_private_dir, write_private_file

log = logging.getLogger("agent.state")

STATE_FILE = "state.json"
TOKEN_FILE = "token"
LOCK_FILE = "agent.lock"
VERSION = 1


@dataclass
class AgentState:
    role: str = "idle"                       # idle, head, worker
    head_address: str = ""                   # worker: the head's GCS
    options: Dict[str, Any] = field(default_factory=dict)   # NodeOptions given at start/join
    last_role: str = ""                      # what StartNode brings back after StopNode
    last_head_address: str = ""
    last_options: Dict[str, Any] = field(default_factory=dict)


def _atomic_write(path: str, data: str) -> None:
    """Replace path with data, 0600, never through a planted name, and durably: the new
    state is on disk when we return (private_fs)."""
    write_private_file(path, data, 0o600, durable=True)


class StateStore:
    """Reads and writes the state directory: created 0700, and refused (UnsafePathError)
    when it is a symlink, another user's or writable by others, since it holds the
    cluster token."""

    def __init__(self, state_dir: str) -> None:
        self.dir = ensure_private_dir(state_dir)
        self._lock_fd: Optional[int] = None

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def load(self) -> AgentState:
        """The saved state; a missing file is a fresh agent, a corrupt one is logged
        and treated as fresh (the agent must start, and idle is always safe)."""
        try:
            with open(self.path(STATE_FILE)) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return AgentState()
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable state file %s (%s); starting idle",
                      self.path(STATE_FILE), exc)
            return AgentState()
        known = {f.name for f in dataclasses.fields(AgentState)}
        state = AgentState(**{k: v for k, v in data.items() if k in known})
        if state.role not in ("idle", "head", "worker"):
            log.error("state file %s names unknown role %r; starting idle",
                      self.path(STATE_FILE), state.role)
            return AgentState()
        return state

    def save(self, state: AgentState) -> None:
        data = dict(dataclasses.asdict(state), version=VERSION)
        _atomic_write(self.path(STATE_FILE), json.dumps(data, indent=2, sort_keys=True) + "\n")

    def read_token(self) -> str:
        try:
            with open(self.path(TOKEN_FILE)) as fh:
                return fh.read().strip()
        except OSError:
            return ""

    def write_token(self, token: str) -> None:
        _atomic_write(self.path(TOKEN_FILE), token + "\n")

    def forget_token(self) -> None:
        try:
            os.unlink(self.path(TOKEN_FILE))
        except FileNotFoundError:
            pass

    def acquire_lock(self) -> None:
        """Hold the state dir for this process; raise RuntimeError naming the pid
        of the agent that already holds it (two agents on one state dir would
        fight over the same ports and role)."""
        path = self.path(LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode().strip() or "?"
            finally:
                os.close(fd)
            raise RuntimeError(f"another node-agent (pid {holder}) is using state dir {self.dir}; "
                               f"stop it first (agentctl stop) or pass another --state-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def agent_pid(self) -> Optional[int]:
        """The pid written by the agent holding the lock, if any (for tests and tools)."""
        try:
            with open(self.path(LOCK_FILE)) as fh:
                text = fh.read().strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None
