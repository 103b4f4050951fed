"""The owner's state machine: cancellation of a task or an actor call in each state
(runtime/core_worker/owner_state.py). Without sockets or processes: stimuli in, actions
out, as tests/test_scheduler.py tests the raylet's."""
from __future__ import annotations

import pytest

from runtime.core_worker.owner_actions import (CancelRemote, Fail, Finish, Push, RequestLease,
                                               ResolveArgs, ReturnLease, WorkerDied)
from runtime.core_worker.owner_records import FAILED, PENDING_ARGS_AVAIL
from runtime.core_worker.owner_tasks import LOCAL_RAYLET
from runtime.exceptions import TaskCancelledError
from runtime.protocol import common_pb2

from helpers.owner_machine import ACTOR, KEY, W1, machine, of, result, running, task


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
