"""Streaming-generator throughput: items/s a driver consumes from one generator task.

    .venv/bin/python scripts/bench_generators.py [--module ray] [--items N]

Runs against this runtime by default, or Ray (`--module ray`, e.g. from .venv-ray)."""
from __future__ import annotations

import argparse
import importlib
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--module", default="runtime", help="runtime (default) or ray")
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ray = importlib.import_module(args.module)
    ray.init(num_cpus=2, include_dashboard=False) if args.module == "ray" else ray.init(num_cpus=2)

    @ray.remote(num_returns="streaming")
    def produce(n):
        for i in range(n):
            yield i

    list(produce.remote(100))  # warm a worker
    for what, take in (("consuming refs", lambda ref: None),
                       ("getting each value", ray.get)):
        best = 0.0
        for _ in range(args.repeat):
            start = time.perf_counter()
            n = 0
            for ref in produce.remote(args.items):
                take(ref)
                n += 1
            best = max(best, n / (time.perf_counter() - start))
        print(f"{args.module}: streaming generator, driver {what}: {best:,.0f} items/s")
    ray.shutdown()


if __name__ == "__main__":
    main()
