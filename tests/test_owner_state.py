"""The owner's state machine (runtime/core_worker/owner_state.py), without sockets or
processes: stimuli in, actions out, as tests/test_scheduler.py tests the raylet's."""
from __future__ import annotations

import asyncio
import os
import signal
import types
from pathlib import Path
from typing import List

import psutil
import pytest

import runtime as ray

from runtime.core_worker.memory_store import Value
from runtime.core_worker.owner_state import (ACTOR_ALIVE, ACTOR_DEAD, ACTOR_RESTARTING,
                                             FAILED, FINISHED, HANDSHAKE_ATTEMPTS, LOCAL_RAYLET,
                                             PENDING_ARGS_AVAIL, PENDING_NODE_ASSIGNMENT,
                                             SUBMITTED_TO_WORKER, ArgumentLost, ArmIdleTimer,
                                             ArmRetry, CancelLeaseRequest, CancelRemote,
                                             CloseLink, Connect, Fail, FailObjects, Finish,
                                             FreeLineage, OwnerState, PendingTask, PinLineage,
                                             Push, RequestLease, ResolveArgs, Resubmit,
                                             RetryLater, ReturnLease, WatchActor, WorkerDied,
                                             WorkerLink, Warn)
from runtime.exceptions import (ActorDiedError, ActorUnavailableError, ObjectLostError,
                                ObjectReconstructionFailedError,
                                ObjectReconstructionFailedLineageEvictedError,
                                ObjectReconstructionFailedMaxAttemptsExceededError,
                                OutOfMemoryError, RayActorError, RayTaskError, TaskCancelledError,
                                TaskPlacementGroupRemoved, TaskUnschedulableError)
from runtime.protocol import common_pb2
from runtime.serialization import serialize_error
from runtime.util.state import get_actor as state_get_actor

from conftest import wait_for
from helpers.gates import await_path

KEY = ("f", (("CPU", 1.0),), b"")
W1, W2 = b"\x01" * 28, b"\x02" * 28
ACTOR = b"\xaa" * 16


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def machine(**settings) -> OwnerState:
    knobs = types.SimpleNamespace(LEASE_IDLE_RETURN_S=0.2, PIPELINE_DEPTH=16,
                                  PIPELINE_MAX_TASK_SECONDS=0.002, TASK_OOM_RETRIES=-1)
    for k, v in settings.items():
        setattr(knobs, k, v)
    return OwnerState(clock=Clock(), settings=knobs)


_next = [0]


def task(retries: int = 3, num_returns: int = 1, slots: int = 0, retry_exceptions=False,
         key=KEY, actor: bytes = b"") -> PendingTask:
    _next[0] += 1
    t = PendingTask()
    t.task_id = _next[0].to_bytes(4, "big") * 6
    t.name = "f"
    t.function_id = b"fn"
    t.key = key
    t.resources = {"CPU": 1.0}
    t.strategy = common_pb2.SchedulingStrategy(kind="DEFAULT")
    t.return_ids = [t.task_id + bytes([i + 1]) for i in range(num_returns)]
    t.retries_left = retries
    t.retry_exceptions = retry_exceptions
    t.args = b"args"
    t.slot_refs = [object()] * slots or None
    t.actor_id = actor
    return t


def of(actions: List, kind) -> List:
    return [a for a in actions if isinstance(a, kind)]


def grant(m: OwnerState, actions, worker=W1, lease_id=7, raylet=LOCAL_RAYLET):
    (req,) = of(actions, RequestLease)[:1]
    return m.lease_granted(raylet, req.request_id, lease_id, worker, "127.0.0.1:9",
                           b"node", 42, [])


def result(t: PendingTask, app_error: bool = False, error: BaseException = None,
           exec_seconds: float = 0.5, cancelled: bool = False) -> common_pb2.TaskResult:
    r = common_pb2.TaskResult(task_id=t.task_id, app_error=app_error, exec_seconds=exec_seconds,
                              cancelled=cancelled)
    data = serialize_error(error).to_bytes() if error is not None else b"ok"
    for oid in t.return_ids:
        r.returns.add(object_id=oid, inline_data=data, is_error=app_error)
    return r


