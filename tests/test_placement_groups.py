"""Placement groups: atomic bundle reservation, strategies, pending groups, scheduling
tasks and actors into bundles, child-task capture, removal, names and validation —
checked against Ray's documented behaviour.

The end-to-end tests share the module's private single-node 2-CPU ``cluster``. Every
group a test creates is removed when it ends (the ``groups`` fixture) and every actor
killed, so each test starts with both CPUs free (tests that count CPUs wait for that
first). The GCS's reservation state machine is tested without any process (sans-I/O),
one test per interleaving of replies and removal.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import psutil
import pytest

import runtime as ray
from runtime.exceptions import (ActorPlacementGroupRemoved, GetTimeoutError, RayError,
                                TaskPlacementGroupRemoved)
from runtime.gcs.pg_reservation import (Cancel, Commit, Created, GroupReservation, Outcome,
                                        Prepare, Retry, State)
from runtime.util import (get_current_placement_group, get_placement_group, placement_group,
                          placement_group_table, remove_placement_group)
from runtime.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from helpers import gates
from helpers.gates import await_path
from conftest import wait_for


# -- remote functions and classes ---------------------------------------------------------------
@ray.remote
def whoami():
    return os.getpid()


@ray.remote
def current_group():
    pg = get_current_placement_group()
    return pg.id.hex() if pg is not None else None


@ray.remote
def parent_submits_child():
    """Runs in a group with capture_child_tasks=True; the child must land in it too."""
    child = ray.get(current_group.remote(), timeout=60)
    mine = get_current_placement_group()
    return {"parent": mine.id.hex() if mine is not None else None, "child": child}


@ray.remote
def block_on(path, timeout=60.0):
    await_path(path, timeout)
    return os.getpid()


@ray.remote
def meet(directory, parties, timeout=20.0):
    """Arrive, then wait until `parties` tasks arrived: they must run at the same time."""
    gates.meet(directory, parties, timeout)
    return True


@ray.remote
class Member:
    def pid(self):
        return os.getpid()

    def group(self):
        pg = get_current_placement_group()
        return pg.id.hex() if pg is not None else None


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture
def groups(cluster):
    """Collects placement groups and actor handles; all removed/killed after the test."""
    made = {"groups": [], "actors": []}
    wait_for(lambda: cpu_available() == 2.0, 20, message="both CPUs free before the test")
    yield made
    for h in made["actors"]:
        try:
            ray.kill(h)
        except Exception:
            pass
    for pg in made["groups"]:
        try:
            remove_placement_group(pg)
        except Exception:
            pass
    wait_for(lambda: cpu_available() == 2.0, 20, message="both CPUs free after the test")


def cpu_available() -> float:
    return ray.available_resources().get("CPU", 0.0)


def stays(predicate, seconds: float, interval: float = 0.1) -> None:
    """Assert predicate() holds at every check for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        assert value, f"condition stopped holding (value {value!r})"
        time.sleep(interval)


def in_group(pg, index=-1, capture=None):
    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=capture)


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- creation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["PACK", "SPREAD", "STRICT_PACK"])
def test_group_created_and_reserves(groups, strategy):
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy=strategy)
    groups["groups"].append(pg)
    assert ray.get(pg.ready(), timeout=30) == pg
    assert pg.wait(10) is True
    entry = placement_group_table(pg)
    assert entry["state"] == "CREATED"
    assert entry["strategy"] == strategy
    assert entry["placement_group_id"] == pg.id.hex()
    assert entry["bundles"] == {0: {"CPU": 1.0}, 1: {"CPU": 1.0}}
    node = ray.get_runtime_context().get_node_id()
    assert set(entry["bundles_to_node_id"].values()) == {node}
    assert pg.bundle_count == 2 and pg.bundle_specs == [{"CPU": 1}, {"CPU": 1}]
    # the reservation is taken from the node's CPUs and shows as group resources
    wait_for(lambda: cpu_available() == 0.0, 15, message="the group's 2 CPUs to be reserved")
    total = ray.cluster_resources()
    assert total["CPU"] == 2.0
    assert total.get(f"CPU_group_{pg.id.hex()}") == 2.0, sorted(total)
    remove_placement_group(pg)
    wait_for(lambda: cpu_available() == 2.0, 15, message="the CPUs back after removal")
    assert placement_group_table(pg)["state"] == "REMOVED"
    assert pg.wait(1) is False


