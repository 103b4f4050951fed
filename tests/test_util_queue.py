"""runtime.util.queue.Queue, as Ray 2.60 documents it (python/ray/util/queue.py): FIFO
put/get, blocking and non-blocking, timeouts, Empty/Full, batches, async variants, a
queue shared with tasks and actors, actor options, and shutdown.

All tests share the module's private 2-CPU cluster; every queue is shut down at the
end of its test.
"""
from __future__ import annotations

import asyncio
import queue as std_queue
import time

import pytest

import runtime as ray
from runtime.exceptions import RayActorError
from runtime.util import list_named_actors
from runtime.util.queue import Empty, Full, Queue


@pytest.fixture
def queues(cluster):
    made = []

    def make(*args, **kwargs):
        q = Queue(*args, **kwargs)
        made.append(q)
        return q

    yield make
    for q in made:
        q.shutdown(force=True)


@ray.remote
def producer(q, items):
    for item in items:
        q.put(item)
    return len(items)


@ray.remote
def consumer(q, n, timeout):
    return [q.get(timeout=timeout) for _ in range(n)]


@ray.remote
class AsyncUser:
    async def round_trip(self, q, item):
        await q.put_async(item)
        return await q.get_async(timeout=10)


def test_fifo_and_size(queues):
    q = queues()
    assert q.empty() and q.size() == 0 and len(q) == 0 and not q.full()
    for item in range(5):
        q.put(item)
    assert q.qsize() == 5 and len(q) == 5 and not q.empty()
    assert [q.get() for _ in range(5)] == list(range(5))


def test_nowait_on_full_and_empty(queues):
    q = queues(maxsize=2)
    q.put_nowait("a")
    q.put("b", block=False)
    assert q.full()
    with pytest.raises(Full):
        q.put_nowait("c")
    with pytest.raises(std_queue.Full):  # Ray's Full is the standard library's too
        q.put("c", block=False)
    assert q.get_nowait() == "a" and q.get(block=False) == "b"
    with pytest.raises(Empty):
        q.get_nowait()
    with pytest.raises(std_queue.Empty):
        q.get(block=False)


def test_timeouts(queues):
    q = queues(maxsize=1)
    t0 = time.monotonic()
    with pytest.raises(Empty):
        q.get(timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    q.put(1)
    t0 = time.monotonic()
    with pytest.raises(Full):
        q.put(2, timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    assert q.get(timeout=0) == 1  # timeout 0 with an item there: no wait, no error
    q.put(4, timeout=0)
    assert q.get() == 4
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            q.get(timeout=bad)
        with pytest.raises(ValueError, match="timeout"):
            q.put(1, timeout=bad)


def test_blocked_get_waits_for_a_producer_task(queues):
    q = queues()
    waiting = consumer.remote(q, 3, 60)
    ready, _ = ray.wait([waiting], timeout=0.3)
    assert not ready  # blocked in get() on the empty queue
    assert ray.get(producer.remote(q, ["x", "y", "z"]), timeout=60) == 3
    assert ray.get(waiting, timeout=60) == ["x", "y", "z"]


def test_blocked_put_waits_for_room(queues):
    q = queues(maxsize=1)
    q.put("first")
    blocked = producer.remote(q, ["second"])
    ready, _ = ray.wait([blocked], timeout=0.3)
    assert not ready  # the task is stuck in put() until there is room
    assert q.get(timeout=10) == "first"
    assert ray.get(blocked, timeout=60) == 1
    assert q.get(timeout=10) == "second"


def test_batches(queues):
    q = queues(maxsize=3)
    q.put_nowait_batch([1, 2])
    with pytest.raises(Full, match="Cannot add 2 items"):
        q.put_nowait_batch([3, 4])
    assert q.size() == 2  # all or nothing
    with pytest.raises(Empty, match="Cannot get 3 items"):
        q.get_nowait_batch(3)
    assert q.get_nowait_batch(2) == [1, 2]
    assert q.get_nowait_batch(0) == []
    with pytest.raises(TypeError):
        q.put_nowait_batch(5)
    with pytest.raises(ValueError):
        q.get_nowait_batch(-1)


def test_async_variants(queues):
    q = queues(maxsize=1)

    async def main():
        await q.put_async("a")
        with pytest.raises(Full):
            await q.put_async("b", block=False)
        with pytest.raises(Full):
            await q.put_async("b", timeout=0.1)
        got = await q.get_async()
        with pytest.raises(Empty):
            await q.get_async(block=False)
        with pytest.raises(Empty):
            await q.get_async(timeout=0.1)
        return got

    assert asyncio.run(main()) == "a"
    user = AsyncUser.remote()
    try:
        assert ray.get(user.round_trip.remote(q, "from an async actor"), timeout=60) == \
            "from an async actor"
    finally:
        ray.kill(user)


def test_actor_options_and_shutdown(queues):
    q = queues(actor_options={"name": "shared-queue"})
    assert "shared-queue" in list_named_actors()
    q.put("kept")
    handle = q.actor
    q.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        q.put("more")
    deadline = time.monotonic() + 30
    while "shared-queue" in list_named_actors():
        assert time.monotonic() < deadline, "the queue's actor outlived shutdown()"
        time.sleep(0.1)
    with pytest.raises(RayActorError):
        ray.get(handle.qsize.remote(), timeout=30)
    q.shutdown()  # a second shutdown does nothing
