"""A private cluster with extra nodes on other loopback addresses (127.0.0.2, ...).

The extra nodes are started with runtime.node.Node, the class the node agent uses,
joined to the private cluster's GCS with its token: several "hosts" on one machine.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, List, Optional, Tuple

import psutil

import runtime as ray
from runtime.node import Node, NodeConfig
from runtime.session import new_session_dir

from conftest import assert_all_gone, wait_for


@contextlib.contextmanager
def cluster_with_nodes(root: str, *, head_cpus: int = 1,
                       extra: Optional[List[Dict]] = None,
                       register_timeout: float = 30.0) -> Iterator[Tuple[object, List[Node]]]:
    """init() a head with `head_cpus`, start one node per dict of `extra` (keys: ip,
    num_cpus, resources, labels), wait until all are alive, and stop every process at the end,
    checking by PID that none is left."""
    if ray.is_initialized():
        ray.shutdown()
    extra = extra if extra is not None else [{"ip": "127.0.0.2", "resources": {"second": 1}}]
    ctx = ray.init(num_cpus=head_cpus, _temp_dir=root)
    with open(os.path.join(ctx.address_info["session_dir"], "token")) as f:
        token = f.read()
    nodes: List[Node] = []
    try:
        for spec in extra:
            node = Node(NodeConfig(head=False, node_ip=spec["ip"],
                                   gcs_address=ctx.address_info["gcs_address"],
                                   num_cpus=spec.get("num_cpus", 1),
                                   resources=spec.get("resources", {}),
                                   labels=spec.get("labels", {}),
                                   session_dir=new_session_dir(root), token=token,
                                   object_store_memory=spec.get("object_store_memory",
                                                                128 * 1024 * 1024)))
            node.start()
            nodes.append(node)
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 1 + len(nodes),
                 register_timeout, message="the extra nodes to register")
        yield ctx, nodes
    finally:
        pids = [p.pid for p in psutil.Process().children(recursive=True)]
        for node in nodes:
            node.stop()
        ray.shutdown()
        assert_all_gone(pids)
