"""The owner's state machine for lineage (runtime/core_worker/owner_lineage.py): what is
kept and pinned, what is freed, and lost objects rebuilt from it or failed with the
reason. Without sockets or processes: stimuli in, actions out, as tests/test_scheduler.py
tests the raylet's."""
from __future__ import annotations

import pytest

from runtime.core_worker.owner_actions import (ArgumentLost, FailObjects, Finish, FreeLineage,
                                               PinLineage, Push, RequestLease, ResolveArgs,
                                               Resubmit)
from runtime.core_worker.owner_records import (FAILED, FINISHED, PENDING_ARGS_AVAIL,
                                               PENDING_NODE_ASSIGNMENT, SUBMITTED_TO_WORKER)
from runtime.core_worker.owner_state import OwnerState
from runtime.exceptions import (ObjectLostError, ObjectReconstructionFailedError,
                                ObjectReconstructionFailedLineageEvictedError,
                                ObjectReconstructionFailedMaxAttemptsExceededError, RayTaskError)

from helpers.owner_machine import (W1, W2, Clock, finished, in_store, machine, of, pushed, result,
                                   running, task, with_args)


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


# -- lost objects: rebuilt from lineage, or failed with the reason ----------------------------------


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
