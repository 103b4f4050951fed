"""What the agent does on its machine: pick its address, check ports, rotate
logs, reap and kill leftover processes."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
from typing import Set

import grpc
import psutil

from agent.errors import AgentError
from runtime.net import describe_port_holder

log = logging.getLogger("agent")

#: Component logs larger than this are rotated (copied to .1, truncated) while running.
LOG_MAX_BYTES = 50 * 1024 * 1024
LOG_BACKUPS = 3


def detect_node_ip(toward: str = "") -> str:
    """The local address used to reach `toward` (or the default route).

    A UDP connect only selects a route; no packet is sent."""
    target = toward or "10.255.255.255"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def check_port(ip: str, port: int, what: str) -> None:
    """Raise AgentError when ip:port cannot be bound, naming who holds it."""
    if not port:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise AgentError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"node IP {ip} is not an address of this machine (cannot bind "
                                 f"{ip}:{port} for the {what}); pass --node-ip with one of its "
                                 f"addresses") from None
            holder = describe_port_holder(port) or f"port {port} is in use"
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"cannot start the {what} on {ip}:{port}: {holder}; stop that "
                             f"process or choose another port in agent.toml [ports]") from None


def rotate_logs(log_dir: str) -> None:
    """Copy-and-truncate the logs in log_dir that grew past LOG_MAX_BYTES.

    Components keep their log open with O_APPEND, so truncating in place is
    safe (their next write lands at the new end) and needs no signal."""
    try:
        names = os.listdir(log_dir)
    except OSError:
        return
    for name in names:
        if not name.endswith(".log"):
            continue
        path = os.path.join(log_dir, name)
        try:
            if os.path.getsize(path) <= LOG_MAX_BYTES:
                continue
            for i in range(LOG_BACKUPS - 1, 0, -1):
                if os.path.exists(f"{path}.{i}"):
                    os.replace(f"{path}.{i}", f"{path}.{i + 1}")
            shutil.copyfile(path, f"{path}.1")
            os.truncate(path, 0)
        except OSError as exc:
            log.warning("could not rotate %s: %s", path, exc)


def reap_orphans(supervised: Set[int]) -> None:
    """Reap zombies reparented to us (the agent is a child subreaper), never one
    of the supervisor's own children: its Popen objects must see their exit.
    List the children before taking `supervised`, so none slips in between."""
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return
    for child in children:
        if child.pid in supervised:
            continue
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError, OSError):
            pass


def kill_descendants() -> None:
    """SIGKILL and reap whatever still runs below us: nothing may outlive the agent."""
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)
    for p in procs:
        try:
            os.waitpid(p.pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass
