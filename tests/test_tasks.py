"""Tasks: @remote, .remote(), options, arguments, scheduling, resources, context, GPUs.

Ray's documented behaviour is the spec. Most tests share the module-scoped
2-CPU ``cluster``; the tests that need their own configuration use
``fresh_runtime`` and are placed at the END of this file: fresh_runtime shuts
down whatever runtime is up (including the shared cluster), so no ``cluster``
test may run after them.
"""
from __future__ import annotations

import logging
import os
import stat
import sys
import time
from pathlib import Path

import pytest

import runtime as ray
from runtime.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from conftest import wait_for
from helpers.task_module import wait_for_path


# -- module-level definitions (pickled by reference: workers import this module) ---------------
@ray.remote
def add(a, b):
    return a + b


@ray.remote(num_cpus=1, max_retries=1)
def mul(a, b):
    return a * b


@ray.remote
def noop():
    return None


@ray.remote
def identity(x):
    return x


@ray.remote
def arg_info(*args, **kwargs):
    """What the task saw: type names of its positional and keyword arguments."""
    return ([type(a).__name__ for a in args], {k: type(v).__name__ for k, v in kwargs.items()})


@ray.remote
def get_nested(container):
    """Receives a list/dict holding ObjectRefs; checks they are refs and gets them."""
    items = container.values() if isinstance(container, dict) else container
    assert all(isinstance(r, ray.ObjectRef) for r in items), [type(r) for r in items]
    if isinstance(container, dict):
        return {k: ray.get(v) for k, v in container.items()}
    return [ray.get(r) for r in container]


@ray.remote
def interval(seconds):
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


@ray.remote
def wait_gate(started, gate):
    Path(started).touch()
    return wait_for_path(gate, 30.0)


@ray.remote
def context_ids():
    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "task": ctx.get_task_id(),
            "worker": ctx.get_worker_id(), "job": ctx.get_job_id(), "pid": os.getpid()}


@ray.remote
def inner(x):
    return x * 10


@ray.remote
def outer(n, base):
    return sum(ray.get([inner.remote(base + i) for i in range(n)], timeout=60))


@ray.remote
def top(n):
    return sum(ray.get([outer.remote(2, 100 * i) for i in range(n)], timeout=60))


@ray.remote
def needs_resource():
    return "ran"


class Box:
    """A class defined in the test module, sent to and returned from a task."""

    def __init__(self, value):
        self.value = value

    def doubled(self):
        return Box(self.value * 2)


@ray.remote
def double_box(box):
    assert type(box).__name__ == "Box"
    return box.doubled()


def _barrier(barrier_dir, parties, timeout):
    """Inside a task: wait until `parties` files are in barrier_dir; True if they all came."""
    deadline = time.monotonic() + timeout
    while len(os.listdir(barrier_dir)) < parties and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(os.listdir(barrier_dir)) >= parties


def _short_options_check(ref, value, timeout=30):
    assert isinstance(ref, ray.ObjectRef)
    assert ray.get(ref, timeout=timeout) == value


# -- @remote and .remote() ------------------------------------------------------------------
def test_bare_decorator_returns_object_ref(cluster):
    ref = add.remote(1, 2)
    assert isinstance(ref, ray.ObjectRef)
    assert ray.get(ref, timeout=30) == 3


def test_decorator_with_options(cluster):
    assert isinstance(mul, ray.RemoteFunction)
    _short_options_check(mul.remote(6, 7), 42)


def test_num_returns_k_returns_k_refs(cluster):
    @ray.remote(num_returns=3)
    def three():
        return 1, 2, 3

    refs = three.remote()
    assert isinstance(refs, list) and len(refs) == 3
    assert all(isinstance(r, ray.ObjectRef) for r in refs)
    assert len(set(refs)) == 3
    assert ray.get(refs, timeout=30) == [1, 2, 3]

    refs2 = add.options(num_returns=2).remote([1], [2])
    assert isinstance(refs2, list) and len(refs2) == 2
    assert ray.get(refs2, timeout=30) == [1, 2]


