"""free() (Ray's ``ray._private.internal_api.free``) and ObjectFreedError, on real clusters.

free() drops a value while references to it remain: every later read of it (get, a task
taking it as an argument, a borrower on another node) raises ObjectFreedError naming the
object, lineage never rebuilds it, and the object stores release its memory at once.
Store contents are read with the stores' own RPCs (Stats, List), so "released" means
released in the store process. Tasks that must stay running wait on a gate file.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest

import runtime as ray
from runtime._private import internal_api
from runtime.core_worker.memory_store import MemoryStore, Value
from runtime.exceptions import ObjectFreedError, RayTaskError
from runtime.object_store.client import StoreClient
from runtime.util import state

from conftest import wait_for
from helpers.env import scrubbed_env
from helpers.gates import await_path
from helpers.nodes import cluster_with_nodes

MiB = 1024 * 1024
BIG = 20 * MiB            # far above the 100 KiB inline limit: the value lives in the store
TOLERANCE = 1 * MiB       # serialization overhead allowed in byte accounting
REPO = Path(__file__).resolve().parent.parent


def free(refs, local_only: bool = False) -> None:
    """internal_api.free, checking that it warns as Ray's does (it is deprecated there)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        internal_api.free(refs, local_only=local_only)
    assert any(issubclass(w.category, DeprecationWarning) and "deprecated" in str(w.message)
               for w in caught), [str(w.message) for w in caught]


def _token(ctx) -> str:
    with open(os.path.join(ctx.address_info["session_dir"], "token")) as fh:
        return fh.read().strip()


def _store_call(address: str, token: str, fn):
    async def go():
        client = StoreClient(address, token)
        try:
            return await fn(client)
        finally:
            await client.close()
    return asyncio.run(go())


def store_stats(ctx):
    return _store_call(ctx.address_info["object_store_address"], _token(ctx),
                       lambda c: c.stats())


def held_by_store(address: str, token: str, ref) -> bool:
    """Whether the object store at `address` holds a copy of ref's object (List RPC)."""
    found = _store_call(address, token, lambda c: c.list_objects([ref.binary()]))
    return any(o.object_id == ref.binary() for o in found)


