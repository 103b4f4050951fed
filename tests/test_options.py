"""Options that must not be silently ignored (issue 14, item 4), as Ray 2.60 documents them:
concurrency groups, max_calls, accelerator_type, node labels and label_selector; and the
options still unsupported raise, naming themselves.

Real clusters: one node (with a fake GPU and custom labels), then two (the second on
127.0.0.2, with an ``accelerator_type:A100`` resource and labels), and a third that joins
while a task waits for its labels.
"""
from __future__ import annotations

import asyncio
import collections
import os
import threading
import time

import psutil
import pytest

import runtime as ray
from runtime.labels import check_node_labels, check_selector, compile_selector, matches
from runtime.node import Node, NodeConfig
from runtime.session import new_session_dir
from runtime.util.accelerators import NVIDIA_A100
from runtime.util.placement_group import placement_group, remove_placement_group

from conftest import assert_all_gone, wait_for
from helpers.nodes import cluster_with_nodes

GATE_S = 30.0  # how long a call waits for the others it must run beside


# -- label syntax (runtime/labels.py), no cluster ---------------------------------------------
def test_label_selectors_match_as_ray_documents():
    labels = {"zone": "a", "disk": "ssd"}
    assert matches({"zone": "a"}, labels)
    assert not matches({"zone": "b"}, labels)
    assert matches({"zone": "!b"}, labels) and not matches({"zone": "!a"}, labels)
    assert matches({"zone": "in(b, a)"}, labels) and not matches({"zone": "in(b,c)"}, labels)
    assert matches({"zone": "!in(b, c)"}, labels) and not matches({"zone": "!in(a)"}, labels)
    assert matches({"gpu": "!t4", "region": "!in(x)"}, labels)  # absent label: "!" matches
    assert not matches({"gpu": "t4"}, labels) and not matches({"gpu": "in(t4)"}, labels)
    assert matches({}, labels) and compile_selector({}) is None
    assert matches({"zone": "a", "disk": "ssd"}, labels)
    assert not matches({"zone": "a", "disk": "hdd"}, labels)


@pytest.mark.parametrize("selector, words", [
    ({"zone": "in()"}, "not a label selector expression"),
    ({"zone": "in(a,"}, "not a label selector expression"),
    ({"zone": "!!a"}, "not a label selector expression"),
    ({"zone": "-a"}, "not a label selector expression"),
    ({"bad key!": "a"}, "label key name"),
    ({"zone": 1}, "must be a string"),
])
def test_a_bad_label_selector_is_refused_naming_the_entry(selector, words):
    with pytest.raises((ValueError, TypeError), match=words):
        check_selector(selector)
    with pytest.raises((ValueError, TypeError), match=words):
        ray.remote(label_selector=selector)(lambda: None)


def test_node_labels_keep_ray_io_for_ray():
    assert check_node_labels({"zone": "a", "team/x": "ml"}) == {"zone": "a", "team/x": "ml"}
    with pytest.raises(ValueError, match="reserved"):
        check_node_labels({"ray.io/node-id": "x"})
    with pytest.raises(ValueError, match="value 'a b'"):
        check_node_labels({"zone": "a b"})
    with pytest.raises(TypeError, match="string"):
        check_node_labels({"zone": 3})


# -- options refused at declaration, no cluster ------------------------------------------------
def test_unsupported_or_misplaced_options_raise_naming_the_option():
    def f():
        return 1

    with pytest.raises(ValueError, match="enable_task_events=False"):
        ray.remote(enable_task_events=False)(f)
    with pytest.raises(ValueError, match="object_store_memory"):
        ray.remote(object_store_memory=10)(f)
    with pytest.raises(ValueError, match="max_calls"):
        ray.remote(max_calls=-1)(f)
    with pytest.raises(ValueError, match="'max_calls' is not supported in '.options\\(\\)'"):
        ray.remote(f).options(max_calls=2)
    with pytest.raises(ValueError, match="accelerator_type"):
        ray.remote(accelerator_type="")(f)
    with pytest.raises(ValueError, match="placement_group_bundle_index"):
        ray.remote(placement_group_bundle_index=0)(f)
    with pytest.raises(TypeError, match="placement_group"):
        ray.remote(placement_group="mine")(f)
    with pytest.raises(ValueError, match="Invalid option keyword foo for actor methods"):
        ray.method(foo=1)
    with pytest.raises(ValueError, match="concurrency_group"):
        ray.method(concurrency_group="")

    class A:
        @ray.method(concurrency_group="io")
        def f(self):
            return 1

    with pytest.raises(ValueError, match="concurrency group 'io', which the actor does not"):
        ray.remote(A)
    with pytest.raises(ValueError, match="max concurrency of group 'io'"):
        ray.remote(concurrency_groups={"io": 0})(A)
    with pytest.raises(TypeError, match="concurrency_groups must be a dict"):
        ray.remote(concurrency_groups=["io"])(A)
    actor_class = ray.remote(concurrency_groups={"io": 1})(A)
    with pytest.raises(ValueError, match="'concurrency_groups' is not supported in"):
        actor_class.options(concurrency_groups={"io": 2})
    with pytest.raises(ValueError, match="enable_task_events=False"):
        actor_class.options(enable_task_events=False)


# -- one node: concurrency groups, max_calls, init(labels=...) -------------------------------------
@ray.remote(max_concurrency=4)
class GateWaiter:
    def wait(self, gate: str) -> str:
        from helpers.gates import await_path
        await_path(gate)
        return "open"


@ray.remote(concurrency_groups={"io": 2, "compute": 3})
class Threaded:
    """A sync actor with groups: each group runs on a pool of its own."""

    def __init__(self):
        self.cond = threading.Condition()
        self.now = collections.Counter()
        self.peak = collections.Counter()

    def _gate(self, group: str, want: int, others: tuple = ()):
        """Run as one of `group`'s calls until `want` of them (and one call of each group
        in `others`) run at once, or GATE_S passes; whether they did, and the thread."""
        with self.cond:
            self.now[group] += 1
            self.peak[group] = max(self.peak[group], self.now[group])
            self.cond.notify_all()
            ok = self.cond.wait_for(lambda: self.now[group] >= want and all(
                self.now[g] >= 1 for g in others), GATE_S)
        time.sleep(0.2)  # stay in, so the others see this call too
        with self.cond:
            self.now[group] -= 1
            self.cond.notify_all()
        return ok, threading.current_thread().name

    @ray.method(concurrency_group="io")
    def io(self, want, others=()):
        return self._gate("io", want, others)

    @ray.method(concurrency_group="compute")
    def compute(self, want, others=()):
        return self._gate("compute", want, others)

    def default(self, want, others=()):
        return self._gate("default", want, others)

    def peaks(self):
        return dict(self.peak)


@ray.remote(concurrency_groups={"io": 2, "compute": 3}, max_concurrency=2)
class AsyncGroups:
    """An async actor with groups: each group runs on an event loop of its own."""

    def __init__(self):
        self.lock = threading.Lock()  # the groups' loops run on different threads
        self.now = collections.Counter()
        self.peak = collections.Counter()

    async def _gate(self, group: str, want: int, others: tuple = ()):
        with self.lock:
            self.now[group] += 1
            self.peak[group] = max(self.peak[group], self.now[group])
        deadline = time.monotonic() + GATE_S
        while not (self.now[group] >= want and all(self.now[g] >= 1 for g in others)):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        ok = self.now[group] >= want and all(self.now[g] >= 1 for g in others)
        await asyncio.sleep(0.2)
        with self.lock:
            self.now[group] -= 1
        return ok, threading.current_thread().name

    @ray.method(concurrency_group="io")
    async def io(self, want, others=()):
        return await self._gate("io", want, others)

    @ray.method(concurrency_group="compute")
    async def compute(self, want, others=()):
        return await self._gate("compute", want, others)

    async def default(self, want, others=()):
        return await self._gate("default", want, others)

    async def peaks(self):
        return dict(self.peak)


@ray.remote
class Plain:
    def hello(self):
        return "hi"


@ray.remote(max_calls=2, max_retries=0)
def worker_pid():
    return os.getpid()


@ray.remote(num_gpus=1, max_retries=0)
def gpu_worker_pid():
    return os.getpid()


@ray.remote
def node_id():
    return ray.get_runtime_context().get_node_id()


@ray.remote
def placement_group_id():
    return ray.get_runtime_context().get_placement_group_id()