def running(m: OwnerState, t: PendingTask, **kw):
    """Submit t and have its lease granted: (link, actions of the grant)."""
    out = m.submit(t)
    actions = grant(m, out, **kw)
    (push,) = of(actions, Push)
    return push.link, actions


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


# -- cancellation in each state --------------------------------------------------------------------
def test_cancel_while_waiting_for_arguments():
    m = machine()
    t = task(slots=1)
    (resolve,) = of(m.submit(t), ResolveArgs)
    assert t.state == PENDING_ARGS_AVAIL and t.waiting == 1
    found, out = m.cancel(t.task_id, force=False)
    assert found and isinstance(of(out, Fail)[0].error, TaskCancelledError)
    loc = common_pb2.ObjectLocation(object_id=b"a", inline_data=b"v")
    assert m.arg_ready(t, 0, loc) == []  # the late value changes nothing


def test_cancel_while_queued_for_a_lease():
    m = machine()
    t = task()
    (req,) = of(m.submit(t), RequestLease)
    found, out = m.cancel(t.task_id, force=False)
    assert found and of(out, Fail)[0].tasks == [t]
    assert not m.keys[KEY].queue
    (ret,) = m.lease_granted(LOCAL_RAYLET, req.request_id, 3, W1, "x:1")[:1]
    assert not m.tasks


def test_cancel_of_a_running_task_is_sent_to_its_worker():
    m = machine()
    t = task()
    link, _ = running(m, t)
    found, out = m.cancel(t.task_id, force=False, recursive=True)
    (remote,) = out
    assert isinstance(remote, CancelRemote) and remote.recursive and not remote.force
    assert remote.address == link.control_address
    # The worker answers with a cancelled result: final, not retried.
    out = m.task_result(link, result(t, app_error=True, cancelled=True,
                                     error=TaskCancelledError(t.task_id.hex())))
    assert of(out, Finish) and t.state == FAILED


def test_force_cancel_kills_the_worker_and_no_task_goes_there_again():
    m = machine()
    t = task()
    link, _ = running(m, t)
    found, out = m.cancel(t.task_id, force=True)
    (ret,) = out
    assert isinstance(ret, ReturnLease) and ret.kill_worker
    t2 = task()
    out = m.submit(t2)
    assert not of(out, Push) and of(out, RequestLease)  # not onto the dying worker
    out = m.worker_lost(link, "killed")
    (fail,) = of(out, Fail)
    assert fail.tasks == [t] and isinstance(fail.error, TaskCancelledError)


def test_cancel_after_its_worker_died_fails_it_as_cancelled():
    m = machine()
    t = task(retries=0)
    link, _ = running(m, t)
    (died,) = of(m.worker_lost(link, "EOF"), WorkerDied)
    found, out = m.cancel(t.task_id, force=False)
    assert found and out == []  # nothing to send to a dead worker
    (fail,) = m.fail_tasks(died.tasks, RuntimeError("crash"))
    assert isinstance(fail.error, TaskCancelledError)


def test_cancel_of_a_finished_task_finds_nothing():
    m = machine()
    t = task()
    link, _ = running(m, t)
    m.task_result(link, result(t))
    assert m.cancel(t.task_id, force=False) == (False, [])


def test_recursive_cancel_cancels_the_children_this_process_owns():
    m = machine()
    parent = b"p" * 24
    child, other = task(), task()
    child.parent_task_id = parent
    m.submit(child)
    m.submit(other)
    out = m.cancel_children(parent, force=False)
    assert of(out, Fail)[0].tasks == [child] and other.task_id in m.tasks


def test_force_cancel_of_an_actor_call_is_refused():
    m = machine()
    t = task(actor=ACTOR)
    m.submit_call(t)
    with pytest.raises(ValueError, match="force=True is not supported for actor calls"):
        m.cancel(t.task_id, force=True)


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