def test_strict_spread_on_one_node_stays_pending(groups):
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    groups["groups"].append(pg)
    t0 = time.monotonic()
    assert pg.wait(2) is False
    elapsed = time.monotonic() - t0
    assert elapsed < 7, f"pg.wait(2) on a pending group took {elapsed:.1f}s"
    entry = wait_for(lambda: (lambda e: e if e["stats"]["pending_reason"] else None)(
        placement_group_table(pg)), 10, message="a pending reason")
    assert entry["state"] == "PENDING"
    assert cpu_available() == 2.0  # a pending group holds nothing
    ready, _ = ray.wait([pg.ready()], timeout=0.5)
    assert ready == []


def test_infeasible_group_does_not_block_other_work(groups, tmp_path):
    pg = placement_group([{"CPU": 100}])
    groups["groups"].append(pg)
    ready, _ = ray.wait([pg.ready()], timeout=1.0)
    assert ready == []
    entry = placement_group_table(pg)
    assert entry["state"] == "PENDING"
    # both CPUs are still usable at the same time, by tasks and by an actor
    assert ray.get([meet.remote(str(tmp_path), 2) for _ in range(2)], timeout=60) == [True, True]
    a = Member.options(num_cpus=1).remote()
    groups["actors"].append(a)
    assert isinstance(ray.get(a.pid.remote(), timeout=30), int)
    assert ray.get(whoami.remote(), timeout=30) > 0
    assert placement_group_table(pg)["state"] == "PENDING"
    assert placement_group_table(pg)["stats"]["pending_reason"]


def test_group_is_reserved_atomically(groups, tmp_path):
    """3 x 1 CPU on a 2-CPU node can never be placed: none of it may be held."""
    pg = placement_group([{"CPU": 1}, {"CPU": 1}, {"CPU": 1}], strategy="PACK")
    groups["groups"].append(pg)
    ready, _ = ray.wait([pg.ready()], timeout=1.0)
    assert ready == []
    stays(lambda: cpu_available() == 2.0, 2.0)
    # both CPUs can be used at once by other tasks while the group waits
    assert ray.get([meet.remote(str(tmp_path), 2) for _ in range(2)], timeout=60) == [True, True]
    wait_for(lambda: cpu_available() == 2.0, 15, message="the tasks' CPUs to come back")
    assert placement_group_table(pg)["state"] == "PENDING"
    stays(lambda: cpu_available() == 2.0, 1.0)


# -- scheduling into groups ---------------------------------------------------------------------
def test_tasks_and_actors_in_bundles(groups, tmp_path):
    pg = placement_group([{"CPU": 1}, {"CPU": 1}])
    groups["groups"].append(pg)
    ray.get(pg.ready(), timeout=30)
    wait_for(lambda: cpu_available() == 0.0, 15, message="the group to hold both CPUs")
    # every CPU outside the group is reserved, so anything that runs now runs in the group
    for index in (0, 1, -1):
        assert ray.get(whoami.options(scheduling_strategy=in_group(pg, index)).remote(),
                       timeout=30) > 0
    a = Member.options(num_cpus=1, scheduling_strategy=in_group(pg, 0)).remote()
    groups["actors"].append(a)
    assert isinstance(ray.get(a.pid.remote(), timeout=30), int)
    # bundle 0 is the actor's now; bundle 1 and "any bundle" still take tasks
    assert ray.get(whoami.options(scheduling_strategy=in_group(pg, 1)).remote(), timeout=30) > 0
    assert ray.get(whoami.options(scheduling_strategy=in_group(pg, -1)).remote(), timeout=30) > 0
    # two tasks in the group's two bundles run side by side once the actor is gone
    ray.kill(a)
    refs = [meet.options(scheduling_strategy=in_group(pg, i)).remote(str(tmp_path), 2)
            for i in (0, 1)]
    assert ray.get(refs, timeout=60) == [True, True]
    # a bundle index beyond the group is rejected
    with pytest.raises(ValueError):
        whoami.options(scheduling_strategy=in_group(pg, 2)).remote()


def test_normal_task_waits_while_group_holds_all_cpus(groups):
    pg = placement_group([{"CPU": 2}], strategy="STRICT_PACK")
    groups["groups"].append(pg)
    ray.get(pg.ready(), timeout=30)
    ref = whoami.remote()
    ready, _ = ray.wait([ref], timeout=1.5)
    assert ready == [], "a task outside the group ran although the group holds every CPU"
    remove_placement_group(pg)
    assert ray.get(ref, timeout=30) > 0


