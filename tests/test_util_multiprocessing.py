"""runtime.util.multiprocessing.Pool, as Ray 2.60 documents it
(python/ray/util/multiprocessing/pool.py, and the standard library's Pool API it copies):
map / map_async / starmap / apply / apply_async / imap / imap_unordered, callbacks,
errors raised as themselves, initializer, maxtasksperchild, close / terminate / join and
the context manager.

All tests share the module's private 2-CPU cluster; each test's pool is terminated at
its end, which kills its actors.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time

import pytest

from runtime.util.multiprocessing import Pool, TimeoutError
from runtime.util.state import list_actors


def square(x):
    return x * x


def multiply(a, b):
    return a * b


def pid(_=None):
    return os.getpid()


def fail_on_three(x):
    if x == 3:
        raise ValueError("three is not allowed")
    return x


def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


_STATE = {}


def set_state(value):
    _STATE["value"] = value


def read_state():
    return _STATE.get("value")


@pytest.fixture
def pools(cluster):
    made = []

    def make(*args, **kwargs):
        pool = Pool(*args, **kwargs)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.terminate()


def _alive_pool_actors():
    return [a for a in list_actors(limit=1000)
            if a["class_name"] == "_PoolActor" and a["state"] != "DEAD"]


def test_map_starmap_apply(pools):
    pool = pools(processes=2)
    assert pool.map(square, range(20)) == [x * x for x in range(20)]
    assert pool.map(square, range(7), chunksize=3) == [x * x for x in range(7)]
    assert pool.map(square, []) == []
    assert pool.starmap(multiply, [(1, 2), (3, 4), (5, 6)]) == [2, 12, 30]
    assert pool.apply(multiply, (6, 7)) == 42
    assert pool.apply(multiply, kwargs={"a": 2, "b": 5}) == 10
    assert pool.apply_async(square, (9,)).get(timeout=60) == 81
    assert len(set(pool.map(pid, range(8), chunksize=1))) == 2  # both processes worked
    assert os.getpid() not in pool.map(pid, range(2))


def test_imap_in_order_and_unordered(pools):
    pool = pools(processes=2)
    assert list(pool.imap(square, range(10))) == [x * x for x in range(10)]
    assert list(pool.imap(square, range(10), chunksize=4)) == [x * x for x in range(10)]
    delays = [(0.5, "slow"), (0, "fast")]
    assert list(pool.imap_unordered(_sleep_pair, delays)) == ["fast", "slow"]
    assert list(pool.imap(_sleep_pair, delays)) == ["slow", "fast"]
    it = pool.imap(_sleep_pair, [(1.0, "late")])
    with pytest.raises(TimeoutError):
        it.next(timeout=0.1)
    assert it.next(timeout=30) == "late"
    with pytest.raises(StopIteration):
        next(it)


def _sleep_pair(pair):
    return sleep_then(*pair)


def test_imap_is_lazy(pools):
    """imap reads its input only as the pool works: one chunk per process in flight
    (unordered), and in order at most 4 chunks per process ahead of the next result."""
    pool = pools(processes=2)
    consumed = []

    def values():
        for n in itertools.count():
            consumed.append(n)
            yield n

    assert len(list(itertools.islice(pool.imap_unordered(square, values()), 5))) == 5
    assert len(consumed) <= 5 + 2
    consumed.clear()
    first = list(itertools.islice(pool.imap(square, values()), 5))
    assert first == [0, 1, 4, 9, 16]
    assert len(consumed) <= 5 + 4 * 2


def test_errors_are_raised_as_themselves(pools):
    pool = pools(processes=2)
    with pytest.raises(ValueError, match="three is not allowed"):
        pool.map(fail_on_three, range(6))
    with pytest.raises(ValueError, match="three is not allowed"):
        pool.apply(fail_on_three, (3,))
    it = pool.imap(fail_on_three, range(5))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError):
        next(it)
    assert next(it) == 4  # the pool goes on after a failed item


def test_async_results_and_callbacks(pools):
    pool = pools(processes=2)
    got, errors = [], []
    done = threading.Event()

    def on_result(value):
        got.append((value, threading.current_thread().name))
        done.set()

    result = pool.map_async(square, range(5), callback=on_result, error_callback=errors.append)
    assert result.get(timeout=60) == [0, 1, 4, 9, 16]
    assert done.wait(30)
    assert got[0][0] == [0, 1, 4, 9, 16] and not errors
    assert got[0][1] == "pool-results"  # never the runtime's I/O thread
    assert result.ready() and result.successful()
    failed = pool.starmap_async(multiply, [(1, 2), ("a", None)], error_callback=errors.append)
    failed.wait(60)
    assert failed.ready() and not failed.successful()
    with pytest.raises(TypeError):
        failed.get()
    assert len(errors) == 1 and isinstance(errors[0], TypeError)
    single = []
    pool.apply_async(square, (4,), callback=single.append).wait(60)
    deadline = time.monotonic() + 30
    while not single and time.monotonic() < deadline:
        time.sleep(0.02)
    assert single == [16]  # apply_async's callback gets the value, not a list
    slow = pool.apply_async(sleep_then, (1.0, "x"))
    assert not slow.ready()
    with pytest.raises(ValueError, match="not ready"):
        slow.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        slow.get(timeout=0.1)
    assert slow.get(timeout=30) == "x"


def test_initializer_runs_in_every_process(pools):
    pool = pools(processes=2, initializer=set_state, initargs=("initialized",))
    assert set(pool.map(_read_state_slowly, range(4), chunksize=1)) == {"initialized"}


def _read_state_slowly(_):
    time.sleep(0.05)
    return read_state()


def test_maxtasksperchild_replaces_processes(pools):
    pool = pools(processes=1, maxtasksperchild=1)
    pids = [pool.apply(pid) for _ in range(3)]
    assert len(set(pids)) == 3  # a fresh actor process after every chunk


def test_close_join_and_terminate(pools):
    pool = pools(processes=2)
    pending = pool.map_async(_sleep_pair, [(0.3, 1), (0.3, 2)])
    late = pool.apply_async(sleep_then, (0.3, "done"))
    pool.close()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(square, [1])
    pool.join()  # waits for the outstanding work, then the actors exit
    assert late.get(timeout=5) == "done"  # finished, not lost, though the pool closed
    assert pending.get(timeout=5) == [1, 2]
    deadline = time.monotonic() + 30
    while _alive_pool_actors():
        assert time.monotonic() < deadline, "the pool's actors outlived join()"
        time.sleep(0.1)
    with pools(processes=2) as ctx_pool:
        assert ctx_pool.map(square, [3]) == [9]
        assert len(_alive_pool_actors()) == 2
    deadline = time.monotonic() + 30
    while _alive_pool_actors():  # the with-block terminated them
        assert time.monotonic() < deadline, "the pool's actors outlived the with-block"
        time.sleep(0.1)
    running = pools(processes=2)
    with pytest.raises(ValueError, match="still running"):
        running.join()


def test_more_processes_than_cpus_is_refused(cluster):
    with pytest.raises(ValueError, match="only 2 CPUs"):
        Pool(processes=3)
    with pytest.raises(ValueError, match=">0"):
        Pool(processes=0)
