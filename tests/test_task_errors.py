"""Task failures: application errors, worker death and retries, cancellation, bad input.

Ray's documented behaviour is the spec. All tests share the module-scoped 2-CPU
``cluster``; workers that tests kill are checked to be gone by PID and the
cluster is checked to keep running tasks afterwards.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

import runtime as ray
from runtime import exceptions as rex

from conftest import wait_for
from helpers.task_module import bump_counter, read_counter, wait_for_path


class MyError(Exception):
    """An application error class defined in the test module."""


class MySubError(MyError):
    pass


ERRORS = {"MyError": MyError, "MySubError": MySubError, "ValueError": ValueError}


# -- remote functions (module level: pickled by reference) ----------------------------------
@ray.remote
def add(a, b):
    return a + b


@ray.remote
def pid_of():
    return os.getpid()


@ray.remote
def raise_value_error(msg):
    raise ValueError(msg)


@ray.remote
def raise_my_error(msg):
    raise MyError(msg)


@ray.remote
def calls_failing_child(msg):
    return ray.get(raise_value_error.remote(msg))


@ray.remote
def consume(x, marker):
    Path(marker).touch()
    return x


def _die(mode):
    if mode == "exit":
        os._exit(1)
    elif mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)
    elif mode == "segfault":
        import ctypes
        ctypes.string_at(0)
    raise AssertionError(f"still alive after {mode}")


@ray.remote
def die_until(counter, succeed_on, mode, pid_file):
    """Dies (mode) on attempts before `succeed_on`; returns the attempt number after."""
    n = bump_counter(counter)
    if n < succeed_on:
        Path(pid_file).write_text(str(os.getpid()))
        _die(mode)
    return n


@ray.remote
def flaky(counter, succeed_on, error):
    """Raises ERRORS[error] on attempts before `succeed_on`; returns the attempt number."""
    n = bump_counter(counter)
    if n < succeed_on:
        raise ERRORS[error](f"attempt {n} failed")
    return n


@ray.remote
def hold(started, gate):
    Path(started).touch()
    return wait_for_path(gate, 30.0)


@ray.remote
def sleeper(started, seconds):
    Path(started).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "finished"


@ray.remote
def needs_missing():
    return "ran"


@ray.remote
def two_args(a, b):
    return a, b


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _cluster_still_runs():
    assert ray.get([add.remote(i, i) for i in range(4)], timeout=30) == [0, 2, 4, 6]


# -- application errors -----------------------------------------------------------------------
def test_task_error_is_ray_task_error_and_original_class(cluster):
    ref = raise_value_error.remote("bad value 1234")
    with pytest.raises(rex.RayTaskError) as ei:
        ray.get(ref, timeout=30)
    err = ei.value
    assert isinstance(err, ValueError)
    assert isinstance(err, rex.RayError)
    msg = str(err)
    assert "raise_value_error" in msg
    assert "bad value 1234" in msg
    assert "Traceback" in msg
    assert type(err.cause) is ValueError
    assert err.cause.args == ("bad value 1234",)
    # except ValueError catches it, as with a local call.
    with pytest.raises(ValueError, match="bad value 1234"):
        ray.get(ref, timeout=30)


def test_custom_exception_class(cluster):
    with pytest.raises(MyError) as ei:
        ray.get(raise_my_error.remote("custom failure"), timeout=30)
    err = ei.value
    assert isinstance(err, rex.RayTaskError)
    assert type(err.cause) is MyError
    assert err.cause.args == ("custom failure",)
    assert "raise_my_error" in str(err) and "custom failure" in str(err)


def test_error_from_nested_task_keeps_class_and_both_frames(cluster):
    with pytest.raises(ValueError) as ei:
        ray.get(calls_failing_child.remote("deep failure"), timeout=30)
    assert isinstance(ei.value, rex.RayTaskError)
    assert "deep failure" in str(ei.value)
    assert "raise_value_error" in str(ei.value)


def test_error_propagates_to_dependent_task(cluster, tmp_path):
    marker = tmp_path / "consumer-ran"
    ref = consume.remote(raise_my_error.remote("upstream broke"), str(marker))
    with pytest.raises(MyError) as ei:
        ray.get(ref, timeout=30)
    assert isinstance(ei.value, rex.RayTaskError)
    assert "upstream broke" in str(ei.value)
    assert not marker.exists(), "a task whose argument failed must not run"
    # Two levels down.
    ref2 = add.remote(add.remote(raise_value_error.remote("x"), 1), 1)
    with pytest.raises(ValueError):
        ray.get(ref2, timeout=30)


# -- worker death ---------------------------------------------------------------------------
MODES = ["exit", "sigkill", "segfault"]


@pytest.mark.parametrize("mode", MODES)
def test_worker_death_without_retries_is_worker_crashed(cluster, tmp_path, mode):
    counter, pid_file = tmp_path / "count", tmp_path / "pid"
    ref = die_until.options(max_retries=0).remote(str(counter), 99, mode, str(pid_file))
    with pytest.raises(rex.WorkerCrashedError):
        ray.get(ref, timeout=60)
    assert read_counter(str(counter)) == 1, "max_retries=0 must not retry"
    dead = int(pid_file.read_text())
    wait_for(lambda: _gone(dead), 10, message=f"worker {dead} to be gone")
    # A replacement worker runs the next tasks.
    assert dead not in ray.get([pid_of.remote() for _ in range(2)], timeout=30)
    _cluster_still_runs()


@pytest.mark.parametrize("mode", MODES)
def test_worker_death_is_retried_until_success(cluster, tmp_path, mode):
    counter, pid_file = tmp_path / "count", tmp_path / "pid"
    ref = die_until.options(max_retries=2).remote(str(counter), 3, mode, str(pid_file))
    assert ray.get(ref, timeout=90) == 3
    assert read_counter(str(counter)) == 3
    _cluster_still_runs()


def test_worker_death_retries_exhausted(cluster, tmp_path):
    counter, pid_file = tmp_path / "count", tmp_path / "pid"
    ref = die_until.options(max_retries=1).remote(str(counter), 99, "exit", str(pid_file))
    with pytest.raises(rex.WorkerCrashedError):
        ray.get(ref, timeout=60)
    assert read_counter(str(counter)) == 2


def test_default_max_retries_covers_a_worker_death(cluster, tmp_path):
    # Ray's default max_retries for tasks is 3: one death is retried without any option.
    counter, pid_file = tmp_path / "count", tmp_path / "pid"
    assert ray.get(die_until.remote(str(counter), 2, "exit", str(pid_file)), timeout=60) == 2


# -- retry_exceptions -----------------------------------------------------------------------
def test_retry_exceptions_true_retries_max_retries_times(cluster, tmp_path):
    counter = tmp_path / "count"
    ref = flaky.options(max_retries=2, retry_exceptions=True).remote(str(counter), 99, "MyError")
    with pytest.raises(MyError, match="attempt 3 failed"):
        ray.get(ref, timeout=60)
    assert read_counter(str(counter)) == 3


def test_retry_exceptions_true_succeeds_on_second_attempt(cluster, tmp_path):
    counter = tmp_path / "count"
    ref = flaky.options(max_retries=3, retry_exceptions=True).remote(str(counter), 2, "ValueError")
    assert ray.get(ref, timeout=60) == 2
    assert read_counter(str(counter)) == 2


@pytest.mark.parametrize("error,attempts", [("MyError", 3), ("MySubError", 3), ("ValueError", 1)])
def test_retry_exceptions_list_retries_only_listed_classes(cluster, tmp_path, error, attempts):
    counter = tmp_path / "count"
    ref = flaky.options(max_retries=2, retry_exceptions=[MyError]).remote(str(counter), 99, error)
    with pytest.raises(ERRORS[error]):
        ray.get(ref, timeout=60)
    assert read_counter(str(counter)) == attempts


def test_application_errors_not_retried_by_default(cluster, tmp_path):
    counter = tmp_path / "count"
    with pytest.raises(MyError, match="attempt 1 failed"):
        ray.get(flaky.options(max_retries=3).remote(str(counter), 99, "MyError"), timeout=30)
    assert read_counter(str(counter)) == 1
    counter2 = tmp_path / "count2"
    with pytest.raises(MyError):
        ray.get(flaky.remote(str(counter2), 99, "MyError"), timeout=30)
    assert read_counter(str(counter2)) == 1


def test_retry_exceptions_with_zero_retries_does_not_retry(cluster, tmp_path):
    counter = tmp_path / "count"
    ref = flaky.options(max_retries=0, retry_exceptions=True).remote(str(counter), 99, "MyError")
    with pytest.raises(MyError):
        ray.get(ref, timeout=30)
    assert read_counter(str(counter)) == 1


# -- cancel --------------------------------------------------------------------------------
def test_cancel_task_queued_behind_busy_cpus(cluster, tmp_path):
    gate = tmp_path / "gate"
    started = [tmp_path / f"started{i}" for i in range(2)]
    holders = [hold.remote(str(s), str(gate)) for s in started]
    try:
        for s in started:
            wait_for(s.exists, 30, message="both CPUs to be taken")
        queued = add.remote(1, 2)
        ready, _ = ray.wait([queued], timeout=0.3)
        assert ready == [], "a third 1-CPU task ran while both CPUs were held"
        t0 = time.monotonic()
        ray.cancel(queued)
        with pytest.raises(rex.TaskCancelledError):
            ray.get(queued, timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        gate.touch()
    assert ray.get(holders, timeout=30) == [True, True]
    _cluster_still_runs()


def test_cancel_infeasible_task(cluster):
    ref = needs_missing.options(resources={"no_such_resource": 1}).remote()
    ray.cancel(ref)
    with pytest.raises(rex.TaskCancelledError):
        ray.get(ref, timeout=10)


def test_cancel_running_task_interrupts_it(cluster, tmp_path):
    started = tmp_path / "started"
    ref = sleeper.remote(str(started), 30)
    wait_for(started.exists, 30, message="the task to start")
    t0 = time.monotonic()
    ray.cancel(ref)
    with pytest.raises(rex.TaskCancelledError):
        ray.get(ref, timeout=25)
    assert time.monotonic() - t0 < 10, "cancel did not interrupt the running task"
    _cluster_still_runs()


def test_force_cancel_kills_the_worker(cluster, tmp_path):
    started = tmp_path / "started"
    ref = sleeper.remote(str(started), 30)
    wait_for(started.exists, 30, message="the task to start")
    wait_for(lambda: started.read_text(), 5, message="the task's pid")
    victim = int(started.read_text())
    t0 = time.monotonic()
    ray.cancel(ref, force=True)
    with pytest.raises(rex.TaskCancelledError):
        ray.get(ref, timeout=25)
    assert time.monotonic() - t0 < 10
    wait_for(lambda: _gone(victim), 10, message=f"force-cancelled worker {victim} to exit")
    assert victim not in ray.get([pid_of.remote() for _ in range(2)], timeout=30)
    _cluster_still_runs()


def test_cancel_finished_task_keeps_its_value(cluster):
    ref = add.remote(2, 2)
    assert ray.get(ref, timeout=30) == 4
    ray.cancel(ref)
    assert ray.get(ref, timeout=30) == 4


# -- bad input -------------------------------------------------------------------------------
def test_unpicklable_positional_argument(cluster):
    with pytest.raises(TypeError) as ei:
        two_args.remote(1, threading.Lock())
    msg = str(ei.value)
    assert re.search(r"argument 1\b|'b'", msg), msg
    assert "lock" in msg.lower(), msg


def test_unpicklable_keyword_argument(cluster):
    with pytest.raises(TypeError) as ei:
        two_args.remote(1, b=(i for i in range(3)))
    msg = str(ei.value)
    assert "'b'" in msg, msg
    assert "generator" in msg.lower(), msg
    _cluster_still_runs()


def test_calling_remote_function_directly(cluster):
    with pytest.raises(TypeError, match=r"\.remote\(\)"):
        add(1, 2)
    with pytest.raises(TypeError, match=r"\.remote\(\)"):
        add.options(num_cpus=1)(1, 2)


@pytest.mark.parametrize("opts,exc,word", [
    ({"num_cpus": -1}, ValueError, "num_cpus"),
    ({"num_gpus": -1}, ValueError, "num_gpus"),
    ({"resources": {"CPU": 1}}, ValueError, "CPU"),
    ({"resources": {"GPU": 1}}, ValueError, "GPU"),
    ({"num_returns": -1}, ValueError, "num_returns"),
    ({"max_retries": -2}, ValueError, "max_retries"),
    ({"not_an_option": 1}, (ValueError, TypeError), "not_an_option"),
], ids=["num_cpus", "num_gpus", "resources-CPU", "resources-GPU", "num_returns", "max_retries",
        "unknown"])
def test_bad_options(cluster, opts, exc, word):
    with pytest.raises(exc) as ei:
        add.options(**opts)
    assert word in str(ei.value)
    with pytest.raises(exc):
        ray.remote(**opts)(lambda: None)


def test_get_bad_input(cluster):
    with pytest.raises(ValueError):
        ray.get(1)
    with pytest.raises(ValueError):
        ray.get("not a ref")


def test_get_timeout(cluster, tmp_path):
    started, gate = tmp_path / "started", tmp_path / "gate"
    ref = hold.remote(str(started), str(gate))
    try:
        t0 = time.monotonic()
        with pytest.raises(rex.GetTimeoutError) as ei:
            ray.get(ref, timeout=0.1)
        assert time.monotonic() - t0 < 5
        assert isinstance(ei.value, TimeoutError)
        with pytest.raises(TimeoutError):
            ray.get([ref, add.remote(1, 1)], timeout=0.1)
    finally:
        gate.touch()
    assert ray.get(ref, timeout=30) is True  # a timed-out get does not affect the task


def test_put_of_object_ref(cluster):
    with pytest.raises(TypeError):
        ray.put(ray.put(1))
    # Wrapped in a list it is allowed (Ray's error message suggests it).
    inner = ray.put(5)
    assert ray.get(ray.get(ray.put([inner]), timeout=30)[0], timeout=30) == 5


def test_wait_bad_input(cluster):
    ref = ray.put(1)
    other = ray.put(2)
    with pytest.raises(TypeError):
        ray.wait(ref)
    with pytest.raises(TypeError):
        ray.wait([1])
    with pytest.raises(ValueError):
        ray.wait([ref, ref])
    with pytest.raises(ValueError):
        ray.wait([ref, other], num_returns=3)
    with pytest.raises(ValueError):
        ray.wait([ref], num_returns=0)
    with pytest.raises(ValueError):
        ray.wait([ref], timeout=-1)
    # Valid calls still work after the rejected ones.
    assert ray.wait([ref, other], num_returns=2, timeout=10) == ([ref, other], [])


# -- init ----------------------------------------------------------------------------------
def test_second_init_raises(cluster):
    node_id = ray.get_runtime_context().get_node_id()
    with pytest.raises(RuntimeError):
        ray.init()
    with pytest.raises(RuntimeError):
        ray.init(num_cpus=1)
    assert ray.is_initialized()
    assert ray.get_runtime_context().get_node_id() == node_id
    _cluster_still_runs()


def test_init_ignore_reinit_error(cluster):
    node_id = ray.get_runtime_context().get_node_id()
    ctx = ray.init(ignore_reinit_error=True)
    assert ctx is not None
    assert ray.get_runtime_context().get_node_id() == node_id
    _cluster_still_runs()


def test_init_unknown_keyword(cluster):
    with pytest.raises(TypeError, match="no_such_init_keyword"):
        ray.init(no_such_init_keyword=1)
    assert ray.is_initialized()
    _cluster_still_runs()


def _refuse_to_rebuild():
    raise RuntimeError("this exception cannot be rebuilt here")


class UnrebuildableError(Exception):
    """Pickles fine in the worker; unpickling it anywhere fails."""

    def __reduce__(self):
        return (_refuse_to_rebuild, ())


@ray.remote(max_retries=0)
def raises_unrebuildable():
    raise UnrebuildableError("the original message")


def test_an_exception_that_cannot_be_unpickled_arrives_as_its_text(cluster):
    # Ray: UnserializableException, carrying the original text and traceback.
    with pytest.raises(rex.UnserializableException) as info:
        ray.get(raises_unrebuildable.remote(), timeout=60)
    text = str(info.value)
    assert "the original message" in text and "UnrebuildableError" in text, text
    assert "raises_unrebuildable" in text, text  # the remote traceback came along
