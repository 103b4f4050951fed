"""Generator tasks and actor methods (Ray 2.60's ObjectRefGenerator, num_returns="streaming"
and "dynamic"), on a real private cluster. File gates prove items are readable while the
generator is still blocked."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

import runtime as ray
from runtime.core_worker.generators import DynamicObjectRefGenerator, ObjectRefGenerator

from conftest import wait_for


def _wait_file(path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.01)


@ray.remote
def gated(gate: str, n: int):
    yield "first"
    _wait_file(gate)
    for i in range(n):
        yield i


@ray.remote
def failing():
    yield 1
    yield 2
    raise ValueError("boom in the generator")


@ray.remote
def counting(marks: str, n: int):
    for i in range(n):
        Path(marks, f"{i}").touch()
        yield i


@ray.remote
def endless(marks: str):
    i = 0
    try:
        while True:
            Path(marks, "last").write_text(str(i))
            yield i
            i += 1
            time.sleep(0.02)
    finally:
        Path(marks, "closed").touch()


@ray.remote(num_returns="dynamic")
def dynamic(n: int):
    for i in range(n):
        yield i * 2


@ray.remote
class SyncGen:
    def items(self, n):
        for i in range(n):
            yield i

    def gated(self, gate):
        yield "first"
        _wait_file(gate)
        yield "second"


@ray.remote
class AsyncGen:
    async def items(self, n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    async def gated(self, gate):
        yield "first"
        while not os.path.exists(gate):
            await asyncio.sleep(0.01)
        yield "second"


def test_streaming_items_arrive_before_generator_ends(cluster, tmp_path):
    gate = str(tmp_path / "gate")
    gen = gated.remote(gate, 3)
    assert isinstance(gen, ObjectRefGenerator)
    assert ray.get(next(gen), timeout=60) == "first"  # while the worker waits on the gate
    assert not gen.is_finished()
    Path(gate).touch()
    assert [ray.get(r) for r in gen] == [0, 1, 2]
    with pytest.raises(StopIteration):
        next(gen)
    assert gen.is_finished()
    assert ray.get(gen.completed(), timeout=30) is None


def test_exception_surfaces_at_its_item(cluster):
    gen = failing.remote()
    assert ray.get(next(gen)) == 1
    assert ray.get(next(gen)) == 2
    with pytest.raises(ValueError, match="boom in the generator"):
        ray.get(next(gen))
    with pytest.raises(StopIteration):
        next(gen)


def test_large_items_go_through_the_object_store(cluster):
    np = pytest.importorskip("numpy")

    @ray.remote
    def big():
        for i in range(3):
            yield np.full(500_000, i)

    assert [int(ray.get(r)[0]) for r in big.remote()] == [0, 1, 2]


def test_cancel_stops_the_worker_side_generator(cluster, tmp_path):
    gen = endless.remote(str(tmp_path))
    assert ray.get(next(gen), timeout=60) == 0
    ray.cancel(gen)
    wait_for(lambda: (tmp_path / "closed").exists(), timeout=30,
             message="the generator's finally block after cancel")
    last = (tmp_path / "last").read_text()
    time.sleep(0.3)
    assert (tmp_path / "last").read_text() == last  # it produces nothing more
    with pytest.raises((ray.exceptions.TaskCancelledError, StopIteration)):
        for ref in gen:  # the items before the cancel, then the cancellation
            ray.get(ref, timeout=30)


def test_backpressure_bounds_unconsumed_items(cluster, tmp_path):
    gen = counting.options(_generator_backpressure_num_objects=2).remote(str(tmp_path), 10)
    wait_for(lambda: (tmp_path / "1").exists(), timeout=60, message="two items produced")
    time.sleep(0.5)
    assert not (tmp_path / "2").exists()  # paused with 2 unconsumed
    assert ray.get(next(gen)) == 0
    wait_for(lambda: (tmp_path / "2").exists(), timeout=30, message="third item after a read")
    time.sleep(0.3)
    assert not (tmp_path / "3").exists()
    assert [ray.get(r) for r in gen] == list(range(1, 10))


def test_dynamic_returns_one_ref_to_a_generator(cluster):
    ref = dynamic.remote(4)
    assert isinstance(ref, ray.ObjectRef) and not isinstance(ref, ObjectRefGenerator)
    value = ray.get(ref, timeout=60)
    assert isinstance(value, DynamicObjectRefGenerator)
    assert len(value) == 4
    assert ray.get(list(value)) == [0, 2, 4, 6]


def test_generator_function_option_validation(cluster):
    with pytest.raises(ValueError, match="_generator_backpressure_num_objects"):
        counting.options(_generator_backpressure_num_objects=-1)


def test_sync_actor_generator_method(cluster, actors):
    a = SyncGen.remote()
    actors.append(a)
    gen = a.items.remote(4)
    assert isinstance(gen, ObjectRefGenerator)
    assert [ray.get(r, timeout=60) for r in gen] == [0, 1, 2, 3]


def test_async_actor_generator_streams(cluster, actors, tmp_path):
    a = AsyncGen.remote()
    actors.append(a)
    gate = str(tmp_path / "gate")
    gen = a.gated.remote(gate)
    assert ray.get(next(gen), timeout=60) == "first"  # the method waits on the gate
    Path(gate).touch()
    assert ray.get(next(gen), timeout=30) == "second"
    with pytest.raises(StopIteration):
        next(gen)


def test_async_for_in_a_driver_coroutine(cluster, actors):
    a = AsyncGen.remote()
    actors.append(a)

    async def main():
        out = []
        async for ref in a.items.remote(5):
            out.append(await ref)
        return out

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]