# -- lineage ----------------------------------------------------------------------------------------
def test_lineage_is_kept_while_a_return_is_referenced_and_freed_with_the_last():
    m = machine()
    t = task(num_returns=2)
    link, _ = running(m, t)
    m.task_result(link, result(t))
    assert m.lineage_done == {t.task_id: t} and m.lineage_bytes > 0
    assert m.references_released([t.return_ids[0]]) == []
    (free,) = m.references_released([t.return_ids[1]])
    assert isinstance(free, FreeLineage) and free.task is t
    assert not m.lineage and not m.lineage_done and m.lineage_bytes == 0


def test_no_lineage_for_tasks_that_cannot_be_retried_or_that_failed():
    m = machine()
    t0 = task(retries=0)
    link, _ = running(m, t0)
    m.task_result(link, result(t0))
    failed = task(retries=1)
    m.submit(failed)
    m.task_result(link, result(failed, app_error=True, error=ValueError("x")))
    assert failed.state == FAILED
    released_first = task()
    (push,) = of(m.submit(released_first), Push)
    assert m.references_released(released_first.return_ids) == []  # before it finished
    m.task_result(push.link, result(released_first))
    assert not m.lineage and not m.lineage_done


def test_lineage_beyond_its_budget_drops_the_oldest():
    m = OwnerState(clock=Clock(), lineage_max_bytes=700)
    tasks = [task() for _ in range(3)]
    link, _ = running(m, tasks[0])
    out = m.task_result(link, result(tasks[0]))
    for t in tasks[1:]:
        m.submit(t)
        out = m.task_result(link, result(t))
    assert of(out, FreeLineage)[0].task is tasks[0]
    assert list(m.lineage_done) == [t.task_id for t in tasks[1:]]


# -- actor calls ------------------------------------------------------------------------------------
def alive(m: OwnerState, version: int = 1, worker: bytes = W1, task_port: int = 0):
    address = common_pb2.Address(ip="127.0.0.1", port=5000 + version, worker_id=worker,
                                 node_id=b"node", task_port=task_port)
    return m.actor_reported(ACTOR, version, ACTOR_ALIVE, address, pid=100 + version)


def test_actor_calls_wait_for_the_actor_then_go_in_order():
    m = machine()
    calls = [task(actor=ACTOR) for _ in range(3)]
    out = m.submit_call(calls[0])
    (watch,) = of(out, WatchActor)
    for c in calls[1:]:
        assert not of(m.submit_call(c), WatchActor)  # one watch at a time
    out = alive(m)
    (conn,) = of(out, Connect)
    assert [p.task for p in of(out, Push)] == calls
    assert [c.seq for c in calls] == [1, 2, 3]
    assert conn.link.control_address == "127.0.0.1:5001" and not watch.actor.watching


def test_actor_call_waits_for_its_arguments_and_keeps_later_calls_behind_it():
    m = machine()
    first = task(actor=ACTOR, slots=1)
    second = task(actor=ACTOR)
    m.submit_call(first)
    alive_out = alive(m)
    assert not of(alive_out, Push)
    assert not of(m.submit_call(second), Push)  # behind `first`, which waits for a value
    loc = common_pb2.ObjectLocation(object_id=b"a", inline_data=b"v")
    out = m.arg_ready(first, 0, loc)
    assert [p.task for p in of(out, Push)] == [first, second]


def test_actor_restart_resends_calls_in_flight_that_have_retries():
    m = machine()
    keep, lose = task(actor=ACTOR, retries=1), task(actor=ACTOR, retries=0)
    m.submit_call(keep)
    m.submit_call(lose)
    link = of(alive(m), Connect)[0].link
    out = m.worker_lost(link, "stream broke")
    (watch,) = of(out, WatchActor)
    assert m.actors[ACTOR].limbo == [keep, lose]
    assert m.actor_reported(ACTOR, 2, ACTOR_RESTARTING) == []
    out = alive(m, version=3, worker=W2)
    (push,) = of(out, Push)
    assert push.task is keep and keep.attempt == 1 and push.link.worker_id == W2
    (fail,) = of(out, Fail)
    assert fail.tasks == [lose] and isinstance(fail.error, RayActorError)
    assert "no retries left" in str(fail.error)