def test_num_returns_zero_returns_none_and_runs(cluster, tmp_path):
    marker = tmp_path / "ran"

    @ray.remote(num_returns=0)
    def side_effect(path):
        Path(path).write_text("yes")

    assert side_effect.remote(str(marker)) is None
    wait_for(marker.exists, 30, message="the num_returns=0 task to run")
    assert marker.read_text() == "yes"


def test_options_are_accepted(cluster):
    opts = dict(num_cpus=1, num_gpus=0, resources={}, num_returns=1, max_retries=2,
                retry_exceptions=False, name="renamed_add", scheduling_strategy="DEFAULT")
    _short_options_check(add.options(**opts).remote(2, 3), 5)
    _short_options_check(add.options(retry_exceptions=[ValueError]).remote(1, 1), 2)
    _short_options_check(add.options(num_cpus=0.5).remote(1, 2), 3)
    # .options() does not change the decorated function's own options.
    refs = add.options(num_returns=2).remote([1], [2])
    assert isinstance(refs, list)
    assert ray.get(add.remote(4, 4), timeout=30) == 8


def test_spread_strategy_runs(cluster):
    refs = [add.options(scheduling_strategy="SPREAD").remote(i, i) for i in range(6)]
    assert ray.get(refs, timeout=30) == [2 * i for i in range(6)]


def test_node_affinity_to_own_node_runs(cluster):
    node_id = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    ids = ray.get(context_ids.options(scheduling_strategy=strategy).remote(), timeout=30)
    assert ids["node"] == node_id


