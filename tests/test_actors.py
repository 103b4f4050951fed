"""Actors: ``@remote`` classes, handles, ordering, options, resources, names,
lifetimes, concurrency and failures — checked against Ray's documented behaviour.

Every test shares the module's private 2-CPU ``cluster``; actors a test creates are
killed when it ends (the ``actors`` fixture), so resource checks in later tests see
a quiet cluster. The owner-exit test runs a driver subprocess
(tests/scripts/actor_owner.py) that attaches to this cluster by address; it and
every actor process it reports are killed by PID at the end, whatever happened.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

import runtime as ray
from runtime.exceptions import ActorDiedError, RayActorError
from runtime.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from runtime.util.state import get_actor as state_get_actor

from helpers.env import scrubbed_env
from helpers.gates import await_path
from conftest import wait_for

REPO = str(Path(__file__).resolve().parent.parent)
OWNER_SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "actor_owner.py")


# -- actor classes and tasks used below ---------------------------------------------------------
@ray.remote
class Counter:
    def __init__(self, start=0):
        self.n = start

    def incr(self, by=1):
        self.n += by
        return self.n

    def get(self):
        return self.n

    def pid(self):
        return os.getpid()

    def pair(self):
        return self.n, self.n + 1

    @ray.method(num_returns=2)
    def two(self):
        return "a", "b"

    def actor_id(self):
        return ray.get_runtime_context().get_actor_id()

    def node_id(self):
        return ray.get_runtime_context().get_node_id()

    def exit(self):
        ray.actor.exit_actor()
        return "unreachable"  # pragma: no cover

    def gate(self, started, gate, timeout=60.0):
        """Mark that the call started, then block until the gate file exists."""
        Path(started).touch()
        await_path(gate, timeout)
        return os.getpid()


@ray.remote
class Caller:
    """Holds another actor's handle (passed to its constructor or to a method)."""

    def __init__(self, target=None):
        self.target = target

    def bump_held(self, n):
        return ray.get([self.target.incr.remote() for _ in range(n)])

    def bump(self, target, n):
        return ray.get([target.incr.remote() for _ in range(n)])


@ray.remote
def bump_from_task(handle, n):
    return ray.get([handle.incr.remote() for _ in range(n)])


@ray.remote
def short_task(x):
    return x * 2


@ray.remote
class Sleeper:
    async def nap(self, i):
        await asyncio.sleep(1)
        return i


@ray.remote
class Meeting:
    def __init__(self, parties, timeout=10.0):
        self.barrier = threading.Barrier(parties, timeout=timeout)

    def meet(self):
        return self.barrier.wait()


@ray.remote
class BadInit:
    def __init__(self):
        raise ValueError("constructor refuses")

    def ping(self):
        return "pong"


# -- helpers ------------------------------------------------------------------------------------
def cpu_available() -> float:
    return ray.available_resources().get("CPU", 0.0)


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_pid(pid) -> None:
    try:
        psutil.Process(pid).kill()
    except (psutil.Error, TypeError, ValueError):
        pass


def actor_state(handle) -> dict:
    rec = state_get_actor(handle._actor_id.hex())
    assert rec is not None, f"the GCS does not know actor {handle}"
    return rec


def expect_error(ref, cls, timeout=30):
    with pytest.raises(cls) as info:
        ray.get(ref, timeout=timeout)
    return info.value


# -- basics -------------------------------------------------------------------------------------
def test_handle_state_and_refs(actors):
    c = Counter.remote(10)
    actors.append(c)
    assert isinstance(c, ray.ActorHandle)
    ref = c.incr.remote()
    assert isinstance(ref, ray.ObjectRef)
    assert ray.get(ref, timeout=30) == 11
    assert ray.get(c.incr.remote(5), timeout=30) == 16
    assert ray.get(c.get.remote(), timeout=30) == 16
    with pytest.raises(TypeError):
        c.incr()  # methods are called with .remote()
    with pytest.raises(TypeError):
        Counter()  # classes are instantiated with .remote()
    with pytest.raises(AttributeError):
        _ = c.no_such_method


def test_calls_run_in_submission_order(actors):
    c = Counter.remote()
    actors.append(c)
    refs = [c.incr.remote() for _ in range(500)]
    assert ray.get(refs, timeout=60) == list(range(1, 501))


def test_interleaved_calls_to_four_actors_keep_order(actors):
    hs = [Counter.remote() for _ in range(4)]
    actors.extend(hs)
    refs = {i: [] for i in range(4)}
    for _ in range(100):
        for i, h in enumerate(hs):
            refs[i].append(h.incr.remote())
    for i in range(4):
        assert ray.get(refs[i], timeout=60) == list(range(1, 101))


