"""Generator tasks and actor methods (Ray 2.60's ObjectRefGenerator, num_returns="streaming"
and "dynamic"), on a real private cluster. File gates prove items are readable while the
generator is still blocked."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import runtime as ray
from runtime.core_worker.generators import DynamicObjectRefGenerator, ObjectRefGenerator

from conftest import wait_for
from helpers.env import scrubbed_env
from helpers.gates import await_path

REPO = str(Path(__file__).resolve().parent.parent)



@ray.remote
def gated(gate: str, n: int):
    yield "first"
    await_path(gate)
    for i in range(n):
        yield i


@ray.remote
def failing():
    yield 1
    yield 2
    raise ValueError("boom in the generator")


def _counting(marks: str, n: int):
    """Marks each item's file as it is produced (back-pressure shows in the marks)."""
    for i in range(n):
        Path(marks, f"{i}").touch()
        yield i


def _endless(marks: str):
    """Yields until closed; its finally marks "closed" (a cancel or a gone caller)."""
    i = 0
    try:
        while True:
            Path(marks, "last").write_text(str(i))
            yield i
            i += 1
            time.sleep(0.02)
    finally:
        Path(marks, "closed").touch()


@ray.remote
def counting(marks: str, n: int):
    yield from _counting(marks, n)


@ray.remote
def endless(marks: str):
    yield from _endless(marks)


@ray.remote(num_returns="dynamic")
def dynamic(n: int):
    for i in range(n):
        yield i * 2


@ray.remote
class SyncGen:
    """A sync actor (max_concurrency 1): its calls take the call port."""

    def __init__(self):
        self.calls = []

    def items(self, n):
        for i in range(n):
            yield i

    def gated(self, gate, fail=False):
        yield "first"
        await_path(gate)
        if fail:
            raise ValueError("boom after the gate")
        yield "second"

    def counting(self, marks, n):
        yield from _counting(marks, n)

    def endless(self, marks):
        yield from _endless(marks)

    def record(self, i):
        self.calls.append(i)
        return i

    def recorded(self):
        return list(self.calls)


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


def _assert_paused_at_two_unconsumed(gen, marks: Path) -> None:
    """`gen` is `counting(marks, 10)` under back-pressure 2: it pauses after two items,
    makes one more per item read, and ends with all ten. The sleeps only give a worker
    that ignored the bound time to show it (what is checked is that nothing happens)."""
    wait_for(lambda: (marks / "1").exists(), timeout=60, message="two items produced")
    time.sleep(0.5)
    assert not (marks / "2").exists()  # paused with 2 unconsumed
    assert ray.get(next(gen), timeout=30) == 0
    wait_for(lambda: (marks / "2").exists(), timeout=30, message="third item after a read")
    time.sleep(0.3)
    assert not (marks / "3").exists()
    assert [ray.get(r, timeout=30) for r in gen] == list(range(1, 10))


def test_backpressure_bounds_unconsumed_items(cluster, tmp_path):
    gen = counting.options(_generator_backpressure_num_objects=2).remote(str(tmp_path), 10)
    _assert_paused_at_two_unconsumed(gen, tmp_path)


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


# -- sync actors: items stream on the call port ------------------------------------------------
def test_sync_actor_generator_streams_items_as_yielded(cluster, actors, tmp_path):
    a = SyncGen.remote()
    actors.append(a)
    gate = str(tmp_path / "gate")
    gen = a.gated.remote(gate)
    wait_for(gen.next_ready, timeout=60, message="the first item while the method waits on its gate")
    assert ray.get(next(gen), timeout=30) == "first"
    assert not gen.is_finished()
    Path(gate).touch()
    assert ray.get(next(gen), timeout=30) == "second"
    with pytest.raises(StopIteration):
        next(gen)
    assert ray.get(gen.completed(), timeout=30) is None


@ray.remote(max_retries=1)
def dies_once_midway(marker: str, n: int):
    for i in range(n):
        if i == 4 and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)  # the worker dies after the caller consumed 3+ items
        yield i


def test_a_retried_backpressured_generator_resumes_past_what_was_consumed(cluster, tmp_path):
    """The retry starts from item 0 again; the items the caller already took are
    duplicates it ignores, so the worker must count them as consumed or it waits for acks
    that never come (limit 2, 4 items consumed before the crash)."""
    gen = dies_once_midway.options(_generator_backpressure_num_objects=2).remote(
        str(tmp_path / "died"), 8)
    values = []
    for _ in range(8):
        ref = gen._next_sync(timeout_s=60)
        assert not ref.is_nil(), f"item {len(values)} never came (got {values})"
        values.append(ray.get(ref, timeout=30))
    assert values == list(range(8))
    assert (tmp_path / "died").exists()
    with pytest.raises(StopIteration):
        next(gen)


def test_sync_actor_generator_backpressure_bounds_unconsumed_items(cluster, actors, tmp_path):
    a = SyncGen.remote()
    actors.append(a)
    gen = a.counting.options(_generator_backpressure_num_objects=2).remote(str(tmp_path), 10)
    _assert_paused_at_two_unconsumed(gen, tmp_path)