class TestOneNode:
    @pytest.fixture(scope="class")
    def one_node(self, tmp_path_factory):
        if ray.is_initialized():
            ray.shutdown()
        ctx = ray.init(num_cpus=2, num_gpus=1, labels={"zone": "a", "team/x": "ml"},
                       _temp_dir=str(tmp_path_factory.mktemp("one")))
        pids = [p.pid for p in psutil.Process().children(recursive=True)]
        yield ctx
        pids += [p.pid for p in psutil.Process().children(recursive=True)]
        ray.shutdown()
        assert_all_gone(pids)

    @pytest.mark.parametrize("actor_class", [Threaded, AsyncGroups], ids=["threaded", "async"])
    def test_each_concurrency_group_runs_its_calls_up_to_its_own_limit(self, one_node,
                                                                       actor_class):
        a = actor_class.remote()
        default_limit = 1 if actor_class is Threaded else 2
        refs = ([a.io.remote(2) for _ in range(4)] + [a.compute.remote(3) for _ in range(6)]
                + [a.default.remote(default_limit) for _ in range(2 * default_limit)])
        got = ray.get(refs, timeout=120)
        assert all(ok for ok, _thread in got), got
        assert ray.get(a.peaks.remote(), timeout=30) == {"io": 2, "compute": 3,
                                                         "default": default_limit}
        ray.kill(a)

    @pytest.mark.parametrize("actor_class", [Threaded, AsyncGroups], ids=["threaded", "async"])
    def test_calls_in_different_groups_run_at_the_same_time(self, one_node, actor_class):
        a = actor_class.remote()
        # Each call waits until a call of every other group runs: only if the three groups
        # run at once do all three come back True.
        got = ray.get([a.io.remote(1, ("compute", "default")),
                       a.compute.remote(1, ("io", "default")),
                       a.default.remote(1, ("io", "compute"))], timeout=120)
        assert [ok for ok, _thread in got] == [True, True, True], got
        threads = [thread for _ok, thread in got]
        assert len(set(threads)) == 3, threads
        ray.kill(a)

    @pytest.mark.parametrize("actor_class", [Threaded, AsyncGroups], ids=["threaded", "async"])
    def test_a_call_runs_in_the_group_its_options_name(self, one_node, actor_class):
        a = actor_class.remote()
        (_ok, plain), (_ok2, moved) = ray.get(
            [a.default.remote(1), a.default.options(concurrency_group="io").remote(1)],
            timeout=120)
        (_ok3, io_thread), = ray.get([a.io.remote(1)], timeout=60)
        assert "-io" not in plain and "-io" in moved and "-io" in io_thread, (plain, moved)
        with pytest.raises(ray.exceptions.RayTaskError, match="no concurrency group 'disk'"):
            ray.get(a.default.options(concurrency_group="disk").remote(1), timeout=60)
        ray.kill(a)

    def test_a_group_an_actor_lacks_fails_the_call_naming_it(self, one_node):
        a = Plain.remote()
        assert ray.get(a.hello.remote(), timeout=60) == "hi"
        with pytest.raises(ray.exceptions.RayTaskError, match="no concurrency group"):
            ray.get(a.hello.options(concurrency_group="io").remote(), timeout=60)
        ray.kill(a)

    def test_a_worker_exits_after_max_calls_and_no_call_counts_as_a_crash(self, one_node):
        pids = [ray.get(worker_pid.remote(), timeout=60) for _ in range(6)]
        assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5], pids
        assert len(set(pids)) == 3, pids
        wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status()
                                 != psutil.STATUS_ZOMBIE for p in pids[:4]),
                 30, message="the workers that reached max_calls to exit")
        log = os.path.join(one_node.address_info["session_dir"], "logs", "raylet.log")
        with open(log) as fh:
            died = [line for line in fh if "died" in line
                    and any(f"pid {p} " in line for p in pids)]
        assert not died, died

    def test_a_gpu_task_gets_a_fresh_worker_each_time_by_default(self, one_node):
        first = ray.get(gpu_worker_pid.remote(), timeout=60)
        second = ray.get(gpu_worker_pid.remote(), timeout=60)
        assert first != second

    def test_init_labels_are_the_nodes_and_tasks_select_them(self, one_node):
        (node,) = [n for n in ray.nodes() if n["Alive"]]
        assert node["Labels"] == {"zone": "a", "team/x": "ml", "ray.io/node-id": node["NodeID"]}
        here = node["NodeID"]
        assert ray.get(node_id.options(label_selector={"zone": "a"}).remote(), timeout=60) == here
        assert ray.get(node_id.options(label_selector={"zone": "in(a, b)",
                                                       "team/x": "!ops"}).remote(),
                       timeout=60) == here
        waiting = node_id.options(label_selector={"zone": "b"}).remote()
        ready, _ = ray.wait([waiting], timeout=3)
        assert ready == [], "a task ran on a node whose labels do not match its selector"
        ray.cancel(waiting)

    def test_the_deprecated_placement_group_option_is_honoured(self, one_node):
        pg = placement_group([{"CPU": 1}])
        ray.get(pg.ready(), timeout=60)
        try:
            got = ray.get(placement_group_id.options(placement_group=pg).remote(), timeout=60)
            assert got == pg.id.hex()
            with pytest.raises(ValueError, match="scheduling_strategy option"):
                placement_group_id.options(placement_group=pg, scheduling_strategy="SPREAD")
        finally:
            remove_placement_group(pg)

    def test_max_pending_calls_refuses_at_the_limit(self, one_node, tmp_path):
        gate = str(tmp_path / "open")
        waiter = GateWaiter.options(max_pending_calls=2).remote()
        first, second = waiter.wait.remote(gate), waiter.wait.remote(gate)
        with pytest.raises(ray.exceptions.PendingCallsLimitExceeded, match="max_pending_calls"):
            waiter.wait.remote(gate)
        open(gate, "w").close()
        assert ray.get([first, second], timeout=60) == ["open", "open"]
        assert ray.get(waiter.wait.remote(gate), timeout=60) == "open"  # room again
        with pytest.raises(ValueError, match="max_pending_calls must be -1"):
            GateWaiter.options(max_pending_calls=0)


