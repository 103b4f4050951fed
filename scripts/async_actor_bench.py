"""Async-actor calls/s for any module with Ray's API (microbench.py has no such figure).

    python scripts/async_actor_bench.py --module runtime
    /path/to/ray-venv/bin/python scripts/async_actor_bench.py --module ray
"""
import argparse
import importlib
import json
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--module", default="runtime")
    p.add_argument("--calls", type=int, default=5000)
    args = p.parse_args()
    rt = importlib.import_module(args.module)
    kwargs = {"num_cpus": 2}
    if args.module == "ray":
        kwargs["include_dashboard"] = False
    rt.init(**kwargs)

    @rt.remote(num_cpus=0)
    class AsyncPinger:
        async def ping(self):
            return None

    a = AsyncPinger.remote()
    rt.get([a.ping.remote() for _ in range(200)])
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        rt.get([a.ping.remote() for _ in range(args.calls)])
        rates.append(args.calls / (time.perf_counter() - t0))
    print(json.dumps({"module": args.module, "async_actor_calls_per_s": round(statistics.median(rates))}))
    rt.shutdown()


if __name__ == "__main__":
    main()
