"""Session directories: one per cluster started on this machine.

    <root>/session_2026-11-26_04-20-00_123456_4242/       (0700)
        logs/          one log file per process (gcs.log, raylet.log, worker-1a2b3c4d.out/.err ...)
        spill/         objects spilled from the object store
        cluster.json   how to reach this cluster (GCS address, node id, pids); 0600
        token          the cluster token; 0600
    <root>/session_latest -> the newest session

The root is per user (0700): ``$XDG_RUNTIME_DIR/runtime-cluster`` when that is a
private directory of ours, else ``/tmp/runtime-cluster-<uid>``; ``_temp_dir=`` or
$RUNTIME_SESSION_ROOT choose another. A root that another user could have made or
can write is refused (runtime.private_fs.UnsafePathError), never repaired.

``init(address="auto")`` finds the running cluster through session_latest, or by
asking this machine's node agent over its unix socket (a node run by
``node-agent`` keeps its sessions in the agent's state directory, which a driver
cannot be expected to know, and its token is readable only through the socket).
Discovery trusts only what another user cannot have planted: files and sockets
owned by us (or root), in directories nobody else can write. Each candidate it
skips is logged with the reason, and require_running_cluster() puts the reasons in
its error.

Creating a session prunes the session directories of clusters that are gone (see
prune_sessions), so a process that calls init()/shutdown() in a loop does not fill
the disk with them.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import stat
import time
from typing import List, Optional, Set

from runtime import config
from runtime.object_store.reclaim import pid_alive
from runtime.private_fs import (UnsafePathError, check_private_dir, check_trusted_socket,
                                default_session_root, ensure_private_dir, read_trusted_file,
                                replace_symlink, write_private_file)

log = logging.getLogger("runtime.session")

#: Environment variable naming the node agent's control socket.
AGENT_SOCKET_ENV = "NODE_AGENT_SOCKET"
#: Where a node agent run by systemd (or as root) listens.
SYSTEM_AGENT_SOCKET = "/run/node-agent/agent.sock"
#: A session dir without cluster.json whose creator lives is taken to be starting for
#: this long (from its last change); after that only a process naming it keeps it.
STARTING_GRACE_S = 120.0

_SESSION_NAME = re.compile(r"^session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_(\d+)$")


def session_root(root: Optional[str] = None) -> str:
    """The session root to use: root (``_temp_dir=``), else $RUNTIME_SESSION_ROOT, else
    this user's default. Not checked here; new_session_dir and discovery check it."""
    return os.path.abspath(root or config.SESSION_ROOT or default_session_root())


def new_session_dir(root: Optional[str] = None) -> str:
    """Create a fresh private session directory and point session_latest at it.

    Raises UnsafePathError (one line, naming the path) when the root is a symlink,
    belongs to another user or is writable by others. Prunes the directories of
    clusters that are gone, beyond the newest config.SESSIONS_KEPT.
    """
    root = ensure_private_dir(session_root(root))
    pid = os.getpid()
    for _ in range(1000):
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
        name = f"session_{stamp}_{pid}"
        path = os.path.join(root, name)
        try:
            os.mkdir(path, 0o700)
            break
        except FileExistsError:  # the same microsecond in this process: take the next one
            continue
    else:
        raise FileExistsError(f"cannot create a new session directory in {root}: every name "
                              f"tried exists (is the clock stopped?)")
    os.mkdir(os.path.join(path, "logs"), 0o700)
    try:
        replace_symlink(name, os.path.join(root, "session_latest"))
    except OSError as exc:
        log.warning("cannot point %s/session_latest at %s: %s", root, name, exc)
    try:
        prune_sessions(root, current=path)
    except OSError as exc:
        log.debug("pruning old sessions in %s failed: %s", root, exc)
    return path


def write_cluster_file(session_dir: str, info: dict, token: str) -> None:
    """Write token and cluster.json (0600, never through a planted name), token first:
    a reader that finds cluster.json finds the token too."""
    write_private_file(os.path.join(session_dir, "token"), token)
    write_private_file(os.path.join(session_dir, "cluster.json"), json.dumps(info, indent=2))