def test_calls_queued_behind_a_paused_sync_generator_run_after_it_in_order(cluster, actors,
                                                                            tmp_path):
    """The actor's thread reads the caller's socket for acks while the generator is paused;
    the calls it reads meanwhile run after the generator, in submission order."""
    a = SyncGen.remote()
    actors.append(a)
    gen = a.counting.options(_generator_backpressure_num_objects=1).remote(str(tmp_path), 5)
    wait_for(lambda: (tmp_path / "0").exists(), timeout=60, message="the first item")
    calls = []
    for i in range(6):  # several frames: each submission here is a turn of the caller's loop
        calls.append(a.record.remote(i))
        time.sleep(0.01)
    wait_for(gen.next_ready, timeout=60, message="the first item to reach the caller")
    ready, _ = ray.wait(calls, num_returns=len(calls), timeout=0.5)
    assert ready == []  # a sync actor runs one call at a time: the generator is not done
    assert [ray.get(r, timeout=30) for r in gen] == list(range(5))
    assert ray.get(calls, timeout=30) == list(range(6))
    assert ray.get(a.recorded.remote(), timeout=30) == list(range(6))


def test_sync_actor_generator_exception_surfaces_at_its_item(cluster, actors, tmp_path):
    a = SyncGen.remote()
    actors.append(a)
    gate = str(tmp_path / "gate")
    gen = a.gated.remote(gate, fail=True)
    wait_for(gen.next_ready, timeout=60, message="the first item while the method waits on its gate")
    assert ray.get(next(gen), timeout=30) == "first"
    Path(gate).touch()
    with pytest.raises(ValueError, match="boom after the gate"):
        ray.get(next(gen), timeout=30)
    with pytest.raises(StopIteration):
        next(gen)
    assert ray.get(a.record.remote(7), timeout=30) == 7  # the actor lives on


def test_cancel_stops_a_sync_actor_generator(cluster, actors, tmp_path):
    a = SyncGen.remote()
    actors.append(a)
    gen = a.endless.remote(str(tmp_path))
    wait_for(gen.next_ready, timeout=60, message="the first item of the endless generator")
    assert ray.get(next(gen), timeout=30) == 0
    ray.cancel(gen)
    wait_for(lambda: (tmp_path / "closed").exists(), timeout=30,
             message="the generator's finally block after cancel")
    last = (tmp_path / "last").read_text()
    time.sleep(0.3)
    assert (tmp_path / "last").read_text() == last  # it produces nothing more
    with pytest.raises(ray.exceptions.TaskCancelledError):
        for ref in gen:  # the items before the cancel, then the cancellation
            ray.get(ref, timeout=30)
    assert ray.get(a.record.remote(1), timeout=30) == 1  # the actor serves the next call


CALLER_GOES = """
import os, sys, runtime as ray
ray.init(address=sys.argv[1], namespace=sys.argv[2])
a = ray.get_actor(sys.argv[3])
gen = a.endless.options(num_returns="streaming",
                        _generator_backpressure_num_objects=1).remote(sys.argv[4])
print("item", ray.get(next(gen), timeout=60), flush=True)
os._exit(0)  # no goodbye: the actor sees the connection close
"""


def test_a_gone_caller_ends_its_paused_sync_generator(cluster, actors, tmp_path):
    name = f"syncgen-{uuid.uuid4().hex[:8]}"
    a = SyncGen.options(name=name).remote()
    actors.append(a)
    assert ray.get(a.record.remote(0), timeout=60) == 0
    marks = tmp_path / "marks"
    marks.mkdir()
    with open(os.path.join(cluster.address_info["session_dir"], "token")) as fh:
        token = fh.read().strip()
    proc = subprocess.Popen(
        [sys.executable, "-c", CALLER_GOES, cluster.address_info["gcs_address"],
         ray.get_runtime_context().namespace, name, str(marks)], cwd=REPO,
        env=scrubbed_env(NODE_AGENT_TOKEN=token, RUNTIME_SESSION_ROOT=str(tmp_path / "root")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "item 0" in out, out[-3000:]
        wait_for(lambda: (marks / "closed").exists(), timeout=30,
                 message="the generator's finally block after its caller went away")
        assert int((marks / "last").read_text()) <= 2  # it was paused, not running on
        assert ray.get(a.record.remote(1), timeout=30) == 1  # and the actor serves others
    finally:
        if proc.poll() is None:  # an attached driver starts no processes of its own
            proc.kill()
            proc.wait(10)


def test_cancel_stops_a_threaded_actor_generator(cluster, actors, tmp_path):
    """A threaded actor (max_concurrency > 1) has no call port: its calls come on the task
    stream and run on its pool. A running call is not interrupted, but a generator is
    stopped between two items."""
    a = SyncGen.options(max_concurrency=2).remote()
    actors.append(a)
    gen = a.endless.remote(str(tmp_path))
    assert ray.get(next(gen), timeout=60) == 0
    ray.cancel(gen)
    wait_for(lambda: (tmp_path / "closed").exists(), timeout=30,
             message="the generator's finally block after cancel")
    with pytest.raises(ray.exceptions.TaskCancelledError):
        for ref in gen:
            ray.get(ref, timeout=30)
    assert ray.get(a.record.remote(2), timeout=30) == 2