def test_alive_at_the_address_whose_link_broke_is_asked_again_before_anything_is_resent():
    """The caller's link and the GCS's stream to the worker break about together; a
    watch may still find the dead worker alive. Nothing is resent on that answer: the
    next one (DEAD here) decides."""
    m = machine()
    lose = task(actor=ACTOR, retries=0)
    m.submit_call(lose)
    link = of(alive(m), Connect)[0].link
    (watch,) = of(m.worker_lost(link, "stream broke"), WatchActor)
    out = alive(m, version=2)  # the same worker, still alive as far as the GCS knows
    assert out == [] and watch.actor.watching and watch.actor.recheck_alive
    assert m.actors[ACTOR].limbo == [lose] and lose.state == SUBMITTED_TO_WORKER
    death = ActorDiedError("The actor is dead: killed by the memory monitor",
                           actor_id=ACTOR.hex())
    (fail,) = of(m.actor_reported(ACTOR, 3, ACTOR_DEAD, death=death), Fail)
    assert fail.tasks == [lose] and fail.error is death


def test_alive_twice_at_the_same_address_means_only_the_link_failed():
    m = machine()
    keep = task(actor=ACTOR, retries=1)
    m.submit_call(keep)
    link = of(alive(m), Connect)[0].link
    m.worker_lost(link, "stream broke")
    assert alive(m, version=2) == []
    out = alive(m, version=2)  # no news after the recheck: the worker lives
    (conn,) = of(out, Connect)
    assert of(out, Push)[0].task is keep and conn.link.worker_id == W1
    assert not m.actors[ACTOR].recheck_alive and not m.actors[ACTOR].watching


def test_actor_dead_fails_queued_and_in_flight_calls_and_later_ones():
    m = machine()
    sent, queued = task(actor=ACTOR), task(actor=ACTOR, slots=1)
    m.submit_call(sent)
    link = of(alive(m), Connect)[0].link
    m.submit_call(queued)
    m.worker_lost(link, "gone")
    death = ActorDiedError("The actor is dead: killed", actor_id=ACTOR.hex())
    out = m.actor_reported(ACTOR, 2, ACTOR_DEAD, death=death)
    (fail,) = of(out, Fail)
    assert fail.tasks == [sent, queued] and fail.error is death
    later = task(actor=ACTOR)
    assert of(m.submit_call(later), Fail)[0].error is death


def test_cancel_of_a_call_in_flight_when_its_actor_died_is_never_resent():
    m = machine()
    c = task(actor=ACTOR, retries=3)
    m.submit_call(c)
    link = of(alive(m), Connect)[0].link
    m.worker_lost(link, "stream broke")
    found, out = m.cancel(c.task_id, force=False)
    (fail,) = of(out, Fail)
    assert found and isinstance(fail.error, TaskCancelledError)
    out = alive(m, version=2, worker=W2)
    assert not of(out, Push)  # the restarted actor never runs it


def test_cancel_of_a_queued_call_lets_the_next_one_go():
    m = machine()
    first, second = task(actor=ACTOR, slots=1), task(actor=ACTOR)
    m.submit_call(first)
    m.submit_call(second)
    alive(m)
    found, out = m.cancel(first.task_id, force=False)
    assert of(out, Fail)[0].tasks == [first]
    assert [p.task for p in of(out, Push)] == [second]


