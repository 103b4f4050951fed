"""runtime: a Ray-compatible distributed runtime. ``import runtime as ray``.

This module only re-exports; the implementation lives in the submodules.
"""
import os as _os

# Processes are forked from threads that use gRPC (the supervisor, the raylet's
# worker pool); gRPC's fork handlers would restart its pollers in the child between
# fork and exec and abort it. The child execs at once, so it needs none of them.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
from runtime._version import __version__
from runtime import actor, exceptions, util
from runtime.actor import ActorClass, ActorHandle
from runtime.api import (available_resources, cancel, cluster_resources, get, get_actor,
                         get_gpu_ids, get_runtime_context, init, is_initialized, kill, nodes, put,
                         shutdown, wait)
from runtime.object_ref import ObjectRef
from runtime.remote import method, remote
from runtime.remote_function import RemoteFunction

__all__ = [
    "__version__", "exceptions", "init", "shutdown", "is_initialized", "remote", "method", "get",
    "put", "wait", "cancel", "nodes", "cluster_resources", "available_resources",
    "get_runtime_context", "get_gpu_ids", "ObjectRef", "RemoteFunction", "kill", "get_actor",
    "actor", "util", "ActorClass", "ActorHandle",
]