def test_node_affinity_to_missing_node_hard_is_unschedulable(cluster):
    real = ray.get_runtime_context().get_node_id()
    missing = os.urandom(len(real) // 2).hex()
    assert missing != real
    strategy = NodeAffinitySchedulingStrategy(node_id=missing, soft=False)
    ref = add.options(scheduling_strategy=strategy).remote(1, 2)
    with pytest.raises(ray.exceptions.TaskUnschedulableError):
        ray.get(ref, timeout=30)


def test_node_affinity_to_missing_node_soft_runs_anyway(cluster):
    real = ray.get_runtime_context().get_node_id()
    missing = os.urandom(len(real) // 2).hex()
    strategy = NodeAffinitySchedulingStrategy(node_id=missing, soft=True)
    ids = ray.get(context_ids.options(scheduling_strategy=strategy).remote(), timeout=30)
    assert ids["node"] == real


# -- arguments ----------------------------------------------------------------------------
def test_top_level_ref_args_are_resolved_to_values(cluster):
    put_ref = ray.put(41)
    task_ref = add.remote(1, 1)
    types, kwtypes = ray.get(arg_info.remote(put_ref, task_ref, 3, kw=ray.put("s")), timeout=30)
    assert types == ["int", "int", "int"]
    assert kwtypes == {"kw": "str"}
    assert ray.get(add.remote(put_ref, task_ref), timeout=30) == 43
    # A chain: each task's output feeds the next as a top-level argument.
    ref = identity.remote(0)
    for _ in range(5):
        ref = add.remote(ref, 1)
    assert ray.get(ref, timeout=30) == 5


def test_nested_refs_arrive_as_refs(cluster):
    a, b = ray.put("a-value"), add.remote(20, 22)
    assert ray.get(get_nested.remote([a, b]), timeout=30) == ["a-value", 42]
    assert ray.get(get_nested.remote({"x": a, "y": b}), timeout=30) == {"x": "a-value", "y": 42}
    types, _ = ray.get(arg_info.remote([a]), timeout=30)
    assert types == ["list"]


def test_large_argument_round_trips(cluster):
    big = b"x" * (2 * 1024 * 1024)
    assert ray.get(identity.remote(big), timeout=30) == big


# -- what code a task can run ---------------------------------------------------------------
def test_module_level_function_and_class(cluster):
    out = ray.get(double_box.remote(Box(21)), timeout=30)
    assert isinstance(out, Box) and out.value == 42


def test_lambda_and_closure(cluster):
    double = ray.remote(lambda x: 2 * x)
    assert ray.get(double.remote(21), timeout=30) == 42

    def make_adder(n):
        offset = {"n": n}

        @ray.remote
        def add_n(x):
            return x + offset["n"]

        return add_n

    add5, add7 = make_adder(5), make_adder(7)
    assert ray.get([add5.remote(1), add7.remote(1)], timeout=30) == [6, 8]

    class Local:
        def __init__(self, v):
            self.v = v

    @ray.remote
    def make_local(v):
        return Local(v)

    obj = ray.get(make_local.remote(3), timeout=30)
    assert type(obj).__name__ == "Local" and obj.v == 3


def test_driver_sys_path_modules_importable_in_task(cluster):
    """tests/ is on the driver's sys.path only (pytest inserts it), so a worker can
    import helpers.task_module only if the driver's sys.path reached it."""
    import helpers.task_module as tm

    @ray.remote
    def use_helper(x):
        import helpers.task_module as m
        return m.square(x), m.MARKER, m.__file__

    sq, marker, path = ray.get(use_helper.remote(9), timeout=30)
    assert (sq, marker) == (81, tm.MARKER)
    assert os.path.realpath(path) == os.path.realpath(tm.__file__)
    # A function from that module, and an instance of its class, pickled by reference.
    assert ray.get(ray.remote(tm.square).remote(12), timeout=30) == 144

    @ray.remote
    def norm(p):
        return p.norm2()

    assert ray.get(norm.remote(tm.Point(3, 4)), timeout=30) == 25


# -- nesting and scheduling ----------------------------------------------------------------
def test_nested_tasks_more_than_cpus_do_not_deadlock(cluster):
    # 4 outer tasks on 2 CPUs, each blocking in get() on 4 inner tasks.
    refs = [outer.remote(4, 10 * i) for i in range(4)]
    expected = [sum((10 * i + j) * 10 for j in range(4)) for i in range(4)]
    assert ray.get(refs, timeout=90) == expected


def test_nested_tasks_depth_three(cluster):
    # top -> 3 x outer -> 2 x inner each; 1 + 3 + 6 tasks on 2 CPUs.
    expected = sum(sum((100 * i + j) * 10 for j in range(2)) for i in range(3))
    assert ray.get(top.remote(3), timeout=90) == expected
    assert ray.get([top.remote(2), top.remote(2)], timeout=90) == [
        sum(sum((100 * i + j) * 10 for j in range(2)) for i in range(2))] * 2


def test_task_runs_only_when_its_resources_are_free(cluster):
    # The cluster has 2 CPUs: two num_cpus=2 tasks must run one after the other.
    a = interval.options(num_cpus=2).remote(0.6)
    b = interval.options(num_cpus=2).remote(0.6)
    (s1, e1), (s2, e2) = sorted(ray.get([a, b], timeout=60))
    assert e1 - s1 >= 0.6 and e2 - s2 >= 0.6
    assert s2 >= e1 - 0.01, f"num_cpus=2 tasks overlapped on a 2-CPU node: {(s1, e1)} {(s2, e2)}"


def test_free_cpus_run_tasks_in_parallel_even_after_fast_history(cluster, tmp_path):
    """Two tasks with 2 free CPUs run at the same time (Ray: a task runs as soon as its
    resources are free), also for a function whose earlier calls were very short."""

    @ray.remote
    def maybe_wait(barrier_dir=None, parties=0):
        if barrier_dir is None:
            return "fast"
        Path(barrier_dir, str(os.getpid())).touch()
        deadline = time.monotonic() + 5
        while len(os.listdir(barrier_dir)) < parties and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(os.listdir(barrier_dir)) >= parties

    for _ in range(3):  # one call at a time: a short run history on one leased worker
        assert ray.get(maybe_wait.remote(), timeout=30) == "fast"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    refs = [maybe_wait.remote(str(barrier), 2) for _ in range(2)]
    assert ray.get(refs, timeout=60) == [True, True], (
        "two 1-CPU tasks did not overlap on an idle 2-CPU node (each waited 5 s for the other)")


def test_wait_with_timeout_returns_not_ready(cluster, tmp_path):
    started, gate = tmp_path / "started", tmp_path / "gate"
    ref = wait_gate.remote(str(started), str(gate))
    try:
        t0 = time.monotonic()
        ready, not_ready = ray.wait([ref], timeout=0.5)
        assert time.monotonic() - t0 >= 0.45
        assert (ready, not_ready) == ([], [ref])
        done = add.remote(1, 1)
        assert ray.get(done, timeout=30) == 2
        ready, not_ready = ray.wait([ref, done], num_returns=2, timeout=0.5)
        assert (ready, not_ready) == ([done], [ref])
    finally:
        gate.touch()
    assert ray.get(ref, timeout=30) is True


@pytest.mark.parametrize("opts,missing", [
    ({"resources": {"nonexistent_res": 1}}, "nonexistent_res"),
    ({"num_cpus": 64}, "CPU"),
], ids=["custom-resource", "too-many-cpus"])
def test_infeasible_task_stays_pending_and_warns(cluster, caplog, opts, missing):
    # The runtime's logger does not propagate to the root logger, so attach caplog's handler.
    logger = logging.getLogger("runtime")
    logger.addHandler(caplog.handler)
    try:
        ref = needs_resource.options(**opts).remote()
        ready, not_ready = ray.wait([ref], timeout=1.0)
        assert ready == [] and not_ready == [ref]
        # Feasible work is not blocked by it.
        assert ray.get([add.remote(i, 1) for i in range(4)], timeout=30) == [1, 2, 3, 4]

        def warned():
            return [r for r in caplog.records
                    if r.levelno >= logging.WARNING and missing in r.getMessage()]

        records = wait_for(warned, 15, message=f"a warning naming {missing!r}")
        assert records[0].name.startswith("runtime")
        ready, _ = ray.wait([ref], timeout=0.2)
        assert ready == []
    finally:
        logger.removeHandler(caplog.handler)
    ray.cancel(ref)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=30)


def test_runtime_context_inside_task(cluster):
    driver = ray.get_runtime_context()
    a, b = ray.get([context_ids.remote(), context_ids.remote()], timeout=30)
    for ids in (a, b):
        assert ids["node"] == driver.get_node_id()
        assert ids["job"] == driver.get_job_id()
        assert ids["worker"] != driver.get_worker_id()
        assert ids["pid"] != os.getpid()
        assert isinstance(ids["task"], str) and ids["task"]
        int(ids["task"], 16)  # a hex string
    assert a["task"] != b["task"]


def test_many_noop_tasks_all_return(cluster):
    refs = [noop.remote() for _ in range(2000)]
    assert len(set(refs)) == 2000
    assert ray.get(refs, timeout=120) == [None] * 2000
    refs = [add.remote(i, 1) for i in range(2000)]
    assert ray.get(refs, timeout=120) == list(range(1, 2001))


# == tests with their own cluster: keep these LAST (fresh_runtime stops the shared cluster) ==
def test_driver_sys_path_from_temp_dir_reaches_workers(fresh_runtime, tmp_path, monkeypatch):
    mod_dir = tmp_path / "extra_path"
    mod_dir.mkdir()
    name = "rt_tasks_tmp_module"
    (mod_dir / f"{name}.py").write_text("VALUE = 1234\n\ndef triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(mod_dir))
    monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        fresh_runtime.init(num_cpus=2)
        import importlib

        mod = importlib.import_module(name)

        @ray.remote
        def use_module():
            import importlib as il
            m = il.import_module("rt_tasks_tmp_module")
            return m.VALUE, m.__file__

        value, path = ray.get(use_module.remote(), timeout=30)
        assert value == 1234
        assert os.path.realpath(path) == os.path.realpath(str(mod_dir / f"{name}.py"))
        # The module's function pickled by reference: the worker must import it.
        assert ray.get(ray.remote(mod.triple).remote(5), timeout=30) == 15
    finally:
        sys.modules.pop(name, None)


def test_custom_resources_and_available_resources(fresh_runtime, tmp_path):
    ray.init(num_cpus=2, resources={"custom": 2})
    total = ray.cluster_resources()
    assert total["CPU"] == 2 and total["custom"] == 2
    assert ray.get(needs_resource.options(resources={"custom": 1}).remote(), timeout=30) == "ran"
    assert ray.get(needs_resource.options(resources={"custom": 2}).remote(), timeout=30) == "ran"

    started, gate = tmp_path / "started", tmp_path / "gate"
    ref = wait_gate.options(num_cpus=1, resources={"custom": 1}).remote(str(started), str(gate))
    try:
        wait_for(started.exists, 30, message="the long task to start")
        wait_for(lambda: (ray.available_resources().get("CPU", 0) == 1
                          and ray.available_resources().get("custom", 0) == 1), 15,
                 message="available_resources to show 1 CPU and 1 custom in use")
    finally:
        gate.touch()
    assert ray.get(ref, timeout=30) is True
    wait_for(lambda: (ray.available_resources().get("CPU", 0) == 2
                      and ray.available_resources().get("custom", 0) == 2), 15,
             message="available_resources to return to 2 CPU / 2 custom")


def test_custom_resource_beyond_node_is_infeasible(fresh_runtime):
    ray.init(num_cpus=2, resources={"custom": 2})
    ref = needs_resource.options(resources={"custom": 3}).remote()
    ready, _ = ray.wait([ref], timeout=1.0)
    assert ready == []
    assert ray.get(needs_resource.options(resources={"custom": 1}).remote(), timeout=30) == "ran"
    ray.cancel(ref)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=30)


# -- GPUs (a fake nvidia-smi that reports GPUs 0 and 1) -------------------------------------
FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *--query-gpu=index*) printf '0\\n1\\n' ;;
  *) echo "fake nvidia-smi" ;;
