"""A driver process for tests/test_lifecycle.py.

    python tests/scripts/driver.py OUT_JSON MODE [ADDRESS]

MODE:
  sleep   init() a private cluster, run a task, report, then sleep until killed
  exit    the same, then return normally (no shutdown() call: the interpreter exits)
  attach  init(address=ADDRESS) ("auto" or "host:port"), run a task, report, exit

The report is written atomically to OUT_JSON (tmp file + rename): the session dir,
this driver's pid, the pids of every process under it (psutil, recursive), the
node id and the task's result. An exception from init/the task is reported as
{"error_type", "error_mro", "error": message} and the script exits with status 3.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import psutil

from script_results import write_result  # beside this script


def main() -> int:
    out, mode = sys.argv[1], sys.argv[2]
    address = sys.argv[3] if len(sys.argv) > 3 else None
    import runtime as ray

    started = time.monotonic()
    try:
        if mode == "attach":
            ctx = ray.init(address=address)
        else:
            ctx = ray.init(num_cpus=1)

        @ray.remote
        def where():
            return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

        result = ray.get(where.remote(), timeout=60)
    except BaseException as exc:  # reported to the test, which asserts on it
        write_result(out, {"error_type": type(exc).__name__,
                     "error_mro": [c.__name__ for c in type(exc).__mro__],
                     "error": str(exc), "traceback": traceback.format_exc(),
                     "elapsed": time.monotonic() - started, "driver_pid": os.getpid()})
        return 3
    children = psutil.Process().children(recursive=True)
    write_result(out, {
        "driver_pid": os.getpid(),
        "session_dir": ctx.address_info["session_dir"],
        "gcs_address": ctx.address_info["gcs_address"],
        "node_id": ctx.address_info["node_id"],
        "task": result,
        "job_id": ray.get_runtime_context().get_job_id(),
        "pids": [p.pid for p in children],
        "cmdlines": [p.cmdline() for p in children],
    })
    if mode == "sleep":
        while True:  # until the test kills us
            time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
