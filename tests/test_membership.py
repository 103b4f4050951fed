"""Raylets see a node as soon as it joins: their view of other nodes follows the GCS's
membership by long poll (Gcs.WaitMembership), not only the periodic refresh."""
import os

import psutil

import runtime as ray
from runtime.node import Node, NodeConfig
from runtime.session import new_session_dir

from conftest import assert_all_gone, wait_for


@ray.remote(scheduling_strategy="SPREAD")
def spread_where():
    import time

    time.sleep(0.3)
    return ray.get_runtime_context().get_node_id()


def test_a_node_that_just_joined_takes_spread_tasks_at_once(fresh_runtime, tmp_path):
    ctx = ray.init(num_cpus=2, _temp_dir=str(tmp_path / "sessions"))
    token = open(os.path.join(ctx.address_info["session_dir"], "token")).read()
    # Let the head raylet settle into its periodic refresh before the node joins.
    wait_for(lambda: ray.available_resources().get("CPU") == 2.0, 15, message="2 free CPUs")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    second = Node(NodeConfig(head=False, node_ip="127.0.0.2",
                             gcs_address=ctx.address_info["gcs_address"], num_cpus=2,
                             session_dir=new_session_dir(str(tmp_path / "sessions")), token=token,
                             object_store_memory=64 * 1024 * 1024))
    second.start()
    pids = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before]
    try:
        wait_for(lambda: any(n["Alive"] and n["NodeID"] == second.node_id.hex()
                             for n in ray.nodes()), 15, interval=0.01,
                 message="the second node to register")
        nodes = ray.get([spread_where.remote() for _ in range(8)], timeout=60)
        assert nodes.count(second.node_id.hex()) >= 3, nodes
    finally:
        second.stop()
        assert_all_gone(pids)