def big_array(seed: float = 1.0) -> np.ndarray:
    return np.full(BIG // 8, seed)


# -- the memory store (no processes) ------------------------------------------------------------
def test_the_memory_store_keeps_a_freed_value_until_the_object_goes():
    """The error free() stores wakes waiters and is never replaced (a late task result,
    a retry, an owner's answer), until the object goes out of scope (delete)."""
    memory = MemoryStore()
    oid = bytes(range(28))
    woken = []
    memory.add_waiter(oid, lambda _oid, value: woken.append(value))
    error = Value(b"freed", is_error=True)
    assert memory.mark_freed(oid, error) is None
    assert woken == [error] and memory.is_freed(oid)
    memory.put(oid, Value(b"late result"))
    assert memory.get(oid) is error
    assert memory.mark_freed(oid, Value(b"again", is_error=True)) is error  # a second free()
    memory.delete(oid)
    assert not memory.is_freed(oid) and oid not in memory
    memory.put(oid, Value(b"new"))
    assert memory.get(oid).data == b"new"


# -- put, get, wait --------------------------------------------------------------------------
def test_get_of_a_freed_put_raises_object_freed_error_naming_it(cluster):
    small = ray.put({"a": 1})
    large = ray.put(big_array())
    assert ray.get(small) == {"a": 1}
    free([small, large])
    for ref in (small, large):
        with pytest.raises(ObjectFreedError) as info:
            ray.get(ref, timeout=30)
        assert ref.hex() in str(info.value)
        assert "free" in str(info.value)
        assert info.value.object_ref_hex == ref.hex()
    # wait() reports a freed object ready, as Ray does (its value is the error) ...
    ready, not_ready = ray.wait([small, large], num_returns=2, timeout=30)
    assert ready == [small, large] and not_ready == []
    # ... and a get of several refs raises for it too.
    with pytest.raises(ObjectFreedError):
        ray.get([ray.put(1), small], timeout=30)


def test_free_releases_the_stores_memory(cluster):
    base = store_stats(cluster)
    ref = ray.put(big_array())
    arr = ray.get(ref)
    assert arr[0] == 1.0
    with_it = store_stats(cluster)
    assert with_it.used >= base.used + BIG and with_it.num_objects == base.num_objects + 1
    del arr
    free(ref)
    # free() returns once the store has dropped the object: no polling needed.
    after = store_stats(cluster)
    assert after.used <= base.used + TOLERANCE and after.num_objects == base.num_objects
    assert not held_by_store(cluster.address_info["object_store_address"], _token(cluster), ref)
    with pytest.raises(ObjectFreedError):
        ray.get(ref, timeout=30)


# -- task returns: never rebuilt ---------------------------------------------------------------
@ray.remote(max_retries=3)
def make_big(runs: str, gate: str = ""):
    Path(runs, uuid.uuid4().hex).touch()
    if gate:
        await_path(gate)
    return np.full(BIG // 8, 7.0)


def test_a_freed_task_return_raises_and_is_not_rebuilt(cluster, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    base = store_stats(cluster)
    ref = make_big.remote(str(runs))
    assert ray.get(ref, timeout=60)[0] == 7.0
    free(ref)
    assert store_stats(cluster).used <= base.used + TOLERANCE
    for _ in range(2):
        with pytest.raises(ObjectFreedError) as info:
            ray.get(ref, timeout=30)
        assert ref.hex() in str(info.value)
    assert len(os.listdir(runs)) == 1  # the task never ran again to rebuild it


def test_a_return_freed_while_its_task_runs_is_dropped_when_it_arrives(cluster, tmp_path):
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    runs.mkdir()
    base = store_stats(cluster)
    ref = make_big.remote(str(runs), str(gate))
    wait_for(lambda: len(os.listdir(runs)) == 1, 60, message="the task to start")
    free(ref)
    with pytest.raises(ObjectFreedError):  # at once: the running task is not waited for
        ray.get(ref, timeout=30)
    gate.touch()
    # The result comes back into the store and is deleted there, not kept. (The owner
    # reports FINISHED when the result reached it: the delete is under way by then.)
    wait_for(lambda: (lambda t: t is not None and t["state"] == "FINISHED")(
        state.get_task(ref)), 60, message="the task to finish")
    wait_for(lambda: store_stats(cluster).used <= base.used + TOLERANCE, 30,
             message="the freed result to leave the store")
    with pytest.raises(ObjectFreedError):
        ray.get(ref, timeout=30)
    assert len(os.listdir(runs)) == 1


@ray.remote(max_retries=3)
def plus_one(arr, runs: str):
    Path(runs, uuid.uuid4().hex).touch()
    return arr + 1


def test_a_freed_argument_is_not_rebuilt_to_rebuild_a_lost_result(cluster, tmp_path):
    """x is freed and dropped while lineage still keeps it (y's task took it); y is then
    lost: y's task runs again, finds x freed and fails with ObjectFreedError, and x's
    task never runs again."""
    x_runs, y_runs = tmp_path / "x", tmp_path / "y"
    x_runs.mkdir()
    y_runs.mkdir()
    x = make_big.remote(str(x_runs))
    y = plus_one.remote(x, str(y_runs))
    assert ray.get(y, timeout=60)[0] == 8.0
    free(x)
    del x
    # Lose y behind its owner's back: the owner then rebuilds it from its lineage.
    _store_call(cluster.address_info["object_store_address"], _token(cluster),
                lambda c: c.delete([y.binary()]))
    with pytest.raises(ObjectFreedError):
        ray.get(y, timeout=60)
    assert len(os.listdir(x_runs)) == 1


# -- tasks given freed refs ------------------------------------------------------------------------
@ray.remote
def takes(x):
    return "ran"


@ray.remote
def reads_nested(lst):
    return ray.get(lst[0])


def test_a_task_given_a_freed_ref_fails_with_object_freed_error(cluster):
    large, small = ray.put(big_array()), ray.put("small")
    free([large, small])
    for ref in (large, small):
        with pytest.raises(ObjectFreedError) as info:
            ray.get(takes.remote(ref), timeout=60)
        assert ref.hex() in str(info.value)
        # Read inside the task (a borrower asking the owner): the task's error, caused by it.
        with pytest.raises(ObjectFreedError) as info:
            ray.get(reads_nested.remote([ref]), timeout=60)
        assert isinstance(info.value, RayTaskError)
        assert isinstance(info.value.cause, ObjectFreedError)
        assert ref.hex() in str(info.value)


@ray.remote
def free_borrowed(lst):
    from runtime._private.internal_api import free as free_
    from runtime.exceptions import ObjectFreedError as Freed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        free_(lst[0])
    try:
        ray.get(lst[0], timeout=30)
    except Freed as exc:
        return str(exc)
    return "not freed"


def test_a_borrower_frees_through_the_owner(cluster):
    """A ref this process does not own: free() goes to the owner, as Ray's does."""
    base = store_stats(cluster)
    ref = ray.put(big_array())
    message = ray.get(free_borrowed.remote([ref]), timeout=60)
    assert ref.hex() in message
    with pytest.raises(ObjectFreedError):
        ray.get(ref, timeout=30)
    assert store_stats(cluster).used <= base.used + TOLERANCE


@ray.remote
class Holder:
    """A borrower that keeps a ref (and what it learnt of its value) between calls."""

    def __init__(self):
        self.held = None

    def hold(self, lst):
        self.held = lst
        return float(ray.get(lst[0])[0])

    def read(self):
        from runtime.exceptions import ObjectFreedError as Freed

        try:
            return float(ray.get(self.held[0], timeout=60)[0])
        except Freed as exc:
            return "freed: " + str(exc)


def test_a_borrower_that_read_the_value_before_gets_object_freed_error(cluster):
    """The borrower knows where the value was; its next read finds it gone, asks the
    owner again and learns it was freed, promptly (no wait for a seal that never comes)."""
    ref = ray.put(big_array(5.0))
    holder = Holder.remote()
    try:
        assert ray.get(holder.hold.remote([ref]), timeout=60) == 5.0
        free(ref)
        start = time.monotonic()
        message = ray.get(holder.read.remote(), timeout=90)
        assert message.startswith("freed: ") and ref.hex() in message
        assert time.monotonic() - start < 15
    finally:
        ray.kill(holder)


# -- input -------------------------------------------------------------------------------------------------
def test_bad_input_is_a_type_error(cluster):
    ref = ray.put(1)
    for bad in (1, "ref", (ref,), {ref}, [ref, 3], None, [[ref]]):
        with pytest.raises(TypeError, match="ObjectRef"), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            internal_api.free(bad)
    free([])  # nothing to free, as Ray
    assert ray.get(ref) == 1  # a failed call freed nothing


def test_free_is_reachable_as_ray_private_internal_api():
    """``ray._private.internal_api.free`` after a bare ``import runtime as ray``, as in Ray
    (its ray/__init__ imports _private)."""
    code = "import runtime as ray; f = ray._private.internal_api.free; print(f.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=scrubbed_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "free"


# -- several nodes ------------------------------------------------------------------------------------------
@ray.remote(resources={"second": 1})
def total_there(arr):
    return float(arr[0])


@ray.remote(resources={"second": 1})
def read_there(lst):
    from runtime.exceptions import ObjectFreedError as Freed

    try:
        ray.get(lst[0], timeout=30)
    except Freed as exc:
        return "freed: " + str(exc)
    return "read"


def test_free_across_nodes_and_local_only(tmp_path_factory):
    """The owner deletes every node's copy; a borrower on the other node then gets
    ObjectFreedError. local_only=True deletes this node's copy only; the other goes when
    the object goes out of scope."""
    root = str(tmp_path_factory.mktemp("sessions"))
    with cluster_with_nodes(root, head_cpus=1) as (ctx, (second,)):
        token = _token(ctx)
        head_store = ctx.address_info["object_store_address"]
        other_store = second.store_address

        a = ray.put(big_array(3.0))
        assert ray.get(total_there.remote(a), timeout=60) == 3.0  # copied to the other node
        assert held_by_store(head_store, token, a) and held_by_store(other_store, token, a)
        free(a)
        assert not held_by_store(head_store, token, a)
        assert not held_by_store(other_store, token, a)
        message = ray.get(read_there.remote([a]), timeout=60)
        assert message.startswith("freed: ") and a.hex() in message

        b = ray.put(big_array(4.0))
        assert ray.get(total_there.remote(b), timeout=60) == 4.0
        assert held_by_store(other_store, token, b)
        free(b, local_only=True)
        assert not held_by_store(head_store, token, b)
        assert held_by_store(other_store, token, b)
        with pytest.raises(ObjectFreedError):
            ray.get(b, timeout=30)
        del b
        wait_for(lambda: not _any_big(other_store, token), 30,
                 message="the other node's copy to go with the last reference")


def _any_big(address: str, token: str) -> bool:
    return any(o.size >= BIG for o in _store_call(address, token, lambda c: c.list_objects()))
