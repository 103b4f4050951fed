"""The owner's state machine for tasks the memory monitor killed (Ray's OOM retry
policy, runtime/core_worker/owner_oom.py). Without sockets or processes: stimuli in,
actions out, as tests/test_scheduler.py tests the raylet's."""
from __future__ import annotations

from runtime.core_worker.owner_actions import (Fail, Finish, Push, RequestLease, RetryLater,
                                               ReturnLease, Warn, WorkerDied)
from runtime.core_worker.owner_records import FAILED, FINISHED, PENDING_NODE_ASSIGNMENT
from runtime.core_worker.owner_tasks import LOCAL_RAYLET
from runtime.exceptions import OutOfMemoryError, TaskCancelledError

from helpers.owner_machine import W1, W2, machine, of, result, running, task


# -- the memory monitor (Ray's OOM retry policy) ------------------------------------------------
OOM_TEXT = ("Task was killed due to the node running low on memory.\nMemory on the node (IP: "
            "127.0.0.1, ID: abc) where the task (name=f, pid=42) was running was 9.70GB / "
            "10.00GB (0.97), which exceeds the memory usage threshold of 0.95. Ray killed this "
            "worker (ID: 0101) because it was the most recently scheduled task; ...")


def test_a_task_without_retries_killed_for_memory_fails_with_out_of_memory_error():
    m = machine()
    t = task(retries=0)
    link, _ = running(m, t)
    assert m.worker_killed(W1, OOM_TEXT) == []  # the notice only marks the link
    out = m.worker_lost(link, "UNAVAILABLE: Socket closed")
    assert not of(out, WorkerDied) and not of(out, RequestLease)
    (fail,) = of(out, Fail)
    assert fail.tasks == [t] and t.state == FAILED
    assert type(fail.error) is OutOfMemoryError and str(fail.error) == OOM_TEXT
    assert of(out, ReturnLease)[0].kill_worker  # never granted again, as any dead worker


def test_a_task_killed_for_memory_runs_again_after_a_doubling_backoff_without_using_retries():
    m = machine()
    t = task(retries=1)
    link, _ = running(m, t)
    delays = []
    for kill in range(1, 9):
        m.worker_killed(link.worker_id, OOM_TEXT)
        out = m.worker_lost(link, "EOF")
        (later,) = of(out, RetryLater)
        (warn,) = of(out, Warn)
        assert later.task is t and not of(out, RequestLease)  # not before the backoff
        assert "failed due to oom" in warn.message and "infinite oom retries" in warn.message
        assert "9.70GB / 10.00GB" in warn.message
        assert t.retries_left == 1 and t.attempt == kill and t.state == PENDING_NODE_ASSIGNMENT
        delays.append(later.delay)
        (req,) = of(m.retry_due(t), RequestLease)
        worker = bytes([kill + 10]) * 28
        out = m.lease_granted(LOCAL_RAYLET, req.request_id, 100 + kill, worker, "x:1")
        link = of(out, Push)[0].link
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]  # Ray: 1 s doubling, capped at 60 s
    out = m.task_result(link, result(t))
    assert of(out, Finish) and t.state == FINISHED


def test_oom_retries_are_bounded_by_task_oom_retries_then_out_of_memory_error():
    m = machine(TASK_OOM_RETRIES=1)
    t = task(retries=3)
    link, _ = running(m, t)
    m.worker_killed(W1, OOM_TEXT)
    (later,) = of(m.worker_lost(link, "EOF"), RetryLater)
    (req,) = of(m.retry_due(later.task), RequestLease)
    link = of(m.lease_granted(LOCAL_RAYLET, req.request_id, 8, W2, "x:2"), Push)[0].link
    m.worker_killed(W2, OOM_TEXT)
    (fail,) = of(m.worker_lost(link, "EOF"), Fail)
    assert isinstance(fail.error, OutOfMemoryError) and t.retries_left == 3
    assert str(fail.error).startswith(OOM_TEXT)
    assert "killed for memory 2 times" in str(fail.error)


def test_a_task_cancelled_during_its_oom_backoff_fails_as_cancelled_and_never_runs_again():
    m = machine()
    t = task(retries=2)
    link, _ = running(m, t)
    m.worker_killed(W1, OOM_TEXT)
    (later,) = of(m.worker_lost(link, "EOF"), RetryLater)
    found, out = m.cancel(t.task_id, force=False)
    (fail,) = of(out, Fail)
    assert found and isinstance(fail.error, TaskCancelledError) and t.state == FAILED
    assert m.retry_due(later.task) == []


def test_a_late_memory_notice_changes_nothing():
    """The worker's stream broke before the notice came: the loss was an ordinary worker
    death (a retry used); the notice finds no link and is harmless."""
    m = machine()
    t = task(retries=1)
    link, _ = running(m, t)
    (req,) = of(m.worker_lost(link, "EOF"), RequestLease)
    assert t.retries_left == 0 and t.attempt == 1
    assert m.worker_killed(W1, OOM_TEXT) == []
    out = m.lease_granted(LOCAL_RAYLET, req.request_id, 8, W2, "x:2")
    (push,) = of(out, Push)
    assert push.task is t and not push.link.oom
    (died,) = of(m.worker_lost(push.link, "EOF"), WorkerDied)  # no OOM policy for this one
    assert died.tasks == [t]


def test_lease_requests_say_whether_the_keys_tasks_survive_a_memory_kill():
    m = machine()
    out = m.submit(task(retries=2))
    assert of(out, RequestLease)[0].key.retriable
    key0 = ("g", (), b"")
    out = m.submit(task(retries=0, key=key0))
    assert not of(out, RequestLease)[0].key.retriable
    m2 = machine(TASK_OOM_RETRIES=0)  # killed for memory means failed: not retriable
    assert not of(m2.submit(task(retries=3)), RequestLease)[0].key.retriable