def _read_cluster(session_dir: str) -> dict:
    """cluster.json plus the token of session_dir, both checked as ours.

    FileNotFoundError when either is missing, UnsafePathError when either (or the
    directory) is not trustworthy, ValueError when cluster.json is not a JSON object.
    """
    check_private_dir(session_dir)
    info = json.loads(read_trusted_file(os.path.join(session_dir, "cluster.json")))
    if not isinstance(info, dict):
        raise ValueError(f"{session_dir}/cluster.json is not a JSON object")
    info["token"] = read_trusted_file(os.path.join(session_dir, "token")).decode().strip()
    return info


def read_cluster_file(session_dir: str) -> Optional[dict]:
    """The cluster described in session_dir (with its token), or None when it is missing,
    unreadable or not trustworthy (see _read_cluster)."""
    try:
        return _read_cluster(session_dir)
    except (OSError, ValueError) as exc:
        log.debug("not using %s: %s", session_dir, exc)
        return None


# ---- liveness and pruning -----------------------------------------------------------------



def _cmdline(pid: int) -> Optional[List[bytes]]:
    """pid's argv, or None when it cannot be read (hidepid, gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    return raw.split(b"\0")[:-1] if raw else []


def _gcs_alive(info: dict, session_dir: str) -> bool:
    """Whether the GCS recorded in cluster.json still runs: its pid lives and, where we
    can see its command line, names this session (a recycled pid does not count)."""
    try:
        pid = int(info.get("gcs_pid") or 0)
    except (TypeError, ValueError):
        return False
    if pid <= 0 or not pid_alive(pid):
        return False
    argv = _cmdline(pid)
    if argv is None:
        return True
    names = {os.fsencode(session_dir)}
    if isinstance(info.get("session_dir"), str):
        names.add(os.fsencode(info["session_dir"]))
    return any(arg in names for arg in argv)


def _session_alive(path: str, creator_pid: int, st: os.stat_result) -> bool:
    """Whether the session at path may still be in use, judged from its cluster.json
    (the GCS's pid, or the agent's) or, before one is written, from its creator."""
    try:
        info = json.loads(read_trusted_file(os.path.join(path, "cluster.json")))
    except FileNotFoundError:
        info = None
    except ValueError:
        info = None
    except OSError:
        return True  # not ours to judge (e.g. a file of another user): leave it alone
    if isinstance(info, dict):
        if info.get("gcs_pid"):
            return _gcs_alive(info, path)
        if info.get("agent_pid"):
            try:
                return pid_alive(int(info["agent_pid"]))
            except (TypeError, ValueError):
                return False
    if not pid_alive(creator_pid):
        return False
    return time.time() - st.st_mtime < STARTING_GRACE_S


def _sessions_named_by_processes(root: str) -> Set[str]:
    """Names of sessions under root that some running process names in its argv
    (every component gets --session-dir): such a session is in use whatever its
    cluster.json says."""
    prefix = os.fsencode(os.path.join(root, "session_"))
    cut = len(os.fsencode(root)) + 1
    names: Set[str] = set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return names
    for entry in entries:
        if not entry.isdigit():
            continue
        for arg in _cmdline(int(entry)) or ():
            if arg.startswith(prefix):
                names.add(os.fsdecode(arg[cut:].split(b"/", 1)[0]))
    return names


def prune_sessions(root: str, keep: Optional[int] = None, current: Optional[str] = None
                   ) -> List[str]:
    """Remove the session directories under root of clusters that are gone, except the
    newest `keep` of them (config.SESSIONS_KEPT; kept for post-mortem logs). Returns
    the paths removed.

    Only directories named like ours, owned by us and not symlinks are considered. A
    session is gone when its GCS (or, for an agent's session, the agent) has exited,
    or, with no cluster.json yet, when its creator has exited or it has been starting
    for over STARTING_GRACE_S; a session that any process still names in its command
    line is never removed, nor is `current`.
    """
    keep = config.SESSIONS_KEPT if keep is None else max(0, keep)
    root = os.path.abspath(root)
    uid = os.getuid()
    dead = []
    for name in os.listdir(root):
        m = _SESSION_NAME.match(name)
        path = os.path.join(root, name)
        if m is None or path == current:
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            continue
        if not _session_alive(path, int(m.group(1)), st):
            dead.append(name)
    dead.sort(reverse=True)  # the timestamp in the name sorts newest first
    doomed = dead[keep:]
    if not doomed:
        return []
    in_use = _sessions_named_by_processes(root)
    removed = []
    for name in doomed:
        if name in in_use:
            continue
        path = os.path.join(root, name)
        try:
            shutil.rmtree(path)  # never follows symlinks inside (fd-based on Linux)
        except OSError as exc:
            log.debug("cannot remove old session %s: %s", path, exc)
            continue
        removed.append(path)
    if removed:
        log.debug("removed %d old session dir(s) under %s", len(removed), root)
    return removed


# ---- discovery ------------------------------------------------------------------------------


def _skip(why_not: Optional[List[str]], reason: str, untrusted: bool) -> None:
    """Record why a candidate was not used: info when it exists but is not trustworthy
    (someone may have planted it), debug when there was simply nothing there."""
    log.log(logging.INFO if untrusted else logging.DEBUG, "discovery: skipped %s", reason)
    if why_not is not None:
        why_not.append(reason)


def user_agent_socket() -> str:
    """The socket of an unprivileged node agent (one that cannot write /run):
    $XDG_RUNTIME_DIR/node-agent/agent.sock when XDG_RUNTIME_DIR is a private directory
    of ours, else /tmp/node-agent-<uid>/agent.sock. The latter's directory can be made
    by anyone first, so whoever uses it checks it (check_agent_socket, the daemon)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base):
        try:
            check_private_dir(base)
            return os.path.join(base, "node-agent", "agent.sock")
        except UnsafePathError as exc:
            log.debug("not using XDG_RUNTIME_DIR for the agent socket: %s", exc)
    return os.path.join(f"/tmp/node-agent-{os.getuid()}", "agent.sock")