def test_call_port_handshake_failures_redial_then_recheck_then_fail_unavailable():
    m = machine()
    c = task(actor=ACTOR)
    m.submit_call(c)
    link = of(alive(m, task_port=7000), Connect)[0].link
    assert link.call_port and link.address == "127.0.0.1:7000"
    for _ in range(1, HANDSHAKE_ATTEMPTS):
        out = m.worker_lost(link, "refused", handshake_error="hello timed out")
        (conn,) = of(out, Connect)  # dial the same port again, the call resent untouched
        assert of(out, Push)[0].task is c and c.attempt == 0
        link = conn.link
    out = m.worker_lost(link, "refused", handshake_error="hello timed out")
    (watch,) = of(out, WatchActor)
    assert watch.actor.watch_handshake_error == "hello timed out"
    out = alive(m, task_port=7000)  # the same version: alive where it was, no news
    (fail,) = of(out, Fail)
    assert isinstance(fail.error, ActorUnavailableError) and not of(out, Connect)
    later = task(actor=ACTOR)
    assert of(m.submit_call(later), Connect)  # the next call dials again


def test_kill_fails_calls_at_once_and_closes_the_link():
    m = machine()
    c = task(actor=ACTOR)
    m.submit_call(c)
    alive(m)
    err = ActorDiedError("killed", actor_id=ACTOR.hex())
    out = m.actor_killed(ACTOR, err)
    assert of(out, CloseLink) and of(out, Fail)[0].tasks == [c]


def test_actor_call_results_finish_the_call():
    m = machine()
    c = task(actor=ACTOR)
    m.submit_call(c)
    link = of(alive(m), Connect)[0].link
    out = m.task_result(link, result(c))
    assert of(out, Finish)[0].task is c and c.state == FINISHED
    assert not m.lineage  # actor calls keep no lineage


def test_dependency_error_fails_the_task_without_running_it():
    m = machine()
    t = task(slots=1)
    m.submit(t)
    err = Value(b"error-bytes", is_error=True)
    out = m.arg_ready(t, 0, err.to_proto(b"a"))
    (fail,) = of(out, Fail)
    assert fail.tasks == [t] and fail.error.data == b"error-bytes"
    assert not of(out, RequestLease)


# -- the same path end to end: a cancel while the actor restarts ----------------------------------
@ray.remote(max_restarts=1, max_task_retries=1, num_cpus=0)
class SlowToRestart:
    """An async actor whose restart waits for `<dir>/restart`; work() records each run."""

    def __init__(self, directory: str):
        created = Path(directory, "created")
        if created.exists():
            await_path(os.path.join(directory, "restart"), 60)
        created.touch()

    async def work(self, directory: str):
        Path(directory, f"ran-{os.getpid()}").touch()
        await asyncio.sleep(60)

    def pid(self):
        return os.getpid()


def test_cancel_of_an_async_call_while_its_actor_restarts_is_not_run_again(actors, tmp_path):
    """The call was in flight when the actor's process died: cancel() must fail it at once,
    and the restarted actor must never run it (it has a retry left, so it used to be
    sent again: the cancel reported success and did nothing)."""
    a = SlowToRestart.remote(str(tmp_path))
    actors.append(a)
    pid1 = ray.get(a.pid.remote(), timeout=60)
    ref = a.work.remote(str(tmp_path))
    wait_for((tmp_path / f"ran-{pid1}").exists, 30, message="the call to start")
    os.kill(pid1, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(pid1) or
             psutil.Process(pid1).status() == psutil.STATUS_ZOMBIE, 30,
             message="the actor's process to die")
    wait_for(lambda: state_get_actor(a._actor_id.hex())["state"] == "RESTARTING", 30,
             message="the actor to be restarting")
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    (tmp_path / "restart").touch()
    pid2 = ray.get(a.pid.remote(), timeout=60)
    assert pid2 != pid1
    assert not (tmp_path / f"ran-{pid2}").exists(), "the cancelled call ran on the restarted actor"


# -- lost objects: rebuilt from lineage, or failed with the reason ----------------------------------
REMOTE = "127.0.0.3:6381"


def pushed(m: OwnerState, t: PendingTask, out, worker=W1, lease_id=7) -> WorkerLink:
    """Where t went: on a lease the actions reuse, or on one granted now."""
    for _ in range(2):
        for push in of(out, Push):
            if push.task is t:
                return push.link
        out = grant(m, out, worker=worker, lease_id=lease_id)
    raise AssertionError(f"{t.name} was not pushed")


