"""The raylet's memory monitor (runtime/raylet/memory_monitor.py) and Ray 2.60's
OutOfMemoryError semantics.

The policy, the messages, the settings and the cgroup reader are tested without
processes. The end-to-end tests start a private cluster whose raylet gets Ray's own
variables (RAY_memory_usage_threshold just above the memory used now,
RAY_memory_monitor_refresh_ms=100), then let a task or an actor allocate past it: a
task without retries fails with OutOfMemoryError, a retriable one runs again and
succeeds, an actor without restarts dies with the monitor's text.
"""
from __future__ import annotations

import logging
import os
import time

import pytest

import runtime as ray
from runtime import config
from runtime.exceptions import OutOfMemoryError, RayActorError
from runtime.raylet.memory_monitor import (GIB, Candidate, Kill, MemoryMonitor, MemorySnapshot,
                                           NodeMemoryReader, NothingToKill, describe,
                                           find_cgroup, kill_message, pick_victim)

from conftest import assert_all_gone, cluster_pids, wait_for

NODE_IP, NODE_ID = "127.0.0.1", "ab" * 28
HOST_TOTAL = 64 * GIB


def cand(lease_id: int, retriable: bool = False, pid: int = 0, actor: bool = False) -> Candidate:
    return Candidate(bytes([lease_id]) * 28, pid or 1000 + lease_id, lease_id, retriable,
                     "actor A" if actor else f"f{lease_id}", actor)


def snap(fraction: float, total: int = 10 * GIB) -> MemorySnapshot:
    return MemorySnapshot(int(total * fraction), total)


# -- the active worker policy -------------------------------------------------------------------
def test_the_victim_is_retriable_work_first_then_the_newest_grant():
    assert pick_victim([]) is None
    assert pick_victim([cand(1), cand(3), cand(2)]).lease_id == 3
    assert pick_victim([cand(1, True), cand(3), cand(2, True)]).lease_id == 2
    assert pick_victim([cand(5, actor=True), cand(4, True, actor=True)]).lease_id == 4


def test_the_monitor_kills_one_worker_at_a_time_and_only_above_the_threshold():
    m = MemoryMonitor(0.9, NODE_IP, NODE_ID)
    asked = []

    def leased():
        asked.append(1)
        return [cand(1, True), cand(2)]

    assert m.check(snap(0.90), leased) is None and not asked  # at the threshold: calm
    kill = m.check(snap(0.95), leased)
    assert isinstance(kill, Kill) and kill.victim.lease_id == 1 and m.kills == 1
    # Until that worker is gone, no other is chosen, however high memory stays.
    assert m.check(snap(0.99), leased) is None and len(asked) == 1
    assert not m.worker_gone(4242)  # some other process
    assert m.worker_gone(kill.victim.pid) and m.killing is None
    assert m.check(snap(0.99), lambda: [cand(2)]).victim.lease_id == 2


def test_over_the_threshold_with_nothing_leased_is_said_once_per_episode():
    m = MemoryMonitor(0.5, NODE_IP, NODE_ID)
    said = m.check(snap(0.7), list)
    assert isinstance(said, NothingToKill) and "no leased worker" in said.message
    assert "7.00 GiB of 10.00 GiB" in said.message
    assert m.check(snap(0.7), list) is None
    assert m.check(snap(0.2), list) is None  # calm again: the next episode is said again
    assert isinstance(m.check(snap(0.7), list), NothingToKill)


def test_the_kill_message_is_rays_with_the_nodes_figures():
    victim = cand(3, pid=4321)
    text = kill_message(victim, MemorySnapshot(int(9.7 * GIB), 10 * GIB), 0.95, NODE_IP,
                        NODE_ID, newest=True, rss=int(1.25 * GIB))
    assert text.startswith("Task was killed due to the node running low on memory.\n")
    assert (f"Memory on the node (IP: {NODE_IP}, ID: {NODE_ID}) where the task (name=f3, "
            f"pid=4321, memory used=1.25GB) was running was 9.70GB / 10.00GB (0.97), which "
            f"exceeds the memory usage threshold of 0.95. Ray killed this worker (ID: "
            f"{victim.worker_id.hex()}) because it was the most recently scheduled task;") in text
    assert "`RAY_memory_usage_threshold`" in text and "`RAY_memory_monitor_refresh_ms`" in text
    older = kill_message(cand(1, True, actor=True), snap(0.97), 0.95, NODE_IP, NODE_ID,
                         newest=False)
    assert "where the actor (name=A, pid=1001)" in older
    assert "most recently scheduled task that can be retried" in older


