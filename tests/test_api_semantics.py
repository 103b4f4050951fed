"""API semantics checked against Ray 2.x: non-finite numbers refused with the option's
name, options() in a loop, wait([]), get() failing early, namespaces in tasks and
actors, and the message of an actor whose constructor raised.

Most tests share the module's private 2-CPU cluster; the ones that call init()
themselves come last (``fresh_runtime`` shuts the shared cluster down).
"""
from __future__ import annotations

import os
import pickle
import time
import tracemalloc

import pytest

import runtime as ray
from runtime.exceptions import ActorDiedError, RayActorError, TaskCancelledError
from runtime.util import placement_group, remove_placement_group

NAN = float("nan")
INF = float("inf")


@ray.remote
def noop():
    return None


# -- NaN and infinity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [NAN, INF, -1])
@pytest.mark.parametrize("option", ["num_cpus", "num_gpus", "memory", "object_store_memory",
                                    "resources"])
def test_non_finite_resource_options_are_refused(cluster, option, bad):
    value = {"custom": bad} if option == "resources" else bad

    class Plain:
        pass

    Actor = ray.remote(Plain)
    for make in (lambda: noop.options(**{option: value}),
                 lambda: ray.remote(**{option: value})(lambda: None),
                 lambda: Actor.options(**{option: value}),
                 lambda: ray.remote(**{option: value})(Plain)):
        with pytest.raises(ValueError, match=option):
            make()


@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_placement_group_bundles_are_refused(cluster, bad):
    with pytest.raises(ValueError, match="CPU"):
        placement_group([{"CPU": bad}])
    with pytest.raises(ValueError, match="custom"):
        placement_group([{"CPU": 1}, {"custom": bad}])


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_timeouts_are_refused(cluster, bad):
    ref = noop.remote()
    with pytest.raises(ValueError, match="timeout"):
        ray.get(ref, timeout=bad)
    with pytest.raises(ValueError, match="timeout"):
        ray.wait([ref], timeout=bad)
    pg = placement_group([{"CPU": 0.01}])
    try:
        with pytest.raises(ValueError, match="timeout_seconds"):
            pg.wait(timeout_seconds=bad)
    finally:
        remove_placement_group(pg)
    assert ray.get(ref, timeout=60) is None


# -- options() in a loop ---------------------------------------------------------------------------------
def test_options_in_a_loop_does_not_grow_memory(cluster):
    @ray.remote
    class Actor:
        def f(self):
            return 1

    def round_of_calls(n: int) -> None:
        refs = []
        for i in range(n):
            refs.append(noop.options(num_cpus=0.5, name=f"n{i % 3}").remote())
            Actor.options(num_cpus=0, name=None)  # building options alone must not grow either
            if len(refs) == 500:
                ray.get(refs, timeout=120)
                refs = []
        ray.get(refs, timeout=120)

    round_of_calls(2_000)  # warm up: leases, connections, caches of bounded size
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        round_of_calls(20_000)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename")
                if s.traceback[0].filename.endswith(("remote_function.py", "options.py",
                                                       "actor.py")))
    # A leak keeps about 850 bytes a call (17 MB here). What legitimately remains is
    # bounded: e.g. the resource shapes of the last second's tasks in the task-event buffer.
    assert grown < 3 * 2**20, f"{grown / 1024:.0f} KiB still held after 20,000 options() calls"


# -- wait and get ----------------------------------------------------------------------------------------
def test_wait_on_an_empty_list_returns_two_empty_lists(cluster):
    assert ray.wait([]) == ([], [])
    assert ray.wait([], num_returns=1, timeout=0) == ([], [])


def test_get_raises_a_failure_without_waiting_for_slower_refs(cluster):
    @ray.remote
    def slow():
        time.sleep(30)
        return "slow"

    @ray.remote
    def failing():
        raise KeyError("failed at once")

    s = slow.remote()
    t0 = time.monotonic()
    with pytest.raises(KeyError, match="failed at once"):
        ray.get([s, failing.remote()], timeout=60)
    assert time.monotonic() - t0 < 10, "get() waited for the slow task before raising"
    # The same in the other order, and a ready value before the failure changes nothing.
    t0 = time.monotonic()
    with pytest.raises(KeyError):
        ray.get([ray.put(1), failing.remote(), s], timeout=60)
    assert time.monotonic() - t0 < 10
    ray.cancel(s, force=True)


