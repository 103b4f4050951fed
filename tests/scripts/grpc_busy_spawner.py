"""Spawn children through runtime.supervisor while gRPC is busy on another thread.

    python grpc_busy_spawner.py OUT_DIR N

gRPC is imported before anything of ours, as a user's program (or an entry point
that forgot) would, and GRPC_ENABLE_FORK_SUPPORT comes from the environment as the
test set it. A grpc.aio server on another thread answers a client's calls in a
loop for the whole run, so gRPC's threads are inside calls whenever we spawn: a
spawn that forks (rather than vfork+exec) then runs gRPC's fork handlers in the
child, which crashes it or prints "skipping fork() handlers" here.

Writes OUT_DIR/result.json: {"spawned", "ready", "failures", "calls_during_spawns"}.
"""
from __future__ import annotations

import grpc  # noqa: I001 - first on purpose: before anything could set the fork variable
import grpc.aio

import asyncio
import os
import sys
import threading

from script_results import write_result


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


def serve_and_call(ready: threading.Event, stop: threading.Event, calls: list) -> None:
    """Run a server and keep 8 calls in flight against it until stop is set."""
    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Busy", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                echo = channel.unary_unary("/test.Busy/Echo")
                await echo(b"warm-up", timeout=10)
                ready.set()
                while not stop.is_set():
                    await asyncio.gather(*(echo(b"x", timeout=10) for _ in range(8)))
                    calls[0] += 8
        finally:
            await server.stop(0)

    asyncio.run(main())


def main() -> None:
    out_dir, n = sys.argv[1], int(sys.argv[2])
    ready, stop, calls = threading.Event(), threading.Event(), [0]
    busy = threading.Thread(target=serve_and_call, args=(ready, stop, calls), name="grpc-busy")
    busy.start()
    if not ready.wait(30):
        sys.exit("the gRPC server thread did not come up within 30s")

    from runtime.supervisor import ComponentStartError, ProcessSpec, Supervisor

    sup = Supervisor()
    procs, failures = [], []
    before = calls[0]
    try:
        for i in range(n):
            ready_file = os.path.join(out_dir, f"child-{i}.ready")
            # The child reports itself ready from the shell: cheap, so the run is about
            # the spawn, not the children's start-up.
            script = f'echo "{{\\"pid\\": $$}}" > {ready_file}.tmp && mv {ready_file}.tmp {ready_file}'
            procs.append(sup.spawn(ProcessSpec(
                name=f"child-{i}", argv=["/bin/sh", "-c", script + "; exec sleep 60"],
                log_path=os.path.join(out_dir, "logs", f"child-{i}.log"),
                ready_file=ready_file, stop_grace_s=1.0)))
        ready_count = 0
        for proc in procs:
            try:
                proc.wait_ready(30)
                ready_count += 1
            except ComponentStartError as exc:
                failures.append(str(exc).splitlines()[0])
        during = calls[0] - before
    finally:
        sup.close()
        stop.set()
        busy.join(30)
    write_result(os.path.join(out_dir, "result.json"),
                 {"spawned": len(procs), "ready": ready_count, "failures": failures,
                  "calls_during_spawns": during})


if __name__ == "__main__":
    main()
