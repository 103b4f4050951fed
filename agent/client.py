"""Talking to a node agent: find its socket, call it, launch one in the background.

Used by agentctl, the tests and any tool (raytop) that wants the agent's view.

agentctl sends the cluster token over the socket (Join, StartHead), so it only
talks to an agent nobody else can have put there: the socket must be ours (or
root's) in a directory nobody else can write (runtime.session.check_agent_socket),
and the process listening on it must be ours or root's (SO_PEERCRED). The system
agent, which systemd runs as the node-agent user, counts as root's: its directory
/run/node-agent can only have been made by root (runtime.private_fs.system_dir_owner),
so its owner, and only its owner, may serve there. An agent agentctl launches itself
must moreover be that very process: the listener's pid, and the pid its Status reply
claims, must be the pid we started.
"""
from __future__ import annotations

import importlib.machinery
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from typing import Any, Dict, List, NamedTuple, Optional

import grpc

from agent import config as agent_config
from runtime.private_fs import ensure_private_dir, trusted_socket_uids
from runtime.protocol import agent_pb2, agent_pb2_grpc
from runtime.session import agent_socket_candidates, check_agent_socket

log = logging.getLogger("agent.client")

LAUNCH_TIMEOUT_S = 30.0


class AgentNotRunning(RuntimeError):
    """No agent answers on the socket."""


def socket_alive(path: str) -> bool:
    """True when something accepts connections on the unix socket path."""
    if not path or not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


class Peer(NamedTuple):
    """Who listens on a unix socket, as the kernel recorded it when it called listen()."""
    pid: int
    uid: int
    gid: int


