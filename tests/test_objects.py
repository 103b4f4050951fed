"""Objects: put/get/wait, ObjectRefs, zero-copy numpy values, reference counting,
spilling and a full store, against a real private cluster.

Store contents are read with the object store's own Stats RPC (StoreClient.stats()),
so "freed" means freed in the store process, not just forgotten by the driver.
Tasks that must stay running wait on a file ("gate") the test creates; nothing
here waits with a bare sleep.
"""
from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

import runtime as ray
from runtime.object_store.client import StoreClient

from helpers.gates import await_path
from conftest import wait_for

MiB = 1024 * 1024
BIG = 20 * MiB            # "large": far above the 100 KiB inline limit
TOLERANCE = 1 * MiB       # serialization overhead allowed in byte accounting


class Point:
    """A user class defined in the test module."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


# -- helpers ----------------------------------------------------------------------------------
def store_stats(ctx):
    """The object store's Stats (used bytes, num_objects, spill counters)."""
    addr = ctx.address_info["object_store_address"]
    with open(os.path.join(ctx.address_info["session_dir"], "token")) as fh:
        token = fh.read().strip()

    async def go():
        client = StoreClient(addr, token)
        try:
            return await client.stats()
        finally:
            await client.close()

    return asyncio.run(go())


def big_array(seed: int, nbytes: int = BIG) -> np.ndarray:
    return np.arange(nbytes // 8, dtype=np.int64) + seed


def check_big(arr: np.ndarray, seed: int, nbytes: int = BIG) -> None:
    assert arr.dtype == np.int64 and arr.shape == (nbytes // 8,)
    assert np.array_equal(arr, big_array(seed, nbytes))


def settle_frees(ctx):
    """Make sure frees requested so far reached the store.

    Puts and drops a sentinel of a distinctive size and waits until it is gone:
    frees are handled in order, so anything dropped before it was handled too.
    Returns the stats after that.
    """
    size = 3 * MiB + 12345
    sentinel = ray.put(np.zeros(size, dtype=np.uint8))
    with_sentinel = store_stats(ctx)
    assert with_sentinel.used >= size
    del sentinel
    return wait_for(lambda: (lambda s: s if s.used <= with_sentinel.used - size else None)(
        store_stats(ctx)), 15, message="sentinel object to be freed")


class Gate:
    """A file the test creates to let waiting tasks go on."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def open(self) -> None:
        Path(self.path).touch()


@pytest.fixture
def gate(tmp_path):
    g = Gate(tmp_path / "gate")
    yield g
    g.open()  # never leave a task waiting forever


@ray.remote
def wait_gate(path, value=None, started=None, timeout=60.0):
    """Signal `started`, wait for the gate file, return value."""
    if started:
        Path(started).touch()
    await_path(path, timeout)
    return value


@ray.remote
def sum_after_gate(arr, path, started):
    Path(started).touch()
    await_path(path, 60)
    return int(arr.sum())


@ray.remote
def make_big(seed, nbytes=BIG):
    return np.arange(nbytes // 8, dtype=np.int64) + seed


@ray.remote
def describe(arr):
    return {"writeable": bool(arr.flags.writeable), "has_base": arr.base is not None,
            "sum": int(arr.sum()), "len": len(arr)}


@ray.remote
def fail(msg):
    raise ValueError(msg)


@ray.remote
def identity(x):
    return x


# -- put / get ----------------------------------------------------------------------------------
VALUES = {
    "int": 42,
    "negative_big_int": -(2**100),
    "str": "hello, wörld",
    "none": None,
    "dict": {"a": 1, "b": [1, 2, {"c": (3, 4)}], 5: "five"},
    "nested_lists": [[1, [2, [3, [4, []]]]], ["x"], []],
    "custom_class": Point(1, "two"),
    "bytes": b"\x00\x01binary",
    "large_bytes": os.urandom(300 * 1024),
    "large_str": "z" * (200 * 1024),
    "large_list": list(range(100_000)),
    "large_dict_of_custom": {i: Point(i, str(i)) for i in range(20_000)},
}


@pytest.mark.parametrize("name", list(VALUES))
def test_put_get_round_trip(cluster, name):
    value = VALUES[name]
    ref = ray.put(value)
    assert isinstance(ref, ray.ObjectRef)
    out = ray.get(ref)
    assert out == value
    assert type(out) is type(value)
    assert ray.get(ref) == value  # a second get works too


def test_custom_class_through_task(cluster):
    out = ray.get(identity.remote(Point(3, [4])))
    assert isinstance(out, Point) and out == Point(3, [4])


def test_large_put_lives_in_the_store(cluster):
    before = store_stats(cluster)
    ref = ray.put(os.urandom(2 * MiB))
    after = store_stats(cluster)
    assert after.num_objects == before.num_objects + 1
    assert after.used >= before.used + 2 * MiB
    assert len(ray.get(ref)) == 2 * MiB
    del ref


def test_get_list_keeps_order(cluster, gate):
    # Mix of inline puts, store puts and task results that finish out of order.
    slow = wait_gate.remote(gate.path, "slow")
    refs = [ray.put(i) for i in range(20)]
    refs.insert(3, slow)
    refs.insert(7, ray.put(b"x" * (200 * 1024)))
    refs.append(identity.remote("fast"))
    expected = list(range(3)) + ["slow"] + list(range(3, 6)) + [b"x" * (200 * 1024)] \
        + list(range(6, 20)) + ["fast"]
    gate.open()
    assert ray.get(refs, timeout=60) == expected
    assert ray.get(tuple(refs[:3])) == [0, 1, 2]
    assert ray.get([]) == []


# -- zero-copy numpy ----------------------------------------------------------------------------
def _assert_zero_copy_view(out, original):
    assert isinstance(out, np.ndarray)
    assert np.array_equal(out, original)
    assert not out.flags.writeable, "a value from the store must be a read-only view"
    assert out.base is not None, "expected a view over shared memory, not a private copy"
    assert not np.shares_memory(out, original)
    with pytest.raises(ValueError):
        out[0] = -1


def test_numpy_put_get_is_readonly_zero_copy(cluster):
    original = big_array(7)
    ref = ray.put(original)
    _assert_zero_copy_view(ray.get(ref), original)
    # Nested inside other values, each array is its own view.
    ref2 = ray.put({"a": original, "b": [original[:1000].copy(), "x"]})
    out = ray.get(ref2)
    _assert_zero_copy_view(out["a"], original)
    assert out["b"][1] == "x" and np.array_equal(out["b"][0], original[:1000])
    # The driver's array is untouched and still writable.
    assert original.flags.writeable


def test_numpy_returned_from_task_is_readonly_zero_copy(cluster):
    out = ray.get(make_big.remote(11), timeout=60)
    _assert_zero_copy_view(out, big_array(11))


def test_numpy_passed_to_task_as_ref(cluster):
    original = big_array(5)
    ref = ray.put(original)
    info = ray.get(describe.remote(ref), timeout=60)
    assert info == {"writeable": False, "has_base": True, "sum": int(original.sum()),
                    "len": len(original)}
    # A task result passed on to another task, never fetched by the driver.
    info = ray.get(describe.remote(make_big.remote(3)), timeout=60)
    assert info["writeable"] is False and info["has_base"] is True
    assert info["sum"] == int(big_array(3).sum())


def test_value_stays_valid_after_ref_is_dropped(cluster):
    ref = ray.put(big_array(9))
    out = ray.get(ref)
    del ref
    settle_frees(cluster)
    check_big(out, 9)


# -- get timeout / wait --------------------------------------------------------------------------
def test_get_timeout_raises_get_timeout_error(cluster, gate):
    ref = wait_gate.remote(gate.path, "done")
    with pytest.raises(ray.exceptions.GetTimeoutError):
        ray.get(ref, timeout=0.3)
    with pytest.raises(TimeoutError):  # Ray's GetTimeoutError is also a TimeoutError
        ray.get([ray.put(1), ref], timeout=0.1)
    gate.open()
    assert ray.get(ref, timeout=60) == "done"  # the task was not affected


def test_wait_num_returns_and_order(cluster, gate):
    slow = wait_gate.remote(gate.path, "slow")
    a, b, c = ray.put("a"), ray.put(b"b" * (200 * 1024)), ray.put("c")
    refs = [a, slow, b, c]
    ready, not_ready = ray.wait(refs, num_returns=2, timeout=10)
    assert ready == [a, b]
    assert not_ready == [slow, c]
    ready, not_ready = ray.wait(refs, num_returns=3, timeout=10, fetch_local=False)
    assert ready == [a, b, c] and not_ready == [slow]
    # Default num_returns is 1.
    ready, not_ready = ray.wait(refs)
    assert ready == [a] and not_ready == [slow, b, c]


def test_wait_timeout_returns_partial(cluster, gate):
    slow1 = wait_gate.remote(gate.path, 1)
    x = ray.put("x")
    slow2 = wait_gate.remote(gate.path, 2)
    refs = [slow1, x, slow2]
    t0 = time.monotonic()
    ready, not_ready = ray.wait(refs, num_returns=3, timeout=0.5)
    elapsed = time.monotonic() - t0
    assert ready == [x]
    assert not_ready == [slow1, slow2]
    assert elapsed >= 0.4, f"wait returned after {elapsed:.2f}s, before its timeout"
    # timeout=0 polls.
    ready, not_ready = ray.wait(refs, num_returns=2, timeout=0)
    assert ready == [x] and not_ready == [slow1, slow2]
    gate.open()
    ready, not_ready = ray.wait(refs, num_returns=3, timeout=60)
    assert ready == refs and not_ready == []
    assert ray.get(refs) == [1, "x", 2]


def test_wait_returns_as_soon_as_enough_are_ready(cluster, gate):
    slow = wait_gate.remote(gate.path, "slow")
    fast = identity.remote("fast")
    ready, not_ready = ray.wait([slow, fast], num_returns=1, timeout=60)
    assert ready == [fast] and not_ready == [slow]
    gate.open()
    ready, _ = ray.wait([slow], timeout=60)
    assert ready == [slow]


# -- ObjectRef ----------------------------------------------------------------------------------
def test_object_refs_hashable_and_comparable(cluster):
    refs = [ray.put(i) for i in range(5)]
    table = {r: i for i, r in enumerate(refs)}
    assert [table[r] for r in refs] == list(range(5))
    assert len(set(refs + refs)) == 5
    assert refs[0] == refs[0] and refs[0] != refs[1]
    assert refs[0] != refs[0].hex()
    hexes = [r.hex() for r in refs]
    assert len(set(hexes)) == 5
    for r, h in zip(refs, hexes):
        assert isinstance(h, str) and h == h.lower()
        assert bytes.fromhex(h) == r.binary()
        assert len(h) == 56  # Ray's ObjectID: 28 bytes
    # The same ref coming back from a task is equal, hashes the same and finds its entry.
    back = ray.get(identity.remote([refs[2]]))[0]
    assert back == refs[2] and hash(back) == hash(refs[2]) and table[back] == 2
    assert ray.get(back) == 2


def test_ref_is_awaitable(cluster):
    ref = identity.remote({"k": "v"})
    big = ray.put(big_array(4))

    async def main():
        one = await ref
        many = await asyncio.gather(identity.remote(1), ray.put(2), big)
        return one, many

    one, many = asyncio.run(main())
    assert one == {"k": "v"}
    assert many[:2] == [1, 2]
    check_big(many[2], 4)


def test_awaiting_a_failed_task_raises_its_error(cluster):
    async def main():
        return await fail.remote("boom from await")

    with pytest.raises(ValueError, match="boom from await") as ei:
        asyncio.run(main())
    assert isinstance(ei.value, ray.exceptions.RayTaskError)


def test_ref_future(cluster):
    assert ray.put("hello").future().result(timeout=30) == "hello"
    assert identity.remote(5).future().result(timeout=30) == 5
    fut = fail.remote("boom from future").future()
    with pytest.raises(ValueError, match="boom from future"):
        fut.result(timeout=30)


# -- reference counting ---------------------------------------------------------------------------
def test_dropping_put_ref_frees_store_memory(cluster):
    base = settle_frees(cluster)
    ref = ray.put(big_array(1))
    s = store_stats(cluster)
    assert s.num_objects == base.num_objects + 1
    assert s.used >= base.used + BIG
    del ref
    wait_for(lambda: (lambda s: s.num_objects == base.num_objects
                      and s.used <= base.used + TOLERANCE)(store_stats(cluster)),
             15, message="the dropped put object to be freed in the store")


def test_dropping_task_result_frees_store_memory(cluster):
    base = settle_frees(cluster)
    ref = make_big.remote(2)
    ready, _ = ray.wait([ref], timeout=60)
    assert ready == [ref]
    s = wait_for(lambda: (lambda s: s if s.num_objects == base.num_objects + 1 else None)(
        store_stats(cluster)), 15, message="the task result in the store")
    assert s.used >= base.used + BIG
    del ref, ready
    wait_for(lambda: (lambda s: s.num_objects == base.num_objects
                      and s.used <= base.used + TOLERANCE)(store_stats(cluster)),
             15, message="the dropped task result to be freed in the store")


def test_nested_ref_keeps_inner_object_alive(cluster):
    base = settle_frees(cluster)
    inner = ray.put(big_array(21))
    outer = ray.put({"inner": [inner], "note": "holds a ref"})
    del inner
    s = settle_frees(cluster)
    assert s.num_objects == base.num_objects + 1, "inner object was freed while still referenced"
    assert s.used >= base.used + BIG
    value = ray.get(outer)
    check_big(ray.get(value["inner"][0]), 21)
    del value
    s = settle_frees(cluster)
    assert s.num_objects == base.num_objects + 1
    del outer
    wait_for(lambda: (lambda s: s.num_objects == base.num_objects
                      and s.used <= base.used + TOLERANCE)(store_stats(cluster)),
             15, message="the inner object to be freed after the outer one was dropped")


def test_argument_of_running_task_is_not_freed(cluster, gate, tmp_path):
    base = settle_frees(cluster)
    started = str(tmp_path / "started")
    arg = ray.put(big_array(13))
    result = sum_after_gate.remote(arg, gate.path, started)
    wait_for(lambda: os.path.exists(started), 30, message="the task to start")
    del arg
    s = settle_frees(cluster)
    assert s.num_objects == base.num_objects + 1, "argument freed while its task still runs"
    gate.open()
    assert ray.get(result, timeout=60) == int(big_array(13).sum())
    # A put argument cannot be rebuilt, so the lineage of the task's result keeps it (as
    # in Ray) while the result can still be lost and the task run again.
    s = settle_frees(cluster)
    assert s.num_objects == base.num_objects + 1, "argument freed while the lineage needs it"
    del result
    wait_for(lambda: (lambda s: s.num_objects == base.num_objects
                      and s.used <= base.used + TOLERANCE)(store_stats(cluster)),
             15, message="the argument to be freed with the result of its task")


# -- own clusters: store sizes ----------------------------------------------------------------------
# These run last: fresh_runtime shuts the module's shared cluster down.

def test_put_and_drop_many_times_does_not_fill_store(fresh_runtime):
    ctx = ray.init(num_cpus=1, object_store_memory=1024 * MiB)
    arr = np.ones(200 * MiB // 8, dtype=np.float64)
    for i in range(50):
        ref = ray.put(arr)
        if i % 10 == 0:
            out = ray.get(ref)
            assert out.shape == arr.shape and out[-1] == 1.0
            del out
        del ref
    s = wait_for(lambda: (lambda s: s if s.used < 10 * MiB else None)(store_stats(ctx)), 15,
                 message="the store to be nearly empty")
    assert s.num_objects <= 1


def test_spilling_beyond_capacity_and_restore(fresh_runtime):
    ctx = ray.init(num_cpus=1, object_store_memory=300 * MiB)
    size = 100 * MiB
    refs = [ray.put(big_array(i, size)) for i in range(5)]
    s = store_stats(ctx)
    assert s.spilled_objects >= 2, s
    assert s.num_spilled_now >= 2, s
    assert s.used <= 300 * MiB
    spill_dir = os.path.join(ctx.address_info["session_dir"], "spill")
    files = os.listdir(spill_dir)
    assert len(files) >= 2, files
    for i in reversed(range(5)):  # the oldest ones were spilled: restore them on demand
        out = ray.get(refs[i], timeout=60)
        check_big(out, i, size)
        del out
    s = store_stats(ctx)
    assert s.restored_objects >= 1, s
    del refs
    wait_for(lambda: (lambda s: s.used < MiB and s.num_spilled_now == 0)(store_stats(ctx)), 15,
             message="spilled and in-memory objects to be freed")
    wait_for(lambda: not os.listdir(spill_dir), 15, message="spill files to be removed")


def test_object_larger_than_store_raises_store_full(fresh_runtime):
    ctx = ray.init(num_cpus=1, object_store_memory=100 * MiB)
    with pytest.raises(ray.exceptions.ObjectStoreFullError) as ei:
        ray.put(np.zeros(150 * MiB, dtype=np.uint8))
    msg = str(ei.value)
    numbers = [int(n) for n in re.findall(r"\d+", msg)]
    assert "150.0 MiB" in msg or any(150 * MiB <= n < 151 * MiB for n in numbers), msg
    assert "100.0 MiB" in msg or 100 * MiB in numbers, msg
    assert isinstance(ei.value, ray.exceptions.RayError)
    # The store is still usable and holds nothing of the failed put.
    assert store_stats(ctx).used == 0
    ref = ray.put(np.zeros(10 * MiB, dtype=np.uint8))
    assert ray.get(ref).nbytes == 10 * MiB
