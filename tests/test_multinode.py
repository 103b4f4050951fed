"""Two nodes on one machine (the second on 127.0.0.2): scheduling sends work across.

The second node is started with runtime.node.Node, the same class the node agent
uses, joined to the private cluster's GCS with its token.
"""
import os

import psutil
import pytest

import runtime as ray
from runtime.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from helpers.nodes import cluster_with_nodes
from conftest import wait_for


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sessions"))
    with cluster_with_nodes(root, head_cpus=1) as (ctx, (second,)):
        yield ctx, second


@ray.remote
def where():
    return ray.get_runtime_context().get_node_id(), os.getpid()


def test_cluster_sees_both_nodes(two_nodes):
    ctx, second = two_nodes
    ips = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    assert ips == ["127.0.0.1", "127.0.0.2"]
    wait_for(lambda: ray.cluster_resources().get("CPU") == 2.0, 10, message="2 CPUs in total")
    assert ray.cluster_resources()["second"] == 1.0


def test_task_needing_the_other_nodes_resource_runs_there(two_nodes):
    ctx, second = two_nodes
    node, pid = ray.get(where.options(resources={"second": 1}).remote(), timeout=60)
    assert node == second.node_id.hex()
    assert node != ctx.address_info["node_id"]
    assert psutil.Process(pid).cmdline()[-1] != ""  # a real worker of the second node


def test_node_affinity_to_the_other_node(two_nodes):
    ctx, second = two_nodes
    strategy = NodeAffinitySchedulingStrategy(node_id=second.node_id.hex(), soft=False)
    results = ray.get([where.options(scheduling_strategy=strategy).remote() for _ in range(3)],
                      timeout=60)
    assert {node for node, _pid in results} == {second.node_id.hex()}


def test_actor_on_the_other_node(two_nodes):
    ctx, second = two_nodes

    @ray.remote(resources={"second": 0.5})
    class Here:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    a = Here.remote()
    assert ray.get(a.node.remote(), timeout=60) == second.node_id.hex()
    ray.kill(a)


def test_large_objects_cross_nodes_both_ways(two_nodes):
    """A 20 MB argument put on the head is read on the second node, and a 20 MB result
    made there is read by the driver: the stores copy objects between nodes."""
    import numpy as np

    ctx, second = two_nodes

    @ray.remote(resources={"second": 1})
    def total_and_make(arr):
        return float(arr.sum()), np.full(20 * 1024 * 1024 // 8, 2.0)

    src = np.ones(20 * 1024 * 1024 // 8)
    ref = ray.put(src)
    s, made = ray.get(total_and_make.remote(ref), timeout=60)
    assert s == float(src.size)
    assert made.shape == src.shape and made[0] == 2.0 and made[-1] == 2.0
    assert not made.flags.writeable  # a zero-copy view of the local copy