def test_init_refuses_bad_labels_before_starting_anything(fresh_runtime, tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError, match="reserved"):
        ray.init(labels={"ray.io/node-id": "mine"}, _temp_dir=str(tmp_path))
    assert not ray.is_initialized()
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    assert not os.listdir(tmp_path), "a session was created for a refused init()"


# -- two nodes: accelerator_type and label_selector place work on the second -----------------------
@ray.remote
class WhereAmI:
    def node(self):
        return ray.get_runtime_context().get_node_id()


class TestTwoNodes:
    @pytest.fixture(scope="class")
    def two_nodes(self, tmp_path_factory):
        root = str(tmp_path_factory.mktemp("two"))
        extra = [{"ip": "127.0.0.2", "resources": {"accelerator_type:A100": 1},
                  "labels": {"zone": "b"}}]
        with cluster_with_nodes(root, head_cpus=1, extra=extra) as (ctx, (second,)):
            yield root, ctx, ctx.address_info["node_id"], second.node_id.hex()

    def test_nodes_show_their_labels(self, two_nodes):
        _root, _ctx, head, second = two_nodes
        labels = {n["NodeID"]: n["Labels"] for n in ray.nodes() if n["Alive"]}
        # The second node's accelerator type, given by hand as a resource, is a label too.
        assert labels == {head: {"ray.io/node-id": head},
                          second: {"ray.io/node-id": second, "zone": "b",
                                   "ray.io/accelerator-type": "A100"}}

    def test_accelerator_type_runs_where_the_accelerator_is(self, two_nodes):
        _root, _ctx, head, second = two_nodes
        f = node_id.options(accelerator_type=NVIDIA_A100)
        assert {ray.get(f.remote(), timeout=60) for _ in range(3)} == {second}
        a = WhereAmI.options(accelerator_type="A100").remote()
        assert ray.get(a.node.remote(), timeout=60) == second
        ray.kill(a)
        waiting = node_id.options(accelerator_type="H100").remote()
        ready, _ = ray.wait([waiting], timeout=3)
        assert ready == [], "a task for an H100 ran on a node without one"
        ray.cancel(waiting)

    def test_label_selector_places_tasks_and_actors_on_the_matching_node(self, two_nodes):
        _root, _ctx, head, second = two_nodes
        for selector, where in [({"zone": "b"}, second), ({"zone": "!b"}, head),
                                ({"zone": "in(a, b)"}, second),
                                ({"ray.io/node-id": head}, head),
                                ({"ray.io/node-id": f"!in({head})"}, second)]:
            got = {ray.get(node_id.options(label_selector=selector).remote(), timeout=60)
                   for _ in range(2)}
            assert got == {where}, selector
        a = WhereAmI.options(label_selector={"zone": "b"}).remote()
        b = WhereAmI.options(label_selector={"zone": "!b"}).remote()
        assert ray.get([a.node.remote(), b.node.remote()], timeout=60) == [second, head]
        ray.kill(a)
        ray.kill(b)

    def test_work_no_node_matches_waits_until_a_matching_node_joins(self, two_nodes):
        root, ctx, _head, _second = two_nodes
        task = node_id.options(label_selector={"zone": "c"}).remote()
        actor = WhereAmI.options(label_selector={"zone": "c"}).remote()
        call = actor.node.remote()
        ready, _ = ray.wait([task, call], num_returns=2, timeout=3)
        assert ready == [], "work ran on a node whose labels do not match its selector"
        with open(os.path.join(ctx.address_info["session_dir"], "token")) as fh:
            token = fh.read()
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        third = Node(NodeConfig(head=False, node_ip="127.0.0.3",
                                gcs_address=ctx.address_info["gcs_address"], num_cpus=1,
                                labels={"zone": "c"}, session_dir=new_session_dir(root),
                                token=token, object_store_memory=128 * 1024 * 1024))
        try:
            third.start()
            assert ray.get(task, timeout=60) == third.node_id.hex()
            assert ray.get(call, timeout=60) == third.node_id.hex()
        finally:
            ray.kill(actor)
            mine = [p.pid for p in psutil.Process().children(recursive=True)
                    if p.pid not in before]
            third.stop()
            assert_all_gone(mine)