def test_the_start_line_says_what_the_monitor_uses():
    line = describe(0.95, 250, MemorySnapshot(2 * GIB, int(23.4 * GIB)))
    assert line.startswith("memory monitor: threshold 0.95 of 23.4 GiB (host memory")
    assert line.endswith("every 250 ms")
    assert "disabled" in describe(0.95, 0, None)


# -- settings -----------------------------------------------------------------------------------
def test_rays_variables_are_honoured_and_ours_win():
    def threshold(env):
        return config.ray_env("MEMORY_USAGE_THRESHOLD", "RAY_memory_usage_threshold", 0.95,
                              float, "a number from 0 to 1", lambda v: 0 <= v <= 1, environ=env)

    assert threshold({}) == 0.95
    assert threshold({"RAY_memory_usage_threshold": "0.4"}) == 0.4
    assert threshold({"RAY_memory_usage_threshold": "0.4",
                      "RUNTIME_MEMORY_USAGE_THRESHOLD": "0.6"}) == 0.6
    for bad in ("1.5", "lots"):
        with pytest.raises(ValueError) as err:
            threshold({"RAY_memory_usage_threshold": bad})
        assert f"RAY_memory_usage_threshold={bad!r}" in str(err.value)
        assert "a number from 0 to 1" in str(err.value)
    assert (config.MEMORY_USAGE_THRESHOLD, config.MEMORY_MONITOR_REFRESH_MS,
            config.TASK_OOM_RETRIES) == (0.95, 250, -1)  # Ray 2.60's defaults


# -- reading the node's memory ------------------------------------------------------------------
def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_limited_cgroup_v2_is_read_as_current_minus_inactive_file(tmp_path):
    group = tmp_path / "job" / "slice"
    _write(group / "memory.max", f"{4 * GIB}\n")
    _write(group / "memory.current", f"{3 * GIB}\n")
    _write(group / "memory.stat", f"anon 123\ninactive_file {GIB}\nactive_file 5\n")
    reader = NodeMemoryReader(root=str(tmp_path), proc_cgroup="0::/job/slice\n")
    assert reader.source == "cgroup v2 limit"
    assert reader.read() == MemorySnapshot(2 * GIB, 4 * GIB, "cgroup v2 limit")


def test_an_unlimited_cgroup_means_host_memory(tmp_path):
    _write(tmp_path / "memory.max", "max\n")
    assert find_cgroup("0::/\n", HOST_TOTAL, str(tmp_path)) is None
    _write(tmp_path / "memory.max", f"{2 * HOST_TOTAL}\n")  # above the host: no limit
    assert find_cgroup("0::/\n", HOST_TOTAL, str(tmp_path)) is None
    reader = NodeMemoryReader(root=str(tmp_path), proc_cgroup="0::/\n")
    s = reader.read()
    assert s.source == "host memory" and 0 < s.used < s.total


def test_a_limited_cgroup_v1_is_read_too(tmp_path):
    group = tmp_path / "memory" / "docker" / "c1"
    _write(group / "memory.limit_in_bytes", f"{8 * GIB}\n")
    _write(group / "memory.usage_in_bytes", f"{5 * GIB}\n")
    _write(group / "memory.stat", f"inactive_file 7\ntotal_inactive_file {GIB}\n")
    found = find_cgroup("12:memory:/docker/c1\n0::/\n", HOST_TOTAL, str(tmp_path))
    assert found is not None and found.version == 1 and found.limit == 8 * GIB
    reader = NodeMemoryReader(root=str(tmp_path), proc_cgroup="4:memory:/docker/c1\n")
    assert reader.read() == MemorySnapshot(4 * GIB, 8 * GIB, "cgroup v1 limit")


