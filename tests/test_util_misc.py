"""The rest of Ray 2.60's ``ray.util`` that scripts use (python/ray/util/__init__.py,
helpers.py, check_serialize.py): as_completed, map_unordered, list_named_actors,
get_node_ip_address and inspect_serializability.

All tests share the module's private 2-CPU cluster.
"""
from __future__ import annotations

import io
import itertools
import threading
import time

import pytest

import runtime as ray
import runtime.util as util


@ray.remote
def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


@ray.remote
def identity(x):
    return x


@ray.remote
def node_ip_in_a_task():
    return util.get_node_ip_address()


@ray.remote
class Named:
    def ping(self):
        return "pong"


def test_util_exports_what_ray_util_does():
    for name in ("ActorPool", "as_completed", "map_unordered", "list_named_actors",
                 "get_node_ip_address", "inspect_serializability", "placement_group",
                 "get_current_placement_group", "remove_placement_group"):
        assert name in util.__all__ and callable(getattr(util, name)), name
    assert util.queue.Queue and util.multiprocessing.Pool and util.state.list_actors


def test_as_completed_yields_in_completion_order(cluster):
    refs = [sleep_then.remote(1.0, "slow"), sleep_then.remote(0, "fast")]
    assert list(util.as_completed(refs, chunk_size=1)) == ["fast", "slow"]
    refs = [identity.remote(i) for i in range(25)]
    assert sorted(util.as_completed(refs)) == list(range(25))
    refs = [identity.remote(i) for i in range(3)]
    out = list(util.as_completed(refs, yield_obj_refs=True))
    assert set(out) == set(refs)
    with pytest.raises(ValueError, match="chunk_size"):
        list(util.as_completed(refs, chunk_size=0))
    with pytest.raises(ValueError, match="chunk_size"):
        list(util.as_completed(refs, num_returns=2))


def test_map_unordered_applies_backpressure(cluster):
    drawn = []

    def items():
        for n in itertools.count():
            drawn.append(n)
            yield n

    results = util.map_unordered(identity, items(), backpressure_size=2, chunk_size=1)
    first = next(results)
    assert first in (0, 1)
    assert len(drawn) == 2  # no more than backpressure_size tasks were submitted
    assert sorted(util.map_unordered(identity, range(30), backpressure_size=5)) == list(range(30))
    assert sorted(util.map_unordered(identity, range(12), backpressure_size=None)) == \
        list(range(12))
    with pytest.raises(ValueError, match="backpressure_size"):
        next(util.map_unordered(identity, range(3), backpressure_size=0))


def test_list_named_actors(actors):
    mine = Named.options(name="listed-here").remote()
    elsewhere = Named.options(name="listed-there", namespace="other-namespace").remote()
    unnamed = Named.remote()
    actors += [mine, elsewhere, unnamed]
    ray.get([mine.ping.remote(), elsewhere.ping.remote(), unnamed.ping.remote()], timeout=60)
    here = util.list_named_actors()
    assert "listed-here" in here and "listed-there" not in here
    everywhere = util.list_named_actors(all_namespaces=True)
    namespace = ray.get_runtime_context().namespace
    assert {"name": "listed-here", "namespace": namespace} in everywhere
    assert {"name": "listed-there", "namespace": "other-namespace"} in everywhere
    assert all(set(entry) == {"name", "namespace"} for entry in everywhere)
    ray.kill(mine)
    deadline = time.monotonic() + 30
    while "listed-here" in util.list_named_actors():  # a dead actor's name is free again
        assert time.monotonic() < deadline, "a killed actor is still listed"
        time.sleep(0.05)


def test_get_node_ip_address(cluster):
    assert util.get_node_ip_address() == cluster["node_ip_address"]
    assert ray.get(node_ip_in_a_task.remote(), timeout=60) == cluster["node_ip_address"]


_LOCK = threading.Lock()


class _HoldsALock:
    def __init__(self):
        self.count = 1
        self.guard = threading.Lock()


def test_inspect_serializability_finds_the_culprit():
    def _uses_a_lock():  # nested, so pickled by value with the globals it uses
        return _LOCK.locked()

    out = io.StringIO()
    ok, failures = util.inspect_serializability(_uses_a_lock, name="_uses_a_lock",
                                                print_file=out)
    assert not ok
    assert [f.obj for f in failures] == [_LOCK]
    assert [f.name for f in failures] == ["_LOCK"]
    assert "_LOCK" in out.getvalue() and "FAIL" in out.getvalue()
    ok, failures = util.inspect_serializability(_HoldsALock(), print_file=io.StringIO())
    assert not ok and [f.name for f in failures] == ["guard"]
    ok, failures = util.inspect_serializability({"fine": [1, 2, 3]}, print_file=io.StringIO())
    assert ok and failures == set()
