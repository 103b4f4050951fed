"""The raylet's memory monitor (Ray 2.60's): kill one worker before the node runs out
of memory, so the kernel's OOM killer never picks the raylet, the object store or a
driver, and the work killed is work that can run again.

Every MEMORY_MONITOR_REFRESH_MS (config.py; Ray's ``RAY_memory_monitor_refresh_ms``,
0 turns the monitor off) the raylet reads the node's memory use: psutil's total minus
available, or, when the raylet runs in a cgroup whose memory is limited, the cgroup's
use (current minus inactive page cache, as Ray counts it) against that limit. Above
MEMORY_USAGE_THRESHOLD (Ray's ``RAY_memory_usage_threshold``) it kills one leased worker
chosen by Ray's *active worker policy*: retriable work first (a task with max_retries
!= 0, an actor with max_restarts != 0, as the lease request says), then the newest
grant. It tells the lease's holder why before it sends SIGKILL, and chooses no other
worker until that one is gone: freeing memory takes the kernel a moment, and a second
kill meanwhile would be one too many.

Everything that decides is pure (``pick_victim``, ``MemoryMonitor``, ``kill_message``),
so each rule is a unit test (tests/test_memory_monitor.py); ``NodeMemoryReader`` is the
only part that reads the system. Its cost per refresh is one psutil call (about 25 us)
or, in a limited cgroup, two reads of small cgroup files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

GIB = 1024 ** 3
CGROUP_ROOT = "/sys/fs/cgroup"
#: Ray's page on the memory monitor, named in every kill message.
DOC_URL = "https://docs.ray.io/en/latest/ray-core/scheduling/ray-oom-prevention.html"


@dataclass(frozen=True)
class MemorySnapshot:
    """The node's memory at one moment: bytes used of bytes in all, and where the
    figures come from ("host memory", "cgroup v2 limit", ...)."""
    used: int
    total: int
    source: str = "host memory"

    @property
    def fraction(self) -> float:
        return self.used / self.total if self.total > 0 else 0.0


@dataclass(frozen=True)
class Candidate:
    """A leased worker the monitor may kill. ``lease_id`` grows with each grant, so the
    newest grant has the highest one."""
    worker_id: bytes
    pid: int
    lease_id: int
    retriable: bool
    name: str = ""
    is_actor: bool = False


@dataclass(frozen=True)
class Kill:
    """Tell the holder of the victim's lease `message`, then SIGKILL the victim."""
    victim: Candidate
    message: str
    snapshot: MemorySnapshot


@dataclass(frozen=True)
class NothingToKill:
    """Over the threshold, but no leased worker runs here: say so (once per episode)."""
    message: str


Decision = Union[Kill, NothingToKill, None]


def pick_victim(candidates: Sequence[Candidate]) -> Optional[Candidate]:
    """Ray's active worker policy: retriable work first, then the newest grant."""
    best: Optional[Candidate] = None
    for c in candidates:
        if best is None or (c.retriable, c.lease_id) > (best.retriable, best.lease_id):
            best = c
    return best


def kill_message(victim: Candidate, snapshot: MemorySnapshot, threshold: float, node_ip: str,
                 node_id: str, newest: bool, rss: Optional[int] = None) -> str:
    """Ray's text for a worker the monitor killed (OutOfMemoryError, the actor's death
    cause and the raylet's log all carry it). `newest`: the victim is the newest grant of
    all, not only the newest retriable one."""
    what = "actor" if victim.is_actor else "task"
    used = f", memory used={rss / GIB:.2f}GB" if rss is not None else ""
    name = victim.name.removeprefix("actor ")
    why = ("because it was the most recently scheduled task" if newest else
           "because it was the most recently scheduled task that can be retried "
           "(max_retries or max_restarts is not 0)")
    wid = victim.worker_id.hex()
    return (
        f"Task was killed due to the node running low on memory.\n"
        f"Memory on the node (IP: {node_ip}, ID: {node_id}) where the {what} (name={name}, "
        f"pid={victim.pid}{used}) was running was {snapshot.used / GIB:.2f}GB / "
        f"{snapshot.total / GIB:.2f}GB ({snapshot.fraction:g}), which exceeds the memory "
        f"usage threshold of {threshold:g}. Ray killed this worker (ID: {wid}) {why}; to see "
        f"more information about memory usage on this node, read its raylet.log "
        f"(runtime.util.state.get_log(filename=\"raylet.log\", node_ip=\"{node_ip}\")); the "
        f"worker's own logs are worker-{wid[:8]}.* on that node.\n\n"
        f"Refer to the documentation on how to address the out of memory issue: {DOC_URL}. "
        f"Consider provisioning more memory on this node or reducing task parallelism by "
        f"requesting more CPUs per task. Set max_restarts and max_task_retries to enable "
        f"retry when the task crashes due to OOM. To adjust the kill threshold, set the "
        f"environment variable `RAY_memory_usage_threshold` when starting Ray. To disable "
        f"worker killing, set the environment variable `RAY_memory_monitor_refresh_ms` to "
        f"zero.")


