"""Entry point of a worker process (``python -m runtime.worker``), started by the raylet.

``import runtime`` (the package, imported before this module) has already set
GRPC_ENABLE_FORK_SUPPORT=false unless the environment chose otherwise, before any
gRPC import; the same holds for the GCS, raylet and object store entry points.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from runtime import component
from runtime.core_worker import task_logs
from runtime.core_worker.core_worker import WORKER, CoreWorker
from runtime.core_worker.current import set_core_worker
from runtime.core_worker.executor import Executor
from runtime.runtime_env import context as runtime_env_context

log = logging.getLogger("runtime.worker")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="runtime.worker")
    p.add_argument("--raylet-address", required=True)
    p.add_argument("--node-id", required=True)
    p.add_argument("--node-ip", default="127.0.0.1")
    p.add_argument("--store-address", required=True)
    p.add_argument("--gcs-address", required=True)
    p.add_argument("--session-dir", required=True)
    p.add_argument("--startup-token", required=True)
    p.add_argument("--worker-id", required=True)
    args = p.parse_args(argv)
    # stdout is the worker's log file, which Python would buffer in 8 KiB blocks
    # (unless the environment happens to say PYTHONUNBUFFERED): what a task prints
    # must be in the log as it is printed, and nothing may be lost at os._exit below.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass
    # Each task's byte range in the worker's .out and .err logs, for get_log(task_id=...).
    task_logs.configure(os.path.join(args.session_dir, "logs"),
                        task_logs.worker_log_stem(args.worker_id))
    token = component.token_from_env()
    runtime_env_context.load_worker_env()  # the runtime_env the raylet started us for
    component.setup_logging("worker", args.node_id)
    component.die_with_parent()
    cw = CoreWorker(mode=WORKER, node_id=bytes.fromhex(args.node_id), node_ip=args.node_ip,
                    raylet_address=args.raylet_address, store_address=args.store_address,
                    gcs_address=args.gcs_address, session_dir=args.session_dir, token=token,
                    worker_id=bytes.fromhex(args.worker_id), startup_token=args.startup_token)
    set_core_worker(cw)
    executor = Executor(cw)
    cw.executor = executor

    def raylet_lost(reason: str) -> None:
        log.info("exiting: %s", reason)
        executor.request_exit()

    cw.on_raylet_lost = raylet_lost
    cw.start()
    from runtime.core_worker.task_output import OutputForwarder

    OutputForwarder(cw).install()
    try:
        executor.run_forever()
    finally:
        metrics = sys.modules.get("runtime.util.metrics")  # os._exit runs no atexit hook
        if metrics is not None:
            try:
                metrics.flush(timeout=2.0)
            except Exception:  # nothing may keep a worker from exiting
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or broken log must not keep us from exiting
                pass
        try:
            task_logs.close()  # the last ranges (os._exit runs no atexit hook either)
        except Exception:
            pass
        os._exit(0)


if __name__ == "__main__":
    main()