def test_multiple_returns(actors):
    c = Counter.remote(3)
    actors.append(c)
    a, b = c.pair.options(num_returns=2).remote()
    assert isinstance(a, ray.ObjectRef) and isinstance(b, ray.ObjectRef)
    assert ray.get([a, b], timeout=30) == [3, 4]
    x, y = c.two.remote()
    assert ray.get(x, timeout=30) == "a"
    assert ray.get(y, timeout=30) == "b"
    # without num_returns the tuple comes back as one value
    assert ray.get(c.pair.remote(), timeout=30) == (3, 4)


def test_actor_options_accepted(actors):
    h = Counter.options(
        num_cpus=0, num_gpus=0, resources={}, name=f"opts-{uuid.uuid4().hex[:8]}",
        namespace="opts-ns", lifetime="non_detached", get_if_exists=False, max_restarts=1,
        max_task_retries=1, max_concurrency=2, scheduling_strategy="DEFAULT").remote(7)
    actors.append(h)
    assert ray.get(h.incr.remote(), timeout=30) == 8


def test_unknown_options_raise_value_error(actors):
    with pytest.raises(ValueError):
        Counter.options(no_such_option=1)
    with pytest.raises(ValueError):
        ray.remote(no_such_option=1)(type("Tmp", (), {"f": lambda self: 1}))
    with pytest.raises(ValueError):
        Counter.options(max_restarts=-2)
    with pytest.raises(ValueError):
        Counter.options(lifetime="forever")
    with pytest.raises(ValueError):
        Counter.options(get_if_exists=True)  # needs a name
    c = Counter.remote()
    actors.append(c)
    with pytest.raises(ValueError):
        c.incr.options(no_such_option=1)
    assert ray.get(c.incr.options(name="named_call").remote(), timeout=30) == 1


# -- resources ----------------------------------------------------------------------------------
def test_default_actor_holds_no_cpu(actors):
    hs = [Counter.remote(i) for i in range(4)]  # 4 actors on a 2-CPU node
    actors.extend(hs)
    assert ray.get([h.incr.remote() for h in hs], timeout=60) == [1, 2, 3, 4]
    # tasks still run while all four actors live, and the CPUs come back afterwards
    assert ray.get([short_task.remote(i) for i in range(6)], timeout=60) == [0, 2, 4, 6, 8, 10]
    wait_for(lambda: cpu_available() == 2.0, 15, message="both CPUs available with 4 actors alive")
    assert ray.get([h.get.remote() for h in hs], timeout=30) == [1, 2, 3, 4]


def test_actor_with_num_cpus_holds_it(actors):
    wait_for(lambda: cpu_available() == 2.0, 15, message="an idle cluster")
    h = Counter.options(num_cpus=1).remote()
    actors.append(h)
    assert ray.get(h.incr.remote(), timeout=30) == 1
    wait_for(lambda: cpu_available() == 1.0, 15, message="the actor's CPU to be held")
    ray.kill(h)
    wait_for(lambda: cpu_available() == 2.0, 15, message="the CPU to come back after kill")


def test_each_actor_has_its_own_process(actors):
    hs = [Counter.remote() for _ in range(3)]
    actors.extend(hs)
    pids = ray.get([h.pid.remote() for h in hs], timeout=60)
    assert len(set(pids)) == 3
    assert os.getpid() not in pids
    # the same actor always answers from the same process
    assert ray.get(hs[0].pid.remote(), timeout=30) == pids[0]


# -- handles ------------------------------------------------------------------------------------
def test_handle_passed_to_task_and_actor(actors):
    c = Counter.remote()
    actors.append(c)
    assert ray.get(bump_from_task.remote(c, 5), timeout=60) == [1, 2, 3, 4, 5]
    assert ray.get(c.get.remote(), timeout=30) == 5
    holder = Caller.remote(c)  # handle in the constructor's arguments
    other = Caller.remote()
    actors.extend([holder, other])
    assert ray.get(holder.bump_held.remote(3), timeout=60) == [6, 7, 8]
    assert ray.get(other.bump.remote(c, 2), timeout=60) == [9, 10]  # handle as a method argument
    assert ray.get(c.get.remote(), timeout=30) == 10
    # a handle round-tripped through put/get is usable too
    again = ray.get(ray.put(c), timeout=30)
    assert again == c
    assert ray.get(again.incr.remote(), timeout=30) == 11