def finished(m: OwnerState, t: PendingTask, worker=W1, lease_id=7):
    """Submit t (its slot arguments, if any, in the store of node 3), run it to the end:
    the actions of its result."""
    out = m.submit(t)
    for i in range(len(t.slot_refs or ())):
        out += m.arg_ready(t, i, in_store(t.arg_ids[i]))
    return m.task_result(pushed(m, t, out, worker, lease_id), result(t))


def in_store(oid: bytes, store: str = "127.0.0.3:6382") -> common_pb2.ObjectLocation:
    return common_pb2.ObjectLocation(object_id=oid, in_store=True, node_id=b"n3",
                                     store_address=store, size=10)


def with_args(t: PendingTask, *oids: bytes) -> PendingTask:
    t.slot_refs = [object()] * len(oids)
    t.arg_ids = list(oids)
    return t


def test_a_finished_task_is_kept_and_its_arguments_pinned_before_its_result_is_stored():
    m = machine()
    arg = b"a" * 28
    t = with_args(task(), arg)
    out = finished(m, t)
    pin, fin = of(out, PinLineage), of(out, Finish)
    assert pin[0].task is t and out.index(pin[0]) < out.index(fin[0])
    assert t.lineage_kept and m.lineage_done == {t.task_id: t}
    # A task with no ObjectRef argument has nothing to pin.
    assert not of(finished(m, task()), PinLineage)


def test_a_lost_object_runs_its_task_again_as_a_new_attempt():
    m = machine()
    t = task(retries=2)
    finished(m, t)
    m.worker_lost(t.link, "node 3 died")  # its worker went with the node
    out = m.object_lost(t.return_ids[0], "node 3 died")
    (again,) = of(out, Resubmit)
    assert again.task is t and of(out, RequestLease)
    assert t.attempt == 1 and t.retries_left == 1 and t.state == PENDING_NODE_ASSIGNMENT
    assert m.tasks[t.task_id] is t and t.task_id not in m.lineage_done
    assert m.lineage_bytes == 0
    # Lost again while it runs: once is enough.
    assert m.object_lost(t.return_ids[0], "node 3 died") == []
    out = m.task_result(pushed(m, t, out, W2, 8), result(t))
    assert of(out, Finish) and not of(out, PinLineage)  # pinned already
    assert t.state == FINISHED and m.lineage_done == {t.task_id: t}


def test_a_rebuilt_task_resolves_its_arguments_again_by_id_so_lost_ones_are_rebuilt_first():
    """b = g(a), both lost: b's re-run waits for a, whose loss (the shell finds its value
    gone) runs a's task again; b runs once a has a value."""
    m = machine()
    a = task()
    finished(m, a)
    b = with_args(task(), a.return_ids[0])
    finished(m, b, worker=W2, lease_id=8)
    out = m.object_lost(b.return_ids[0], "node 3 died")
    (resolve,) = of(out, ResolveArgs)
    assert resolve.task is b and b.slot_refs == [a.return_ids[0]]
    assert b.state == PENDING_ARGS_AVAIL and not of(out, RequestLease)
    out = m.object_lost(a.return_ids[0], "freed while only lineage kept it")
    assert of(out, Resubmit)[0].task is a and a.attempt == 1
    # a finishes again: b gets its argument and is queued.
    m.task_result(pushed(m, a, out, W1, 9), result(a))
    out = m.arg_ready(b, 0, in_store(a.return_ids[0], "127.0.0.1:6382"))
    assert b.state in (PENDING_NODE_ASSIGNMENT, SUBMITTED_TO_WORKER)


