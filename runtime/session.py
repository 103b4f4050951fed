"""Session directories: one per cluster started on this machine.

    /tmp/runtime-cluster/session_2026-11-26_04-20-00_123456_4242/
        logs/          one log file per process (gcs.log, raylet.log, worker-1a2b3c4d.log ...)
        spill/         objects spilled from the object store
        cluster.json   how to reach this cluster (GCS address, node id, pids); 0600
        token          the cluster token; 0600
    /tmp/runtime-cluster/session_latest -> the newest session

``init(address="auto")`` finds the running cluster through session_latest.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Optional

from runtime import config


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


def find_running_cluster(root: Optional[str] = None) -> Optional[dict]:
    """The newest session on this machine whose GCS process is still alive."""
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