def agent_socket_candidates() -> List[str]:
    """Where a local node agent may listen, most specific first: $NODE_AGENT_SOCKET
    alone when set, else the system socket and then the per-user one. These are
    places to look, not endpoints to trust: check each with check_agent_socket."""
    explicit = os.environ.get(AGENT_SOCKET_ENV)
    if explicit:
        return [explicit]
    return [SYSTEM_AGENT_SOCKET, user_agent_socket()]


def check_agent_socket(path: str) -> str:
    """Raise UnsafePathError unless path is a socket that we or root bound, in a
    directory that nobody else can write (so nobody else can have planted it); a
    FileNotFoundError when nothing is there. Returns the absolute path."""
    return check_trusted_socket(path, allow_root=True)


def query_local_agent(timeout: float = 2.0, why_not: Optional[List[str]] = None
                      ) -> Optional[dict]:
    """Ask this machine's node agent which cluster its node belongs to.

    None when no trustworthy agent answers or its node is not running (each skipped
    socket is appended to why_not). The reply carries gcs_address, token,
    session_dir, node_ip and node_id.
    """
    for path in agent_socket_candidates():
        try:
            check_agent_socket(path)
        except FileNotFoundError:
            _skip(why_not, f"no agent socket at {path}", untrusted=False)
            continue
        except OSError as exc:  # UnsafePathError, or a path we cannot even inspect
            _skip(why_not, f"agent socket {path} not trusted: {exc}", untrusted=True)
            continue
        try:
            import grpc

            from runtime.protocol import agent_pb2, agent_pb2_grpc

            with grpc.insecure_channel(f"unix:{path}") as channel:
                reply = agent_pb2_grpc.NodeAgentStub(channel).Status(
                    agent_pb2.StatusRequest(local_only=True), timeout=timeout)
        except Exception as exc:  # a stale socket or an agent of another version
            _skip(why_not, f"the agent at {path} did not answer ({type(exc).__name__})",
                  untrusted=False)
            continue
        if reply.role == "idle" or not reply.gcs_address or not reply.token:
            _skip(why_not, f"the agent at {path} runs no node (role {reply.role or 'idle'})",
                  untrusted=False)
            continue
        return {"gcs_address": reply.gcs_address, "token": reply.token,
                "session_dir": reply.session_dir, "node_ip": reply.node_ip,
                "node_id": reply.node_id, "agent_socket": path}
    return None