@pytest.mark.parametrize("case, reason, cls", [
    ("out of retries", "OBJECT_UNRECONSTRUCTABLE_MAX_ATTEMPTS_EXCEEDED",
     ObjectReconstructionFailedMaxAttemptsExceededError),
    ("max_retries=0", "OBJECT_UNRECONSTRUCTABLE_RETRIES_DISABLED", ObjectReconstructionFailedError),
    ("put", "OBJECT_UNRECONSTRUCTABLE_PUT", ObjectReconstructionFailedError),
    ("evicted", "OBJECT_UNRECONSTRUCTABLE_LINEAGE_EVICTED",
     ObjectReconstructionFailedLineageEvictedError),
])
def test_what_cannot_be_rebuilt_fails_with_the_reason_naming_object_and_place(case, reason, cls):
    m = OwnerState(clock=Clock(), lineage_max_bytes=300)
    if case == "put":
        oid = b"p" * 24 + b"\x00" * 4
    else:
        t = task(retries=0 if case == "max_retries=0" else 1)
        finished(m, t)
        oid = t.return_ids[0]
        if case == "out of retries":
            out = m.object_lost(oid, "first loss")
            m.task_result(pushed(m, t, out, W2, 8), result(t))
        elif case == "evicted":
            later = task()
            out = finished(m, later, worker=W2, lease_id=8)
            assert of(out, FreeLineage)[0].task is t
    out = m.object_lost(oid, "its copy in the object store of node 3 (127.0.0.3:6382) is gone")
    (fail,) = of(out, FailObjects)
    assert fail.oids == [oid] and type(fail.error) is cls and fail.error.reason == reason
    text = str(fail.error)
    assert oid.hex() in text and "127.0.0.3:6382" in text and reason in text
    assert isinstance(fail.error, ObjectLostError)


def test_lineage_of_a_rebuilt_task_that_fails_is_freed():
    m = machine()
    t = with_args(task(retries=1), b"a" * 28)
    finished(m, t)
    out = m.object_lost(t.return_ids[0], "node 3 died")
    for i in range(t.nslots):
        out += m.arg_ready(t, i, in_store(t.arg_ids[i], "127.0.0.1:6382"))
    out = m.task_result(pushed(m, t, out, W2, 8), result(t, app_error=True,
                                                           error=ValueError("bad")))
    assert of(out, FreeLineage)[0].task is t and not t.lineage_kept
    assert t.state == FAILED and t.return_ids[0] not in m.lineage


def test_a_task_whose_worker_could_not_fetch_an_argument_recovers_it_without_a_retry():
    m = machine()
    arg = b"a" * 28
    t = with_args(task(retries=1), arg)
    out = m.submit(t)
    out += m.arg_ready(t, 0, in_store(arg))
    link = pushed(m, t, out)
    lost = ObjectLostError(arg.hex(), f"Object {arg.hex()} cannot be fetched from node 3")
    wrapped = RayTaskError("f", "Traceback...", lost)
    out = m.task_result(link, result(t, app_error=True, error=wrapped))
    (gone,) = of(out, ArgumentLost)
    assert gone.oid == arg and gone.location.store_address == "127.0.0.3:6382"
    (resolve,) = of(out, ResolveArgs)
    assert out.index(gone) < out.index(resolve) and t.slot_refs == [arg]
    assert t.retries_left == 1 and t.state == PENDING_ARGS_AVAIL and not of(out, Finish)
    # Lost again and again: recovered ARGUMENT_LOSSES_MAX times in all, then it fails.
    for _ in range(2):
        m.arg_ready(t, 0, in_store(arg, "127.0.0.1:6382"))
        assert of(m.task_result(t.link, result(t, app_error=True, error=wrapped)), ArgumentLost)
    m.arg_ready(t, 0, in_store(arg, "127.0.0.1:6382"))
    out = m.task_result(t.link, result(t, app_error=True, error=wrapped))
    assert not of(out, ArgumentLost) and t.state == FAILED
    # An ObjectLostError about another object (the task's own get()) is the task's error.
    other = with_args(task(retries=1), arg)
    out = m.submit(other) + m.arg_ready(other, 0, in_store(arg))
    mine = RayTaskError("f", "Traceback...", ObjectLostError("b" * 56, "lost"))
    out = m.task_result(pushed(m, other, out), result(other, app_error=True, error=mine))
    assert not of(out, ArgumentLost) and other.state == FAILED


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