def test_handle_out_of_scope_kills_actor(cluster):
    c = Counter.remote()
    pid = ray.get(c.pid.remote(), timeout=30)
    assert psutil.pid_exists(pid)
    del c
    gc.collect()
    wait_for(lambda: pid_gone(pid), 15, message=f"actor process {pid} to exit after its "
                                                f"last handle was dropped")


# -- concurrency --------------------------------------------------------------------------------
def test_async_actor_runs_calls_concurrently(actors):
    s = Sleeper.remote()
    actors.append(s)
    assert ray.get(s.nap.remote(-1), timeout=30) == -1  # the actor is up
    t0 = time.monotonic()
    assert ray.get([s.nap.remote(i) for i in range(10)], timeout=30) == list(range(10))
    elapsed = time.monotonic() - t0
    assert elapsed < 5, f"10 one-second async calls took {elapsed:.1f}s: not concurrent"


def test_threaded_actor_max_concurrency(actors):
    m = Meeting.options(max_concurrency=4).remote(4)
    actors.append(m)
    indices = ray.get([m.meet.remote() for _ in range(4)], timeout=30)
    assert sorted(indices) == [0, 1, 2, 3]


def test_default_actor_runs_one_call_at_a_time(actors):
    m = Meeting.remote(2, 1.0)  # max_concurrency=1: two calls can never meet at the barrier
    actors.append(m)
    refs = [m.meet.remote() for _ in range(2)]
    with pytest.raises(threading.BrokenBarrierError):
        ray.get(refs[0], timeout=30)


# -- exit and names -----------------------------------------------------------------------------
def test_exit_actor(actors):
    c = Counter.options(max_restarts=2).remote()
    actors.append(c)
    pid = ray.get(c.pid.remote(), timeout=30)
    err = expect_error(c.exit.remote(), RayActorError)
    assert isinstance(err, ActorDiedError), f"{type(err).__mro__}: {err}"
    expect_error(c.get.remote(), ActorDiedError)
    wait_for(lambda: pid_gone(pid), 15, message="the exited actor's process to end")
    rec = wait_for(lambda: (lambda r: r if r["state"] == "DEAD" else None)(actor_state(c)), 10,
                   message="the actor to be DEAD")
    assert rec["num_restarts"] == 0, "exit_actor() must not restart the actor"
    expect_error(c.get.remote(), ActorDiedError)


def test_exit_actor_outside_actor_raises(cluster):
    with pytest.raises(TypeError, match="outside an actor"):
        ray.actor.exit_actor()


def test_named_actor_lookup_and_namespaces(actors):
    name = f"named-{uuid.uuid4().hex[:8]}"
    c = Counter.options(name=name).remote()
    actors.append(c)
    assert ray.get(c.incr.remote(), timeout=30) == 1
    found = ray.get_actor(name)
    assert ray.get(found.incr.remote(), timeout=30) == 2
    assert found._actor_id == c._actor_id
    with pytest.raises(ValueError):
        ray.get_actor(name, namespace="other")
    with pytest.raises(ValueError):
        ray.get_actor(f"missing-{uuid.uuid4().hex[:8]}")

    # the same name in another namespace is a different actor
    elsewhere = Counter.options(name=name, namespace="other-ns").remote(100)
    actors.append(elsewhere)
    assert ray.get(ray.get_actor(name, namespace="other-ns").get.remote(), timeout=30) == 100
    assert ray.get(ray.get_actor(name).get.remote(), timeout=30) == 2


@ray.remote
class Shaped:
    @ray.method(num_returns=2)
    def pair(self):
        return "a", "b"


GET_SHAPED = """
import json, sys, runtime as ray
ray.init(address=sys.argv[1], namespace=sys.argv[2])
h = ray.get_actor(sys.argv[3])
refs = h.pair.remote()
print(json.dumps(ray.get(list(refs), timeout=30)))
"""