def socket_peer(path: str) -> Optional[Peer]:
    """The process listening on the unix socket path (SO_PEERCRED), or None when
    nothing accepts a connection there. PermissionError when we may not connect."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except PermissionError:
            raise
        except OSError:
            return None
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


def _no_access(path: str) -> str:
    """Why we may not use a socket the kernel will not let us reach."""
    group = "node-agent"
    try:
        import grp
        group = grp.getgrgid(os.stat(os.path.dirname(path)).st_gid).gr_name
    except (OSError, KeyError, ImportError):
        pass
    return (f"permission denied on {path}: only root and members of group {group} may use "
            f"this node-agent (an admin adds you with `adduser $USER {group}`; log in again "
            f"afterwards)")


def find_socket(explicit: Optional[str] = None,
                why_not: Optional[List[str]] = None) -> Optional[str]:
    """The socket of the running agent: --socket, $NODE_AGENT_SOCKET, the system
    socket, the per-user socket (the first that answers). None when none does; the
    reason each candidate was passed over is appended to why_not.

    A candidate someone else could have planted (see the module docstring) is
    skipped, or refused when it was named with --socket."""
    candidates = [explicit] if explicit else agent_socket_candidates()
    for path in candidates:
        try:
            check_agent_socket(path)
        except FileNotFoundError:
            continue
        except PermissionError as exc:
            # UnsafePathError is a PermissionError too: someone else could have planted it.
            why = (f"not using agent socket {path}: {exc}" if getattr(exc, "errno", None) is None
                   else _no_access(path))
            if explicit:
                raise AgentNotRunning(why) from None
            log.info("skipping %s", why)
            if why_not is not None:
                why_not.append(why)
            continue
        except OSError as exc:
            log.info("skipping agent socket %s: %s", path, exc)
            continue
        try:
            peer = socket_peer(path)
        except PermissionError:
            peer, why = None, _no_access(path)
            if explicit:
                raise AgentNotRunning(why) from None
            if why_not is not None:
                why_not.append(why)
        if peer is None:
            continue
        trusted = trusted_socket_uids(path)
        if peer.uid not in trusted:
            why = (f"not using agent socket {path}: it is served by pid {peer.pid} of uid "
                   f"{peer.uid}, not by uid {' or '.join(map(str, trusted))}")
            if explicit:
                raise AgentNotRunning(why)
            log.info("%s", why)
            if why_not is not None:
                why_not.append(why)
            continue
        return path
    return None


def check_launch_socket(path: str) -> str:
    """Make sure an agent launched on path gets a socket nobody else can have planted
    or can replace: its directory is created private (ancestors checked first) or
    must already be ours (or root's) and writable by nobody else, and a socket already
    there must be ours (or root's). AgentNotRunning, one line naming the path and the
    problem, otherwise. Returns the absolute path."""
    path = os.path.abspath(path)
    try:
        ensure_private_dir(os.path.dirname(path), allow_root=True)
        check_agent_socket(path)
    except FileNotFoundError:
        pass  # nothing there yet: the agent binds it
    except OSError as exc:  # UnsafePathError names the path and what is wrong
        raise AgentNotRunning(
            f"cannot launch node-agent on {path}: {exc}; pass --socket PATH in a directory of "
            f"yours (or set XDG_RUNTIME_DIR to a private one)") from None
    return path


def launch_socket(explicit: Optional[str], state_dir: Optional[str],
                  config_path: Optional[str]) -> str:
    """Where an agent launched with these arguments will listen (the same rule the
    daemon applies, so agentctl finds what it started)."""
    cfg = agent_config.load(config_path)
    return agent_config.resolve_paths(cfg, state_dir, explicit).socket


class AgentClient:
    """A blocking client of one agent's unix socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.channel = grpc.insecure_channel(f"unix:{path}")
        self.stub = agent_pb2_grpc.NodeAgentStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self, local_only: bool = False, timeout: float = 10.0) -> agent_pb2.StatusReply:
        return self.stub.Status(agent_pb2.StatusRequest(local_only=local_only), timeout=timeout)


def connect(explicit: Optional[str] = None) -> AgentClient:
    why_not: List[str] = []
    path = find_socket(explicit, why_not)
    if path is None:
        if why_not:
            raise AgentNotRunning("; ".join(why_not))
        where = explicit or " or ".join(agent_socket_candidates())
        raise AgentNotRunning(
            f"no node-agent is running (nothing answers on {where}); start one with `agentctl "
            f"start --head`, `agentctl join HOST:PORT --token T` or `systemctl start node-agent`")
    return AgentClient(path)


def _tail(path: str, n: int = 5) -> List[str]:
    try:
        with open(path, errors="replace") as fh:
            return fh.read().splitlines()[-n:]
    except OSError:
        return []


def _importable_from_anywhere(package: str) -> bool:
    """Whether `package` is found without the current directory on sys.path (an
    installed or pip-editable project is; a bare checkout is only from its root)."""
    cwd = os.getcwd()
    path = [p for p in sys.path if p and os.path.abspath(p) != cwd]
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            spec = (find_spec(package, path) if finder is importlib.machinery.PathFinder
                    else find_spec(package, None))
        except Exception:  # a third-party finder's bug is no reason to fail a launch
            continue
        if spec is not None:
            return True
    return False


def _stop_launched(proc: subprocess.Popen) -> None:
    """Stop the agent we started and are not going to use (it is ours, by pid)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def launch_agent(socket_path: Optional[str], state_dir: Optional[str],
                 config_path: Optional[str], timeout: float = LAUNCH_TIMEOUT_S,
                 extra_args: Optional[List[str]] = None) -> AgentClient:
    """Start node-agent in the background (its own session, detached from our
    terminal; output to <log dir>/node-agent.out) and wait until it serves, as
    `ray start` does where no service manager runs the agent.

    The caller is about to send the cluster token over the socket, so the socket is
    checked before the launch (check_launch_socket) and at each poll, and only an
    answer from the process we started is taken: whatever else listens there (a
    planted server answering before our agent gives up on the path, another agent)
    gets no request beyond a connect, and the launch fails naming it."""
    cfg = agent_config.load(config_path)
    paths = agent_config.resolve_paths(cfg, state_dir, socket_path)
    sock = check_launch_socket(paths.socket)
    try:
        ensure_private_dir(paths.state_dir)
        os.makedirs(paths.log_dir, mode=0o750, exist_ok=True)
    except OSError as exc:  # UnsafePathError included: its message names the path
        raise AgentNotRunning(f"cannot launch node-agent: {exc}") from None
    out_path = os.path.join(paths.log_dir, "node-agent.out")
    argv = [sys.executable, "-m", "agent.daemon", "--detached", "--socket", sock,
            "--state-dir", paths.state_dir]
    if config_path:
        argv += ["--config", os.path.abspath(config_path)]
    argv += extra_args or []
    env = dict(os.environ)
    if not _importable_from_anywhere("agent"):
        # Run as `python -m agent.cli` from an uninstalled checkout: the agent starts
        # in /, so point it at the checkout. Only then: every component and worker
        # inherits the agent's environment.
        src_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH")) if p)
    with open(out_path, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                close_fds=True, start_new_session=True, cwd="/", env=env)
    impostor = ""  # why the last thing that answered on the socket was not our agent
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            tail = " | ".join(_tail(out_path, 3))
            raise AgentNotRunning(f"node-agent exited at start (status {rc}): {tail} "
                                  f"(see {out_path}){impostor}")
        try:
            check_agent_socket(sock)
        except FileNotFoundError:
            time.sleep(0.1)
            continue
        except OSError as exc:
            _stop_launched(proc)
            raise AgentNotRunning(f"not using {sock}: {exc}") from None
        peer = socket_peer(sock)
        if peer is not None and peer.pid != proc.pid:
            impostor = (f"; {sock} is served by pid {peer.pid} (uid {peer.uid}), not by the "
                        f"node-agent started here (pid {proc.pid})")
        elif peer is not None:
            client = AgentClient(sock)
            try:
                reply = client.status(local_only=True, timeout=2.0)
            except grpc.RpcError:
                reply = None
            if reply is not None and reply.agent_pid == proc.pid:
                return client
            client.close()
            if reply is not None:
                impostor = (f"; the agent on {sock} says it is pid {reply.agent_pid}, not the "
                            f"node-agent started here (pid {proc.pid})")
        time.sleep(0.1)
    raise AgentNotRunning(f"node-agent (pid {proc.pid}) did not serve on {sock} within "
                          f"{timeout:g}s; see {out_path} and {paths.log_dir}/node-agent.log"
                          f"{impostor}")


# ---- JSON views ---------------------------------------------------------------------------


def process_dict(p: agent_pb2.ProcessInfo) -> Dict[str, Any]:
    return {"component": p.component, "pid": p.pid or None, "state": p.state,
            "restarts": p.restarts, "uptime_s": round(p.uptime_s, 1) if p.uptime_s >= 0 else None,
            "last_exit": p.last_exit or None,
            "last_exit_code": p.last_exit_code if p.has_last_exit else None,
            "failure_reason": p.failure_reason or None, "log_path": p.log_path,
            "supervised_by": p.supervised_by}


def status_dict(s: agent_pb2.StatusReply) -> Dict[str, Any]:
    """The Status reply as one JSON document (agentctl status --json)."""
    out = {
        "role": s.role, "phase": s.phase, "message": s.message, "summary": s.summary,
        "node_id": s.node_id, "node_ip": s.node_ip, "gcs_address": s.gcs_address,
        "session_dir": s.session_dir, "api_address": s.api_address,
        "agent_pid": s.agent_pid, "cluster_error": s.cluster_error or None,
        "nodes": [{"id": n.node_id, "ip": n.node_ip, "state": n.state, "is_head": n.is_head,
                   "resources_total": dict(n.resources_total),
                   "resources_available": dict(n.resources_available),
                   "death_reason": n.death_reason or None} for n in s.nodes],
        "resources": {"total": dict(s.total), "available": dict(s.available)},
        "pending": [{"shape": dict(d.shape), "count": d.count, "infeasible": d.infeasible}
                    for d in s.pending],
        "processes": [process_dict(p) for p in s.processes],
    }
    return out  # the token is left out on purpose: status output gets pasted into tickets
