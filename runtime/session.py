"""Session directories: one per cluster started on this machine.

    /tmp/runtime-cluster/session_2026-11-26_04-20-00_123456_4242/
        logs/          one log file per process (gcs.log, raylet.log, worker-1a2b3c4d.log ...)
        spill/         objects spilled from the object store
        cluster.json   how to reach this cluster (GCS address, node id, pids); 0600
        token          the cluster token; 0600
    /tmp/runtime-cluster/session_latest -> the newest session

``init(address="auto")`` finds the running cluster through session_latest, or by
asking this machine's node agent over its unix socket (a node run by
``node-agent`` keeps its sessions in the agent's state directory, which a driver
cannot be expected to know, and its token is readable only through the socket).
"""
from __future__ import annotations

import datetime
import json
import os
from typing import List, Optional

from runtime import config

#: Environment variable naming the node agent's control socket.
AGENT_SOCKET_ENV = "NODE_AGENT_SOCKET"
#: Where a node agent run by systemd (or as root) listens.
SYSTEM_AGENT_SOCKET = "/run/node-agent/agent.sock"


def new_session_dir(root: Optional[str] = None) -> str:
    root = root or config.SESSION_ROOT
    os.makedirs(root, exist_ok=True)
    try:
        os.chmod(root, 0o1777)
    except OSError:
        pass
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    path = os.path.join(root, f"session_{stamp}_{os.getpid()}")
    os.makedirs(os.path.join(path, "logs"), mode=0o700)
    os.chmod(path, 0o700)
    link = os.path.join(root, "session_latest")
    tmp = f"{link}.{os.getpid()}"
    try:
        os.symlink(os.path.basename(path), tmp)
        os.replace(tmp, link)
    except OSError:
        pass
    return path


def write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def write_cluster_file(session_dir: str, info: dict, token: str) -> None:
    write_private(os.path.join(session_dir, "token"), token)
    write_private(os.path.join(session_dir, "cluster.json"), json.dumps(info, indent=2))


def read_cluster_file(session_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(session_dir, "cluster.json")) as fh:
            info = json.load(fh)
        with open(os.path.join(session_dir, "token")) as fh:
            info["token"] = fh.read().strip()
        return info
    except (OSError, ValueError):
        return None


def user_agent_socket() -> str:
    """The socket of an unprivileged node agent (one that cannot write /run)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "node-agent", "agent.sock")
    return os.path.join(f"/tmp/node-agent-{os.getuid()}", "agent.sock")


def agent_socket_candidates() -> List[str]:
    """Where a local node agent may listen, most specific first: $NODE_AGENT_SOCKET
    alone when set, else the system socket and then the per-user one."""
    explicit = os.environ.get(AGENT_SOCKET_ENV)
    if explicit:
        return [explicit]
    return [SYSTEM_AGENT_SOCKET, user_agent_socket()]


def query_local_agent(timeout: float = 2.0) -> Optional[dict]:
    """Ask this machine's node agent which cluster its node belongs to.

    None when no agent answers or its node is not running. The reply carries
    gcs_address, token, session_dir, node_ip and node_id.
    """
    for path in agent_socket_candidates():
        if not os.path.exists(path):
            continue
        try:
            import grpc

            from runtime.protocol import agent_pb2, agent_pb2_grpc

            with grpc.insecure_channel(f"unix:{path}") as channel:
                reply = agent_pb2_grpc.NodeAgentStub(channel).Status(
                    agent_pb2.StatusRequest(local_only=True), timeout=timeout)
        except Exception:  # a stale socket or an agent of another version: not ours to use
            continue
        if reply.role == "idle" or not reply.gcs_address or not reply.token:
            continue
        return {"gcs_address": reply.gcs_address, "token": reply.token,
                "session_dir": reply.session_dir, "node_ip": reply.node_ip,
                "node_id": reply.node_id, "agent_socket": path}
    return None


def _latest_private_cluster(root: Optional[str]) -> Optional[dict]:
    root = root or config.SESSION_ROOT
    info = read_cluster_file(os.path.join(root, "session_latest"))
    if info is None:
        return None
    pid = int(info.get("gcs_pid") or 0)
    if pid:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
    return info


def find_running_cluster(root: Optional[str] = None) -> Optional[dict]:
    """The cluster a driver on this machine should attach to, or None.

    With $NODE_AGENT_SOCKET set, the agent on that socket is asked first. Otherwise
    the newest session under root whose GCS process is still alive wins (a private
    cluster someone started on purpose), then the node agent on its default socket.
    """
    if os.environ.get(AGENT_SOCKET_ENV):
        return query_local_agent() or _latest_private_cluster(root)
    return _latest_private_cluster(root) or query_local_agent()