def test_get_actor_handles_keep_method_options(actors, cluster):
    """A handle from get_actor, here or in another driver that never saw the class, keeps
    @method(num_returns=2): the call returns two refs, as Ray's does."""
    name = f"shaped-{uuid.uuid4().hex[:8]}"
    actors.append(Shaped.options(name=name).remote())
    first, second = ray.get_actor(name).pair.remote()
    assert ray.get([first, second], timeout=30) == ["a", "b"]
    ns = ray.get_runtime_context().namespace
    with open(os.path.join(cluster.address_info["session_dir"], "token")) as fh:
        token = fh.read().strip()
    proc = subprocess.run([sys.executable, "-c", GET_SHAPED, cluster.address_info["gcs_address"],
                           ns, name], capture_output=True, text=True, timeout=120,
                          env=scrubbed_env(NODE_AGENT_TOKEN=token), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["a", "b"]


def test_duplicate_name_get_if_exists_and_reuse(actors):
    name = f"dup-{uuid.uuid4().hex[:8]}"
    first = Counter.options(name=name).remote()
    actors.append(first)
    assert ray.get(first.incr.remote(), timeout=30) == 1
    with pytest.raises(ValueError) as info:
        Counter.options(name=name).remote()
    msg = str(info.value)
    assert name in msg and first._actor_id.hex() in msg, msg

    same = Counter.options(name=name, get_if_exists=True).remote()
    assert same._actor_id == first._actor_id
    assert ray.get(same.incr.remote(), timeout=30) == 2  # same state
    assert ray.get(first.get.remote(), timeout=30) == 2

    old_pid = ray.get(first.pid.remote(), timeout=30)
    ray.kill(first)
    expect_error(first.get.remote(), ActorDiedError)
    reused = Counter.options(name=name).remote(50)
    actors.append(reused)
    assert ray.get(reused.get.remote(), timeout=30) == 50
    assert ray.get(ray.get_actor(name).get.remote(), timeout=30) == 50
    assert ray.get(reused.pid.remote(), timeout=30) != old_pid


# -- lifetimes ----------------------------------------------------------------------------------
def test_owner_exit_kills_non_detached_but_not_detached(cluster, tmp_path):
    addr = cluster.address_info["gcs_address"]
    with open(os.path.join(cluster.address_info["session_dir"], "token")) as fh:
        token = fh.read().strip()
    owned_name, detached_name = (f"owned-{uuid.uuid4().hex[:8]}",
                                 f"detached-{uuid.uuid4().hex[:8]}")
    out, log = str(tmp_path / "owner.json"), str(tmp_path / "owner.log")
    env = scrubbed_env(NODE_AGENT_TOKEN=token, RUNTIME_SESSION_ROOT=str(tmp_path / "root"))
    pids = []
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, OWNER_SCRIPT, out, addr, owned_name,
                                 detached_name], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
    pids.append(proc.pid)
    detached = None
    try:
        try:
            rc = proc.wait(90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"owner driver did not exit:\n{Path(log).read_text()[-4000:]}")
        text = Path(log).read_text()
        assert os.path.exists(out), f"owner driver exited {rc} without a report:\n{text[-4000:]}"
        report = json.loads(Path(out).read_text())
        pids += [report.get("owned", {}).get("pid"), report.get("detached", {}).get("pid")]
        assert "error_type" not in report, f"{report['error_type']}: {report['error']}\n" \
                                           f"{report.get('traceback')}"
        assert rc == 0 and "ready" in text, text[-4000:]

        # the detached actor outlives its creator and still has its state
        detached = ray.get_actor(detached_name, namespace="lifetimes")
        got = ray.get(detached.ping.remote(), timeout=30)
        assert got["pid"] == report["detached"]["pid"]
        assert got["calls"] == 2
        assert got["actor_id"] == report["detached"]["actor_id"]

        # the non-detached one dies with its owner
        def owned_gone():
            try:
                ray.get_actor(owned_name, namespace="lifetimes")
                return False
            except ValueError:
                return True
        wait_for(owned_gone, 15, message="the owned actor's name to disappear")
        wait_for(lambda: pid_gone(report["owned"]["pid"]), 15,
                 message="the owned actor's process to exit")

        # the detached one dies on kill() (test_kill_then_calls_raise covers calls made
        # immediately after kill(); here only that it dies)
        ray.kill(detached)
        wait_for(lambda: pid_gone(report["detached"]["pid"]), 15,
                 message="the detached actor's process to exit after kill()")
        err = expect_error(detached.ping.remote(), ActorDiedError)
        assert "kill" in str(err).lower(), str(err)
        with pytest.raises(ValueError):
            ray.get_actor(detached_name, namespace="lifetimes")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if detached is not None:
            try:
                ray.kill(detached)
            except Exception:
                pass
        for pid in pids:
            if pid and pid != os.getpid():
                kill_pid(pid)