class MemoryMonitor:
    """The monitor's decisions, one refresh at a time (no I/O): ``check`` says whom to
    kill, if anyone; ``worker_gone`` says the last victim is gone, so another may be
    chosen."""

    def __init__(self, threshold: float, node_ip: str, node_id: str,
                 rss_of: Callable[[int], Optional[int]] = lambda pid: None) -> None:
        self.threshold = threshold
        self.node_ip = node_ip
        self.node_id = node_id
        self.rss_of = rss_of          # the victim's resident memory, for the message
        self.killing: Optional[Candidate] = None   # killed, not gone yet
        self.warned = False           # NothingToKill said, until memory drops again
        self.kills = 0

    def over(self, snapshot: MemorySnapshot) -> bool:
        return snapshot.used > snapshot.total * self.threshold

    def check(self, snapshot: MemorySnapshot,
              candidates: Callable[[], List[Candidate]]) -> Decision:
        """What to do about `snapshot`. `candidates` is called only when the node is over
        the threshold and no kill is under way, so a calm refresh costs nothing more."""
        if self.killing is not None:
            return None  # one at a time: wait until it is gone
        if not self.over(snapshot):
            self.warned = False
            return None
        leased = candidates()
        victim = pick_victim(leased)
        if victim is None:
            if self.warned:
                return None
            self.warned = True
            return NothingToKill(
                f"memory monitor: the node uses {snapshot.used / GIB:.2f} GiB of "
                f"{snapshot.total / GIB:.2f} GiB ({snapshot.source}; {snapshot.fraction:.3f}), "
                f"above the threshold of {self.threshold:g}, but no leased worker runs on this "
                f"node to kill: what uses the memory is outside the workers (a driver, the "
                f"object store, another program)")
        newest = victim.lease_id == max(c.lease_id for c in leased)
        self.killing = victim
        self.kills += 1
        message = kill_message(victim, snapshot, self.threshold, self.node_ip, self.node_id,
                               newest, self.rss_of(victim.pid))
        return Kill(victim, message, snapshot)

    def worker_gone(self, pid: int) -> bool:
        """A worker process exited; True when it was the victim under way."""
        if self.killing is not None and self.killing.pid == pid:
            self.killing = None
            return True
        return False


# -- reading the node's memory ---------------------------------------------------------------------
@dataclass(frozen=True)
class CgroupMemory:
    """Where a limited cgroup's memory figures are: used = `current` minus the
    `inactive_key` line of `stat`, of `limit` bytes."""
    version: int
    limit: int
    current: str
    stat: str
    inactive_key: str


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as fh:
            raw = fh.read().strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None  # "max" (v2): no limit


def _stat_value(path: str, key: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def find_cgroup(proc_cgroup: str, host_total: int, root: str = CGROUP_ROOT
                ) -> Optional[CgroupMemory]:
    """The cgroup this process is in, when its memory is limited below the host's
    (`proc_cgroup`: the text of /proc/self/cgroup). Version 2 first (``0::/path``), then
    version 1's memory controller. Its own directory is looked up first, then the root
    of the mount (what a container sees of its own cgroup)."""
    v1_path = None
    v2_path = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "memory" in parts[1].split(","):
            v1_path = parts[2]
    if v2_path is not None:
        for base in (os.path.join(root, v2_path.lstrip("/")), root):
            limit = _read_int(os.path.join(base, "memory.max"))
            if limit is not None and 0 < limit < host_total:
                return CgroupMemory(2, limit, os.path.join(base, "memory.current"),
                                    os.path.join(base, "memory.stat"), "inactive_file")
    if v1_path is not None:
        mount = os.path.join(root, "memory")
        for base in (os.path.join(mount, v1_path.lstrip("/")), mount):
            limit = _read_int(os.path.join(base, "memory.limit_in_bytes"))
            if limit is not None and 0 < limit < host_total:
                return CgroupMemory(1, limit, os.path.join(base, "memory.usage_in_bytes"),
                                    os.path.join(base, "memory.stat"), "total_inactive_file")
    return None


class NodeMemoryReader:
    """Reads the node's memory use: the host's from psutil, or the limited cgroup's the
    raylet runs in (found once, at start: a limit changed later is not seen)."""

    def __init__(self, root: str = CGROUP_ROOT, proc_cgroup: Optional[str] = None) -> None:
        import psutil

        self._psutil = psutil
        host_total = psutil.virtual_memory().total
        if proc_cgroup is None:
            try:
                with open("/proc/self/cgroup") as fh:
                    proc_cgroup = fh.read()
            except OSError:
                proc_cgroup = ""
        self.cgroup = find_cgroup(proc_cgroup, host_total, root)

    @property
    def source(self) -> str:
        if self.cgroup is None:
            return "host memory"
        return f"cgroup v{self.cgroup.version} limit"

    def read(self) -> MemorySnapshot:
        cg = self.cgroup
        if cg is not None:
            current = _read_int(cg.current)
            if current is not None:
                used = max(0, current - _stat_value(cg.stat, cg.inactive_key))
                return MemorySnapshot(used, cg.limit, self.source)
        vm = self._psutil.virtual_memory()
        return MemorySnapshot(vm.total - vm.available, vm.total, "host memory")


def rss_of(pid: int) -> Optional[int]:
    """A process's resident memory in bytes (None when it is gone), for kill messages."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def describe(threshold: float, refresh_ms: int, snapshot: Optional[MemorySnapshot]) -> str:
    """The raylet's start-up line about the monitor."""
    if refresh_ms <= 0:
        return ("memory monitor: disabled (RAY_memory_monitor_refresh_ms / "
                "RUNTIME_MEMORY_MONITOR_REFRESH_MS is 0); no worker is killed for memory")
    assert snapshot is not None
    return (f"memory monitor: threshold {threshold:g} of {snapshot.total / GIB:.1f} GiB "
            f"({snapshot.source}; {snapshot.used / GIB:.1f} GiB used now), every "
            f"{refresh_ms} ms")
