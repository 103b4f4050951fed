"""Ray's execution semantics where several tasks share a worker, and SPREAD across nodes.

One two-node cluster for the module: the head (2 CPUs, 2 GPUs: ids 0 and 1, made up
when the machine has none) and a second node on 127.0.0.2 (2 CPUs), started as
tests/test_multinode.py does.

* Each task sees its own task context (id, name, GPUs) even when calls run at once:
  threaded actors, async actors, several callers of one sync actor.
* A cancel's SIGINT stops only the task it was meant for, never the next one.
* Cancelling a running async actor call cancels its asyncio task.
* scheduling_strategy="SPREAD" spreads tasks and actors over the nodes.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import runtime as ray
from runtime import config
from runtime.exceptions import TaskCancelledError
from runtime.node import Node, NodeConfig
from runtime.session import new_session_dir
from runtime.util.state import list_tasks

from conftest import assert_all_gone, wait_for
from helpers.gates import await_path, meet


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    if ray.is_initialized():
        ray.shutdown()
    root = str(tmp_path_factory.mktemp("sessions"))
    ctx = ray.init(num_cpus=2, num_gpus=2, _temp_dir=root)
    token = open(os.path.join(ctx.address_info["session_dir"], "token")).read()
    second = Node(NodeConfig(head=False, node_ip="127.0.0.2",
                             gcs_address=ctx.address_info["gcs_address"], num_cpus=2, num_gpus=0,
                             session_dir=new_session_dir(root), token=token,
                             object_store_memory=128 * 1024 * 1024))
    pids = []
    try:
        second.start()
        pids = [p.pid for p in psutil.Process().children(recursive=True)]
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 30,
                 message="the second node to register")
        yield ctx, second
    finally:
        pids = pids or [p.pid for p in psutil.Process().children(recursive=True)]
        second.stop()
        ray.shutdown()
        assert_all_gone(pids)


@pytest.fixture
def actors(two_nodes):
    """Actor handles killed at the end of the test (their GPUs go back to the head)."""
    handles = []
    yield handles
    for h in handles:
        try:
            ray.kill(h)
        except Exception:
            pass


def _identity():
    """What a task sees of itself."""
    ctx = ray.get_runtime_context()
    return {"task_id": ctx.get_task_id(), "name": ctx.get_task_name(),
            "gpus": ray.get_gpu_ids(), "accelerators": ctx.get_accelerator_ids()["GPU"],
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _check_identities(expected, seen, method: str) -> None:
    """Each call saw its own task id, its method's name, and the actor's one GPU."""
    assert [s["task_id"] for s in seen] == expected, "a call saw another call's task id"
    assert len(set(expected)) == len(expected)
    assert {s["name"] for s in seen} == {method}
    gpus = {tuple(s["gpus"]) for s in seen}
    assert len(gpus) == 1 and len(next(iter(gpus))) == 1, f"the actor's GPU, every call: {gpus}"
    (gpu,) = next(iter(gpus))
    assert {s["cuda"] for s in seen} == {str(gpu)}
    assert {tuple(s["accelerators"]) for s in seen} == {(str(gpu),)}


# -- 1. per-task context -------------------------------------------------------------------------
@ray.remote(num_gpus=1, max_concurrency=4)
class Threaded:
    def whoami(self, wave_dir: str):
        before = _identity()
        meet(wave_dir, 4)  # the four calls of a wave run at the same time
        time.sleep(0.05)
        after = _identity()
        assert before == after, f"{before} became {after} while other calls ran"
        return after


def test_threaded_actor_calls_each_see_their_own_task(actors, tmp_path):
    a = Threaded.remote()
    actors.append(a)
    waves = [tmp_path / "wave0", tmp_path / "wave1"]
    for w in waves:
        w.mkdir()
    refs = [a.whoami.remote(str(waves[i // 4])) for i in range(8)]
    _check_identities([r.task_id().hex() for r in refs], ray.get(refs, timeout=60),
                      "Threaded.whoami")


@ray.remote(num_gpus=1)
class AsyncActor:
    def __init__(self):
        self.arrived = 0
        self.all_in = None

    async def whoami(self, parties: int):
        if self.all_in is None:
            self.all_in = asyncio.Event()
        before = _identity()
        self.arrived += 1
        if self.arrived == parties:
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), 30)  # every call is in flight at once
        await asyncio.sleep(0.05)
        after = _identity()
        assert before == after, f"{before} became {after} while other calls ran"
        return after


def test_async_actor_calls_each_see_their_own_task(actors):
    a = AsyncActor.remote()
    actors.append(a)
    refs = [a.whoami.remote(8) for _ in range(8)]
    _check_identities([r.task_id().hex() for r in refs], ray.get(refs, timeout=60),
                      "AsyncActor.whoami")


@ray.remote(num_gpus=1)
class Sync:
    def whoami(self):
        return _identity()

    def pid(self):
        return os.getpid()


@ray.remote(num_cpus=0)
def call_sync(actor, n: int):
    refs = [actor.whoami.remote() for _ in range(n)]
    return [r.task_id().hex() for r in refs], ray.get(refs)


def test_sync_actor_callers_each_see_their_own_task(actors):
    """Several callers at once: each connection to the call port has a thread of its own."""
    a = Sync.remote()
    actors.append(a)
    ray.get(a.pid.remote(), timeout=60)
    callers = [call_sync.remote(a, 20) for _ in range(3)]
    mine = [a.whoami.remote() for _ in range(20)]
    expected, seen = [r.task_id().hex() for r in mine], ray.get(mine, timeout=60)
    for their_expected, their_seen in ray.get(callers, timeout=60):
        expected += their_expected
        seen += their_seen
    _check_identities(expected, seen, "Sync.whoami")


@ray.remote(max_concurrency=4)
class Printer:
    def two_pieces(self, i: int, wave_dir: str):
        sys.stdout.write(f"call-{i} first-half ")
        sys.stdout.flush()
        meet(wave_dir, 4)  # every call has written half a line before any finishes its line
        sys.stdout.write(f"second-half-of-{i}\n")
        sys.stdout.flush()
        return os.getpid()


def test_printed_lines_of_concurrent_calls_stay_whole(actors, tmp_path, capfd):
    a = Printer.remote()
    actors.append(a)
    wave = tmp_path / "wave"
    wave.mkdir()
    pid = ray.get([a.two_pieces.remote(i, str(wave)) for i in range(4)], timeout=60)[0]
    out = []

    def all_lines():
        out.append(capfd.readouterr().out)
        return [ln for ln in "".join(out).splitlines() if "second-half-of" in ln]

    lines = wait_for(lambda: len(all_lines()) >= 4 and all_lines(), 30,
                     message="the four printed lines to reach the driver")
    prefix = f"(Printer pid={pid}, ip=127.0.0.1) "
    assert sorted(lines) == sorted(f"{prefix}call-{i} first-half second-half-of-{i}"
                                   for i in range(4))


# -- 2. a cancel's SIGINT stops only its own task ------------------------------------------------
def _io_thread_in_cancel() -> bool:
    """Whether this worker's I/O thread is inside Executor.cancel (a CancelTask is being
    handled)."""
    io = next(t for t in threading.enumerate() if t.name == "runtime-io")
    frame = sys._current_frames().get(io.ident)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "cancel" and code.co_filename.endswith("executor.py"):
            return True
        frame = frame.f_back
    return False


@ray.remote(max_retries=0)
def race_task(mode: str, tmp: str = ""):
    if mode == "work":
        time.sleep(0.5)
    elif mode == "stall":
        # Hold up the worker's I/O thread while it handles the cancel of this task (it
        # logs what it does, and the log handler is ours for now), as a loaded machine
        # may deschedule it; finish while it is held up.
        Path(tmp, "started").touch()
        await_path(os.path.join(tmp, "go"), 60)
        handler = logging.getLogger().handlers[0]
        handler.acquire()
        try:
            Path(tmp, "stalling").touch()
            deadline = time.monotonic() + 60
            while not _io_thread_in_cancel():
                if time.monotonic() > deadline:
                    raise TimeoutError("the cancel never reached this worker")
                time.sleep(0.002)
        finally:
            handler.release()
    return os.getpid()


def _state(ref) -> str:
    rows = list_tasks(filters=[("task_id", "=", ref.task_id().hex())])
    return rows[0]["state"] if rows else ""


@ray.remote(max_retries=0)
def hold_a_cpu(gate: str):
    await_path(gate, 120)
    return True


def test_cancel_never_interrupts_the_task_after_it(two_nodes, tmp_path, monkeypatch):
    """Cancel a task that finishes before the worker delivers the interrupt, while the next
    task waits behind it on the same worker: the late SIGINT must stop nothing there (the
    cancelled task has ended, the next one was never cancelled) and the worker lives on."""
    # The next task is pipelined onto the same worker: the head's other CPU is held, so the
    # raylet queues further leases, and tasks of this function count as short.
    monkeypatch.setattr(config, "PIPELINE_MAX_TASK_SECONDS", 10.0)
    gate = tmp_path / "gate"
    holder = hold_a_cpu.remote(str(gate))
    try:
        ray.get([race_task.remote("quick") for _ in range(3)], timeout=60)
        for attempt in range(2):
            tmp = tmp_path / f"attempt{attempt}"
            tmp.mkdir()
            first = race_task.remote("stall", str(tmp))
            second = race_task.remote("work")
            wait_for((tmp / "started").exists, 60, message="the first task to start")
            wait_for(lambda ref=second: _state(ref) == "SUBMITTED_TO_WORKER", 60,
                     message="the second task to be queued on the worker")
            (tmp / "go").touch()
            wait_for((tmp / "stalling").exists, 60, message="the first task to hold the log")
            ray.cancel(first)
            try:
                first_pid = ray.get(first, timeout=60)  # it may end before the cancel lands
            except TaskCancelledError:
                first_pid = None
            try:
                second_pid = ray.get(second, timeout=60)
            except TaskCancelledError:
                pytest.fail(f"attempt {attempt}: the cancel of the task before it stopped the "
                            f"next task on the worker")
            assert first_pid in (None, second_pid)
            assert psutil.pid_exists(second_pid)
    finally:
        gate.touch()
    assert ray.get(holder, timeout=60)


# -- 3. cancelling actor calls -------------------------------------------------------------------
@ray.remote
class AsyncSleeper:
    def __init__(self):
        self.saw = []

    async def nap(self, started: str):
        Path(started).touch()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.saw.append("CancelledError")
            raise
        return "woke"

    async def seen(self):
        return self.saw


@ray.remote(max_concurrency=2)
class ThreadedSleeper:
    def nap(self, started: str, gate: str):
        Path(started).touch()
        await_path(gate, 60)
        return "finished"


def test_cancel_of_a_running_async_actor_call_cancels_its_asyncio_task(actors, tmp_path):
    a = AsyncSleeper.remote()
    actors.append(a)
    started = tmp_path / "started"
    ref = a.nap.remote(str(started))
    wait_for(started.exists, 60, message="the async call to start")
    with pytest.raises(ValueError, match="force=True is not supported for actor calls"):
        ray.cancel(ref, force=True)
    t0 = time.monotonic()
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=20)
    assert time.monotonic() - t0 < 10
    assert ray.get(a.seen.remote(), timeout=30) == ["CancelledError"]
    # The actor lives on and serves calls.
    again = tmp_path / "again"
    ref2 = a.nap.remote(str(again))
    wait_for(again.exists, 30, message="the second call to start")
    ray.cancel(ref2)
    with pytest.raises(TaskCancelledError):
        ray.get(ref2, timeout=20)

    # A threaded actor's running call is not interrupted (Ray: an actor has state).
    t = ThreadedSleeper.remote()
    actors.append(t)
    started, gate = tmp_path / "t-started", tmp_path / "t-gate"
    running = t.nap.remote(str(started), str(gate))
    wait_for(started.exists, 60, message="the threaded call to start")
    ray.cancel(running)
    ready, _ = ray.wait([running], timeout=1.0)
    assert not ready
    gate.touch()
    assert ray.get(running, timeout=30) == "finished"


# -- 4. SPREAD ---------------------------------------------------------------------------------
@ray.remote
def nap_where(seconds: float):
    time.sleep(seconds)
    return ray.get_runtime_context().get_node_id()


@ray.remote
class Where:
    def node(self):
        return ray.get_runtime_context().get_node_id()


def test_spread_tasks_run_on_both_nodes(two_nodes):
    ctx, second = two_nodes
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= 4, 30,
             message="all four CPUs to be free")
    refs = [nap_where.options(scheduling_strategy="SPREAD").remote(0.5) for _ in range(8)]
    nodes = ray.get(refs, timeout=120)
    assert set(nodes) == {ctx.address_info["node_id"], second.node_id.hex()}
    # DEFAULT keeps work on the driver's node while it can run it.
    assert set(ray.get([nap_where.remote(0.0) for _ in range(4)], timeout=60)) == {
        ctx.address_info["node_id"]}


def test_spread_actors_are_placed_on_both_nodes(two_nodes, actors):
    ctx, second = two_nodes
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= 4, 30,
             message="all four CPUs to be free")
    handles = [Where.options(scheduling_strategy="SPREAD").remote() for _ in range(4)]
    actors.extend(handles)
    nodes = ray.get([h.node.remote() for h in handles], timeout=120)
    assert set(nodes) == {ctx.address_info["node_id"], second.node_id.hex()}
    assert nodes.count(second.node_id.hex()) == 2



# -- 5. parents of tasks submitted by concurrent calls ----------------------------------------------
@ray.remote
def child_of():
    return None


@ray.remote(max_concurrency=4, num_cpus=0)
class Spawner:
    def __init__(self):
        self.all_in = threading.Barrier(4)

    def spawn(self, n: int):
        """Submit n child tasks the moment every call is in (their submissions overlap)."""
        self.all_in.wait(30)
        children = [child_of.remote() for _ in range(n)]
        ray.get(children)
        return [c.task_id().hex() for c in children]


def test_children_of_concurrent_calls_name_their_own_parent(actors):
    """Four calls of a threaded actor submit children at the same time: each child's
    parent_task_id is the call that submitted it, not whichever call woke the worker's
    I/O thread first."""
    a = Spawner.remote()
    actors.append(a)
    calls = [a.spawn.remote(50) for _ in range(4)]
    parent_of = {}
    for call, children in zip(calls, ray.get(calls, timeout=120)):
        for child in children:
            parent_of[child] = call.task_id().hex()

    def recorded():
        rows = {r["task_id"]: r for r in list_tasks(filters=[("name", "=", "child_of")],
                                                    limit=0)}
        return rows if all(c in rows for c in parent_of) else None

    rows = wait_for(recorded, 60, message="every child task in the state API")
    wrong = {c: (rows[c]["parent_task_id"], p) for c, p in parent_of.items()
             if rows[c]["parent_task_id"] != p}
    assert not wrong, f"{len(wrong)} of {len(parent_of)} children name another parent: " \
                      f"{list(wrong.items())[:3]}"
