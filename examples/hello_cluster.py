"""An ordinary Ray script, run on this project's runtime: `import runtime as ray`.

Attaches to the cluster that $RUNTIME_ADDRESS names ("auto": the one running on this
machine, as scripts/demo.sh does), or else starts a private single-node cluster (GCS,
raylet, object store, workers). Runs tasks, nested tasks, a large zero-copy object and an error, then prints
what it got and the cluster's resources.
"""
import time

import numpy as np

import runtime as ray


@ray.remote
def square(x):
    return x * x


@ray.remote
def total(values):
    return sum(ray.get([square.remote(v) for v in values]))


@ray.remote
def column_means(matrix):
    return matrix.mean(axis=0)


@ray.remote
def fails():
    raise ValueError("this task fails on purpose")


def main() -> None:
    t0 = time.perf_counter()
    ctx = ray.init()
    print(f"cluster up in {time.perf_counter() - t0:.2f}s, session {ctx.address_info['session_dir']}")
    print("resources:", {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")})

    print("squares:", ray.get([square.remote(i) for i in range(10)]))
    print("nested sum of squares 0..99:", ray.get(total.remote(list(range(100)))))

    matrix = np.random.default_rng(0).random((2000, 1000))
    ref = ray.put(matrix)  # 16 MB: lives in shared memory
    view = ray.get(ref)
    print(f"zero-copy get: read-only view = {not view.flags.writeable}, "
          f"means match = {np.allclose(ray.get(column_means.remote(ref)), matrix.mean(axis=0))}")

    try:
        ray.get(fails.remote())
    except ValueError as exc:
        print("remote error caught as ValueError:", str(exc).splitlines()[0])

    ready, pending = ray.wait([square.remote(i) for i in range(4)], num_returns=4, timeout=10)
    print(f"wait: {len(ready)} ready, {len(pending)} pending")
    ray.shutdown()
    print("done")


if __name__ == "__main__":
    main()
