"""Where raytop's data comes from: a node agent's gRPC API, behind one small interface.

:class:`AgentSource` talks to an agent (its unix socket, found as agentctl finds it,
or its TCP API with a token). Tests, screenshots and the scale benchmark use
:class:`tui.fake.FakeSource`, which answers the same calls from fixed data. The
app only ever sees this interface, and calls it from worker threads, never from
the UI thread.

Every failure to reach the agent is a :class:`SourceError` with one line that says
what was tried and why it failed; raytop shows it in its banner and tries again at
the next refresh (on a fresh channel, so gRPC's reconnect backoff never delays it).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Iterator, List, Optional, Protocol, Sequence, Tuple

import grpc

from runtime.protocol import agent_pb2, agent_pb2_grpc

__all__ = ["Query", "Source", "SourceError", "AgentSource", "LogStream"]

#: Seconds a view or an action may take before raytop says the agent is not answering.
VIEW_TIMEOUT_S = 10.0
ACTION_TIMEOUT_S = 300.0
READONLY_METADATA = ("node-agent-readonly", "1")


class SourceError(RuntimeError):
    """The agent could not be asked, or refused: one line, for the banner."""

    def __init__(self, message: str, *, unreachable: bool = True) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass
class Query:
    """What one refresh asks for."""

    view: str
    filter: str = ""
    sort: str = ""
    descending: bool = False
    limit: int = 1000
    node: str = ""
    history: bool = False
    history_since: float = 0.0


class LogStream(Protocol):
    """Lines of a log, then (when following) new ones as they are written."""

    def __iter__(self) -> Iterator[agent_pb2.LogLine]: ...

    def cancel(self) -> None: ...


class Source(Protocol):
    """What raytop needs from a cluster."""

    label: str
    """Where the data comes from, for the title bar ("agent at 127.0.0.1:6380")."""
    readonly: bool
    """Actions are refused (raytop --readonly, or a read-only token)."""

    def view(self, query: Query) -> agent_pb2.ViewReply: ...

    def describe(self, view: str, key: str, node: str = "") -> agent_pb2.DescribeReply: ...

    def act(self, action: str, keys: Sequence[str], node: str = "",
            force: bool = False) -> agent_pb2.ActionReply: ...

    def tail(self, component: str, node: str = "", lines: int = 500,
             follow: bool = True) -> LogStream: ...

    def close(self) -> None: ...


def _one_line(exc: grpc.RpcError) -> str:
    details = (exc.details() or "").strip().splitlines()
    code = exc.code()
    text = details[0] if details else ""
    if code == grpc.StatusCode.UNAVAILABLE:
        low = text.lower()
        if "connection refused" in low or "no such file" in low or "failed to connect" in low:
            return "connection refused (is the agent running?)"
        return f"unavailable ({text})" if text else "unavailable"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer in time"
    return f"{code.name}: {text}" if text else code.name


class _Stream:
    def __init__(self, call: object) -> None:
        self._call = call

    def __iter__(self) -> Iterator[agent_pb2.LogLine]:
        try:
            yield from self._call  # type: ignore[misc]
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise SourceError(_one_line(exc), unreachable=exc.code() in (
                    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)) from None

    def cancel(self) -> None:
        self._call.cancel()  # type: ignore[attr-defined]


class AgentSource:
    """A node agent, over its unix socket or its TCP API.

    Args:
        socket: the control socket (None: discover it as agentctl does).
        address: HOST:PORT of an agent's TCP API instead of a socket.
        token: the cluster token, or the read-only token, for ``address``.
        readonly: ask the agent to refuse this client's actions too.
    """

    def __init__(self, *, socket: Optional[str] = None, address: Optional[str] = None,
                 token: str = "", readonly: bool = False) -> None:
        if address and not token:
            raise SourceError(f"--address {address} needs the cluster token (or the read-only "
                              f"token): pass --token-file FILE or set NODE_AGENT_TOKEN",
                              unreachable=False)
        self._socket = socket
        self._address = address
        self._token = token
        self.readonly = readonly
        self._lock = threading.Lock()
        self._channel: Optional[grpc.Channel] = None
        self._stub: Optional[agent_pb2_grpc.NodeAgentStub] = None
        self._path = ""
        self.label = f"agent at {address}" if address else "local agent"
        self._metadata: List[Tuple[str, str]] = [READONLY_METADATA] if readonly else []

    # -- connection -------------------------------------------------------------------------
    def _connect(self) -> agent_pb2_grpc.NodeAgentStub:
        with self._lock:
            if self._stub is not None:
                return self._stub
            if self._address:
                from runtime import rpc

                self._channel = rpc.sync_channel(self._address, self._token)
            else:
                from agent.client import AgentNotRunning, find_socket
                from runtime.session import agent_socket_candidates

                try:
                    path = find_socket(self._socket)
                except AgentNotRunning as exc:
                    raise SourceError(str(exc)) from None
                if path is None:
                    where = self._socket or " or ".join(agent_socket_candidates())
                    raise SourceError(f"no node agent answers on {where} (start one with "
                                      f"`agentctl start --head`, or pass --socket or --address)")
                self._path = path
                self.label = f"agent at {path}"
                self._channel = grpc.insecure_channel(f"unix:{path}")
            self._stub = agent_pb2_grpc.NodeAgentStub(self._channel)
            return self._stub

    def _reset(self) -> None:
        """Drop the channel: the next call dials afresh (no gRPC reconnect backoff)."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None

    def _call(self, method: str, request: object, timeout: float) -> object:
        stub = self._connect()
        try:
            return getattr(stub, method)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            unreachable = exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                         grpc.StatusCode.DEADLINE_EXCEEDED)
            if unreachable:
                self._reset()
            raise SourceError(f"{self.label}: {_one_line(exc)}", unreachable=unreachable) from None

    # -- the interface ----------------------------------------------------------------------
    def view(self, query: Query) -> agent_pb2.ViewReply:
        return self._call("View", agent_pb2.ViewRequest(
            view=query.view, filter=query.filter, sort=query.sort, descending=query.descending,
            limit=query.limit, node=query.node, history=query.history,
            history_since=query.history_since), VIEW_TIMEOUT_S)  # type: ignore[return-value]

    def describe(self, view: str, key: str, node: str = "") -> agent_pb2.DescribeReply:
        return self._call("Describe", agent_pb2.DescribeRequest(view=view, key=key, node=node),
                          VIEW_TIMEOUT_S)  # type: ignore[return-value]

    def act(self, action: str, keys: Sequence[str], node: str = "",
            force: bool = False) -> agent_pb2.ActionReply:
        if self.readonly:
            raise SourceError("read-only: raytop was started with --readonly", unreachable=False)
        return self._call("Act", agent_pb2.ActionRequest(action=action, keys=list(keys),
                                                         node=node, force=force),
                          ACTION_TIMEOUT_S)  # type: ignore[return-value]

    def tail(self, component: str, node: str = "", lines: int = 500,
             follow: bool = True) -> LogStream:
        stub = self._connect()
        call = stub.TailLogs(agent_pb2.TailLogsRequest(component=component, node=node,
                                                       lines=lines, follow=follow),
                             metadata=self._metadata)
        return _Stream(call)

    def close(self) -> None:
        self._reset()


def read_token(token_file: Optional[str]) -> str:
    """The token from --token-file, else $NODE_AGENT_TOKEN, else $NODE_AGENT_TOKEN_FILE."""
    from agent import tokens

    path = token_file or os.environ.get("NODE_AGENT_TOKEN_FILE", "")
    try:
        if path:
            return tokens.read_token_file(path)
        env = os.environ.get(tokens.TOKEN_ENV, "").strip()
        return tokens.check_token(env, f"${tokens.TOKEN_ENV}") if env else ""
    except OSError as exc:
        raise SourceError(f"cannot read the token file {path}: {exc.strerror or exc}",
                          unreachable=False) from None
    except tokens.InvalidToken as exc:
        raise SourceError(str(exc), unreachable=False) from None