def test_capture_child_tasks(groups):
    pg = placement_group([{"CPU": 1}, {"CPU": 1}])
    groups["groups"].append(pg)
    ray.get(pg.ready(), timeout=30)
    wait_for(lambda: cpu_available() == 0.0, 15, message="the group to hold both CPUs")
    got = ray.get(parent_submits_child.options(
        scheduling_strategy=in_group(pg, -1, capture=True)).remote(), timeout=60)
    assert got == {"parent": pg.id.hex(), "child": pg.id.hex()}
    # without capture the task sees no current group
    assert ray.get(current_group.options(scheduling_strategy=in_group(pg, 0)).remote(),
                   timeout=30) is None
    assert get_current_placement_group() is None  # the driver is in no group


# -- removal ------------------------------------------------------------------------------------
def test_remove_kills_actor_and_returns_resources(groups):
    pg = placement_group([{"CPU": 1}, {"CPU": 1}])
    groups["groups"].append(pg)
    ray.get(pg.ready(), timeout=30)
    a = Member.options(num_cpus=1, scheduling_strategy=in_group(pg, 0)).remote()
    groups["actors"].append(a)
    pid = ray.get(a.pid.remote(), timeout=30)
    wait_for(lambda: cpu_available() == 0.0, 15, message="the group to hold both CPUs")
    remove_placement_group(pg)
    wait_for(lambda: pid_gone(pid), 15, message="the group's actor process to exit")
    with pytest.raises(ActorPlacementGroupRemoved, match="was removed"):  # as Ray raises it
        ray.get(a.pid.remote(), timeout=30)
    wait_for(lambda: cpu_available() == 2.0, 15, message="the group's CPUs to come back")
    with pytest.raises(ValueError):
        get_placement_group("never-named")


def test_task_pending_on_removed_group_fails(groups, tmp_path):
    """Ray fails tasks whose placement group was removed (TaskPlacementGroupRemoved)
    instead of leaving them pending forever."""
    pg = placement_group([{"CPU": 1}])
    groups["groups"].append(pg)
    ray.get(pg.ready(), timeout=30)
    gate = str(tmp_path / "gate")
    running = block_on.options(scheduling_strategy=in_group(pg, 0), max_retries=0).remote(gate)
    queued = whoami.options(scheduling_strategy=in_group(pg, 0)).remote()
    ready, _ = ray.wait([running, queued], timeout=1.0)
    assert ready == []
    remove_placement_group(pg)
    try:
        with pytest.raises(RayError) as info:
            ray.get(running, timeout=15)
        assert not isinstance(info.value, GetTimeoutError), "the running task hangs"
        with pytest.raises(TaskPlacementGroupRemoved, match="was removed"):
            ray.get(queued, timeout=15)
    finally:
        Path(gate).touch()
        for ref in (running, queued):
            try:
                ray.cancel(ref, force=True)
            except Exception:
                pass


# -- names and validation -----------------------------------------------------------------------
def test_named_group_lookup(groups):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    pg = placement_group([{"CPU": 1}], name=name)
    groups["groups"].append(pg)
    found = get_placement_group(name)
    assert found == pg and found.id.hex() == pg.id.hex()
    assert found.bundle_specs == [{"CPU": 1.0}]
    assert found.wait(10) is True
    assert placement_group_table(found)["name"] == name
    remove_placement_group(pg)
    with pytest.raises(ValueError):
        get_placement_group(name)


@pytest.mark.parametrize("bundles, strategy", [
    ([], "PACK"),
    ([{}], "PACK"),
    ([{"CPU": 1}, {}], "PACK"),
    ([{"CPU": 1}], "BEST_EFFORT"),
    ([{"CPU": 1}], "pack"),
])
def test_invalid_groups_raise_value_error(cluster, bundles, strategy):
    with pytest.raises(ValueError):
        placement_group(bundles, strategy=strategy)


# -- removal racing the two-phase reservation ---------------------------------------------------
def leftover_group_resources() -> list:
    """Bundle resource names (CPU_group_..., bundle_group_...) still in the cluster's view."""
    names = set(ray.cluster_resources()) | set(ray.available_resources())
    return sorted(n for n in names if "_group_" in n)


def churn_groups(count: int, strategies, max_bundles: int, wait_every: int) -> list:
    """Create `count` groups of varied shapes and remove each right away (every
    `wait_every`-th one once it is created), so removals land before, during and after
    the Prepare/Commit round trips."""
    made = []
    for i in range(count):
        strategy = strategies[i % len(strategies)]
        n = 1 + i % max_bundles
        bundles = [{"CPU": 0.01 * (1 + (i + j) % 7)} for j in range(n)]
        pg = placement_group(bundles, strategy=strategy)
        made.append(pg)
        if i % wait_every == wait_every - 1 and not (strategy == "STRICT_SPREAD" and n > 1):
            assert pg.wait(30), f"group {i} ({strategy}, {bundles}) was never created"
        remove_placement_group(pg)
    return made


