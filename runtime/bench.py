"""``python -m runtime.bench``: the runtime's own benchmark, one line per figure.

Measures what the runtime-core and actor issues name: init time, first-task
time, sync task latency, async task throughput, small put/get rates, 100 MB
put/get throughput, actor creation, sync actor call latency, async calls/s to
1 and 4 actors and to an async actor, ActorPool.map throughput over 4 actors,
idle cluster RSS and RSS after N (default 100k) tasks. ``--only actor-pool
--module ray`` measures the ActorPool figure with Ray itself, to compare.
``--task-events off`` measures the cost of task events. Cluster RSS is the sum
over the driver's descendant processes (the private cluster), driver excluded,
as ../shared/bench/microbench.py counts it.

``--only cluster`` starts two nodes (the driver's on 127.0.0.1, a second on
127.0.0.2) and measures what moves between them: 100 MB and 1 GB arrays made on
node 2 and read on node 1, and no-op tasks pinned to node 2. ``cluster_bench``
takes any module with Ray's API, so scripts/bench_cluster.py runs the same code
against Ray 2.60's two nodes, side by side.

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


def transfer_gbps(ray, make, nbytes: int, reps: int = 3) -> float:
    """Median GB/s of get() on this node of an nbytes array that ``make`` (a task pinned to
    the other node) returns; each rep a fresh object, made before the clock starts."""
    rates = []
    for _ in range(reps):
        ref = make.remote(nbytes)
        # fetch_local=False: Ray's wait() would otherwise start pulling it already.
        ready, _ = ray.wait([ref], timeout=600, fetch_local=False)
        if not ready:
            raise RuntimeError(f"a {nbytes}-byte object was not made on the other node in 600 s")
        t0 = time.perf_counter()
        arr = ray.get(ref)
        dt = time.perf_counter() - t0
        if arr.nbytes != nbytes or arr[-1] != 1:
            raise AssertionError("the transferred array is not the one made")
        rates.append(nbytes / dt / 1e9)
        del arr, ref
        time.sleep(0.5)  # let both stores free the object before the next
    return statistics.median(rates)


def cluster_bench(ray, emit, other_node_id: str, sizes=(100_000_000, 1_000_000_000),
                  tasks: int = 3000, reps: int = 3) -> None:
    """The two-node figures: transfer from the other node, and tasks pinned there.

    ``ray`` is this runtime or Ray itself; the other node is the one with id
    ``other_node_id``, the driver's is the local one.
    """
    import importlib

    import numpy as np

    strategies = importlib.import_module(f"{ray.__name__}.util.scheduling_strategies")
    there = strategies.NodeAffinitySchedulingStrategy(other_node_id, soft=False)

    @ray.remote(scheduling_strategy=there)
    def make(nbytes):
        return np.ones(nbytes // 8)

    @ray.remote(scheduling_strategy=there)
    def noop():
        return None

    ray.get([noop.remote() for _ in range(200)])  # workers up, leases warm
    for nbytes in sizes:
        label = f"{nbytes // 1_000_000}mb" if nbytes < 1_000_000_000 else f"{nbytes // 10**9}gb"
        emit(f"transfer_{label}_gbps", transfer_gbps(ray, make, nbytes, reps), "GB/s")
    emit("cross_node_tasks_per_s", median_rate(ray, lambda i: noop.remote(), tasks, reps),
         "tasks/s")


def sigkill_tree(roots, children: bool = True) -> int:
    """SIGKILL the given pids (and, with ``children``, every descendant, gathered first so
    that none is reparented away mid-way); returns how many got the signal."""
    procs = []
    for pid in roots:
        try:
            p = psutil.Process(pid)
            procs.append(p)
            if children:
                procs.extend(p.children(recursive=True))
        except psutil.Error:
            pass
    sent = 0
    for p in procs:
        try:
            p.kill()
            sent += 1
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    return sent


def node_death_s(ray, node_ip: str, kill, limit_s: float = 180.0) -> float:
    """Seconds from ``kill()`` (SIGKILL of a node's processes) until ``ray.nodes()`` on
    the head says the node at ``node_ip`` is not alive, polled every 50 ms; each system
    with its own defaults. NaN when it is still alive after ``limit_s``."""
    def dead() -> bool:
        mine = [n for n in ray.nodes() if n["NodeManagerAddress"] == node_ip]
        return bool(mine) and not any(n["Alive"] for n in mine)

    if dead():
        raise RuntimeError(f"the node at {node_ip} is not alive before it was killed")
    t0 = time.perf_counter()
    kill()
    while time.perf_counter() - t0 < limit_s:
        if dead():
            return time.perf_counter() - t0
        time.sleep(0.05)
    return float("nan")


def gcs_recovery(ray, kill, wait_s: float = 30.0, probe_timeout_s: float = 5.0) -> dict:
    """Kill the GCS (``kill()``) while this driver is attached and has a named detached
    actor, then measure until the cluster works again: a task of a function defined after
    the kill runs, and the actor, looked up by name, answers with its state kept.

    The probes run in a thread, so a call that blocks on a dead GCS cannot stop the
    clock: after ``wait_s`` the outcome says which step had not succeeded and with what
    error. Keys: ``gcs_recovery_s`` (NaN if not recovered), ``task_s``, ``actor_s``,
    ``actor_lost`` (True/False, None when unknown), ``outcome`` (one line)."""
    import threading

    @ray.remote(num_cpus=0)
    class Keeper:
        def __init__(self):
            self.n = 0

        def incr(self):
            self.n += 1
            return self.n

    name = "bench_gcs_keeper"
    keeper = Keeper.options(name=name, lifetime="detached").remote()
    for _ in range(3):
        n_before = ray.get(keeper.incr.remote(), timeout=60)
    state = {"task_s": float("nan"), "actor_s": float("nan"), "actor_lost": None,
             "step": "task", "error": ""}
    done = threading.Event()

    def probe(t0: float) -> None:
        @ray.remote
        def fresh(x):
            return x + 1

        while not stop.is_set():
            try:
                if ray.get(fresh.remote(1), timeout=probe_timeout_s) == 2:
                    state["task_s"] = time.perf_counter() - t0
                    break
            except Exception as exc:  # noqa: BLE001 - any failure: still down, try again
                state["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                time.sleep(0.05)
        state["step"] = "actor"
        while not stop.is_set():
            try:
                n = ray.get(ray.get_actor(name).incr.remote(), timeout=probe_timeout_s)
                state["actor_s"] = time.perf_counter() - t0
                state["actor_lost"] = n != n_before + 1
                break
            except ValueError as exc:  # no actor of that name: the GCS lost it
                state["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                time.sleep(0.05)
            except Exception as exc:  # noqa: BLE001
                state["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                time.sleep(0.05)
        done.set()

    stop = threading.Event()
    t0 = time.perf_counter()
    kill()
    thread = threading.Thread(target=probe, args=(t0,), daemon=True)
    thread.start()
    recovered = done.wait(wait_s)
    stop.set()
    if recovered:
        outcome = (f"recovered: new task after {state['task_s']:.2f} s, named actor answered "
                   f"after {state['actor_s']:.2f} s, state "
                   f"{'LOST' if state['actor_lost'] else 'kept'}")
    else:
        outcome = (f"not recovered in {wait_s:g} s: "
                   + ("no new task ran" if state["step"] == "task" else
                      f"a new task ran after {state['task_s']:.2f} s, the named actor did not "
                      f"answer") + f"; last error {state['error'] or '(none: calls blocked)'}")
    # The thread may be stuck in a call to the dead GCS: it is a daemon and is left to
    # the process's exit (the caller leaves with os._exit).
    return {"gcs_recovery_s": max(state["task_s"], state["actor_s"]) if recovered
            else float("nan"),
            "task_s": state["task_s"], "actor_s": state["actor_s"],
            "actor_lost": state["actor_lost"], "outcome": outcome}


def _two_node_cluster(ray, num_cpus: int, store_bytes: int):
    """This runtime's two nodes on one machine: the driver's (init) and one on 127.0.0.2,
    which is returned with its node id (stop it after shutdown)."""
    import os

    from runtime.node import Node, NodeConfig
    from runtime.session import new_session_dir

    ctx = ray.init(num_cpus=num_cpus, object_store_memory=store_bytes)
    info = ctx.address_info
    token = open(os.path.join(info["session_dir"], "token")).read()
    second = Node(NodeConfig(head=False, node_ip="127.0.0.2", gcs_address=info["gcs_address"],
                             num_cpus=num_cpus, session_dir=new_session_dir(),
                             token=token, object_store_memory=store_bytes))
    second.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        other = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == "127.0.0.2"]
        if other:
            return second, other[0]["NodeID"]
        time.sleep(0.1)
    second.stop()
    raise RuntimeError("the second node (127.0.0.2) did not join in 60 s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--tasks", type=int, default=100_000, help="tasks before the second RSS sample")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--task-events", choices=("on", "off"), default="on",
                   help="record task events (the default) or not, to measure their cost")
    p.add_argument("--only", choices=("all", "actor-pool", "cluster"), default="all",
                   help="run every figure, only ActorPool.map throughput, or only the "
                        "two-node figures (transfer, cross-node tasks)")
    p.add_argument("--store-gb", type=float, default=3.0,
                   help="--only cluster: object store size of each node, in GB")
    p.add_argument("--module", default="runtime",
                   help="the module to measure (e.g. ray, in a venv with Ray, for the same "
                        "figure side by side; with --only actor-pool)")
    args = p.parse_args(argv)
    import importlib
    import os

    os.environ["RUNTIME_TASK_EVENTS"] = "1" if args.task_events == "on" else "0"
    if args.module != "runtime" and args.only != "actor-pool":
        p.error("--module other than runtime needs --only actor-pool (for the two-node "
                "figures of Ray use scripts/bench_cluster.py)")

    out = {}

    def emit(name, value, unit):
        out[name] = value
        print(f"{name:28s} {value:12.4g} {unit}", flush=True)

    t0 = time.perf_counter()
    ray = importlib.import_module(args.module)
    importlib.import_module(f"{args.module}.util")
    if args.only == "cluster":
        second, other = _two_node_cluster(ray, args.num_cpus, int(args.store_gb * 1e9))
        try:
            cluster_bench(ray, emit, other)
        finally:
            ray.shutdown()  # first: the driver would warn about the second node's raylet
            second.stop()
        return _finish(ray, args, out)

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
