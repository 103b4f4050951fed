"""Where the head's job manager runs an entrypoint: its own agent, or another node's.

Both hosts answer the same five questions (start, wait, stop, read the log, delete the
files), so the manager supervises a job the same way wherever it runs. LocalHost
calls this agent's JobRunner; RemoteHost calls the JobRunner of the agent of the node
holding the job's reservation, over that agent's TCP API with the cluster token
(StartJobProcess ...), whose address agents publish in the GCS KV.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import AsyncIterator, Optional

import grpc

from agent.cluster import AGENT_KV_NS
from agent.jobs.runner import ExitInfo, JobRunner, JobUnknown, LogChunk, StartOutcome
from agent.views import short_rpc_reason
from runtime.protocol import agent_pb2, agent_pb2_grpc, gcs_pb2, gcs_pb2_grpc

log = logging.getLogger("agent.jobs")

#: One WaitJobProcess call waits this long, then is asked again: a call is always open
#: while the job runs, which is how the node knows its job is still supervised.
WAIT_POLL_S = 20.0
#: The node's agent may be unreachable this long (the node itself alive) before the job
#: is given up as FAILED; its agent stops it by itself soon after (runner.ORPHAN_GRACE_S).
UNREACHABLE_S = 60.0
RPC_TIMEOUT_S = 30.0
PACKAGE_CHUNK = 1 << 20


class HostError(RuntimeError):
    """The node that runs (or ran) a job cannot be asked about it; the message says
    which node and why."""


class LocalHost:
    """The head's own node: its agent's runner, called directly."""

    remote = False

    def __init__(self, runner: JobRunner, node_id: str, node_ip: str) -> None:
        self.runner = runner
        self.node_id = node_id
        self.node_ip = node_ip

    def describe(self) -> str:
        return f"the head ({self.node_ip})"

    async def start(self, job: gcs_pb2.SubmittedJob, pg_id: bytes) -> StartOutcome:
        return await self.runner.start(job)

    async def put_package(self, name: str, path: str) -> None:
        raise HostError("the head keeps its packages itself")  # never asked: same store

    async def wait(self, sid: str) -> ExitInfo:
        try:
            exit_ = await self.runner.wait(sid)
        except JobUnknown as exc:
            raise HostError(str(exc)) from None
        assert exit_ is not None
        return exit_

    async def stop(self, sid: str, grace_s: float, note: str = "") -> bool:
        return self.runner.stop(sid, grace_s, note)

    async def read_log(self, sid: str, offset: int, max_bytes: int, wait_s: float = 0.0
                       ) -> LogChunk:
        try:
            return await self.runner.read_log(sid, offset, max_bytes, wait_s)
        except JobUnknown as exc:
            raise HostError(str(exc)) from None

    async def delete_files(self, sid: str) -> bool:
        return self.runner.delete_files(sid)

    def forget(self, sid: str) -> None:
        self.runner.forget(sid)


class RemoteHost:
    """Another node's agent, over its TCP API."""

    remote = True

    def __init__(self, stub: agent_pb2_grpc.NodeAgentStub, node_id: str, node_ip: str,
                 address: str) -> None:
        self.stub = stub
        self.node_id = node_id
        self.node_ip = node_ip
        self.address = address

    def describe(self) -> str:
        return f"node {self.node_id[:8]} ({self.node_ip})"

    def _error(self, what: str, exc: grpc.RpcError) -> HostError:
        return HostError(f"the node agent of {self.describe()} at {self.address} {what}: "
                         f"{exc.details() or short_rpc_reason(exc)}")

    async def start(self, job: gcs_pb2.SubmittedJob, pg_id: bytes) -> StartOutcome:
        try:
            reply = await self.stub.StartJobProcess(
                agent_pb2.StartJobProcessRequest(submission_id=job.submission_id,
                                                 placement_group_id=pg_id),
                timeout=RPC_TIMEOUT_S + 60)  # unpacking a large package takes a while
        except grpc.RpcError as exc:
            raise self._error("did not start the entrypoint", exc) from None
        return StartOutcome(pid=reply.pid, missing_package=reply.missing_package,
                            error_type=reply.error_type, message=reply.message)

    async def put_package(self, name: str, path: str) -> None:
        size = os.path.getsize(path)

        async def chunks() -> AsyncIterator[agent_pb2.JobPackageChunk]:
            yield agent_pb2.JobPackageChunk(name=name, size=size)
            with open(path, "rb") as fh:
                while data := await asyncio.to_thread(fh.read, PACKAGE_CHUNK):
                    yield agent_pb2.JobPackageChunk(data=data)

        try:
            await self.stub.PutJobPackage(chunks(), timeout=RPC_TIMEOUT_S + size / 1e6)
        except grpc.RpcError as exc:
            raise self._error(f"did not take package gcs://{name}", exc) from None
        log.info("package gcs://%s (%d bytes) sent to %s", name, size, self.describe())

    async def wait(self, sid: str) -> ExitInfo:
        """How the job ended there. Retries while the agent is unreachable, for up to
        UNREACHABLE_S (the manager watches the node's liveness meanwhile)."""
        failing_since: Optional[float] = None
        delay = 0.2
        while True:
            try:
                reply = await self.stub.WaitJobProcess(
                    agent_pb2.WaitJobProcessRequest(submission_id=sid, timeout_s=WAIT_POLL_S),
                    timeout=WAIT_POLL_S + RPC_TIMEOUT_S)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.UNAUTHENTICATED):
                    raise self._error(f"no longer knows job {sid}", exc) from None
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > UNREACHABLE_S:
                    raise self._error(f"has not answered for {UNREACHABLE_S:g} s", exc) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            failing_since, delay = None, 0.2
            if reply.exited:
                return ExitInfo(reply.exit_code if reply.has_exit_code else None, reply.reason)

    async def stop(self, sid: str, grace_s: float, note: str = "",
                   timeout_s: float = RPC_TIMEOUT_S) -> bool:
        try:
            reply = await self.stub.StopJobProcess(
                agent_pb2.StopJobProcessRequest(submission_id=sid, grace_s=grace_s, note=note),
                timeout=timeout_s)
        except grpc.RpcError as exc:
            log.warning("could not stop job %s on %s: %s", sid, self.describe(),
                        exc.details() or short_rpc_reason(exc))
            return False
        return reply.stopping

    async def read_log(self, sid: str, offset: int, max_bytes: int, wait_s: float = 0.0
                       ) -> LogChunk:
        try:
            reply = await self.stub.ReadJobLog(
                agent_pb2.ReadJobLogRequest(submission_id=sid, offset=offset,
                                            max_bytes=max_bytes, wait_s=wait_s),
                timeout=wait_s + RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise self._error(f"did not send the log of job {sid}", exc) from None
        return LogChunk(reply.data, reply.offset, reply.size, reply.running)

    async def delete_files(self, sid: str) -> bool:
        try:
            reply = await self.stub.DeleteJobFiles(
                agent_pb2.DeleteJobFilesRequest(submission_id=sid), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise self._error(f"did not delete the files of job {sid}", exc) from None
        return reply.deleted

    def forget(self, sid: str) -> None:
        pass  # the node drops it by itself (runner.KEEP_EXITED_S)


async def agent_address(gcs: gcs_pb2_grpc.GcsStub, node_id: str, node_ip: str,
                        timeout_s: float) -> str:
    """The TCP API address the agent of node_id publishes; HostError when none."""
    try:
        reply = await gcs.KvGet(gcs_pb2.KvRequest(ns=AGENT_KV_NS, key=node_id.encode()),
                                timeout=timeout_s)
    except grpc.RpcError as exc:
        raise HostError(f"cannot ask the GCS where the agent of node {node_id[:8]} ({node_ip}) "
                        f"listens: {short_rpc_reason(exc)}") from None
    try:
        address = json.loads(reply.value).get("api_address", "") if reply.found else ""
    except ValueError:
        address = ""
    if not address:
        raise HostError(f"the agent of node {node_id[:8]} ({node_ip}) publishes no TCP API "
                        f"address in the GCS (is its agent running, with [ports] agent set?)")
    return address


__all__ = ["LocalHost", "RemoteHost", "HostError", "agent_address", "WAIT_POLL_S"]
