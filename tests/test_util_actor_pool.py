"""runtime.util.ActorPool, as Ray 2.60 documents it (python/ray/util/actor_pool.py and its
docstring examples): map / map_unordered, submit with get_next / get_next_unordered,
has_next, has_free, pop_idle, push, timeouts, and a dead actor leaving the pool.

All tests share the module's private 2-CPU cluster; the pools' actors take no CPU and
are killed at the end of each test (the ``actors`` fixture).
"""
from __future__ import annotations

import time

import pytest

import runtime as ray
from runtime.exceptions import ActorDiedError
from runtime.util import ActorPool


@ray.remote(num_cpus=0)
class Worker:
    def double(self, v):
        return 2 * v

    def slow_double(self, v, seconds):
        time.sleep(seconds)
        return 2 * v

    def stamped(self, v, seconds):
        start = time.time()
        time.sleep(seconds)
        return v, start, time.time()

    def fail(self, v):
        raise ValueError(f"bad value {v}")

    def pid(self):
        import os

        return os.getpid()


@pytest.fixture
def two(actors):
    pair = [Worker.remote(), Worker.remote()]
    actors.extend(pair)
    ray.get([a.double.remote(0) for a in pair], timeout=60)
    return pair


def test_map_in_order(two):
    pool = ActorPool(two)
    assert list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3, 4])) == [2, 4, 6, 8]
    # More values than actors: the rest wait for a free actor, order is kept.
    assert list(pool.map(lambda a, v: a.double.remote(v), range(30))) == [2 * v for v in range(30)]


def test_map_unordered_yields_every_result(two):
    pool = ActorPool(two)
    results = list(pool.map_unordered(lambda a, v: a.slow_double.remote(v, 0.3 if v == 0 else 0),
                                      range(6)))
    assert sorted(results) == [0, 2, 4, 6, 8, 10]
    assert results[-1] == 0  # the slow one comes last, not first


def test_submit_get_next_has_next(two):
    pool = ActorPool(two)
    assert not pool.has_next()
    pool.submit(lambda a, v: a.double.remote(v), 1)
    pool.submit(lambda a, v: a.double.remote(v), 2)
    assert pool.has_next()
    assert (pool.get_next(), pool.get_next()) == (2, 4)
    assert not pool.has_next()
    with pytest.raises(StopIteration):
        pool.get_next()
    pool.submit(lambda a, v: a.double.remote(v), 3)
    pool.submit(lambda a, v: a.double.remote(v), 4)
    assert {pool.get_next_unordered(), pool.get_next_unordered()} == {6, 8}
    with pytest.raises(StopIteration):
        pool.get_next_unordered()


def test_get_next_after_get_next_unordered_is_refused(two):
    pool = ActorPool(two)
    pool.submit(lambda a, v: a.slow_double.remote(v, 0.5), 1)  # index 0, slow
    pool.submit(lambda a, v: a.double.remote(v), 2)  # index 1, done first
    assert pool.get_next_unordered() == 4
    with pytest.raises(ValueError, match="get_next_unordered"):
        pool.get_next()  # index 0 can no longer come "in order"
    assert pool.get_next_unordered() == 2
    pool.submit(lambda a, v: a.double.remote(v), 3)
    assert pool.get_next() == 6  # a fresh submission after the unordered ones is fine


def test_get_next_timeout(two):
    pool = ActorPool(two)
    pool.submit(lambda a, v: a.slow_double.remote(v, 1.0), 5)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        pool.get_next(timeout=0.1)
    assert time.monotonic() - t0 < 0.9
    assert pool.has_next()  # still pending: a later get_next returns it
    assert pool.get_next(timeout=30) == 10
    pool.submit(lambda a, v: a.slow_double.remote(v, 1.0), 6)
    with pytest.raises(TimeoutError, match="ignored"):
        pool.get_next(timeout=0.1, ignore_if_timedout=True)
    assert not pool.has_next()  # dropped
    pool.submit(lambda a, v: a.slow_double.remote(v, 1.0), 7)
    with pytest.raises(TimeoutError):
        pool.get_next_unordered(timeout=0.1)
    assert pool.get_next_unordered(timeout=30) == 14


def test_has_free_pop_idle_push(actors):
    a1, a2 = Worker.remote(), Worker.remote()
    actors.extend([a1, a2])
    pool = ActorPool([a1])
    assert pool.has_free()
    pool.submit(lambda a, v: a.double.remote(v), 1)
    assert not pool.has_free()
    assert pool.pop_idle() is None
    assert pool.get_next() == 2
    assert pool.has_free()
    assert pool.pop_idle() == a1
    assert not pool.has_free()
    pool.push(a2)
    with pytest.raises(ValueError, match="already belongs"):
        pool.push(a2)
    pool.submit(lambda a, v: a.double.remote(v), 5)
    with pytest.raises(ValueError, match="already belongs"):
        pool.push(a2)  # busy counts as belonging too
    assert pool.get_next() == 10


def test_pushed_actor_takes_waiting_work(actors):
    a1, a2 = Worker.remote(), Worker.remote()
    actors.extend([a1, a2])
    ray.get([a1.double.remote(0), a2.double.remote(0)], timeout=60)
    pool = ActorPool([a1])
    pool.submit(lambda a, v: a.stamped.remote(v, 1.0), "first")
    pool.submit(lambda a, v: a.stamped.remote(v, 0), "second")  # waits: a1 is busy
    assert not pool.has_free()
    pool.push(a2)  # starts "second" at once, while "first" still runs
    first, second = pool.get_next(), pool.get_next()
    assert second[1] < first[2]


def test_ordered_map_keeps_every_actor_busy(two):
    """An actor is free once its call completes, not once the caller has fetched its result
    (see the module docstring of runtime/util/actor_pool.py): while the first, slow item
    runs on one actor, the other actor works through the rest."""
    pool = ActorPool(two)
    out = list(pool.map(lambda a, v: a.stamped.remote(v, 1.0 if v == 0 else 0.01), range(8)))
    assert [v for v, _s, _e in out] == list(range(8))
    slow_end = out[0][2]
    assert all(start < slow_end for _v, start, _e in out[1:]), out


def test_errors_come_back_at_their_turn(two):
    pool = ActorPool(two)
    results = pool.map(lambda a, v: a.fail.remote(v) if v == 1 else a.double.remote(v), [0, 1, 2])
    assert next(results) == 0
    with pytest.raises(ValueError, match="bad value 1"):
        next(results)
    pool2 = ActorPool(two)
    assert list(pool2.map(lambda a, v: a.double.remote(v), [3])) == [6]


def test_dead_actor_leaves_the_pool(actors):
    a1, a2 = Worker.remote(), Worker.remote()
    actors.extend([a1, a2])
    ray.get([a1.double.remote(0), a2.double.remote(0)], timeout=60)
    ray.kill(a1)
    pool = ActorPool([a1, a2])
    outcomes = []
    for v in range(6):
        pool.submit(lambda a, v: a.double.remote(v), v)
    while pool.has_next():
        try:
            outcomes.append(pool.get_next_unordered(timeout=60))
        except ActorDiedError:
            outcomes.append("died")
    assert outcomes.count("died") == 1  # the dead actor got one call, then left the pool
    values = [o for o in outcomes if o != "died"]
    assert len(values) == 5 and len(set(values)) == 5
    assert set(values) <= {2 * v for v in range(6)}
    assert pool.pop_idle() == a2 and pool.pop_idle() is None  # a1 is not idle: it is gone
