"""A LogService (runtime/raylet/log_service.py) of its own, on a free loopback port behind
the real token check: the log tests talk to it without a cluster."""
from __future__ import annotations

import asyncio
import contextlib
import threading

import grpc
import pytest

from runtime import rpc
from runtime.protocol import log_service_pb2, log_service_pb2_grpc
from runtime.raylet import log_service

TOKEN = "t" * 64


@contextlib.contextmanager
def log_server(logs_dir: str):
    """A LogService over logs_dir on a free loopback port, behind the real token check."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict = {}

    async def serve() -> None:
        server = rpc.make_server(TOKEN)
        log_service_pb2_grpc.add_LogServiceServicer_to_server(
            log_service.LogService(logs_dir), server)
        state["port"] = rpc.bind(server, "127.0.0.1", 0)
        state["stop"] = asyncio.Event()
        await server.start()
        started.set()
        await state["stop"].wait()
        await server.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert started.wait(10), "the test's log server did not start"
        yield f"127.0.0.1:{state['port']}"
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(10)
        loop.close()


def read_all(stub, **request) -> bytes:
    return b"".join(c.data for c in stub.ReadLog(log_service_pb2.ReadLogRequest(**request),
                                                 timeout=10))


def rpc_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        call()
    return ei.value.code()
