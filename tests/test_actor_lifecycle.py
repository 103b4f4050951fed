"""An actor's lifecycle in the GCS (runtime/gcs/actor_lifecycle.py), without sockets or
processes: every transition of the table, and what each asks the manager to do."""
from __future__ import annotations

import pytest

from runtime.gcs.actor_lifecycle import (ALIVE, DEAD, PENDING_CREATION, RESTARTING,
                                         TRANSITIONS, ActorLifecycle, CancelRequest, Event,
                                         Place, Publish, PushCreation, ReleaseName, ReturnLease)


def kinds(actions):
    return [type(a) for a in actions]


def alive(max_restarts: int = 0) -> ActorLifecycle:
    life = ActorLifecycle(max_restarts)
    assert kinds(life.registered()) == [Place]
    life.lease_requested()
    assert kinds(life.lease_granted()) == [PushCreation]
    assert kinds(life.created()) == [Publish]
    assert life.state == ALIVE
    return life


def test_created_actor_is_alive():
    life = alive()
    assert life.state_name == "ALIVE" and life.leased and not life.requesting


def test_worker_death_restarts_within_the_budget_then_it_is_dead():
    life = alive(max_restarts=2)
    for n in (1, 2):
        out = life.worker_died(pid=100 + n, error="UNAVAILABLE")
        assert kinds(out) == [Publish, Event, Place]
        assert life.state == RESTARTING and life.num_restarts == n
        assert out[1].state == "restarting" and f"restart {n}/2" in out[1].message
        assert f"pid {100 + n}" in out[1].message and out[1].severity == "WARNING"
        life.lease_requested()
        life.lease_granted()
        life.created()
        assert life.state == ALIVE
    out = life.worker_died(pid=103, error="EOF")
    assert life.state == DEAD and ReleaseName() in out
    assert life.death_cause == ("its worker process (pid 103) died (EOF); no restarts left "
                                "(max_restarts=2)")
    assert [a for a in out if isinstance(a, Event)][0].severity == "WARNING"


def test_infinite_restarts():
    life = alive(max_restarts=-1)
    for _ in range(20):
        assert Place() in life.worker_died(1, "x")
        life.lease_granted()
        life.created()
    assert life.state == ALIVE and life.num_restarts == 20


def test_death_while_restarting_counts_against_the_budget():
    life = alive(max_restarts=1)
    life.worker_died(1, "x")
    life.lease_requested()
    life.lease_granted()
    out = life.worker_died(2, "y")  # the restarted worker died before its constructor ended
    assert life.state == DEAD and "no restarts left" in life.death_cause
    assert ReturnLease() not in out  # the lease went with the worker


def test_kill_without_restart_is_dead_at_once_and_kills_the_worker():
    life = alive(max_restarts=5)
    out = life.kill_requested(no_restart=True, reason="it was killed by kill()")
    assert life.state == DEAD and life.death_cause == "it was killed by kill()"
    assert {type(a) for a in out} == {ReleaseName, Publish, Event, ReturnLease}
    assert [a for a in out if isinstance(a, Event)][0].severity == "INFO"
    assert life.worker_died(1, "killed") == []  # the stream breaking changes nothing now
    assert life.kill_requested(True, "again") == []


def test_kill_while_the_lease_is_requested_cancels_the_request():
    life = ActorLifecycle(max_restarts=3)
    life.registered()
    life.lease_requested()
    out = life.kill_requested(no_restart=True, reason="its owner exited")
    assert CancelRequest() in out and ReturnLease() not in out and life.state == DEAD
    assert life.lease_granted() == [ReturnLease()]  # a grant that crossed the cancel goes back
    assert life.created() == [] and life.state == DEAD


def test_kill_with_restart_kills_the_worker_and_restarts_it():
    life = alive(max_restarts=1)
    assert life.kill_requested(no_restart=False, reason="kill(no_restart=False)") == [
        ReturnLease()]
    assert life.state == ALIVE  # until its worker's stream breaks
    out = life.worker_died(pid=9, error="killed")
    assert life.state == RESTARTING and Place() in out
    assert "it was killed (kill(no_restart=False))" in out[1].message