def test_get_of_ready_values_still_returns_them_in_order(cluster):
    refs = [ray.put(i) for i in range(100)] + [noop.remote()]
    assert ray.get(refs, timeout=60) == list(range(100)) + [None]


# -- namespaces ------------------------------------------------------------------------------------------
@ray.remote
def namespace_in_task():
    return ray.get_runtime_context().namespace


@ray.remote
class NamespaceActor:
    def __init__(self):
        self.at_init = ray.get_runtime_context().namespace

    def namespaces(self):
        return self.at_init, ray.get_runtime_context().namespace


def test_anonymous_namespace_is_named_and_shared_with_tasks_and_actors(cluster):
    ns = ray.get_runtime_context().namespace
    assert isinstance(ns, str) and ns
    assert ray.get(namespace_in_task.remote(), timeout=60) == ns
    actor = NamespaceActor.remote()
    try:
        assert ray.get(actor.namespaces.remote(), timeout=60) == (ns, ns)
    finally:
        ray.kill(actor)


# -- actors whose constructor raised ---------------------------------------------------------------------
def test_actor_constructor_error_is_in_the_death_message(cluster):
    @ray.remote
    class Broken:
        def __init__(self, n):
            raise ValueError(f"bad config {n}")

        def f(self):
            return 1

    b = Broken.remote(42)
    with pytest.raises(ActorDiedError) as info:
        ray.get(b.f.remote(), timeout=60)
    err = info.value
    assert isinstance(err, RayActorError)
    assert "bad config 42" in str(err), str(err)
    assert isinstance(err.cause, ValueError) and str(err.cause) == "bad config 42"


# -- cancelled tasks -----------------------------------------------------------------------------------
def test_task_cancelled_error_survives_pickling_with_its_message():
    err = TaskCancelledError("ab12")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is TaskCancelledError
    assert str(again) == str(err) == "Task ab12 was cancelled"
    assert again.task_id == "ab12"
    plain = pickle.loads(pickle.dumps(TaskCancelledError()))
    assert str(plain) == "Task was cancelled" and plain.task_id is None


def test_a_cancelled_task_says_so_once(cluster, tmp_path):
    """Queued (the owner fails it) and running (the worker is interrupted): either way the
    error reaches get() pickled, and its message names the task once."""
    @ray.remote
    def wait_for_file(path):
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)

    @ray.remote
    def started_then_sleep(path):
        open(path, "w").close()
        time.sleep(60)

    gate = tmp_path / "gate"
    queued = noop.remote(wait_for_file.remote(str(gate)))  # waits for its argument
    started = tmp_path / "started"
    running = started_then_sleep.remote(str(started))
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline, "the task to cancel never started"
        time.sleep(0.02)
    for ref in (queued, running):
        ray.cancel(ref)
        with pytest.raises(TaskCancelledError) as info:
            ray.get(ref, timeout=60)
        message = str(info.value)
        assert message.count("was cancelled") == 1, message
        assert ref.task_id().hex() in message, message
    gate.touch()


# -- tests that start their own cluster (they stop the module's one) ----------------------------------------
@pytest.mark.parametrize("kwargs", [{"num_cpus": NAN}, {"num_gpus": INF},
                                    {"object_store_memory": INF},
                                    {"resources": {"custom": NAN}}])
def test_init_refuses_non_finite_resources(fresh_runtime, tmp_path, kwargs):
    (option,) = kwargs
    with pytest.raises(ValueError, match=option if option != "resources" else "custom"):
        ray.init(_temp_dir=str(tmp_path), **kwargs)
    assert not ray.is_initialized()


def test_explicit_namespace_reaches_tasks_and_actors(fresh_runtime, tmp_path):
    ray.init(num_cpus=1, namespace="fruits", _temp_dir=str(tmp_path))
    assert ray.get_runtime_context().namespace == "fruits"
    assert ray.get(namespace_in_task.remote(), timeout=60) == "fruits"
    actor = NamespaceActor.remote()
    assert ray.get(actor.namespaces.remote(), timeout=60) == ("fruits", "fruits")
    ray.kill(actor)

