"""The owner's state machine for normal tasks (runtime/core_worker/owner_tasks.py):
submission, leases, retries, raylets that go away, max_calls, failed dependencies.
Without sockets or processes: stimuli in, actions out, as tests/test_scheduler.py tests
the raylet's."""
from __future__ import annotations

import pytest

from runtime.core_worker.memory_store import Value
from runtime.core_worker.owner_actions import (ArmIdleTimer, ArmRetry, CancelLeaseRequest, Connect,
                                               Fail, Finish, Push, RequestLease, ReturnLease,
                                               Warn, WorkerDied)
from runtime.core_worker.owner_records import (FAILED, FINISHED, PENDING_NODE_ASSIGNMENT,
                                               SUBMITTED_TO_WORKER)
from runtime.core_worker.owner_tasks import LOCAL_RAYLET
from runtime.exceptions import RayTaskError, TaskPlacementGroupRemoved, TaskUnschedulableError

from helpers.owner_machine import KEY, REMOTE, W1, W2, machine, of, result, running, task


# -- submission, leases, reuse -----------------------------------------------------------------
def test_submit_requests_a_lease_and_pushes_on_grant():
    m = machine()
    t = task()
    out = m.submit(t)
    assert t.state == PENDING_NODE_ASSIGNMENT
    (req,) = of(out, RequestLease)
    assert req.raylet == LOCAL_RAYLET and req.key.resources == {"CPU": 1.0}
    out = m.lease_granted(LOCAL_RAYLET, req.request_id, 7, W1, "127.0.0.1:9", b"node", 42, [3])
    (conn,) = of(out, Connect)
    (push,) = of(out, Push)
    assert push.task is t and push.link is conn.link and push.lease.gpu_ids == [3]
    assert t.state == SUBMITTED_TO_WORKER and conn.link.inflight == {t.task_id: t}


def test_lease_is_reused_then_returned_after_idling():
    m = machine()
    t1 = task()
    link, out = running(m, t1)
    out = m.task_result(link, result(t1))
    assert of(out, Finish)[0].task is t1 and t1.state == FINISHED
    (arm,) = of(out, ArmIdleTimer)
    lease = arm.lease
    # A task of the same key comes before the timer fires: the same lease, no request.
    t2 = task()
    out = m.submit(t2)
    assert not of(out, RequestLease)
    assert of(out, Push)[0].lease is lease
    m.clock.now += 0.15
    assert m.lease_idle(lease) == []  # it had work meanwhile: kept (armed again when idle)
    out = m.task_result(link, result(t2))
    (arm,) = of(out, ArmIdleTimer)
    m.clock.now += 0.1
    (rearm,) = m.lease_idle(lease)  # idle 0.1 s of 0.2: wait the rest
    assert isinstance(rearm, ArmIdleTimer) and rearm.delay == pytest.approx(0.1)
    m.clock.now += 0.1
    (ret,) = m.lease_idle(lease)
    assert isinstance(ret, ReturnLease) and ret.lease_id == 7 and not ret.kill_worker
    assert not m.keys[KEY].leases
    t3 = task()
    assert of(m.submit(t3), RequestLease)  # the next task asks again


def test_queue_drained_cancels_outstanding_requests():
    m = machine()
    tasks = [task() for _ in range(3)]
    reqs = []
    for t in tasks:
        reqs += of(m.submit(t), RequestLease)
    assert len(reqs) == 3
    out = m.lease_granted(LOCAL_RAYLET, reqs[0].request_id, 1, W1, "a:1")
    link = of(out, Push)[0].link
    out = []
    for t in tasks:
        out += m.task_result(link, result(t))
    cancels = of(out, CancelLeaseRequest)
    assert sorted(c.request_id for c in cancels) == sorted(r.request_id for r in reqs[1:])
    # A grant that comes after the cancel is handed back.
    (ret,) = m.lease_granted(LOCAL_RAYLET, reqs[1].request_id, 2, W2, "a:2")
    assert isinstance(ret, ReturnLease) and ret.lease_id == 2


def test_short_tasks_are_pipelined_only_when_the_node_is_saturated():
    m = machine(PIPELINE_DEPTH=4)
    first = task()
    link, _ = running(m, first)
    m.task_result(link, result(first, exec_seconds=0.0001))  # short, measured
    tasks = [task() for _ in range(6)]
    out = []
    for t in tasks:
        out += m.submit(t)
    assert len(of(out, Push)) == 1  # one at a time while more workers may come
    rid = of(out, RequestLease)[0].request_id
    out = m.lease_queued(rid)  # the node is saturated: pipeline
    assert len(of(out, Push)) == 3 and len(link.inflight) == 4