esac
"""


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    exe = bindir / "nvidia-smi"
    exe.write_text(FAKE_NVIDIA_SMI)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return bindir


@ray.remote
def gpu_view():
    return os.environ.get("CUDA_VISIBLE_DEVICES"), list(ray.get_gpu_ids())


@ray.remote
def gpu_barrier(barrier_dir, parties):
    """Like gpu_view, but waits until `parties` tasks have arrived (proves they overlap).

    A separate function from gpu_view so that no run history of it exists when the
    test submits the concurrent pair."""
    Path(barrier_dir, str(os.getpid())).touch()
    concurrent = _barrier(barrier_dir, parties, 30.0)
    return os.environ.get("CUDA_VISIBLE_DEVICES"), list(ray.get_gpu_ids()), concurrent


def test_gpus_detected_with_fake_nvidia_smi(fresh_runtime, fake_gpus, tmp_path):
    ray.init(num_cpus=2)
    assert ray.cluster_resources().get("GPU") == 2

    cvd, ids = ray.get(gpu_view.options(num_gpus=1).remote(), timeout=30)
    assert cvd in ("0", "1")
    assert [str(i) for i in ids] == [cvd]

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    a, b = ray.get([gpu_barrier.options(num_gpus=1).remote(str(barrier), 2),
                    gpu_barrier.options(num_gpus=1).remote(str(barrier), 2)], timeout=60)
    assert a[2] and b[2], "the two num_gpus=1 tasks did not run concurrently"
    assert {a[0], b[0]} == {"0", "1"}
    assert [str(i) for i in a[1]] == [a[0]] and [str(i) for i in b[1]] == [b[0]]

    cvd, ids = ray.get(gpu_view.options(num_gpus=2).remote(), timeout=30)
    assert sorted(cvd.split(",")) == ["0", "1"]
    assert sorted(str(i) for i in ids) == ["0", "1"]

    # A task that asks for no GPU is assigned none.
    _cvd, ids = ray.get(gpu_view.remote(), timeout=30)
    assert list(ids) == []


def test_init_num_gpus_overrides_detection(fresh_runtime, fake_gpus):
    ray.init(num_cpus=2, num_gpus=1)
    assert ray.cluster_resources().get("GPU") == 1
    cvd, ids = ray.get(gpu_view.options(num_gpus=1).remote(), timeout=30)
    assert cvd is not None and len(cvd.split(",")) == 1
    assert [str(i) for i in ids] == [cvd]
    ref = gpu_view.options(num_gpus=2).remote()
    ready, _ = ray.wait([ref], timeout=1.0)
    assert ready == [], "a num_gpus=2 task ran on a node with num_gpus=1"
    ray.cancel(ref)