def assert_everything_returned(totals: dict, made: list) -> None:
    def back():
        avail = ray.available_resources()
        return all(abs(avail.get(k, 0.0) - v) < 1e-6 for k, v in totals.items()
                   if k in ("CPU", "second")) and not leftover_group_resources()
    try:
        wait_for(back, 20, message="every reserved resource to come back")
    except AssertionError:
        avail = ray.available_resources()
        left = leftover_group_resources()
        raise AssertionError(f"resources leaked: available "
                             f"{ {k: avail.get(k, 0.0) for k in totals} }, totals {totals}; "
                             f"{len(left)} bundle resource names left, e.g. {left[:4]}")
    stays(lambda: not leftover_group_resources() and cpu_available() == totals["CPU"], 1.0)
    states = {placement_group_table(pg)["state"] for pg in made}
    assert states == {"REMOVED"}, states


def test_groups_removed_right_after_creation_return_everything(groups):
    """Removing a group at any point of its reservation (pending, preparing, between
    prepare and commit, created) gives back every reserved resource and leaves no
    bundle resource behind; a group removed mid-reservation is never created."""
    made = churn_groups(50, ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"], max_bundles=3,
                        wait_every=5)
    assert_everything_returned({"CPU": 2.0}, made)


@pytest.fixture
def second_node(cluster, tmp_path):
    """A second node (127.0.0.2, 1 CPU) joined to the module's cluster for one test."""
    from runtime.node import Node, NodeConfig
    from runtime.session import new_session_dir

    wait_for(lambda: cpu_available() == 2.0, 20, message="both CPUs free before the test")
    session_dir = cluster.address_info["session_dir"]
    token = open(os.path.join(session_dir, "token")).read()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    node = Node(NodeConfig(head=False, node_ip="127.0.0.2",
                           gcs_address=cluster.address_info["gcs_address"], num_cpus=1,
                           resources={"second": 1}, session_dir=new_session_dir(str(tmp_path)),
                           token=token, object_store_memory=64 * 1024 * 1024,
                           prestart_workers=0))
    try:
        node.start()
        started = {p.pid for p in psutil.Process().children(recursive=True)} - before
        wait_for(lambda: ray.cluster_resources().get("CPU") == 3.0, 20,
                 message="the second node's CPU in the cluster")
        yield node
    finally:
        node.stop()
        from conftest import assert_all_gone

        assert_all_gone(sorted(started) if "started" in locals() else [])
        wait_for(lambda: ray.cluster_resources().get("CPU") == 2.0, 20,
                 message="the second node to leave the cluster")


def test_removal_returns_bundles_on_every_node(second_node):
    """Groups spread over two nodes, removed at once: both nodes get everything back."""
    made = churn_groups(30, ["SPREAD", "STRICT_SPREAD", "PACK"], max_bundles=3, wait_every=4)
    assert_everything_returned({"CPU": 3.0, "second": 1.0}, made)


# -- the GCS's reservation state machine, one interleaving per test (sans-I/O) ------------------
A, B, C = b"A" * 28, b"B" * 28, b"C" * 28
OK, REFUSED, LOST = Outcome.OK, Outcome.REFUSED, Outcome.LOST


def answer_cancels(r: GroupReservation, actions: list, outcome: Outcome = OK) -> list:
    """Answer every Cancel in `actions`; returns what the reservation did next."""
    out = []
    for a in actions:
        if isinstance(a, Cancel):
            out += r.cancelled(a, outcome)
    return out


def test_fsm_removed_while_pending_cancels_everywhere_and_never_starts():
    r = GroupReservation(2)
    cancels = r.remove([A, B])
    assert cancels == [Cancel(A, (0, 1), remove=True), Cancel(B, (0, 1), remove=True)]
    assert r.begin([A, A]) == [] and r.state is State.REMOVED
    assert answer_cancels(r, cancels) == [] and not r.busy
    assert r.remove([A, B]) == []  # a second removal sends nothing


def test_fsm_removed_while_prepares_are_in_flight_never_commits():
    r = GroupReservation(2)
    assert r.begin([A, B]) == [Prepare(A, (0,)), Prepare(B, (1,))]
    cancels = r.remove([A, B, C])
    assert cancels == [Cancel(n, (0, 1), remove=True) for n in (A, B, C)]
    # A prepared before it saw the removal: cancelled again (its first Cancel may be lost);
    # B saw the removal first and refused: nothing more to do.
    assert r.prepared(Prepare(A, (0,)), OK) == [Cancel(A, (0,), remove=True)]
    assert r.prepared(Prepare(B, (1,)), REFUSED, "removed") == []
    assert answer_cancels(r, cancels + [Cancel(A, (0,), remove=True)]) == []
    assert r.state is State.REMOVED and not r.busy


