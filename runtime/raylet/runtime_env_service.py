"""The node's runtime environments over gRPC (``RuntimeEnvService``): what the state API's
``list_runtime_envs()`` lists, and ``Prepare``, which ``init()`` calls on every node for
a job whose runtime_env has ``eager_install`` (Ray's default), so its first task does not
wait for pip.

Served by the raylet on its port, behind the cluster token; the environments are the
worker pool's (worker_pool.py), which sets each up once however many ask.
"""
from __future__ import annotations

import grpc

from runtime.protocol import runtime_env_pb2, runtime_env_pb2_grpc
from runtime.raylet.worker_pool import WorkerPool

__all__ = ["RuntimeEnvService", "add_to_server"]


class RuntimeEnvService(runtime_env_pb2_grpc.RuntimeEnvServiceServicer):
    def __init__(self, pool: WorkerPool, node_id: bytes) -> None:
        self.pool = pool
        self.node_id = node_id

    async def ListRuntimeEnvs(self, request: runtime_env_pb2.ListRuntimeEnvsRequest,
                              context: grpc.aio.ServicerContext
                              ) -> runtime_env_pb2.ListRuntimeEnvsReply:
        reply = runtime_env_pb2.ListRuntimeEnvsReply(node_id=self.node_id)
        for env, state in sorted(self.pool.states.items()):
            reply.envs.add(hash=env, serialized=state.serialized, success=state.success,
                           error=state.error or "", creation_time_ms=state.creation_time_ms)
        return reply

    async def Prepare(self, request: runtime_env_pb2.PrepareRuntimeEnvRequest,
                      context: grpc.aio.ServicerContext) -> runtime_env_pb2.PrepareRuntimeEnvReply:
        info = request.runtime_env
        if not info.hash or not info.serialized:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"Prepare needs a resolved runtime_env (hash and JSON) to set "
                                f"up on node {self.pool.node}; got hash {info.hash!r}")
        return runtime_env_pb2.PrepareRuntimeEnvReply(started=self.pool.prepare(info))


def add_to_server(server: grpc.aio.Server, pool: WorkerPool) -> RuntimeEnvService:
    """Serve the runtime environments of the node whose worker pool this is on server."""
    service = RuntimeEnvService(pool, bytes.fromhex(pool.args.node_id))
    runtime_env_pb2_grpc.add_RuntimeEnvServiceServicer_to_server(service, server)
    return service
