"""The NodeAgent gRPC servicer: translates RPCs to :class:`agent.core.NodeAgent` calls.

One instance serves the unix socket (``local=True``: the caller is the agent's
own user, so Status includes the cluster token) and another the TCP port (behind
the token interceptor; the token is never sent back over the network).
"""
from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator, List, Tuple

import grpc

from agent.core import NodeAgent
from agent.errors import AgentError
from agent.views import options_dict, process_info
from runtime.protocol import agent_pb2, agent_pb2_grpc

FOLLOW_POLL_S = 0.2
DEFAULT_TAIL_LINES = 50


async def _abort(context: grpc.aio.ServicerContext, exc: AgentError) -> None:
    await context.abort(exc.code, exc.message)


def _last_lines(path: str, n: int) -> Tuple[List[str], int]:
    """The last n lines of path and the offset where following should continue."""
    try:
        with open(path, "rb") as fh:
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
    def __init__(self, agent: NodeAgent, local: bool) -> None:
        self.agent = agent
        self.local = local

    async def Status(self, request, context):
        return await self.agent.status(include_token=self.local, local_only=request.local_only)

    async def StartHead(self, request, context):
        try:
            return await self.agent.start_head(options_dict(request.options), request.token)
        except AgentError as exc:
            await _abort(context, exc)

    async def Join(self, request, context):
        try:
            return await self.agent.join(request.head_address, request.token,
                                         options_dict(request.options), request.wait_s)
        except AgentError as exc:
            await _abort(context, exc)

    async def Leave(self, request, context):
        try:
            return await self.agent.leave(request.drain_timeout_s)
        except AgentError as exc:
            await _abort(context, exc)

    async def StopNode(self, request, context):
        try:
            return await self.agent.stop_node(request.drain_timeout_s, request.exit_agent)
        except AgentError as exc:
            await _abort(context, exc)

    async def StartNode(self, request, context):
        try:
            return await self.agent.start_node()
        except AgentError as exc:
            await _abort(context, exc)

    async def ListProcesses(self, request, context):
        reply = agent_pb2.ListProcessesReply()
        reply.processes.extend(process_info(s) for s in self.agent.process_snapshots())
        reply.processes.extend(await self.agent.workers())
        return reply

    def _log_files(self, component: str) -> List[Tuple[str, str]]:
        agent = self.agent
        if component == "agent":
            return [("agent", os.path.join(agent.paths.log_dir, "node-agent.log"))]
        snaps = {s["name"]: s["log_path"] for s in agent.process_snapshots()}
        if not component:
            return list(snaps.items())
        if component in snaps:
            return [(component, snaps[component])]
        node = agent.node
        if node is not None:
            path = os.path.join(node.session_dir, "logs", f"{component}.log")
            if os.path.exists(path):
                return [(component, path)]
        return []

    async def TailLogs(self, request, context) -> AsyncIterator[agent_pb2.LogLine]:
        files = self._log_files(request.component)
        if not files:
            known = ", ".join(["agent"] + [s["name"] for s in self.agent.process_snapshots()])
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no log for {request.component!r} on this node (known: {known}; "
                                f"workers: worker-<id> as listed by `agentctl status`)")
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
                with open(path, "rb") as fh:
                    fh.seek(offsets[path])
                    data = partial[path] + fh.read(size - offsets[path])
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