def test_fsm_removed_between_prepare_and_commit_never_commits():
    r = GroupReservation(3)
    r.begin([A, A, B])
    assert r.prepared(Prepare(A, (0, 1)), OK) == []  # waits for B before committing
    cancels = r.remove([A, B])
    late = r.prepared(Prepare(B, (2,)), OK)
    assert late == [Cancel(B, (2,), remove=True)]
    assert not [a for a in cancels + late if isinstance(a, (Commit, Created))]
    assert answer_cancels(r, cancels + late) == [] and r.state is State.REMOVED


def test_fsm_removed_while_commit_is_in_flight_is_never_created():
    r = GroupReservation(2)
    r.begin([A, B])
    assert r.prepared(Prepare(A, (0,)), OK) == []
    assert r.prepared(Prepare(B, (1,)), OK) == [Commit(A, (0,)), Commit(B, (1,))]
    assert r.committed(Commit(A, (0,)), OK) == []
    cancels = r.remove([A, B])
    late = r.committed(Commit(B, (1,)), OK)
    assert late == [Cancel(B, (1,), remove=True)]  # not Created
    answer_cancels(r, cancels + late)
    assert r.state is State.REMOVED and not r.busy


def test_fsm_removed_after_creation_cancels_every_bundle_on_every_node():
    r = GroupReservation(2)
    r.begin([A, B])
    r.prepared(Prepare(A, (0,)), OK)
    r.prepared(Prepare(B, (1,)), OK)
    r.committed(Commit(B, (1,)), OK)
    assert r.committed(Commit(A, (0,)), OK) == [Created((A, B))]
    assert r.state is State.CREATED and not r.busy
    # B is gone from the live nodes but still named by the placement: it is tried too
    assert r.remove([A, C]) == [Cancel(n, (0, 1), remove=True) for n in (A, C, B)]


def test_fsm_refused_prepare_undoes_the_attempt_before_the_next_one():
    r = GroupReservation(3)
    r.begin([A, B, C])
    assert r.prepared(Prepare(A, (0,)), OK) == []
    undo = r.prepared(Prepare(B, (1,)), REFUSED, "node B: not enough CPU")
    assert undo == [Cancel(A, (0,))] and r.state is State.ABORTING
    assert r.begin([A, A, A]) == []  # no new attempt while anything is in flight
    late = r.prepared(Prepare(C, (2,)), OK)
    assert late == [Cancel(C, (2,))]
    assert answer_cancels(r, undo) == []
    assert answer_cancels(r, late) == [Retry("node B: not enough CPU")]
    assert r.state is State.PENDING and r.reason == "node B: not enough CPU"
    assert r.begin([A, A, A]) == [Prepare(A, (0, 1, 2))] and r.attempts == 2


def test_fsm_unanswered_prepare_is_cancelled_like_a_success():
    r = GroupReservation(1)
    r.begin([A])
    undo = r.prepared(Prepare(A, (0,)), LOST, "PrepareBundles failed: DEADLINE_EXCEEDED")
    assert undo == [Cancel(A, (0,))]
    # the Cancel got no answer either: remembered, and the attempt still ends
    assert answer_cancels(r, undo, LOST) == [Retry("PrepareBundles failed: DEADLINE_EXCEEDED")]
    assert r.uncancelled == {A: (0,)}


def test_fsm_failed_commit_cancels_every_node_of_the_attempt():
    r = GroupReservation(2)
    r.begin([A, B])
    r.prepared(Prepare(A, (0,)), OK)
    r.prepared(Prepare(B, (1,)), OK)
    assert r.committed(Commit(A, (0,)), OK) == []
    undo = r.committed(Commit(B, (1,)), LOST, "CommitBundles failed: UNAVAILABLE")
    assert sorted(undo, key=lambda a: a.node) == [Cancel(A, (0,)), Cancel(B, (1,))]
    assert answer_cancels(r, undo) == [Retry("CommitBundles failed: UNAVAILABLE")]
    assert r.state is State.PENDING


def test_fsm_removed_while_a_failed_attempt_is_undone_never_retries():
    r = GroupReservation(2)
    r.begin([A, B])
    assert r.prepared(Prepare(A, (0,)), REFUSED, "short") == []  # B still in flight
    cancels = r.remove([A, B])
    late = r.prepared(Prepare(B, (1,)), OK)
    assert late == [Cancel(B, (1,), remove=True)]
    assert answer_cancels(r, cancels + late) == []  # no Retry: the group is gone
    assert r.state is State.REMOVED and r.begin([A, B]) == []
