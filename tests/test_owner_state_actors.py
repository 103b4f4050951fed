"""The owner's state machine for actor calls (runtime/core_worker/owner_actors.py): queues,
links, restarts, deaths, call ports that refuse this caller. Without sockets or
processes: stimuli in, actions out, as tests/test_scheduler.py tests the raylet's; one
test takes the same path end to end, on a cluster."""
from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import psutil
import pytest

import runtime as ray

from runtime.core_worker.owner_actions import CloseLink, Connect, Fail, Finish, Push, WatchActor
from runtime.core_worker.owner_actors import HANDSHAKE_ATTEMPTS
from runtime.core_worker.owner_records import (ACTOR_ALIVE, ACTOR_DEAD, ACTOR_RESTARTING, FINISHED,
                                               SUBMITTED_TO_WORKER)
from runtime.core_worker.owner_state import OwnerState
from runtime.exceptions import (ActorDiedError, ActorUnavailableError, RayActorError,
                                TaskCancelledError)
from runtime.protocol import common_pb2
from runtime.util.state import get_actor as state_get_actor

from conftest import wait_for
from helpers.gates import await_path
from helpers.owner_machine import ACTOR, W1, W2, machine, of, result, task


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