def test_kill_with_restart_and_no_budget_left_is_death():
    life = alive(max_restarts=0)
    life.kill_requested(no_restart=False, reason="kill(no_restart=False)")
    life.worker_died(pid=9, error="killed")
    assert life.state == DEAD
    assert life.death_cause == "it was killed (kill(no_restart=False)); no restarts left " \
                               "(max_restarts=0)"


def test_constructor_error_is_death_with_the_error_and_the_worker_goes():
    life = ActorLifecycle(max_restarts=3)
    life.registered()
    life.lease_granted()
    out = life.constructor_failed("Counter", b"pickled error")
    assert life.state == DEAD and life.death_error == b"pickled error"
    assert life.death_cause == "its constructor (Counter.__init__) raised an exception"
    assert ReturnLease() in out  # never restarted, whatever max_restarts says


def test_exit_actor_is_intentional_death_without_restart():
    life = alive(max_restarts=3)
    out = life.exited("the actor exited intentionally (exit_actor())")
    assert life.state == DEAD and ReturnLease() not in out  # its process exits by itself
    assert [a for a in out if isinstance(a, Event)][0].severity == "INFO"
    assert life.worker_died(1, "EOF") == [] and life.num_restarts == 0


def test_unschedulable_and_internal_errors_are_death():
    life = ActorLifecycle()
    life.registered()
    life.unschedulable("no node has {GPU: 1}")
    assert life.state == DEAD and life.death_cause == "cannot be scheduled: no node has {GPU: 1}"
    other = ActorLifecycle()
    other.registered()
    other.internal_error()
    assert other.state == DEAD and "internal error" in other.death_cause


@pytest.mark.parametrize("state", [PENDING_CREATION, ALIVE, RESTARTING, DEAD])
def test_stimuli_outside_the_table_change_nothing(state):
    life = ActorLifecycle(max_restarts=1)
    life.state = state
    before = (life.state, life.num_restarts, life.death_cause)
    if (state, "created") not in TRANSITIONS:
        assert life.created() == []
    if (state, "exited") not in TRANSITIONS:
        assert life.exited("x") == []
    if (state, "constructor_failed") not in TRANSITIONS:
        assert life.constructor_failed("C", b"e") == []
    if (state, "unschedulable") not in TRANSITIONS:
        assert life.unschedulable("x") == []
    assert (life.state, life.num_restarts, life.death_cause) == before


def test_dead_is_terminal():
    assert not [key for key in TRANSITIONS if key[0] == DEAD]


# -- node death and GCS restarts (issue 12) ------------------------------------------------------
def test_node_death_restarts_an_alive_actor_within_its_budget_without_returning_the_lease():
    life = alive(max_restarts=1)
    out = life.node_died("1a2b3c4d", "its raylet refuses connections", pid=77)
    assert life.state == RESTARTING and life.num_restarts == 1
    assert kinds(out) == [Publish, Event, Place]
    assert ReturnLease() not in out and not life.leased  # the lease died with the node
    assert "its node 1a2b3c4d (worker pid 77) died: its raylet refuses connections" in \
        out[1].message and "restart 1/1" in out[1].message
    life.lease_requested()
    life.lease_granted()
    life.created()
    out = life.node_died("5e6f7a8b", "no resource report for 10s")
    assert life.state == DEAD and ReleaseName() in out
    assert life.death_cause == ("its node 5e6f7a8b died: no resource report for 10s; no "
                                "restarts left (max_restarts=1)")


def test_node_death_during_creation_places_it_again_without_counting_a_restart():
    life = ActorLifecycle(max_restarts=0)
    life.registered()
    life.lease_requested()
    life.lease_granted()  # the creation task is out on that node
    out = life.node_died("1a2b3c4d", "gone")
    assert life.state == PENDING_CREATION and life.num_restarts == 0
    assert Place() in out and ReturnLease() not in out and not life.leased


