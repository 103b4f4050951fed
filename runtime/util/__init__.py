"""runtime.util: Ray's ``ray.util`` - placement groups, scheduling strategies, ActorPool,
as_completed/map_unordered, named-actor listing, serializability checks; and, as
submodules, ``state`` (the state API), ``queue`` (Queue) and ``multiprocessing`` (Pool).
"""
from __future__ import annotations

import socket
from typing import Any, Dict, List, Union

from runtime.util import scheduling_strategies
from runtime.util.actor_pool import ActorPool
from runtime.util.check_serialize import inspect_serializability
from runtime.util.helpers import as_completed, map_unordered
from runtime.util.placement_group import (PlacementGroup, get_current_placement_group,
                                          get_placement_group, placement_group,
                                          placement_group_table, remove_placement_group)

__all__ = ["scheduling_strategies", "state", "placement_group", "remove_placement_group",
           "get_placement_group", "placement_group_table", "get_current_placement_group",
           "PlacementGroup", "ActorPool", "as_completed", "map_unordered",
           "inspect_serializability", "list_named_actors", "get_node_ip_address", "queue",
           "multiprocessing", "metrics", "accelerators"]

_LAZY_SUBMODULES = {"state", "queue", "multiprocessing", "metrics", "accelerators"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"runtime.util.{name}")
    raise AttributeError(f"module 'runtime.util' has no attribute {name!r}")


def list_named_actors(all_namespaces: bool = False) -> List[Union[str, Dict[str, str]]]:
    """The names of the live named actors in this job's namespace; with
    ``all_namespaces``, ``{"name": ..., "namespace": ...}`` for those of every namespace.
    Detached and non-detached actors alike; dead ones are not listed (their names are
    free again), as in Ray."""
    from runtime.api import _ensure_initialized
    from runtime.protocol import common_pb2

    cw = _ensure_initialized()
    reply = cw.gcs_call("ListActors", common_pb2.Empty(), doing="listing named actors")
    named = [(a.namespace, a.name) for a in reply.actors if a.name and a.state != "DEAD"]
    if all_namespaces:
        return [{"name": name, "namespace": ns} for ns, name in named]
    return [name for ns, name in named if ns == cw.namespace]


def get_node_ip_address(address: str = "8.8.8.8:53") -> str:
    """The IP address of this process's node: the node's own address once connected (as
    the cluster knows it); before that, the address this machine would use to reach
    ``address`` (a UDP connect, which sends nothing)."""
    from runtime.core_worker.current import core_worker_or_none

    cw = core_worker_or_none()
    if cw is not None:
        return cw.node_ip
    host, _, port = address.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, int(port)))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
