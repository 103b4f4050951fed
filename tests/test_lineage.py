"""Node death, seen from the owner: tasks retried on other nodes, lost objects rebuilt
from their lineage, and the objects that cannot be rebuilt failing with ObjectLostError.

Three nodes: the head (a private cluster of this test process, the driver, on
127.0.0.1), a second node on 127.0.0.2 (runtime.node.Node, as tests/test_multinode.py
starts it) and, for each test, a node agent on 127.0.0.3 joined to the head. That third
node dies as a machine does: SIGKILL of its agent and of every process under it
(raylet, object store, workers) at once.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import runtime as ray
from runtime.exceptions import NodeDiedError, ObjectLostError, OwnerDiedError
from runtime.node import Node, NodeConfig
from runtime.session import new_session_dir
from runtime.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from agent_helpers import Farm
from conftest import assert_all_gone, wait_for

BIG = 2 * 1024 * 1024  # bytes: well over the inline limit, so values live in a node's store


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """The head (this process drives it) and a second node, for the whole module."""
    if ray.is_initialized():
        ray.shutdown()
    root = str(tmp_path_factory.mktemp("sessions"))
    ctx = ray.init(num_cpus=1, _temp_dir=root, object_store_memory=256 * 1024 * 1024)
    token = open(os.path.join(ctx.address_info["session_dir"], "token")).read()
    second = Node(NodeConfig(head=False, node_ip="127.0.0.2",
                             gcs_address=ctx.address_info["gcs_address"], num_cpus=1,
                             session_dir=new_session_dir(root), token=token,
                             object_store_memory=256 * 1024 * 1024))
    second.start()
    pids = [p.pid for p in psutil.Process().children(recursive=True)]
    try:
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 30,
                 message="the second node to register")
        yield {"gcs": ctx.address_info["gcs_address"], "token": token,
               "head": ctx.address_info["node_id"], "second": second.node_id.hex()}
    finally:
        second.stop()
        ray.shutdown()
        assert_all_gone(pids)


@pytest.fixture
def third(two_nodes, tmp_path):
    """A node agent on 127.0.0.3 joined to the cluster: {"agent", "node_id"}; everything
    it started is killed by pid at the end, whatever the test did to it."""
    farm = Farm(tmp_path / "agents")
    try:
        # The node 3 of an earlier test may not be marked dead yet: the new one is another.
        earlier = {n["NodeID"] for n in ray.nodes()}
        agent = farm.agent("n3", "127.0.0.3")
        out = agent.ctl("join", two_nodes["gcs"], "--token", two_nodes["token"], "--node-ip",
                        "127.0.0.3")
        assert out.returncode == 0, (out.stdout, out.stderr)
        node_id = wait_for(lambda: next((n["NodeID"] for n in ray.nodes()
                                         if n["Alive"] and n["NodeManagerAddress"] == "127.0.0.3"
                                         and n["NodeID"] not in earlier), None), 30,
                           message="node 3 to register")
        # The head's raylet learns of the new node by long poll: until it has, a soft
        # affinity to it would quietly run elsewhere.
        wait_for(lambda: _runs_on(node_id), 60, interval=0.2,
                 message="node 3 to take tasks pinned to it")
        yield {"agent": agent, "node_id": node_id, "markers": tmp_path / "markers"}
    finally:
        farm.cleanup()


@ray.remote(max_retries=0)
def where_am_i():
    return ray.get_runtime_context().get_node_id()


def _runs_on(node_id: str) -> bool:
    strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    try:
        return ray.get(where_am_i.options(scheduling_strategy=strategy).remote(),
                       timeout=20) == node_id
    except ray.exceptions.TaskUnschedulableError:
        return False


def kill_node(agent) -> None:
    """SIGKILL the agent and every process under it at once, as when a machine dies."""
    root = psutil.Process(agent.pid())
    procs = [root] + root.children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def on(node_id: str) -> NodeAffinitySchedulingStrategy:
    """Run there while that node lives, elsewhere once it is gone."""
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)


def runs(markers: Path, name: str) -> list:
    """The nodes where the task `name` ran, in order (each run leaves a marker file)."""
    if not markers.is_dir():
        return []
    found = sorted((p.stat().st_mtime_ns, p.read_text()) for p in markers.glob(f"{name}.*")
                   if p.suffix != ".tmp")
    return [text for _t, text in found]


def mark(markers: str, name: str) -> None:
    """Inside a task: record that it runs now, and on which node."""
    os.makedirs(markers, exist_ok=True)
    node = ray.get_runtime_context().get_node_id()
    path = os.path.join(markers, f"{name}.{os.getpid()}.{time.monotonic_ns()}")
    with open(path + ".tmp", "w") as fh:
        fh.write(node)
    os.rename(path + ".tmp", path)  # readers never see it half written


@ray.remote(max_retries=2)
def make(markers: str, name: str, fill: int):
    mark(markers, name)
    return np.full(BIG, fill, dtype=np.uint8)


@ray.remote(max_retries=2)
def add_one(markers: str, name: str, arr):
    mark(markers, name)
    return arr + 1


@ray.remote(max_retries=2)
def long_then_where(markers: str, name: str, seconds: float):
    mark(markers, name)
    if ray.get_runtime_context().get_node_id() == open(os.path.join(markers, "slow_on")).read():
        time.sleep(seconds)
    return ray.get_runtime_context().get_node_id()


@ray.remote(max_retries=0)
def first_sum(refs):
    """Reads the object as a borrower does: the ref came nested in a list."""
    return int(ray.get(refs[0], timeout=60).sum())


@ray.remote(max_retries=0)
def long_no_retries(markers: str, seconds: float):
    mark(markers, "once")
    time.sleep(seconds)


@ray.remote
def put_there():
    return [ray.put(np.full(BIG, 5, dtype=np.uint8))]


def test_an_object_made_on_a_dead_node_is_rebuilt_by_running_its_task_again(third):
    markers = str(third["markers"])
    ref = make.options(scheduling_strategy=on(third["node_id"])).remote(markers, "make", 3)
    ready, _ = ray.wait([ref], timeout=60, fetch_local=False)
    assert ready, "the task on node 3 did not finish"
    assert runs(third["markers"], "make") == [third["node_id"]]
    kill_node(third["agent"])
    value = ray.get(ref, timeout=90)
    assert value.shape == (BIG,) and value[0] == 3 and value[-1] == 3
    where = runs(third["markers"], "make")
    assert len(where) == 2 and where[1] != third["node_id"], where


@pytest.mark.parametrize("keep_a", [False, True], ids=["a-dropped", "a-kept"])
def test_lost_arguments_are_rebuilt_first(third, keep_a):
    """b = add_one(a), both made on node 3. Node 3 dies: getting b runs a's task, then
    b's, on live nodes. a-dropped: the driver dropped `a`, so only b's lineage kept a's
    (its value was freed). a-kept: the driver still holds `a`, whose known location is on
    the dead node: b's worker cannot fetch it, and that recovers a instead of failing b."""
    markers = str(third["markers"])
    a = make.options(scheduling_strategy=on(third["node_id"])).remote(markers, "a", 1)
    b = add_one.options(scheduling_strategy=on(third["node_id"])).remote(markers, "b", a)
    ready, _ = ray.wait([b], timeout=60, fetch_local=False)
    assert ready
    if not keep_a:
        del a
    kill_node(third["agent"])
    value = ray.get(b, timeout=120)
    assert value[0] == 2 and value[-1] == 2
    for name in ("a", "b"):
        where = runs(third["markers"], name)
        assert len(where) == 2 and where[1] != third["node_id"], (name, where)


