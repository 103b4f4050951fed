"""The NodeAgent gRPC servicer: translates RPCs to :class:`agent.core.NodeAgent` calls.

One instance serves the unix socket (``local=True``: the caller is the agent's
own user, so Status includes the cluster token) and another the TCP port (behind
the token interceptor; the token is never sent back over the network).

Read-only callers (raytop --readonly, or anyone holding only the read-only token)
may call every view, Status and the logs, and nothing that changes the cluster:

* The TCP API accepts the cluster token (everything) or the cluster's *read-only
  token*, derived from the cluster token with HMAC-SHA256 (so every agent of the
  cluster knows it without storing anything, and a new cluster token revokes it).
  :class:`ApiAuth` lets a read-only caller reach only READ_METHODS, from its headers
  alone, like the cluster-token check. A flag a caller sets on itself cannot be
  trusted, so the token is the boundary.
* A caller may also declare itself read-only (``node-agent-readonly: 1`` metadata,
  as raytop --readonly does on the unix socket): honoured as a safety catch for
  honest callers, never relied on against dishonest ones. The unix socket itself
  is 0600 (0660 for group node-agent under the packaged unit): whoever can open it is
  the agent's user, root, or a member of that group, and may act.

The job RPCs (StartJobProcess, PutJobPackage, WaitJobProcess, StopJobProcess,
ReadJobLog, DeleteJobFiles) run entrypoints for the head's job manager on the node
that holds a job's reservation. They are served on the TCP API only, to the full
cluster token (not the read-only token, not the unix socket: nobody but the head's
manager has a reason to call them). StartJobProcess takes no command: it reads the
entrypoint and runtime_env from the job's record in the GCS, and starts it only while
that record is PENDING and the job's reservation (its placement group, named after
the job) is placed on this node. So a caller can only run what was submitted through
the jobs API, which takes the same token, and only where the cluster reserved it.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

import grpc

from agent.core import NodeAgent
from agent.errors import AgentError
from agent.jobs import records
from agent.jobs.packages import PackageError, check_name
from agent.jobs.packages import PROTOCOL as PACKAGE_PROTOCOL
from agent.jobs.records import BadRequest
from agent.jobs.runner import JobRunner, JobUnknown
from agent.views import options_dict, short_rpc_reason
from runtime import rpc
from runtime.protocol import agent_pb2, agent_pb2_grpc, gcs_pb2, gcs_pb2_grpc

log = logging.getLogger("agent.service")

FOLLOW_POLL_S = 0.2
DEFAULT_TAIL_LINES = 50
#: The agent's own log; "agent" is the older spelling, still accepted.
AGENT_LOG_NAMES = ("node-agent", "agent")
#: What a read-only caller may call (everything else changes the cluster or hands out
#: the token).
READ_METHODS = frozenset({"Status", "ListProcesses", "TailLogs", "WatchEvents", "View",
                          "Describe"})
#: Metadata by which a caller asks to be treated as read-only (raytop --readonly).
READONLY_METADATA = "node-agent-readonly"
_AUTH = "authorization"
#: Bounds on what the head's job manager may ask of the job RPCs.
MAX_WAIT_S = 60.0
MAX_LOG_WAIT_S = 10.0
MAX_STOP_GRACE_S = 300.0
MAX_NOTE_CHARS = 2000
JOB_GCS_TIMEOUT_S = 10.0


def readonly_token(token: str) -> str:
    """The cluster's read-only token: HMAC-SHA256 of a fixed label under the cluster
    token, as 64 hex characters (a valid token by agent/tokens.py's rules)."""
    return hmac.new(token.encode(), b"node-agent read-only API v1", hashlib.sha256).hexdigest()


def _bearer(metadata: Any) -> bytes:
    for key, value in metadata or ():
        if key == _AUTH:
            return value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    return b""


def _denying(code: grpc.StatusCode, reason: str) -> grpc.RpcMethodHandler:
    """Refuse without reading the request (stream-typed whatever the method, as in
    runtime.rpc: a unary handler would read the whole body first)."""

    async def deny(request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, reason)
        yield  # pragma: no cover - makes this an async generator

    return grpc.stream_stream_rpc_method_handler(deny)


class ApiAuth(grpc.aio.ServerInterceptor):
    """The TCP API's check: the cluster token, or the read-only token for READ_METHODS."""

    def __init__(self, token: str) -> None:
        self._full = b"Bearer " + token.encode()
        self._read = b"Bearer " + readonly_token(token).encode()
        self._cluster_check = rpc.TokenAuthInterceptor(token)

    async def intercept_service(self, continuation: Callable, details: Any) -> Any:
        raw = _bearer(details.invocation_metadata)
        if raw and hmac.compare_digest(raw, self._read):
            method = details.method.rsplit("/", 1)[-1]
            if method in READ_METHODS:
                return await continuation(details)
            return _denying(grpc.StatusCode.PERMISSION_DENIED,
                            f"read-only: the read-only token allows viewing only; {method} "
                            f"needs the cluster token")
        return await self._cluster_check.intercept_service(continuation, details)


def make_tcp_server(token: str) -> grpc.aio.Server:
    """The agent's TCP API server: runtime.rpc.make_server's, with ApiAuth as its check
    (the cluster token, or the read-only token for views)."""
    return rpc.make_server(token, ApiAuth(token))


async def _abort(context: grpc.aio.ServicerContext, exc: AgentError) -> None:
    await context.abort(exc.code, exc.message)


def _open_log(path: str):
    """Open a log for reading, never through a symlink planted at its name."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def _inside(path: str, root: str) -> bool:
    """True when path, with every symlink resolved, lies inside root."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) == real_root


def _last_lines(path: str, n: int) -> Tuple[List[str], int]:
    """The last n lines of path and the offset where following should continue."""
    try:
        with _open_log(path) as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            start = max(0, size - max(64 * 1024, n * 512))
            fh.seek(start)
            data = fh.read()
    except OSError:
        return [], 0
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:]
    return (lines[-n:] if n > 0 else []), size