def _latest_private_cluster(root: Optional[str], why_not: Optional[List[str]] = None
                            ) -> Optional[dict]:
    """The cluster session_latest under root points at, if everything on the way is
    ours and private and its GCS still runs; else None, with the reason in why_not."""
    root = session_root(root)
    link = os.path.join(root, "session_latest")
    if not os.path.lexists(root):
        _skip(why_not, f"no session root at {root}", untrusted=False)
        return None
    try:
        check_private_dir(root)
        st = os.lstat(link)
    except FileNotFoundError:
        _skip(why_not, f"no session_latest in {root}", untrusted=False)
        return None
    except OSError as exc:
        _skip(why_not, f"session root {root} not trusted: {exc}", untrusted=True)
        return None
    if stat.S_ISLNK(st.st_mode):
        if st.st_uid != os.getuid():
            _skip(why_not, f"{link} is owned by uid {st.st_uid}, not by uid {os.getuid()}",
                  untrusted=True)
            return None
        target = os.readlink(link)
        if "/" in target or target in (".", ".."):
            _skip(why_not, f"{link} points outside {root} ({target!r})", untrusted=True)
            return None
        session_dir = os.path.join(root, target)
    else:
        session_dir = link
    if not os.path.lexists(session_dir):
        _skip(why_not, f"{link} points at {session_dir}, which does not exist", untrusted=False)
        return None
    try:
        info = _read_cluster(session_dir)
    except FileNotFoundError as exc:
        _skip(why_not, f"{session_dir} has no {os.path.basename(exc.filename or 'cluster.json')}"
              f" (not started, or not a session)", untrusted=False)
        return None
    except ValueError as exc:
        _skip(why_not, f"{session_dir}/cluster.json is not valid: {exc}", untrusted=False)
        return None
    except OSError as exc:
        _skip(why_not, f"session {session_dir} not trusted: {exc}", untrusted=True)
        return None
    if info.get("gcs_pid") and not _gcs_alive(info, session_dir):
        _skip(why_not, f"the cluster of {session_dir} has exited (GCS pid {info['gcs_pid']})",
              untrusted=False)
        return None
    return info


def find_running_cluster(root: Optional[str] = None, why_not: Optional[List[str]] = None
                         ) -> Optional[dict]:
    """The cluster a driver on this machine should attach to, or None (with the reason
    for each candidate it skipped appended to why_not).

    This machine's node agent is asked first ($NODE_AGENT_SOCKET, else its default
    sockets): as with Ray's `ray start`, the node this machine runs is the cluster
    "auto" means. Without one, the newest private session under root whose GCS is
    still alive is used (a driver's init() cluster, for a second script to share).
    """
    return query_local_agent(why_not=why_not) or _latest_private_cluster(root, why_not)


def require_running_cluster(root: Optional[str] = None) -> dict:
    """find_running_cluster for init(address="auto"): a ConnectionError whose one-line
    message lists what was found and why it was not used, when nothing is."""
    why_not: List[str] = []
    found = find_running_cluster(root, why_not)
    if found is not None:
        return found
    raise ConnectionError(
        "Could not find any running cluster on this machine (address='auto'): "
        + "; ".join(why_not or ["nothing found"])
        + ". Start one with `agentctl start --head`, or call init() without an address for "
          "a private one.")