def test_spillback_asks_the_named_raylet_with_grant_or_reject():
    m = machine()
    t = task()
    (req,) = of(m.submit(t), RequestLease)
    (again,) = of(m.lease_spilled(req.request_id, "10.0.0.2:6381"), RequestLease)
    assert again.raylet == "10.0.0.2:6381"
    out = m.lease_granted("10.0.0.2:6381", again.request_id, 1, W2, "10.0.0.2:9")
    assert of(out, Push)[0].lease.raylet == "10.0.0.2:6381"


def test_rejected_lease_fails_queued_tasks_and_warning_is_given_once():
    m = machine()
    t1, t2 = task(), task()
    (req,) = of(m.submit(t1), RequestLease)
    m.submit(t2)
    (warn,) = m.lease_warning(req.request_id, "needs {GPU: 1}")
    assert isinstance(warn, Warn)
    assert m.lease_warning(req.request_id, "needs {GPU: 1}") == []
    (fail,) = of(m.lease_rejected(req.request_id, "no node has GPU"), Fail)
    assert fail.tasks == [t1, t2] and isinstance(fail.error, TaskUnschedulableError)
    assert t1.state == t2.state == FAILED


def test_a_request_whose_placement_group_was_removed_fails_as_ray_names_it():
    m = machine()
    t = task()
    (req,) = of(m.submit(t), RequestLease)
    (fail,) = of(m.lease_rejected(req.request_id, "its placement group ab was removed",
                                  group_removed=True), Fail)
    assert fail.tasks == [t] and isinstance(fail.error, TaskPlacementGroupRemoved)
    assert "was removed" in str(fail.error) and t.state == FAILED


# -- retries --------------------------------------------------------------------------------------
def test_retry_after_worker_death_goes_to_another_worker():
    m = machine()
    t = task(retries=1)
    link, _ = running(m, t)
    out = m.worker_lost(link, "UNAVAILABLE: worker died")
    (ret,) = of(out, ReturnLease)
    assert ret.kill_worker  # the raylet must never grant that worker again
    (req,) = of(out, RequestLease)
    assert t.attempt == 1 and t.retries_left == 0 and t.state == PENDING_NODE_ASSIGNMENT
    out = m.lease_granted(LOCAL_RAYLET, req.request_id, 8, W2, "127.0.0.1:10")
    (push,) = of(out, Push)
    assert push.task is t and push.link.worker_id == W2


def test_a_grant_of_a_worker_known_dead_is_handed_back_not_used():
    m = machine()
    t = task(retries=1)
    link, _ = running(m, t, worker=W1)
    (req,) = of(m.worker_lost(link, "died"), RequestLease)
    # The raylet has not noticed the exit yet and grants the same worker again.
    out = m.lease_granted(LOCAL_RAYLET, req.request_id, 9, W1, "127.0.0.1:9")
    (ret,) = of(out, ReturnLease)
    assert ret.lease_id == 9 and ret.kill_worker
    assert not of(out, Push) and t.retries_left == 0  # no retry spent on a dead worker
    assert of(out, RequestLease)  # and it asks again


def test_retry_exhausted_fails_as_worker_death_named_by_the_shell():
    m = machine()
    t = task(retries=0)
    link, _ = running(m, t)
    (died,) = of(m.worker_lost(link, "EOF"), WorkerDied)
    assert died.tasks == [t] and died.error == "EOF"
    assert t.state == SUBMITTED_TO_WORKER  # undecided until the shell names the cause
    (fail,) = m.fail_tasks(died.tasks, RuntimeError("the worker crashed"))
    assert isinstance(fail, Fail) and t.state == FAILED
    assert m.fail_tasks(died.tasks, RuntimeError("again")) == []  # once is all


def test_infinite_retries_stay_infinite():
    m = machine()
    t = task(retries=-1)
    link, _ = running(m, t)
    for i in range(5):
        (req,) = of(m.worker_lost(link, "died"), RequestLease)
        out = m.lease_granted(LOCAL_RAYLET, req.request_id, 10 + i, bytes([i + 3]) * 28, "x:1")
        link = of(out, Push)[0].link
    assert t.retries_left == -1 and t.attempt == 5


@pytest.mark.parametrize("retry_exceptions, raised, retried", [
    (True, ValueError("x"), True),
    ([ValueError], ValueError("x"), True),
    ([KeyError], ValueError("x"), False),
    (False, ValueError("x"), False),
])
def test_retry_exceptions_filter(retry_exceptions, raised, retried):
    m = machine()
    t = task(retries=2, retry_exceptions=retry_exceptions)
    link, _ = running(m, t)
    err = RayTaskError("f", "Traceback ...", raised)
    out = m.task_result(link, result(t, app_error=True, error=err))
    if retried:
        assert t.attempt == 1 and t.retries_left == 1 and not of(out, Finish)
        assert t.state == SUBMITTED_TO_WORKER and of(out, Push)[0].task is t  # same lease
    else:
        (fin,) = of(out, Finish)
        assert fin.task is t and t.state == FAILED and t.attempt == 0