# -- generator tasks (stream items) -------------------------------------------------------------
def _item(t: PendingTask, index: int) -> common_pb2.TaskResult:
    r = common_pb2.TaskResult(task_id=t.task_id, stream_item=True, item_index=index)
    r.returns.add(object_id=t.task_id + bytes([index + 2]), inline_data=b"v")
    return r


def test_stream_items_go_to_the_stream_and_keep_the_task_in_flight():
    from runtime.core_worker.owner_state import StreamItem

    m = machine()
    t = task()
    t.generator = 1
    link, _ = running(m, t)
    out = m.task_result(link, _item(t, 0))
    (item,) = of(out, StreamItem)
    assert item.task is t and item.result.item_index == 0
    assert link.inflight == {t.task_id: t} and t.state == SUBMITTED_TO_WORKER
    out = m.task_result(link, result(t))
    assert of(out, Finish)[0].task is t and t.state == FINISHED
    # An item that comes after the final result still reaches the stream ...
    assert of(m.task_result(link, _item(t, 1)), StreamItem)[0].task is t
    # ... until the shell says every item is in.
    m.stream_closed(t.task_id)
    assert m.task_result(link, _item(t, 2)) == []


def test_stream_items_of_a_retried_generator_task_are_still_accepted():
    from runtime.core_worker.owner_state import StreamItem

    m = machine()
    t = task(retries=1)
    t.generator = 1
    link, _ = running(m, t)
    m.task_result(link, _item(t, 0))
    out = m.worker_lost(link, "killed")
    assert t.attempt == 1 and of(out, RequestLease)
    # The new attempt's items come on another link; the task is found by id.
    assert of(m.task_result(link, _item(t, 1)), StreamItem)[0].task is t


def test_plain_task_ignores_stray_stream_items():
    m = machine()
    t = task()
    link, _ = running(m, t)
    assert m.task_result(link, _item(t, 0)) == []
    assert link.inflight == {t.task_id: t}


class _Owner:
    """What GeneratorStream needs of its core worker, without a cluster."""

    def __init__(self) -> None:
        from runtime.core_worker.memory_store import MemoryStore
        from runtime.core_worker.reference_table import ReferenceTable

        self.address = ("127.0.0.1", 1, b"w" * 28)
        self.memory = MemoryStore()
        self.refs = ReferenceTable(self.address, lambda *a: None, lambda *a: None,
                                   lambda *a: None)


def test_generator_stream_dedups_retried_items_and_acks_consumption():
    from runtime.core_worker.generators import GeneratorStream

    owner = _Owner()
    s = GeneratorStream(b"t" * 24, backpressure=2)
    acks = []
    s.ack = acks.append
    assert s.add_item(0, Value(b"a"), owner)
    assert not s.add_item(0, Value(b"again"), owner)  # a retry re-sends item 0
    assert s.add_item(1, Value(b"b"), owner)
    assert s.next_ready()
    r0 = s.take(timeout=1)
    assert owner.memory.get(r0.binary()).data == b"a" and acks == [1]
    s.take(timeout=1)
    assert acks == [1, 2]
    with pytest.raises(TimeoutError):
        s.take(timeout=0.05)
    s.finish(2)
    assert s.complete() and s.take(timeout=1) is None and s.is_finished()


def test_generator_stream_failure_becomes_the_next_item():
    from runtime.core_worker.generators import GeneratorStream

    owner = _Owner()
    s = GeneratorStream(b"u" * 24)
    s.add_item(0, Value(b"a"), owner)
    s.fail(Value(b"err", is_error=True), owner)
    assert s.end == 2 and s.complete()
    s.take(timeout=1)
    err = s.take(timeout=1)
    assert owner.memory.get(err.binary()).is_error
    assert s.take(timeout=1) is None