def test_node_death_after_a_kill_is_the_kill():
    life = alive(max_restarts=3)
    life.kill_requested(no_restart=False, reason="kill(no_restart=False)")
    assert life.node_died("1a2b3c4d", "gone")[0] == Publish()
    assert life.state == RESTARTING  # a kill that allows restarts restarts
    dead = alive(max_restarts=3)
    dead.kill_requested(no_restart=True, reason="its owner exited")
    assert dead.node_died("1a2b3c4d", "gone") == [] and dead.death_cause == "its owner exited"


def test_restored_actors_resume_where_the_old_gcs_left_them():
    life, out = ActorLifecycle.restored(ALIVE, max_restarts=2, num_restarts=1)
    assert out == [] and life.state == ALIVE and life.leased and life.num_restarts == 1
    assert kinds(life.reattached()) == [Event] and life.state == ALIVE
    # Its raylet no longer holds the lease: the worker died while the GCS was down.
    out = life.worker_lost_while_down(pid=55)
    assert life.state == RESTARTING and life.num_restarts == 2 and Place() in out
    assert "(pid 55) died (it exited while the GCS was down)" in out[1].message
    for state in (PENDING_CREATION, RESTARTING):
        life, out = ActorLifecycle.restored(state, max_restarts=0, num_restarts=0)
        assert out == [Place()] and life.state == state and not life.leased
    life, out = ActorLifecycle.restored(DEAD, 0, 0, "killed", b"err")
    assert out == [] and life.death_cause == "killed" and life.death_error == b"err"
    assert life.reattached() == [] and life.node_died("x", "y") == []


# -- the memory monitor ------------------------------------------------------------------------
OOM_TEXT = ("Task was killed due to the node running low on memory.\nMemory on the node (IP: "
            "127.0.0.1, ID: abc) where the actor (name=A, pid=7) was running was 9.70GB / "
            "10.00GB (0.97), which exceeds the memory usage threshold of 0.95.")


def test_memory_killed_actor_without_restarts_is_dead_with_the_monitors_text():
    life = alive(max_restarts=0)
    out = life.memory_killed(OOM_TEXT)
    assert kinds(out) == [Event] and out[0].state == "oom_killed"
    assert out[0].severity == "WARNING" and "running low on memory" in out[0].message
    assert life.state == ALIVE  # until its worker's stream breaks
    out = life.worker_died(pid=7, error="EOF")
    assert life.state == DEAD and ReleaseName() in out
    assert life.death_cause.startswith("its worker process (pid 7) was killed by the memory "
                                       "monitor because the node ran low on memory; no "
                                       "restarts left (max_restarts=0).\n")
    assert life.death_cause.endswith(OOM_TEXT)


def test_memory_killed_actor_restarts_within_its_budget_and_the_next_death_is_plain():
    life = alive(max_restarts=1)
    life.memory_killed(OOM_TEXT)
    out = life.worker_died(pid=7, error="EOF")
    assert kinds(out) == [Publish, Event, Place] and life.state == RESTARTING
    assert "killed by the memory monitor" in out[1].message and "restart 1/1" in out[1].message
    life.lease_requested()
    life.lease_granted()
    life.created()
    life.worker_died(pid=8, error="EOF")  # no notice this time: an ordinary death
    assert life.state == DEAD and "memory" not in life.death_cause
    assert life.death_cause.startswith("its worker process (pid 8) died (EOF)")


def test_memory_kill_notice_for_a_dead_actor_changes_nothing():
    life = alive()
    life.kill_requested(no_restart=True, reason="killed by kill()")
    assert life.memory_killed(OOM_TEXT) == [] and life.memory_kill == ""


def test_memory_kill_then_node_death_is_the_nodes_death():
    life = alive(max_restarts=0)
    life.memory_killed(OOM_TEXT)
    life.node_died("n1", "its raylet stopped")
    assert life.state == DEAD and "memory" not in life.death_cause