def test_retry_exceptions_stop_when_retries_run_out():
    m = machine()
    t = task(retries=1, retry_exceptions=True)
    link, _ = running(m, t)
    err = RayTaskError("f", "tb", ValueError("x"))
    m.task_result(link, result(t, app_error=True, error=err))
    out = m.task_result(link, result(t, app_error=True, error=err))
    assert of(out, Finish) and t.state == FAILED and t.attempt == 1


# -- raylets -----------------------------------------------------------------------------------------
def test_raylet_lost_forgets_its_requests_and_asks_again_once_back():
    m = machine()
    t = task()
    (req,) = of(m.submit(t), RequestLease)
    assert m.raylet_lost(LOCAL_RAYLET) == []  # no request while it is away
    assert req.request_id not in m.requests
    (again,) = of(m.raylet_restored(), RequestLease)
    assert again.request_id != req.request_id


def test_raylet_gone_fails_queued_and_later_tasks():
    m = machine()
    t = task()
    m.submit(t)
    err = RuntimeError("the raylet died")
    (fail,) = of(m.raylet_gone(err), Fail)
    assert fail.tasks == [t] and fail.error is err
    later = task()
    assert of(m.submit(later), Fail)[0].error is err


def test_spillbacks_to_a_raylet_that_went_away_are_asked_locally_again_later():
    m = machine()
    t = task()
    (req,) = of(m.submit(t), RequestLease)
    (there,) = of(m.lease_spilled(req.request_id, REMOTE), RequestLease)
    assert there.raylet == REMOTE
    out = m.raylet_lost(REMOTE)  # its stream broke: the request goes back to the local one
    (local,) = of(out, RequestLease)
    assert local.raylet == LOCAL_RAYLET and m.raylet_is_dead(REMOTE)
    out = m.lease_spilled(local.request_id, REMOTE)  # the local raylet still names it
    (arm,) = of(out, ArmRetry)
    assert not of(out, RequestLease) and 0 < arm.delay <= 0.2
    (again,) = of(m.retry_held(arm.key), RequestLease)
    assert again.raylet == LOCAL_RAYLET
    m.clock.now += 5  # past the backoff: the dead raylet is probed once
    (probe,) = of(m.lease_spilled(again.request_id, REMOTE), RequestLease)
    assert probe.raylet == REMOTE
    out = m.lease_granted(REMOTE, probe.request_id, 3, W2, "127.0.0.3:9")  # it is back
    assert of(out, Push) and not m.raylet_is_dead(REMOTE)


# -- max_calls: the worker says it exits (TaskResult.worker_exiting) ------------------------------
def test_a_worker_that_reached_max_calls_gives_its_lease_back_and_its_other_tasks_go_elsewhere():
    m = machine(PIPELINE_DEPTH=4)
    first = task(retries=0)
    link, _ = running(m, first)
    m.task_result(link, result(first, exec_seconds=0.0001))  # short: may be pipelined
    later = [task(retries=0) for _ in range(3)]
    out = []
    for t in later:
        out += m.submit(t)
    m.lease_queued(of(out, RequestLease)[0].request_id)  # the node is saturated: pipelined
    assert len(link.inflight) == 3
    last = result(later[0])
    last.worker_exiting = True
    out = m.task_result(link, last)
    assert later[0].state == FINISHED
    (ret,) = of(out, ReturnLease)
    assert ret.worker_exiting and not ret.kill_worker and ret.lease_id == 7
    assert not of(out, Push) and not link.inflight  # nothing more goes to that worker
    for t in later[1:]:  # sent after the last one: never run there, no retry spent
        assert t.state == PENDING_NODE_ASSIGNMENT and t.retries_left == 0 and t.attempt == 0
    assert of(out, RequestLease)
    assert m.worker_lost(link, "its stream ended") == []  # the exit is no crash


# -- arguments -----------------------------------------------------------------------------------
def test_dependency_error_fails_the_task_without_running_it():
    m = machine()
    t = task(slots=1)
    m.submit(t)
    err = Value(b"error-bytes", is_error=True)
    out = m.arg_ready(t, 0, err.to_proto(b"a"))
    (fail,) = of(out, Fail)
    assert fail.tasks == [t] and fail.error.data == b"error-bytes"
    assert not of(out, RequestLease)
