"""Parts that fail, seen from the driver: the raylet SIGKILLed under a private cluster
and under a node agent, a dead GCS, and many init()/shutdown() cycles in one process.

Every failure must surface as an error from runtime.exceptions that names the
component (address, and pid where the driver knows it), within seconds, never as
a hang or a raw gRPC error. Processes are real; each test kills what it started by
PID (the ``fresh_runtime`` fixture and agent_helpers.Farm check that nothing is left).
"""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

import runtime as ray
from runtime import config
from runtime.exceptions import (ClusterConnectionError, NodeDiedError, ObjectLostError,
                                RayletDiedError)

from agent_helpers import Farm, wait_for
from conftest import assert_all_gone
from helpers.env import scrubbed_env

DRIVER_SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "driver.py")


def _children(module: str) -> list:
    """Processes under this test process that run `python -m module`."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if module in p.cmdline():
                out.append(p)
        except psutil.Error:
            pass
    return out


def _child(module: str) -> psutil.Process:
    """The one process under this test process that runs `python -m module`."""
    found = _children(module)
    assert len(found) == 1, [p.cmdline() for p in found]
    return found[0]


def _sigkill(proc: psutil.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    wait_for(lambda: not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, 10,
             message=f"pid {proc.pid} to die")


# -- the raylet of a private cluster ---------------------------------------------------------------
def test_private_raylet_sigkill_fails_pending_and_new_work_fast(fresh_runtime, tmp_path):
    ctx = ray.init(num_cpus=2, _temp_dir=str(tmp_path))
    raylet_address = ctx["raylet_address"]

    @ray.remote
    def slow(started):
        open(started, "w").close()
        time.sleep(60)

    @ray.remote
    def quick(x):
        return x

    @ray.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def incr(self):
            self.n += 1
            return self.n

    assert ray.get(quick.remote(1), timeout=60) == 1
    counter = Counter.remote()
    assert ray.get(counter.incr.remote(), timeout=60) == 1
    gates = [str(tmp_path / f"started-{i}") for i in range(3)]
    # The first has no retries: its worker dies with the raylet, and the raylet's death
    # (the cause, known by then) is what it fails with, not WorkerCrashedError.
    running = [slow.options(max_retries=0).remote(gates[0])]
    wait_for(lambda: os.path.exists(gates[0]), 30, message="the task without retries running")
    running += [slow.remote(g) for g in gates[1:]]  # one more runs, one waits for a CPU
    wait_for(lambda: sum(os.path.exists(g) for g in gates) == 2, 30,
             message="two slow tasks running")
    from runtime.util import placement_group

    unplaceable = placement_group([{"CPU": 64}]).ready()  # stays pending: 2 CPUs only
    raylet = _child("runtime.raylet")
    pid = raylet.pid

    blocked: dict = {}

    def blocked_get() -> None:  # a get() already waiting when the raylet dies
        t0 = time.monotonic()
        try:
            ray.get(running[0], timeout=60)
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever came
            blocked["error"] = exc
        blocked["after"] = time.monotonic() - t0

    waiter = threading.Thread(target=blocked_get)
    waiter.start()
    time.sleep(0.2)  # let the waiter block (not a synchronisation: either order must work)
    killed_at = time.monotonic()
    _sigkill(raylet)

    waiter.join(30)
    assert not waiter.is_alive(), "a get() pending when the raylet died is still blocked"
    err = blocked.get("error")
    assert isinstance(err, RayletDiedError), repr(err)
    assert isinstance(err, ClusterConnectionError) and isinstance(err, NodeDiedError)
    assert f"raylet at {raylet_address}" in str(err) and f"pid {pid}" in str(err), str(err)
    assert "SIGKILL" in str(err), str(err)
    assert err.address == raylet_address and err.pid == pid
    assert time.monotonic() - killed_at < 10

    for ref in running[1:] + [unplaceable]:
        with pytest.raises(RayletDiedError):
            ray.get(ref, timeout=30)
    # New work fails fast too, with the same error; it never hangs.
    t0 = time.monotonic()
    with pytest.raises(RayletDiedError, match=f"raylet at {raylet_address}"):
        ray.get(quick.remote(2), timeout=30)
    with pytest.raises(RayletDiedError):
        ray.get(counter.incr.remote(), timeout=30)
    with pytest.raises(RayletDiedError):
        Counter.remote()
    assert time.monotonic() - t0 < 10
    # What the driver already holds is still readable (it lives in the driver and the store).
    assert ray.get(ray.put(b"x" * 300_000), timeout=30) == b"x" * 300_000
    t0 = time.monotonic()
    ray.shutdown()  # fresh_runtime then checks that every process is gone
    assert time.monotonic() - t0 < 15


def test_a_registration_that_times_out_leaves_no_task_behind(fresh_runtime, tmp_path):
    """A raylet that takes the connection and never answers the registration (stopped):
    connect() gives up after its timeout, and nothing of the attempt (the stream's
    writer, above all) is left pending, to be garbage-collected mid-await later."""
    import asyncio

    from runtime import rpc
    from runtime.core_worker.raylet_client import RayletClient
    from runtime.protocol import raylet_pb2

    ctx = ray.init(num_cpus=1, _temp_dir=str(tmp_path))
    token = Path(ctx["session_dir"], "token").read_text()
    raylet = _child("runtime.raylet")

    async def attempt() -> tuple:
        client = RayletClient(rpc.aio_channel(ctx["raylet_address"], token),
                              lambda grant: None, lambda reason: None)
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await client.connect(raylet_pb2.RegisterClient(is_driver=True, pid=os.getpid()),
                                 timeout=1.0)
        took = time.monotonic() - t0
        deadline = time.monotonic() + 10
        while True:
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if not left or time.monotonic() > deadline:
                return took, left
            await asyncio.sleep(0.02)

    raylet.suspend()
    try:
        took, left = asyncio.run(attempt())
    finally:
        raylet.resume()
    assert took < 5, took
    assert not left, f"still pending after a failed registration: {left}"
    # The driver's own stream to the raylet lived through the pause.
    assert ray.get(ray.put(1), timeout=30) == 1

    @ray.remote
    def one():
        return 1

    assert ray.get(one.remote(), timeout=60) == 1


# -- the raylet of a node run by node-agent -----------------------------------------------------------
@pytest.fixture
def farm(tmp_path):
    f = Farm(tmp_path)
    try:
        yield f
    finally:
        if ray.is_initialized():
            ray.shutdown()
        f.cleanup()


def test_attached_driver_reconnects_when_the_agent_restarts_the_raylet(farm, monkeypatch):
    head = farm.agent("head", "127.0.0.1")
    head.start_daemon()
    started = head.ctl_json("start", "--head", "--node-ip", "127.0.0.1")
    monkeypatch.setenv("NODE_AGENT_TOKEN", started["token"])
    for var in ("RUNTIME_ADDRESS", "NODE_AGENT_SOCKET", "NODE_AGENT_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    # The default window (7 s) covers the agent's restart (backoff, then the raylet's
    # start); a machine loaded by parallel test runs can take longer to start a process.
    monkeypatch.setattr(config, "RECONNECT_TIMEOUT_S", 30.0)
    ray.init(address=started["gcs_address"])

    @ray.remote(max_retries=3)
    def slow(x):
        time.sleep(3)
        return x

    @ray.remote
    def pid_of(x):
        return x, os.getpid()

    _, first_worker = ray.get(pid_of.remote(0), timeout=60)
    pending = slow.remote(7)
    old = head.process("raylet")
    old_node = ray.get_runtime_context().get_node_id()
    os.kill(old.pid, signal.SIGKILL)
    # Submitted while the raylet is down: it waits for the reconnection, it is not lost.
    during = pid_of.remote(1)
    head.wait_restarted("raylet", old.pid)

    # The pending task (its worker died with the raylet) is retried on the new raylet,
    # and new tasks run there: the driver reconnected its raylet stream.
    assert ray.get(pending, timeout=60) == 7
    assert ray.get(during, timeout=60)[0] == 1
    value, worker = ray.get(pid_of.remote(2), timeout=60)
    assert value == 2 and worker != first_worker
    new_node = head.status().node_id
    assert new_node != old_node
    wait_for(lambda: ray.get_runtime_context().get_node_id() == new_node, 10,
             message="the driver to learn its node's new id")
    big = ray.get(ray.put(b"y" * 300_000), timeout=60)
    assert big == b"y" * 300_000


# -- the raylet of another driver's cluster (attached, nobody restarts it) ------------------------------
def test_attached_driver_fails_fast_when_the_raylet_does_not_come_back(tmp_path):
    """The raylet of a cluster this driver attached to dies for good: what waits for it
    fails with an error naming it, about RECONNECT_TIMEOUT_S (7 s) after the death."""
    if ray.is_initialized():
        ray.shutdown()
    root = str(tmp_path / "root")
    os.makedirs(root, mode=0o700)
    out = str(tmp_path / "owner.json")
    with open(tmp_path / "owner.log", "w") as log:
        owner = subprocess.Popen([sys.executable, DRIVER_SCRIPT, out, "sleep"], cwd=str(tmp_path),
                                 env=scrubbed_env(RUNTIME_SESSION_ROOT=root), stdout=log,
                                 stderr=subprocess.STDOUT)
    pids: list = []
    try:
        wait_for(lambda: os.path.exists(out) or owner.poll() is not None, 60,
                 message="the owning driver's report")
        with open(out) as fh:
            report = json.load(fh)
        pids = report["pids"]
        raylet_pid = next(pid for pid, cmd in zip(report["pids"], report["cmdlines"])
                          if "runtime.raylet" in cmd)
        ctx = ray.init(address="auto", _temp_dir=root)

        @ray.remote
        def slow():
            time.sleep(60)

        @ray.remote
        def quick():
            return 1

        assert ray.get(quick.remote(), timeout=60) == 1
        pending = slow.remote()
        time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(raylet_pid, signal.SIGKILL)
        with pytest.raises(RayletDiedError) as info:
            ray.get(pending, timeout=60)
        assert time.monotonic() - killed_at < 10
        msg = str(info.value)
        assert f"raylet at {ctx['raylet_address']}" in msg and "did not come back" in msg, msg
        assert info.value.address == ctx["raylet_address"]
        # The raylet's pid came with its registration ack: an attached driver knows it too.
        assert f"pid {raylet_pid}" in msg and info.value.pid == raylet_pid, msg
        t0 = time.monotonic()
        with pytest.raises(RayletDiedError):
            ray.get(quick.remote(), timeout=30)
        assert time.monotonic() - t0 < 2  # known by now: no second wait
        ray.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        owner.kill()
        owner.wait(10)
        assert_all_gone(pids)


# -- the GCS -----------------------------------------------------------------------------------------
def test_dead_gcs_errors_name_it(fresh_runtime, tmp_path):
    ctx = ray.init(num_cpus=1, _temp_dir=str(tmp_path))
    gcs_address = ctx["gcs_address"]

    @ray.remote
    class A:
        def f(self):
            return 1

    a = A.remote()
    assert ray.get(a.f.remote(), timeout=60) == 1
    _sigkill(_child("runtime.gcs"))

    from runtime.util import placement_group, placement_group_table

    calls = {
        "nodes": ray.nodes,
        "cluster_resources": ray.cluster_resources,
        "available_resources": ray.available_resources,
        "get_actor": lambda: ray.get_actor("nobody"),
        "kill": lambda: ray.kill(a),
        "create actor": lambda: A.remote(),
        "placement_group": lambda: placement_group([{"CPU": 1}]),
        "placement_group_table": placement_group_table,
    }
    for what, call in calls.items():
        t0 = time.monotonic()
        with pytest.raises(ClusterConnectionError) as info:
            call()
        assert not isinstance(info.value, grpc.RpcError), what
        assert f"GCS at {gcs_address}" in str(info.value), (what, str(info.value))
        assert time.monotonic() - t0 < 15, what
    ray.shutdown()


# -- another node's object store dying in the middle of a pull -----------------------------------------
def _unsealed_counter(address: str, token: str):
    """(count, close): count() is how many objects the store at `address` holds unsealed."""
    from runtime import rpc
    from runtime.protocol import common_pb2, object_store_pb2_grpc

    channel = rpc.sync_channel(address, token)
    stub = object_store_pb2_grpc.ObjectStoreStub(channel)
    return (lambda: stub.Stats(common_pb2.Empty(), timeout=10).num_unsealed), channel.close


def test_a_failed_pull_leaves_no_partial_object_in_the_local_store(fresh_runtime, tmp_path):
    """The store holding an object dies while the driver copies it into its own node's
    store: get() fails naming that node, and the half-written local copy is deleted at
    once, not left unsealed until the driver exits."""
    from runtime.node import Node, NodeConfig
    from runtime.session import new_session_dir

    root = str(tmp_path / "root")
    os.makedirs(root, mode=0o700)
    ctx = ray.init(num_cpus=1, object_store_memory=600 * 2**20, _temp_dir=root)
    token = Path(ctx.address_info["session_dir"], "token").read_text()
    unsealed, close_channel = _unsealed_counter(ctx.address_info["object_store_address"], token)
    second = Node(NodeConfig(head=False, node_ip="127.0.0.2", gcs_address=ctx.address_info["gcs_address"],
                             num_cpus=1, resources={"second": 1}, session_dir=new_session_dir(root),
                             token=token, object_store_memory=600 * 2**20))
    try:
        second.start()

        # Runs only there, and is not rebuilt elsewhere when its copy is lost.
        @ray.remote(resources={"second": 1}, max_retries=0)
        def big():
            return b"b" * (400 * 2**20)

        ref = big.remote()
        ray.wait([ref], timeout=120)  # ready on the second node, not fetched yet
        assert unsealed() == 0
        outcome: dict = {}

        def fetch() -> None:
            try:
                outcome["value"] = len(ray.get(ref, timeout=120))
            except BaseException as exc:  # noqa: BLE001 - the test inspects whatever came
                outcome["error"] = exc

        reader = threading.Thread(target=fetch)
        reader.start()
        wait_for(lambda: unsealed() == 1, 60, interval=0.001,
                 message="the pull to create the local copy")
        os.kill(second.pids["object_store"], signal.SIGKILL)
        reader.join(60)
        assert not reader.is_alive(), "get() of an object whose store died is still blocked"
        err = outcome.get("error")
        assert isinstance(err, ObjectLostError), repr(outcome)
        assert second.node_id.hex()[:8] in str(err), str(err)
        wait_for(lambda: unsealed() == 0, 10, message="the partial local copy to be deleted")
    finally:
        close_channel()
        second.stop()


# -- init()/shutdown() cycles ------------------------------------------------------------------------
def test_init_shutdown_cycles_leak_no_fds_threads_or_memory(fresh_runtime, tmp_path):
    @ray.remote
    def echo(x):
        return x

    me = psutil.Process()

    def sample() -> tuple:
        gc.collect()
        return me.num_fds(), threading.active_count(), me.memory_info().rss

    samples = {}
    for cycle in range(1, 21):
        ray.init(num_cpus=1, _temp_dir=str(tmp_path))
        assert ray.get([echo.remote(i) for i in range(5)], timeout=60) == list(range(5))
        assert len(ray.get(ray.put(b"z" * 300_000), timeout=60)) == 300_000
        ray.shutdown()
        if cycle in (3, 20):
            samples[cycle] = sample()
    (fds3, threads3, rss3), (fds20, threads20, rss20) = samples[3], samples[20]
    # gRPC closes a few descriptors of its own a moment after a channel goes: poll.
    wait_for(lambda: me.num_fds() <= fds3 + 2, 10,
             message=f"open fds ({fds20} after cycle 20) to come back to those after cycle 3 "
                     f"({fds3})")
    assert threads20 <= threads3, f"threads grew from {threads3} to {threads20}"
    assert rss20 - rss3 < 12 * 2**20, f"RSS grew by {(rss20 - rss3) / 2**20:.1f} MiB"
