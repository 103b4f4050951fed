"""The NodeAgent gRPC servicer: translates RPCs to :class:`agent.core.NodeAgent` calls.

One instance serves the unix socket (``local=True``: the caller is the agent's
own user, so Status includes the cluster token) and another the TCP port (behind
the token interceptor; the token is never sent back over the network).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
from typing import AsyncIterator, Dict, List, Tuple

import grpc

from agent.core import NodeAgent
from agent.errors import AgentError
from agent.views import options_dict, process_info
from runtime.protocol import agent_pb2, agent_pb2_grpc

log = logging.getLogger("agent.service")

FOLLOW_POLL_S = 0.2
DEFAULT_TAIL_LINES = 50
#: The agent's own log; "agent" is the older spelling, still accepted.
AGENT_LOG_NAMES = ("node-agent", "agent")
_WORKER_LOG = re.compile(r"(worker-[0-9a-f]{8})\.log")


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

    async def _known_logs(self) -> Dict[str, Tuple[str, str]]:
        """Every log this node has, by component name: (path, the directory it must
        lie in). Only these are ever read: a name from the network is looked up
        here, never joined into a path."""
        agent = self.agent
        agent_log = (os.path.join(agent.paths.log_dir, "node-agent.log"), agent.paths.log_dir)
        known = {name: agent_log for name in AGENT_LOG_NAMES}
        node = agent.node
        if node is None:
            return known
        logs_dir = os.path.join(node.session_dir, "logs")
        try:
            names = os.listdir(logs_dir)
        except OSError:
            names = []
        for name in names:  # workers that exited keep their log: often the one wanted
            m = _WORKER_LOG.fullmatch(name)
            if m:
                known[m.group(1)] = (os.path.join(logs_dir, name), logs_dir)
        for w in await agent.workers():
            known[w.component] = (w.log_path, logs_dir)
        for snap in agent.process_snapshots():
            known[snap["name"]] = (snap["log_path"], logs_dir)
        return known

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