class Count(logging.Handler):
    """Counts the driver's log records that contain `needle`."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.count += 1


def test_a_borrower_that_cannot_read_a_lost_object_gets_it_rebuilt_by_the_owner(third,
                                                                              two_nodes):
    """A task on node 2 gets an object the driver owns, made on node 3 before it died: its
    read fails, it tells the owner which copy failed, and the owner rebuilds it."""
    markers = str(third["markers"])
    ref = make.options(scheduling_strategy=on(third["node_id"])).remote(markers, "made", 4)
    ready, _ = ray.wait([ref], timeout=60, fetch_local=False)
    assert ready
    kill_node(third["agent"])
    total = first_sum.options(scheduling_strategy=on(two_nodes["second"])).remote([ref])
    assert ray.get(total, timeout=90) == 4 * BIG
    where = runs(third["markers"], "made")
    assert len(where) == 2 and where[1] != third["node_id"], where


def test_a_copy_on_a_live_node_serves_when_the_original_is_lost(third, two_nodes):
    """A task on node 2 read the object (node 2's store keeps a copy, which the owner
    knows of). Node 3, which made it, dies: the copy serves; nothing runs again."""
    markers = str(third["markers"])
    ref = make.options(scheduling_strategy=on(third["node_id"])).remote(markers, "made", 6)
    total = first_sum.options(scheduling_strategy=on(two_nodes["second"])).remote([ref])
    assert ray.get(total, timeout=60) == 6 * BIG
    kill_node(third["agent"])
    value = ray.get(ref, timeout=60)
    assert value[0] == 6 and value[-1] == 6
    assert runs(third["markers"], "made") == [third["node_id"]]


def test_a_task_without_retries_on_a_dead_node_fails_naming_the_node(third):
    markers = str(third["markers"])
    ref = long_no_retries.options(scheduling_strategy=on(third["node_id"])).remote(markers, 600)
    wait_for(lambda: runs(third["markers"], "once"), 60, message="the task to start on node 3")
    kill_node(third["agent"])
    with pytest.raises(NodeDiedError) as info:
        ray.get(ref, timeout=60)
    text = str(info.value)
    assert third["node_id"][:8] in text and "127.0.0.3" in text, text


def test_a_task_running_on_a_dead_node_is_retried_on_a_live_one(third):
    """Its affinity (soft) keeps naming node 3 until the cluster marks it dead: the
    retry must neither fail nor hammer the dead raylet meanwhile (each spillback there
    used to cost a connection attempt and a warning, in a tight loop)."""
    markers = third["markers"]
    markers.mkdir()
    (markers / "slow_on").write_text(third["node_id"])
    dead_raylet = f"127.0.0.3:{third['agent'].ports['raylet']}"
    attempts = Count(f"lost the raylet at {dead_raylet}")
    logger = logging.getLogger("runtime.core_worker")
    logger.addHandler(attempts)
    try:
        ref = long_then_where.options(scheduling_strategy=on(third["node_id"])).remote(
            str(markers), "long", 600)
        wait_for(lambda: runs(markers, "long"), 60, message="the task to start on node 3")
        t0 = time.monotonic()
        kill_node(third["agent"])
        node = ray.get(ref, timeout=90)
        waited = time.monotonic() - t0
    finally:
        logger.removeHandler(attempts)
    assert node != third["node_id"] and node in [n["NodeID"] for n in ray.nodes()]
    where = runs(markers, "long")
    assert where[0] == third["node_id"] and where[-1] == node, where
    # One probe of the dead raylet per backoff at most (0.1 s, doubling up to 2 s).
    assert attempts.count <= 8 + waited / 2, (attempts.count, waited)


def test_a_put_object_that_lived_only_on_the_dead_node_raises_object_lost(third):
    """The task that put it ran on node 3, so its owner died with the node: no lineage
    can bring it back, and get() says so (Ray: OwnerDiedError, an ObjectLostError)."""
    (inner,) = ray.get(put_there.options(scheduling_strategy=on(third["node_id"])).remote(),
                       timeout=60)
    ready, _ = ray.wait([inner], timeout=60, fetch_local=False)
    assert ready
    kill_node(third["agent"])
    with pytest.raises(ObjectLostError) as info:
        ray.get(inner, timeout=60)
    assert isinstance(info.value, OwnerDiedError), repr(info.value)
    text = str(info.value)
    assert inner.hex() in text and "127.0.0.3" in text, text

