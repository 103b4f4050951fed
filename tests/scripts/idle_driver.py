"""A driver whose connections outlive the servers' idle timeout, for tests/test_security_net.py.

    python tests/scripts/idle_driver.py OUT_JSON

Run with RUNTIME_GRPC_MAX_CONNECTION_IDLE_S set short (the cluster's components inherit
it). It init()s a private cluster and does one round of work over every kind of
connection a driver has: a task (raylet lease, PushTasks), a call to an async actor
(gRPC PushTasks) and to a sync one (its call port), a 1 MB put/get (object store),
ray.nodes() (GCS, on the core worker's asyncio channel) and GetAllNodes on a blocking
channel of its own. Then it waits until the servers have closed a connection that
went idle, and does the same round again on the same handles and channels.

The report (OUT_JSON): each round's results, the driver's TCP connections to the GCS,
raylet and object store before and after the wait (remote address -> local ports), and
how long the wait took; an exception is reported as {"error_type", "error", "traceback"}.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Dict, List

import psutil

from script_results import write_result  # beside this script


def connections(addresses: Dict[str, str]) -> Dict[str, List[int]]:
    """The local ports of this process's established connections to each named address."""
    out: Dict[str, List[int]] = {name: [] for name in addresses}
    for c in psutil.Process().net_connections("tcp"):
        if c.status != psutil.CONN_ESTABLISHED or not c.raddr:
            continue
        ip = c.raddr.ip.removeprefix("::ffff:")  # grpc's sockets are dual-stack
        for name, address in addresses.items():
            if f"{ip}:{c.raddr.port}" == address:
                out[name].append(c.laddr.port)
    return {name: sorted(ports) for name, ports in out.items()}


def main() -> int:
    out = sys.argv[1]
    started = time.monotonic()
    import numpy as np

    import runtime as ray
    from runtime import rpc
    from runtime.core_worker.current import core_worker
    from runtime.protocol import common_pb2, gcs_pb2_grpc

    try:
        ctx = ray.init(num_cpus=2)
        info = ctx.address_info
        addresses = {"gcs": info["gcs_address"], "raylet": info["raylet_address"],
                     "store": info["object_store_address"]}
        blocking = gcs_pb2_grpc.GcsStub(rpc.sync_channel(info["gcs_address"], core_worker().token))

        @ray.remote
        def square(x):
            return x * x

        @ray.remote
        class Async:
            async def echo(self, x):
                return x

        @ray.remote
        class Sync:
            def echo(self, x):
                return x

        async_actor, sync_actor = Async.remote(), Sync.remote()
        big = np.arange(1 << 17, dtype=np.int64)  # 1 MiB: through the object store

        def round_of_work() -> dict:
            ref = ray.put(big)
            return {
                "task": ray.get(square.remote(7), timeout=60),
                "async_actor": ray.get(async_actor.echo.remote("a"), timeout=60),
                "sync_actor": ray.get(sync_actor.echo.remote("s"), timeout=60),
                "put_get": bool((ray.get(ref, timeout=60) == big).all()),
                "nodes": len(ray.nodes()),
                "blocking_nodes": len(blocking.GetAllNodes(common_pb2.Empty(), timeout=30).nodes),
            }

        first = round_of_work()
        before = connections(addresses)
        idle_s = float(os.environ["RUNTIME_GRPC_MAX_CONNECTION_IDLE_S"])
        t0 = time.monotonic()
        # Until a connection of the first round is gone (closed by its idle server), and
        # the timeout has passed once more for any other.
        while time.monotonic() - t0 < 30:
            now = connections(addresses)
            if any(set(before[k]) - set(now[k]) for k in before):
                break
            time.sleep(0.1)
        waited = time.monotonic() - t0
        time.sleep(idle_s * 1.5)
        idle = connections(addresses)
        second = round_of_work()
        after = connections(addresses)
    except BaseException as exc:  # reported to the test, which asserts on it
        write_result(out, {"error_type": type(exc).__name__, "error": str(exc),
                           "traceback": traceback.format_exc(),
                           "elapsed": time.monotonic() - started,
                           "pids": [p.pid for p in psutil.Process().children(recursive=True)]})
        return 3
    write_result(out, {"first": first, "second": second, "before": before, "idle": idle,
                       "after": after, "waited": waited,
                       "pids": [p.pid for p in psutil.Process().children(recursive=True)]})
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
