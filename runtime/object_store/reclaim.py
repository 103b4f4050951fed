"""Reclaiming shared memory that dead processes left behind.

Two kinds of leftovers, each with a proof of death before anything is removed:

* **Files of a dead store.** ``/dev/shm`` outlives every process and is shared
  by all users, so a store killed with SIGKILL (or with the driver whose private
  cluster it served) leaves its ``rt-<node>-<object>`` files there. Each store
  holds an exclusive ``flock`` on ``.rt-<node>.lock`` in its shm directory for as
  long as it runs; the kernel drops the lock when the process dies, however it
  dies. A store that starts sweeps the files of its own node (a restarted store
  of the same node inherits its predecessor's leftovers), then, periodically,
  those of every node whose lock file it can lock. Only files owned by our user
  are touched, and a node without a lock file (an older store, or somebody
  else's) is never swept: its death cannot be proved.
* **Objects a dead writer never sealed.** Creates carry the writer's pid, its
  start time and its pid namespace (:func:`process_identity`); the store
  watches the pid with a pidfd (see ``server.StoreService``).

The lock protocol is the classic flock + unlink one: whoever unlinks the lock
file holds the lock while doing so, and whoever acquires the lock checks that
the path still names the inode it locked, retrying otherwise.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field

from runtime.object_store.store import FILE_PREFIX, format_bytes

log = logging.getLogger("object_store")

#: rt-<12 hex node>-<hex object id>, optionally .deleted-N (renamed on Delete, unlinked
#: by a thread); .rt-<12 hex node>.lock is the node's liveness lock (hidden, so listings
#: of the objects, and globs of a node's objects, never include it).
_OBJECT_NAME = re.compile(rf"^{re.escape(FILE_PREFIX)}([0-9a-f]{{12}})-[0-9a-f]+(?:\.deleted-\d+)?$")
_LOCK_NAME = re.compile(rf"^\.{re.escape(FILE_PREFIX)}([0-9a-f]{{12}})\.lock$")
NODE_PREFIX_LEN = 12


def lock_file_name(node_id_hex: str) -> str:
    return f".{FILE_PREFIX}{node_id_hex[:NODE_PREFIX_LEN]}.lock"


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: with the pid, names one process for the boot's lifetime.

    0 when the process is not visible (gone, or in another pid namespace).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return 0
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


def pid_alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not: it only waits for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_namespace(pid: int | str = "self") -> int:
    """Inode of the pid namespace a process lives in (0 when unknown)."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return 0


_identity: tuple[int, int, int] | None = None


def process_identity() -> tuple[int, int, int]:
    """(pid, start time, pid namespace) of this process, computed once per process."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:  # recomputed in a forked child
        _identity = (pid, process_start_time(pid), pid_namespace())
    return _identity


@dataclass
class SweepResult:
    files: int = 0
    bytes: int = 0
    nodes: list[str] = field(default_factory=list)


def _owned_regular_file(path: str) -> os.stat_result | None:
    """Its lstat when path is a regular file of ours (never follows a symlink)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        return None
    return st


def _remove_files(directory: str, names: list[str], result: SweepResult) -> None:
    for name in names:
        path = os.path.join(directory, name)
        st = _owned_regular_file(path)
        if st is None:
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        result.files += 1
        result.bytes += st.st_size


def _node_files(directory: str) -> dict[str, list[str]]:
    """Object files (not lock files) per 12-hex node prefix."""
    out: dict[str, list[str]] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return out
    for name in names:
        m = _OBJECT_NAME.match(name)
        if m is not None:
            out.setdefault(m.group(1), []).append(name)
    return out


def sweep_own_files(directories: list[str], node_id_hex: str) -> SweepResult:
    """Remove this node's object files; call it holding the node's lock, before any Create.

    With the lock held, any file of this node is a dead predecessor's.
    """
    node = node_id_hex[:NODE_PREFIX_LEN]
    result = SweepResult()
    for directory in directories:
        _remove_files(directory, _node_files(directory).get(node, []), result)
    if result.files:
        result.nodes.append(node)
    return result


def sweep_dead_stores(shm_dir: str, own_node_hex: str = "") -> SweepResult:
    """Remove the files of every other node in shm_dir whose store is provably dead."""
    own = own_node_hex[:NODE_PREFIX_LEN]
    result = SweepResult()
    nodes = set(_node_files(shm_dir))
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return result
    # Lock files without object files are leftovers too.
    nodes.update(m.group(1) for m in map(_LOCK_NAME.match, names) if m is not None)
    for node in sorted(nodes - {own}):
        sweep_dead_store(shm_dir, node, result)
    return result


def sweep_dead_store(shm_dir: str, node_id_hex: str,
                     result: SweepResult | None = None) -> SweepResult:
    """Remove one node's files from shm_dir if its store is provably dead, else nothing.

    For whoever outlives a store (its node's supervisor, say) as much as for
    other stores.
    """
    result = result if result is not None else SweepResult()
    node = node_id_hex[:NODE_PREFIX_LEN]
    lock_path = os.path.join(shm_dir, lock_file_name(node))
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return result  # no lock file (not provably dead) or not ours
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return result
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return result  # its store is alive
            raise
        if not _names_inode(lock_path, st):
            return result  # swept and made again meanwhile: its new store is starting
        before = result.files
        # Listed under the lock: a store makes files only while it holds it.
        _remove_files(shm_dir, _node_files(shm_dir).get(node, []), result)
        os.unlink(lock_path)  # last, and while holding the lock
        if result.files > before:
            result.nodes.append(node)
    finally:
        os.close(fd)
    return result


def _names_inode(path: str, st: os.stat_result) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


class NodeLockError(RuntimeError):
    """Another live store holds this node's lock."""


class NodeLock:
    """The exclusive flock a live store holds on ``<shm_dir>/rt-<node>.lock``."""

    def __init__(self, shm_dir: str, node_id_hex: str) -> None:
        self.path = os.path.join(shm_dir, lock_file_name(node_id_hex))
        self._fd = -1

    def acquire(self, timeout_s: float = 10.0) -> None:
        """Take the lock, waiting out a sweeper that holds it for a moment.

        Raises NodeLockError when another live store of this node holds it.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                st = os.fstat(fd)
                if st.st_uid != os.geteuid():
                    raise NodeLockError(f"lock file {self.path} belongs to uid {st.st_uid}, not "
                                        f"to us (uid {os.geteuid()}); remove it or pick another "
                                        "--shm-dir")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = self._holder(fd)
                        raise NodeLockError(
                            f"another object store of this node is running{holder} and holds "
                            f"{self.path}; two stores must not share a node id") from None
                    os.close(fd)
                    fd = -1
                    time.sleep(0.05)
                    continue
                if not _names_inode(self.path, st):
                    os.close(fd)  # a sweeper unlinked it before we locked: lock a new one
                    fd = -1
                    continue
                os.ftruncate(fd, 0)
                pid = os.getpid()
                os.pwrite(fd, f"{pid} {process_start_time(pid)}\n".encode(), 0)
                self._fd, fd = fd, -1
                return
            finally:
                if fd >= 0:
                    os.close(fd)

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            pid = int(os.pread(fd, 64, 0).split()[0])
        except (OSError, ValueError, IndexError):
            return ""
        return f" (pid {pid})"

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        """Unlink the lock file, then drop the lock; call after the node's files are gone."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)


def log_sweep(result: SweepResult, what: str) -> None:
    if result.files:
        log.info("removed %d files (%s) %s: node%s %s", result.files,
                 format_bytes(result.bytes), what, "s" if len(result.nodes) > 1 else "",
                 ", ".join(result.nodes))