class AgentService(agent_pb2_grpc.NodeAgentServicer):
    def __init__(self, agent: NodeAgent, local: bool, jobs: Optional[JobRunner] = None) -> None:
        self.agent = agent
        self.local = local
        self.jobs = jobs

    def readonly(self, context: grpc.aio.ServicerContext) -> bool:
        """Whether this call may only look: it holds the read-only token, or says so."""
        metadata = context.invocation_metadata() or ()
        for key, value in metadata:
            if key == READONLY_METADATA and str(value).strip().lower() not in ("", "0", "no"):
                return True
        if not self.local and self.agent.token:
            want = b"Bearer " + readonly_token(self.agent.token).encode()
            raw = _bearer(metadata)
            return bool(raw) and hmac.compare_digest(raw, want)
        return False

    async def _refuse_readonly(self, context: grpc.aio.ServicerContext, what: str) -> None:
        if self.readonly(context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"read-only: this caller may view the cluster but not {what} "
                                f"(raytop --readonly, or the read-only token)")

    async def Status(self, request, context):
        reply = await self.agent.status(include_token=self.local, local_only=request.local_only)
        if self.readonly(context):
            reply.token = reply.readonly_token = ""
        return reply

    async def StartHead(self, request, context):
        await self._refuse_readonly(context, "start a head node")
        try:
            return await self.agent.start_head(options_dict(request.options), request.token)
        except AgentError as exc:
            await _abort(context, exc)

    async def Join(self, request, context):
        await self._refuse_readonly(context, "join a cluster")
        try:
            return await self.agent.join(request.head_address, request.token,
                                         options_dict(request.options), request.wait_s)
        except AgentError as exc:
            await _abort(context, exc)

    async def Leave(self, request, context):
        await self._refuse_readonly(context, "leave the cluster")
        try:
            return await self.agent.leave(request.drain_timeout_s)
        except AgentError as exc:
            await _abort(context, exc)

    async def StopNode(self, request, context):
        await self._refuse_readonly(context, "stop the node")
        try:
            return await self.agent.stop_node(request.drain_timeout_s, request.exit_agent)
        except AgentError as exc:
            await _abort(context, exc)

    async def StartNode(self, request, context):
        await self._refuse_readonly(context, "start the node")
        log.info("StartNode requested (%s)", context.peer() or "local")
        try:
            return await self.agent.start_node()
        except AgentError as exc:
            await _abort(context, exc)

    async def ListProcesses(self, request, context):
        reply = agent_pb2.ListProcessesReply()
        reply.processes.extend(await self.agent.views.processes())
        return reply

    async def _known_logs(self) -> Dict[str, Tuple[str, str]]:
        return await self.agent.views.known_logs()

    # ---- raytop (agent/cluster.py) ---------------------------------------------------------

    async def View(self, request, context):
        try:
            return await self.agent.views.view(request, self.readonly(context))
        except AgentError as exc:
            await _abort(context, exc)

    async def Describe(self, request, context):
        try:
            return await self.agent.views.describe(request)
        except AgentError as exc:
            await _abort(context, exc)

    async def Act(self, request, context):
        await self._refuse_readonly(context, f"act ({request.action})")
        who = "the local control socket" if self.local else f"TCP API caller {context.peer()}"
        try:
            return await self.agent.actions.act(request, who)
        except AgentError as exc:
            await _abort(context, exc)

    @staticmethod
    def _describe_known(known: Dict[str, Tuple[str, str]]) -> str:
        components = [n for n in known if n not in AGENT_LOG_NAMES and
                      not n.startswith("worker-")]
        workers = sorted(n for n in known if n.startswith("worker-"))
        shown = components + ["node-agent"]
        if workers:
            shown += workers if len(workers) <= 8 else workers[:8] + [
                f"and {len(workers) - 8} more workers (see `agentctl status`)"]
        return ", ".join(shown)

    async def _log_files(self, component: str, context: grpc.aio.ServicerContext
                         ) -> List[Tuple[str, str]]:
        """(name, path) of the logs to show; aborts with INVALID_ARGUMENT for a name
        this node does not know (or one shaped like a path)."""
        known = await self._known_logs()
        if not component:
            wanted = [(name, known[name]) for name in known
                      if name not in AGENT_LOG_NAMES and not name.startswith("worker-")]
        elif "/" in component or ".." in component or "\0" in component:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{component!r} is not a component name (a name, not a path); "
                                f"this node's logs: {self._describe_known(known)}")
        elif component not in known:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"no component {component!r} on this node; its logs: "
                                f"{self._describe_known(known)}")
        else:
            wanted = [(component, known[component])]
        files = []
        for name, (path, root) in wanted:
            if _inside(path, root):
                files.append((name, path))
                continue
            log.warning("refusing to read the log of %s: %s resolves to %s, outside %s", name,
                        path, os.path.realpath(path), root)
            if component:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"the log of {name} ({path}) resolves to a path outside the "
                                    f"node's log directory {root}; refusing to read it")
        return files

    async def TailLogs(self, request, context) -> AsyncIterator[agent_pb2.LogLine]:
        if request.node:
            views = self.agent.views
            try:
                n = await views.node_or_error(request.node)
                local = views.is_local(n.node_id)
                peer = None if local else await views.peer(n)
            except AgentError as exc:
                await _abort(context, exc)
                return
            if peer is not None:
                fwd = agent_pb2.TailLogsRequest(component=request.component,
                                                lines=request.lines, follow=request.follow)
                try:
                    async for line in peer.TailLogs(fwd):
                        yield line
                except grpc.RpcError as exc:
                    await context.abort(exc.code(), f"the agent of node {n.node_id.hex()[:8]} "
                                        f"({n.node_ip}): {exc.details() or short_rpc_reason(exc)}")
                return
        files = await self._log_files(request.component, context)
        n = request.lines if request.lines > 0 else DEFAULT_TAIL_LINES
        offsets = {}
        for name, path in files:
            lines, offsets[path] = _last_lines(path, n)
            for line in lines:
                yield agent_pb2.LogLine(component=name, line=line)
        if not request.follow:
            return
        partial = {path: b"" for _, path in files}
        while True:
            await asyncio.sleep(FOLLOW_POLL_S)
            for name, path in files:
                try:
                    size = os.path.getsize(path)
                except OSError:
                    continue
                if size < offsets[path]:  # rotated or truncated: start from the top
                    offsets[path] = 0
                if size == offsets[path]:
                    continue
                try:
                    with _open_log(path) as fh:
                        fh.seek(offsets[path])
                        data = partial[path] + fh.read(size - offsets[path])
                except OSError:
                    continue
                offsets[path] = size
                *complete, partial[path] = data.split(b"\n")
                for raw in complete:
                    yield agent_pb2.LogLine(component=name,
                                            line=raw.decode("utf-8", errors="replace"))

    async def WatchEvents(self, request, context) -> AsyncIterator[agent_pb2.AgentEvent]:
        q = self.agent.subscribe()
        try:
            # Start with the current picture, so a watcher needs no separate Status call.
            phase, message = self.agent.effective_phase()
            yield agent_pb2.AgentEvent(kind="phase", subject=self.agent.state.role, state=phase,
                                       message=message)
            for s in self.agent.process_snapshots():
                yield agent_pb2.AgentEvent(kind="process", subject=s["name"], state=s["state"],
                                           pid=s["pid"] or 0)
            while True:
                yield await q.get()
        finally:
            self.agent.unsubscribe(q)

    # ---- jobs: entrypoints for the head's job manager (module doc) -------------------------

    async def _job_runner(self, context: grpc.aio.ServicerContext, method: str) -> JobRunner:
        if self.local:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{method} is for the head's job manager, over the TCP API with "
                                f"the cluster token; submit jobs through the jobs API "
                                f"(`agentctl job submit`, `ray job submit`)")
        await self._refuse_readonly(context, f"run jobs ({method})")
        if self.jobs is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                "this agent runs no jobs (no job runner)")
        return self.jobs  # type: ignore[return-value]

    @staticmethod
    async def _job_error(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        code = (grpc.StatusCode.NOT_FOUND if isinstance(exc, JobUnknown) else
                grpc.StatusCode.INVALID_ARGUMENT)
        await context.abort(code, str(exc.args[0]) if exc.args else str(exc))

    async def StartJobProcess(self, request, context):
        runner = await self._job_runner(context, "StartJobProcess")
        sid = request.submission_id
        if not records.valid_submission_id(sid):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{sid!r} is not a submission id")
        ctx = runner.context()
        if ctx is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this agent runs no node now; it cannot run a job")
        if sid not in runner.jobs:  # else a retry: answered with the job's process
            job = await self._verified_job(context, ctx, sid, request.placement_group_id)
        else:
            job = gcs_pb2.SubmittedJob(submission_id=sid)
        log.info("StartJobProcess %s from %s", sid, context.peer())
        try:
            outcome = await runner.start(job, remote=True)
        except BadRequest as exc:
            await self._job_error(context, exc)
        return agent_pb2.StartJobProcessReply(
            pid=outcome.pid, missing_package=outcome.missing_package,
            error_type=outcome.error_type, message=outcome.message, node_id=ctx.node_id,
            node_ip=ctx.node_ip)

    async def _verified_job(self, context, ctx, sid: str, pg_id: bytes
                            ) -> gcs_pb2.SubmittedJob:
        """The job's record from the GCS, if it may start here (module doc); aborts
        with FAILED_PRECONDITION saying why not."""
        gcs = gcs_pb2_grpc.GcsStub(self.agent._channel(ctx.gcs_address, ctx.token))
        try:
            rec = await gcs.GetSubmittedJob(gcs_pb2.SubmittedJobRequest(submission_id=sid),
                                            timeout=JOB_GCS_TIMEOUT_S)
            pg = (await gcs.GetPlacementGroup(
                gcs_pb2.PlacementGroupRequest(placement_group_id=pg_id),
                timeout=JOB_GCS_TIMEOUT_S)) if pg_id else gcs_pb2.PlacementGroupReply()
        except grpc.RpcError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"cannot check job {sid} with the GCS at {ctx.gcs_address}: "
                                f"{short_rpc_reason(exc)}")
        if not rec.found:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"no job {sid} in the GCS's job table: this node runs only jobs "
                                f"submitted through the head's jobs API")
        if rec.job.status != records.PENDING:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"job {sid} is {rec.job.status}, not PENDING: it was started "
                                f"already, or has ended")
        info = pg.info
        placed_here = (pg.found and info.state == "CREATED" and len(info.bundle_nodes) == 1
                       and info.bundle_nodes[0].hex() == ctx.node_id
                       and info.spec.name == records.reservation_name(sid))
        if not placed_here:
            group = pg_id.hex()[:16] or "none given"
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"job {sid}'s reservation (placement group {group}) is not "
                                f"placed on this node, {ctx.where()}: a job runs only on the "
                                f"node that holds its reservation")
        return rec.job

    async def PutJobPackage(self, request_iterator, context):
        runner = await self._job_runner(context, "PutJobPackage")
        stream = request_iterator.__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an empty package upload")
        try:
            name = check_name(PACKAGE_PROTOCOL, first.name)
        except PackageError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        async def chunks() -> AsyncIterator[bytes]:
            if first.data:
                yield first.data
            async for chunk in stream:
                yield chunk.data

        try:
            size = await runner.put_package(name, first.size or None, chunks())
        except PackageError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED if exc.status == 413
                                else grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except JobUnknown as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        log.info("package gcs://%s (%d bytes) received from %s", name, size, context.peer())
        return agent_pb2.PutJobPackageReply(size=size)

    async def WaitJobProcess(self, request, context):
        runner = await self._job_runner(context, "WaitJobProcess")
        timeout = min(max(request.timeout_s, 0.0), MAX_WAIT_S)
        try:
            ended = await runner.wait(request.submission_id, timeout, watch=True)
        except (JobUnknown, BadRequest) as exc:
            await self._job_error(context, exc)
        if ended is None:
            return agent_pb2.JobProcessExit(exited=False)
        return agent_pb2.JobProcessExit(exited=True, has_exit_code=ended.exit_code is not None,
                                        exit_code=ended.exit_code or 0, reason=ended.reason)

    async def StopJobProcess(self, request, context):
        runner = await self._job_runner(context, "StopJobProcess")
        grace = min(max(request.grace_s, 0.0), MAX_STOP_GRACE_S)
        try:
            stopping = runner.stop(request.submission_id, grace, request.note[:MAX_NOTE_CHARS])
        except BadRequest as exc:
            await self._job_error(context, exc)
        return agent_pb2.StopJobProcessReply(stopping=stopping)

    async def ReadJobLog(self, request, context):
        runner = await self._job_runner(context, "ReadJobLog")
        try:
            chunk = await runner.read_log(request.submission_id, request.offset,
                                          request.max_bytes,
                                          min(max(request.wait_s, 0.0), MAX_LOG_WAIT_S))
        except (JobUnknown, BadRequest) as exc:
            await self._job_error(context, exc)
        return agent_pb2.ReadJobLogReply(data=chunk.data, offset=chunk.offset, size=chunk.size,
                                         running=chunk.running)

    async def DeleteJobFiles(self, request, context):
        runner = await self._job_runner(context, "DeleteJobFiles")
        try:
            deleted = runner.delete_files(request.submission_id)
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return agent_pb2.DeleteJobFilesReply(deleted=deleted)