# -- end to end: a private cluster whose raylet kills for memory --------------------------------
@pytest.fixture(scope="module")
def oom_cluster():
    """A 2-CPU private cluster whose raylet's threshold is the memory used now plus a
    margin (min(1 GiB, 30% of what is available)), checked every 100 ms."""
    now = NodeMemoryReader().read()
    available = now.total - now.used
    if available < 1.5 * GIB:
        pytest.skip(f"needs 1.5 GiB of available memory, this machine has "
                    f"{available / GIB:.2f} GiB")
    margin = min(GIB, int(0.3 * available))
    threshold = round((now.used + margin) / now.total, 4)
    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:  # the raylet reads Ray's own names
        mp.setenv("RAY_memory_usage_threshold", str(threshold))
        mp.setenv("RAY_memory_monitor_refresh_ms", "100")
        ctx = ray.init(num_cpus=2, object_store_memory=128 * 1024 * 1024)
    yield ctx, threshold, margin
    pids = cluster_pids()
    ray.shutdown()
    assert_all_gone(pids)


def _grow(threshold: float, extra: int) -> bytes:
    """Allocate (and touch) what takes the node from where it is now past `threshold`
    by `extra` bytes: what the cluster itself uses since the threshold was set, and what
    other programs use meanwhile, is counted."""
    from runtime.raylet.memory_monitor import NodeMemoryReader as Reader

    now = Reader().read()
    need = max(0, int(threshold * now.total) - now.used) + extra
    return b"x" * need


@ray.remote(max_retries=0)
def hog(threshold: float, extra: int) -> int:
    data = _grow(threshold, extra)
    time.sleep(60)  # the monitor kills it long before
    return len(data)


@ray.remote(max_retries=1)
def hog_once(threshold: float, extra: int, marker: str) -> str:
    if os.path.exists(marker):
        return "ran again"
    with open(marker, "w") as fh:
        fh.write(str(os.getpid()))
    data = _grow(threshold, extra)
    time.sleep(60)
    return str(len(data))


@ray.remote(max_restarts=0)
class Hog:
    def pid(self) -> int:
        return os.getpid()

    def grow(self, threshold: float, extra: int) -> int:
        data = _grow(threshold, extra)
        time.sleep(60)
        return len(data)


def _raylet_log(ctx) -> str:
    with open(os.path.join(ctx.address_info["session_dir"], "logs", "raylet.log")) as fh:
        return fh.read()


def test_a_task_without_retries_killed_for_memory_raises_out_of_memory_error(oom_cluster):
    ctx, threshold, margin = oom_cluster
    assert f"memory monitor: threshold {threshold:g} of" in _raylet_log(ctx)
    assert "every 100 ms" in _raylet_log(ctx)
    ref = hog.remote(threshold, margin)
    t0 = time.monotonic()
    with pytest.raises(OutOfMemoryError) as err:
        ray.get(ref, timeout=30)
    text = str(err.value)
    assert time.monotonic() - t0 < 30
    assert text.startswith("Task was killed due to the node running low on memory.")
    assert f"ID: {ray.get_runtime_context().get_node_id()}" in text
    assert f"exceeds the memory usage threshold of {threshold:g}" in text
    assert "where the task (name=hog" in text
    log = wait_for(lambda: "memory monitor: node uses" in _raylet_log(ctx) and _raylet_log(ctx),
                   10, message="the kill in the raylet's log")
    assert "killing worker" in log and "(hog" in log


def test_a_retriable_task_killed_for_memory_runs_again_and_succeeds(oom_cluster, tmp_path):
    ctx, threshold, margin = oom_cluster
    logger = logging.getLogger("runtime")
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        marker = str(tmp_path / "first-attempt")
        assert ray.get(hog_once.remote(threshold, margin, marker), timeout=30) == "ran again"
        warned = [r.getMessage() for r in records if "failed due to oom" in r.getMessage()]
        assert len(warned) == 1 and "hog_once" in warned[0]
        assert "infinite oom retries remaining" in warned[0]
    finally:
        logger.removeHandler(handler)


def test_an_actor_without_restarts_killed_for_memory_dies_saying_so(oom_cluster):
    ctx, threshold, margin = oom_cluster
    actor = Hog.remote()
    pid = ray.get(actor.pid.remote(), timeout=30)
    with pytest.raises(RayActorError) as err:
        ray.get(actor.grow.remote(threshold, margin), timeout=30)
    text = str(err.value)
    assert "killed by the memory monitor" in text and f"pid {pid}" in text
    assert "Task was killed due to the node running low on memory." in text
    assert f"exceeds the memory usage threshold of {threshold:g}" in text
    assert "no restarts left (max_restarts=0)" in text