# -- failures -----------------------------------------------------------------------------------
def test_kill_then_calls_raise(actors):
    """Ray: ray.kill() makes "any current, pending, and future tasks fail with a
    RayActorError". A call made right after kill() returns must fail, never run: checked
    on several actors because a race between the kill and the call shows only sometimes."""
    c = Counter.remote()
    actors.append(c)
    pid = ray.get(c.pid.remote(), timeout=30)
    ray.kill(c)
    err = expect_error(c.get.remote(), ActorDiedError)
    assert "kill" in str(err).lower(), str(err)
    err2 = expect_error(c.incr.remote(), ActorDiedError)
    assert "kill" in str(err2).lower(), str(err2)
    wait_for(lambda: pid_gone(pid), 15, message="the killed actor's process to exit")
    with pytest.raises(ValueError):
        ray.kill("not an actor")

    ran = []
    for i in range(15):
        h = Counter.remote()
        actors.append(h)
        assert ray.get(h.incr.remote(), timeout=30) == 1
        ray.kill(h)
        ref = h.incr.remote()
        try:
            value = ray.get(ref, timeout=30)
            ran.append((i, value))
        except ActorDiedError:
            pass
    assert not ran, f"calls made after kill() returned ran on the killed actor: {ran}"


def test_constructor_exception(actors):
    b = BadInit.remote()
    actors.append(b)
    for _ in range(3):
        err = expect_error(b.ping.remote(), ActorDiedError)
        assert isinstance(err.cause, ValueError), f"cause is {err.cause!r}"
        assert "constructor refuses" in str(err.cause)


def test_sigkill_restarts_then_exhausts(actors):
    c = Counter.options(max_restarts=1).remote()
    actors.append(c)
    assert ray.get([c.incr.remote() for _ in range(3)], timeout=30) == [1, 2, 3]
    pid1 = ray.get(c.pid.remote(), timeout=30)
    os.kill(pid1, signal.SIGKILL)
    wait_for(lambda: pid_gone(pid1), 10, message="the actor process to die")
    rec = wait_for(lambda: (lambda r: r if r["state"] == "ALIVE" and r["num_restarts"] == 1
                            else None)(actor_state(c)), 30, message="the actor to restart")
    assert rec["pid"] != pid1
    assert ray.get(c.incr.remote(), timeout=30) == 1  # constructor re-ran: state reset
    pid2 = ray.get(c.pid.remote(), timeout=30)
    assert pid2 != pid1 and pid2 == rec["pid"]

    os.kill(pid2, signal.SIGKILL)
    wait_for(lambda: pid_gone(pid2), 10, message="the restarted actor process to die")
    wait_for(lambda: actor_state(c)["state"] == "DEAD", 30,
             message="the actor to be DEAD once restarts are exhausted")
    expect_error(c.get.remote(), ActorDiedError)


def _gate_call_then_sigkill(c, tmp_path):
    """Start a gate() call on c, SIGKILL the actor while it runs; return (ref, old pid, gate)."""
    pid1 = ray.get(c.pid.remote(), timeout=30)
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    ref = c.gate.remote(started, gate)
    wait_for(lambda: os.path.exists(started), 30, message="the gate call to start")
    os.kill(pid1, signal.SIGKILL)
    wait_for(lambda: pid_gone(pid1), 10, message="the actor process to die")
    return ref, pid1, gate


def test_in_flight_call_retried_with_max_task_retries(actors, tmp_path):
    c = Counter.options(max_restarts=1, max_task_retries=1).remote()
    actors.append(c)
    ref, pid1, gate = _gate_call_then_sigkill(c, tmp_path)
    Path(gate).touch()
    pid2 = ray.get(ref, timeout=60)  # retried on the restarted actor
    assert pid2 != pid1
    assert ray.get(c.pid.remote(), timeout=30) == pid2


def test_in_flight_call_fails_without_task_retries(actors, tmp_path):
    c = Counter.options(max_restarts=1, max_task_retries=0).remote()
    actors.append(c)
    ref, pid1, gate = _gate_call_then_sigkill(c, tmp_path)
    Path(gate).touch()
    expect_error(ref, RayActorError, timeout=60)
    # the actor itself was restarted and answers
    wait_for(lambda: actor_state(c)["state"] == "ALIVE", 30, message="the actor to restart")
    assert ray.get(c.get.remote(), timeout=30) == 0
    assert ray.get(c.pid.remote(), timeout=30) != pid1


# -- context and scheduling ---------------------------------------------------------------------
def test_runtime_context_actor_id(actors):
    c = Counter.remote()
    actors.append(c)
    assert ray.get(c.actor_id.remote(), timeout=30) == c._actor_id.hex()
    assert ray.get_runtime_context().get_actor_id() is None


def test_scheduling_strategies(actors):
    node_id = ray.get_runtime_context().get_node_id()
    pinned = Counter.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)).remote()
    spread = Counter.options(scheduling_strategy="SPREAD").remote()
    actors.extend([pinned, spread])
    assert ray.get(pinned.node_id.remote(), timeout=30) == node_id
    assert ray.get(spread.incr.remote(), timeout=30) == 1
