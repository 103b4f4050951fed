"""runtime: a Ray-compatible distributed runtime. ``import runtime as ray``.

This module only re-exports; the implementation lives in the submodules.
"""
import os as _os

# Defence in depth only: the supervisor spawns with vfork+exec, which runs no fork
# handlers, so children are safe whatever this says. Set before gRPC is imported (it
# reads it once), and only as a default: a user's explicit choice is theirs.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# Servers close idle connections (runtime/rpc.py); gRPC would print an INFO line for each
# GOAWAY it receives. Also read once, at import; again only a default.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
from runtime._version import __version__
from runtime import actor, exceptions, util
from runtime import _private  # noqa: F401  (ray._private.internal_api.free: Ray's __init__ imports _private too)
from runtime.actor import ActorClass, ActorHandle
from runtime.api import (available_resources, cancel, cluster_resources, get, get_actor,
                         get_gpu_ids, get_runtime_context, init, is_initialized, kill, nodes, put,
                         shutdown, wait)
from runtime.core_worker.generators import DynamicObjectRefGenerator, ObjectRefGenerator
from runtime.ids import (ActorClassID, ActorID, ClusterID, FunctionID, JobID, NodeID, ObjectID,
                         PlacementGroupID, TaskID, UniqueID, WorkerID)
from runtime.object_ref import ObjectRef
from runtime.remote import method, remote
from runtime.remote_function import RemoteFunction
from runtime.util.timeline import timeline

__all__ = [
    "__version__", "exceptions", "init", "shutdown", "is_initialized", "remote", "method", "get",
    "put", "wait", "cancel", "nodes", "cluster_resources", "available_resources",
    "get_runtime_context", "get_gpu_ids", "ObjectRef", "RemoteFunction", "kill", "get_actor",
    "actor", "util", "ActorClass", "ActorHandle", "ActorClassID", "ActorID", "ClusterID",
    "FunctionID", "JobID", "NodeID", "ObjectID", "PlacementGroupID", "TaskID", "UniqueID",
    "WorkerID", "timeline", "ObjectRefGenerator", "DynamicObjectRefGenerator",
]
