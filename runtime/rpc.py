"""gRPC plumbing shared by every component: token-authenticated servers and channels.

Every TCP endpoint of a cluster requires the cluster token in the ``authorization``
metadata (``Bearer <token>``, the header Ray's token auth uses). The server-side
interceptor rejects a call from its headers alone: the request body of an
unauthenticated peer is never read, let alone decoded or unpickled, and the server's
HTTP/2 windows stay at their defaults for it (no BDP probing), so such a peer cannot
make a server buffer more than a few KB, whatever it sends.

What it can still cost is its connections: about 15 KB and an fd each, with or
without the token (grpc-python has no cap on connections, and no option lowers
that cost: read-buffer and lookahead sizes change nothing measurable). So every
process that serves raises its fd limit to the hard limit (`make_server`), and
servers close connections that carry no call for
`config.GRPC_MAX_CONNECTION_IDLE_S`; clients reconnect on their next call.
"""
from __future__ import annotations

import hmac
import logging
from typing import Any, AsyncIterator, Callable, Sequence

import grpc
import grpc.aio

from runtime import config

# Environment variable through which a component hands the token to its children.
TOKEN_ENV = "RUNTIME_CLUSTER_TOKEN"
_HEADER = "authorization"

CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_send_message_length", config.GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", config.GRPC_MAX_MESSAGE_BYTES),
    # Transparent retries only (no retry policy is configured anywhere): a call the server
    # never saw goes out again on a fresh connection. A server closing an idle connection
    # (max_connection_idle_ms) just as a client sends on it would otherwise fail the call
    # with UNAVAILABLE ("GOAWAY received"), about one call in 400 sent near that moment.
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_send_message_length", config.GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", config.GRPC_MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # No BDP probing on a server's receiving side: it widens a connection's HTTP/2 window
    # to whatever the peer manages to send, whether or not anything reads it, so eight
    # unauthenticated 300 MB requests in parallel grew a server by 45 MB with it and by
    # 1.5 MB without. A request being read still gets a window as large as its message
    # (grpc widens it to the length the reader waits for): authenticated 300 MB requests
    # are as fast as before.
    ("grpc.http2.bdp_probe", 0),
)


def server_options() -> Sequence[tuple[str, Any]]:
    """SERVER_OPTIONS and the idle-connection timeout (read now, so a test can set it).

    max_connection_idle closes a connection once no call has been open on it for that
    long, a peer without the token included (its calls are refused at once). Open streams
    are calls, so long-lived streams keep their connections. Never max_connection_age:
    it would cut those streams.
    """
    idle_ms = int(config.GRPC_MAX_CONNECTION_IDLE_S * 1000)
    if idle_ms <= 0:
        return SERVER_OPTIONS
    return (*SERVER_OPTIONS, ("grpc.max_connection_idle_ms", idle_ms))

AUTH_FAILED_MESSAGE = (
    "authentication failed: the request carried {what} cluster token; "
    "pass the token printed by `agentctl start --head` (NODE_AGENT_TOKEN or --token)"
)


def _check(metadata: Sequence[tuple[str, Any]] | None, token: str) -> str | None:
    """None when the metadata carries the token, else the reason.

    Compared as bytes: `hmac.compare_digest` raises TypeError on a non-ASCII str, and a
    peer chooses what its header holds (grpc hands an invalid UTF-8 value over decoded
    as latin-1).
    """
    for key, value in metadata or ():
        if key == _HEADER:
            raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
            if hmac.compare_digest(raw, b"Bearer " + token.encode()):
                return None
            if not raw.isascii():
                return AUTH_FAILED_MESSAGE.format(
                    what="a non-ASCII authorization header instead of a")
            return AUTH_FAILED_MESSAGE.format(what="a wrong")
        if key == _HEADER + "-bin":
            return AUTH_FAILED_MESSAGE.format(
                what="binary metadata (authorization-bin) instead of an ASCII `authorization: "
                     "Bearer <token>` header with the")
    return AUTH_FAILED_MESSAGE.format(what="no")


