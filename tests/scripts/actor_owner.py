"""A driver that owns actors, for tests/test_actors.py (actor lifetimes).

    python tests/scripts/actor_owner.py OUT_JSON ADDRESS OWNED_NAME DETACHED_NAME

Connects to the running cluster at ADDRESS (the token comes from $NODE_AGENT_TOKEN)
in namespace "lifetimes", creates a named non-detached actor OWNED_NAME and a named
``lifetime="detached"`` actor DETACHED_NAME, calls both once, writes a report
atomically to OUT_JSON (tmp file + rename), prints "ready" and exits without calling
shutdown() (the interpreter's exit ends the driver).

The report: {"driver_pid", "owned": {"pid", "actor_id"}, "detached": {"pid", "actor_id"}}.
An exception is reported as {"error_type", "error", "traceback"} and the script exits 3.
"""
from __future__ import annotations

import os
import sys
import traceback

from script_results import write_result  # beside this script


def main() -> int:
    out, address, owned_name, detached_name = sys.argv[1:5]
    import runtime as ray

    try:
        ray.init(address=address, namespace="lifetimes")

        @ray.remote
        class Keeper:
            def __init__(self):
                self.calls = 0

            def ping(self):
                self.calls += 1
                return {"pid": os.getpid(), "calls": self.calls,
                        "actor_id": ray.get_runtime_context().get_actor_id()}

        owned = Keeper.options(name=owned_name).remote()
        detached = Keeper.options(name=detached_name, lifetime="detached").remote()
        o, d = ray.get([owned.ping.remote(), detached.ping.remote()], timeout=60)
    except BaseException as exc:  # reported to the test, which fails with it
        write_result(out, {"error_type": type(exc).__name__, "error": str(exc),
                     "traceback": traceback.format_exc(), "driver_pid": os.getpid()})
        return 3
    write_result(out, {"driver_pid": os.getpid(), "owned": o, "detached": d})
    print("ready", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
