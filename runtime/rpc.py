"""gRPC plumbing shared by every component: token-authenticated servers and channels.

Every TCP endpoint of a cluster requires the cluster token in the ``authorization``
metadata (``Bearer <token>``, the header Ray's token auth uses). The server-side
interceptor rejects a call before its handler runs, so nothing sent by an
unauthenticated peer is ever deserialized beyond protobuf framing, let alone unpickled.
"""
from __future__ import annotations

import hmac
from typing import Any, Callable, Sequence

import grpc
import grpc.aio

from runtime import config

# Environment variable through which a component hands the token to its children.
TOKEN_ENV = "RUNTIME_CLUSTER_TOKEN"
_HEADER = "authorization"

CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_send_message_length", config.GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", config.GRPC_MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
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
)

AUTH_FAILED_MESSAGE = (
    "authentication failed: the request carried {what} cluster token; "
    "pass the token printed by `agentctl start --head` (NODE_AGENT_TOKEN or --token)"
)


def _check(metadata: Sequence[tuple[str, Any]] | None, token: str) -> str | None:
    """None when the metadata carries the token, else the reason."""
    expected = f"Bearer {token}"
    for key, value in metadata or ():
        if key == _HEADER:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if hmac.compare_digest(value, expected):
                return None
            return AUTH_FAILED_MESSAGE.format(what="a wrong")
    return AUTH_FAILED_MESSAGE.format(what="no")


def _denying_handler(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same arity as `handler` that aborts with UNAUTHENTICATED."""

    async def abort_unary(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        yield  # pragma: no cover - makes this an async generator

    # Deserializers are dropped on purpose: the denied request is never decoded.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort_unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    return grpc.unary_unary_rpc_method_handler(abort_unary)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call whose metadata lacks the cluster token."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(self, continuation: Callable, handler_call_details):
        reason = _check(handler_call_details.invocation_metadata, self._token)
        handler = await continuation(handler_call_details)
        if reason is None or handler is None:
            return handler
        return _denying_handler(handler, reason)


def make_server(token: str) -> grpc.aio.Server:
    """An asyncio gRPC server that enforces the cluster token."""
    if not token:
        raise ValueError("a cluster token is required to start a server")
    return grpc.aio.server(interceptors=[TokenAuthInterceptor(token)], options=SERVER_OPTIONS)


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
