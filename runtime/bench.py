"""``python -m runtime.bench``: the runtime's own benchmark, one line per figure.

Measures what the runtime-core and actor issues name: init time, first-task
time, sync task latency, async task throughput, small put/get rates, 100 MB
put/get throughput, actor creation, sync actor call latency, async calls/s to
1 and 4 actors and to an async actor, ActorPool.map throughput over 4 actors,
idle cluster RSS and RSS after N (default 100k) tasks. ``--only actor-pool
--module ray`` measures the ActorPool figure with Ray itself, to compare. ``--task-events off`` measures the cost of task events. Cluster
RSS is the sum over the driver's descendant processes (the private cluster),
driver excluded, as ../shared/bench/microbench.py counts it.

For the side-by-side comparison with Ray use ../shared/bench/microbench.py
(see docs/benchmarks.md); this module is the quick local check.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import psutil

MiB = 1024 * 1024


def cluster_rss_mb() -> float:
    total = 0
    for p in psutil.Process().children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / MiB


def tree_cpu_s() -> float:
    """CPU seconds used so far by this process and the cluster under it (less noisy than
    wall time on a shared machine)."""
    total = 0.0
    for p in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def settle(seconds: float = 2.0, limit: float = 20.0) -> None:
    """Wait until the set of cluster processes stops changing."""
    last, since, start = None, time.monotonic(), time.monotonic()
    while time.monotonic() - start < limit:
        pids = frozenset(p.pid for p in psutil.Process().children(recursive=True))
        if pids != last:
            last, since = pids, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
        time.sleep(0.2)


def median_rate(ray, submit, n: int = 5000, reps: int = 3) -> float:
    """Submit n calls (submit(i) returns a ref), get them all; the median rate over reps."""
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        ray.get([submit(i) for i in range(n)])
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def actor_pool_map_per_s(ray, actors, n: int = 2000, reps: int = 3) -> float:
    """ActorPool.map over n values on the given actors (``echo``), in order, all
    results consumed; the median rate over reps. ``ray`` is any module with Ray's API
    (this runtime or Ray itself, for the side-by-side figure)."""
    pool = ray.util.ActorPool(actors)
    values = list(range(n))
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = list(pool.map(lambda a, v: a.echo.remote(v), values))
        rates.append(n / (time.perf_counter() - t0))
        if out != values:
            raise AssertionError("ActorPool.map returned the results out of order")
    return statistics.median(rates)


def actor_pool_bench(ray, emit, actors: int = 4, n: int = 2000) -> None:
    """The ActorPool figure on its own: ``actors`` zero-CPU echo actors."""

    @ray.remote(num_cpus=0)
    class Echo:
        def echo(self, v):
            return v

    pool_actors = [Echo.remote() for _ in range(actors)]
    ray.get([a.echo.remote(0) for a in pool_actors])
    emit(f"actor_pool_map_{actors}_per_s", actor_pool_map_per_s(ray, pool_actors, n), "items/s")
    for a in pool_actors:
        ray.kill(a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--tasks", type=int, default=100_000, help="tasks before the second RSS sample")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--task-events", choices=("on", "off"), default="on",
                   help="record task events (the default) or not, to measure their cost")
    p.add_argument("--only", choices=("all", "actor-pool"), default="all",
                   help="run every figure, or only ActorPool.map throughput")
    p.add_argument("--module", default="runtime",
                   help="the module to measure (e.g. ray, in a venv with Ray, for the same "
                        "figure side by side; with --only actor-pool)")
    args = p.parse_args(argv)
    import importlib
    import os

    os.environ["RUNTIME_TASK_EVENTS"] = "1" if args.task_events == "on" else "0"
    if args.module != "runtime" and args.only == "all":
        p.error("--module other than runtime needs --only actor-pool")

    out = {}

    def emit(name, value, unit):
        out[name] = value
        print(f"{name:28s} {value:12.4g} {unit}", flush=True)

    t0 = time.perf_counter()
    ray = importlib.import_module(args.module)
    importlib.import_module(f"{args.module}.util")

    init_kwargs = {"num_cpus": args.num_cpus}
    if args.module != "runtime":
        init_kwargs["include_dashboard"] = False
    ray.init(**init_kwargs)
    emit("init_s", time.perf_counter() - t0, "s")
    if args.only == "actor-pool":
        actor_pool_bench(ray, emit)
        return _finish(ray, args, out)

    import numpy as np

    @ray.remote
    def noop():
        return None

    t0 = time.perf_counter()
    ray.get(noop.remote())
    emit("first_task_s", time.perf_counter() - t0, "s")

    settle()
    emit("idle_cluster_rss_mb", cluster_rss_mb(), "MB")

    lat = []
    for _ in range(1000):
        t0 = time.perf_counter()
        ray.get(noop.remote())
        lat.append(time.perf_counter() - t0)
    emit("task_latency_ms", 1e3 * statistics.median(lat), "ms")

    emit("tasks_per_s", median_rate(ray, lambda i: noop.remote()), "tasks/s")

    t0 = time.perf_counter()
    refs = [ray.put(i) for i in range(5000)]
    emit("put_small_per_s", 5000 / (time.perf_counter() - t0), "puts/s")
    t0 = time.perf_counter()
    for r in refs:
        ray.get(r)
    emit("get_small_per_s", 5000 / (time.perf_counter() - t0), "gets/s")
    del refs

    arr = np.ones(100 * MiB // 8)
    puts, gets = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        ref = ray.put(arr)
        t1 = time.perf_counter()
        view = ray.get(ref)
        gets.append(time.perf_counter() - t1)
        puts.append(t1 - t0)
        del ref, view
    emit("put_100mb_gbps", 0.1048576 / statistics.median(puts), "GB/s")
    emit("get_100mb_gbps", 0.1048576 / statistics.median(gets), "GB/s")

    @ray.remote(num_cpus=0)
    class Pinger:
        def ping(self):
            return None

    @ray.remote(num_cpus=0)
    class AsyncPinger:
        async def ping(self):
            return None

    t0 = time.perf_counter()
    actors = [Pinger.remote() for _ in range(10)]
    ray.get([a.ping.remote() for a in actors])
    emit("actor_create_s", (time.perf_counter() - t0) / 10, "s/actor")
    a0 = actors[0]
    lat = []
    for _ in range(1000):
        t0 = time.perf_counter()
        ray.get(a0.ping.remote())
        lat.append(time.perf_counter() - t0)
    emit("actor_call_latency_ms", 1e3 * statistics.median(lat), "ms")
    emit("actor_calls_per_s", median_rate(ray, lambda i, a0=a0: a0.ping.remote()), "calls/s")
    four = actors[:4]
    emit("actor_calls_4_actors_per_s", median_rate(ray, lambda i, four=four: four[i % 4].ping.remote()),
         "calls/s")
    aa = AsyncPinger.remote()
    ray.get(aa.ping.remote())
    emit("async_actor_calls_per_s", median_rate(ray, lambda i, aa=aa: aa.ping.remote()), "calls/s")
    for a in actors + [aa]:
        ray.kill(a)
    del actors, a0, four, aa
    actor_pool_bench(ray, emit)

    done = 0
    t0 = time.perf_counter()
    c0 = tree_cpu_s()
    while done < args.tasks:
        k = min(1000, args.tasks - done)
        ray.get([noop.remote() for _ in range(k)])
        done += k
    emit("tasks_per_s_long_run", args.tasks / (time.perf_counter() - t0), "tasks/s")
    emit("cpu_us_per_task", 1e6 * (tree_cpu_s() - c0) / args.tasks, "us")
    settle()
    emit("rss_after_tasks_mb", cluster_rss_mb(), "MB")
    out["tasks_in_long_run"] = args.tasks
    return _finish(ray, args, out)


def _finish(ray, args, out: dict) -> int:
    ray.shutdown()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