def _denying_handler(reason: str) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED without reading the request.

    It is stream-request typed whatever the method's arity: for a unary-request handler
    grpc reads the whole request message (up to max_receive_message_length, opening
    the HTTP/2 flow-control window for it) before the handler runs, so a peer without
    the token could make the server buffer hundreds of MB. A stream-request handler
    reads only when it iterates, which this one never does. The wire is the same for
    every arity, so a unary client gets its UNAUTHENTICATED status all the same.
    """

    async def deny(request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        yield  # pragma: no cover - makes this an async generator

    return grpc.stream_stream_rpc_method_handler(deny)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call whose metadata lacks the cluster token, before it reads the request."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(self, continuation: Callable, handler_call_details):
        reason = _check(handler_call_details.invocation_metadata, self._token)
        if reason is None:
            return await continuation(handler_call_details)
        return _denying_handler(reason)


class _DropInvalidEncoding(logging.Filter):
    """grpc logs a traceback for every metadata value that is not valid UTF-8 ("Invalid
    encoding on b'...'") before any interceptor runs; a peer without the token could fill
    the log with them. The call itself is refused by the interceptor (its value arrives
    decoded as latin-1), so the record says nothing worth keeping."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Invalid encoding on")


def make_server(token: str, interceptor: grpc.aio.ServerInterceptor | None = None
                ) -> grpc.aio.Server:
    """An asyncio gRPC server that enforces the cluster token (or what `interceptor`, which
    replaces TokenAuthInterceptor, checks), in a process whose fd limit is raised so that
    idle connections, which anyone can open, cannot use its fds up."""
    if not token:
        raise ValueError("a cluster token is required to start a server")
    from runtime.component import raise_open_file_limit  # component imports this module

    raise_open_file_limit()
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _DropInvalidEncoding) for f in grpc_log.filters):
        grpc_log.addFilter(_DropInvalidEncoding())
    return grpc.aio.server(interceptors=[interceptor or TokenAuthInterceptor(token)],
                           options=server_options())


class PortInUseError(OSError):
    """The requested port could not be bound."""


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Bind host:port (0 = any free port) and return the bound port."""
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpc raises RuntimeError on bind failure
        bound = 0
        detail = str(exc)
    else:
        detail = ""
    if not bound:
        from runtime.net import describe_port_holder

        holder = describe_port_holder(port) if port else ""
        raise PortInUseError(f"cannot listen on {host}:{port}{': ' + holder if holder else ''}"
                             f"{' (' + detail + ')' if detail else ''}")
    return bound


class _AuthCallable:
    """A multi-callable that adds the token to the call's metadata."""

    __slots__ = ("_inner", "_md")

    def __init__(self, inner: Any, md: tuple) -> None:
        self._inner = inner
        self._md = md

    def __call__(self, *args, metadata=None, **kwargs):
        return self._inner(*args, metadata=tuple(metadata or ()) + self._md, **kwargs)

    def future(self, *args, metadata=None, **kwargs):
        """The sync API's non-blocking call (unary requests), token included."""
        return self._inner.future(*args, metadata=tuple(metadata or ()) + self._md, **kwargs)

    def with_call(self, *args, metadata=None, **kwargs):
        return self._inner.with_call(*args, metadata=tuple(metadata or ()) + self._md, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class AuthChannel:
    """Wraps a grpc (or grpc.aio) channel so every call carries the cluster token.

    Metadata is added directly rather than by client interceptors: interceptors
    wrap streaming calls in extra tasks and generators that misbehave when a
    stream is cancelled, and they cost time on every unary call.
    """

    def __init__(self, channel: Any, token: str) -> None:
        self._channel = channel
        self._md = ((_HEADER, f"Bearer {token}"),)

    def unary_unary(self, *args, **kwargs):
        return _AuthCallable(self._channel.unary_unary(*args, **kwargs), self._md)

    def unary_stream(self, *args, **kwargs):
        return _AuthCallable(self._channel.unary_stream(*args, **kwargs), self._md)

    def stream_unary(self, *args, **kwargs):
        return _AuthCallable(self._channel.stream_unary(*args, **kwargs), self._md)

    def stream_stream(self, *args, **kwargs):
        return _AuthCallable(self._channel.stream_stream(*args, **kwargs), self._md)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


def aio_channel(address: str, token: str) -> AuthChannel:
    """An asyncio channel whose every call carries the cluster token (create it on its loop)."""
    return AuthChannel(grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS), token)


def sync_channel(address: str, token: str) -> AuthChannel:
    """A blocking channel whose every call carries the cluster token (CLIs, tests)."""
    return AuthChannel(grpc.insecure_channel(address, options=CHANNEL_OPTIONS), token)


def is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNAUTHENTICATED


def new_cluster_token() -> str:
    """A fresh cluster token: 256 random bits as hex, so it never starts with '-' (which
    a command line would take for an option) and needs no quoting anywhere."""
    import secrets

    return secrets.token_hex(32)
