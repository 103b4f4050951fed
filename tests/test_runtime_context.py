"""get_runtime_context() in drivers, tasks and actors; Ray's exception classes and their
hierarchy; a taken actor name; ObjectRef.task_id() and the ID classes; init()'s handling
of keywords - each as Ray 2.60 documents it (python/ray/runtime_context.py,
python/ray/exceptions.py, ray.init's signature).

The module shares one private 2-CPU cluster; the init() keyword checks come last and
need no cluster of their own (they fail before anything starts).
"""
from __future__ import annotations

import pickle
import re
import time

import pytest

import runtime as ray
from runtime import exceptions as exc
from runtime.actor import exit_actor
from runtime.core_worker.executor import Executor
from runtime.core_worker.task_context import TaskContext
from runtime.util import placement_group, remove_placement_group
from runtime.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@ray.remote
def task_context():
    ctx = ray.get_runtime_context()
    return {"task_id": ctx.get_task_id(), "task_name": ctx.get_task_name(),
            "job_id": ctx.get_job_id(), "actor_id": ctx.get_actor_id(),
            "actor_name": ctx.get_actor_name(), "node_id": ctx.get_node_id(),
            "pg": ctx.get_placement_group_id(), "labels": ctx.get_node_labels(),
            "session": ctx.get_session_name(), "job_id_obj": ctx.job_id}


@ray.remote
class Introspect:
    def context(self):
        ctx = ray.get_runtime_context()
        return {"actor_id": ctx.get_actor_id(), "actor_name": ctx.get_actor_name(),
                "task_name": ctx.get_task_name(),
                "function_name": ctx.get_task_function_name(),
                "resources": ctx.get_assigned_resources(),
                "reconstructed": ctx.was_current_actor_reconstructed,
                "pg": ctx.get_placement_group_id()}

    def myself(self):
        return ray.get_runtime_context().current_actor

    def hello(self):
        return "hello"


@ray.remote
class AsyncExit:
    async def leave(self):
        try:
            exit_actor()
        except exc.AsyncioActorExit:
            return "AsyncioActorExit"
        return "nothing raised"

    async def really_leave(self):
        exit_actor()

    async def ping(self):
        return "pong"


# -- the driver ---------------------------------------------------------------------------------
def test_driver_context(cluster):
    ctx = ray.get_runtime_context()
    assert re.fullmatch(r"[0-9a-f]{8}", ctx.get_job_id())  # Ray's 4-byte job id, in hex
    assert ctx.job_id == ray.JobID.from_hex(ctx.get_job_id())
    assert isinstance(ctx.job_id, ray.JobID) and isinstance(ctx.node_id, ray.NodeID)
    assert ctx.get_node_id() == cluster["node_id"]
    assert ctx.get_task_id() is None and ctx.get_task_name() is None
    assert ctx.get_actor_id() is None and ctx.get_actor_name() is None
    assert ctx.get_placement_group_id() is None
    assert ctx.get_session_name() == cluster["session_dir"].rstrip("/").rsplit("/", 1)[1]
    assert cluster["session_dir"].startswith(ctx.get_temp_dir())
    assert ctx.get()["namespace"] == ctx.namespace
    with pytest.raises(RuntimeError, match="driver"):
        ctx.get_assigned_resources()
    with pytest.raises(RuntimeError, match="worker"):
        ctx.is_canceled()
    with pytest.raises(RuntimeError, match="only available in an actor"):
        ctx.current_actor  # noqa: B018


# -- tasks --------------------------------------------------------------------------------------
def test_task_context(cluster):
    ref = task_context.remote()
    got = ray.get(ref, timeout=60)
    driver = ray.get_runtime_context()
    assert got["task_id"] == ref.task_id().hex()
    assert got["task_name"] == "task_context"
    assert got["job_id"] == driver.get_job_id()
    assert got["job_id_obj"] == driver.job_id
    assert got["actor_id"] is None and got["actor_name"] is None
    assert got["node_id"] == driver.get_node_id()
    assert got["pg"] is None
    assert got["labels"]["ray.io/node-id"] == driver.get_node_id()
    assert got["session"] == driver.get_session_name()
    named = ray.get(task_context.options(name="renamed").remote(), timeout=60)
    assert named["task_name"] == "renamed"


def test_placement_group_id_in_a_capturing_group(cluster):
    pg = placement_group([{"CPU": 1}])
    try:
        assert pg.wait(30)
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
        got = ray.get(task_context.options(scheduling_strategy=strategy).remote(), timeout=60)
        assert got["pg"] == pg.id.hex()
    finally:
        remove_placement_group(pg)


_NEEDS_TASK_SPEC = pytest.mark.xfail(
    not hasattr(TaskContext, "spec"), raises=NotImplementedError, strict=True,
    reason="the executor does not record the running task's spec (with its resources) in "
           "its task context yet (runtime/core_worker/task_context.py)")


@ray.remote
def function_name_and_resources():
    ctx = ray.get_runtime_context()
    return ctx.get_task_function_name(), ctx.get_assigned_resources()


@_NEEDS_TASK_SPEC
def test_task_function_name_and_resources(cluster):
    name, resources = ray.get(function_name_and_resources.options(name="other").remote(),
                              timeout=60)
    assert name == f"{__name__}.function_name_and_resources"
    assert resources == {"CPU": 1.0}


@ray.remote(max_concurrency=2)
class Spinner:
    """A threaded actor: a running call is not interrupted by cancel(); it polls."""

    def __init__(self):
        self.started = False
        self.saw_cancel = False

    def spin(self):
        self.started = True
        ctx = ray.get_runtime_context()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if ctx.is_canceled():
                self.saw_cancel = True
                return "stopped"
            time.sleep(0.01)
        return "never cancelled"

    def state(self):
        return self.started, self.saw_cancel


@pytest.mark.xfail(not hasattr(Executor, "is_cancelled"), raises=NotImplementedError,
                   strict=True, reason="the executor does not record cancels of running "
                                       "tasks yet (runtime/core_worker/executor.py)")
def test_is_canceled_in_a_running_actor_call(actors):
    a = Spinner.remote()
    actors.append(a)
    ref = a.spin.remote()
    deadline = time.monotonic() + 30
    while not ray.get(a.state.remote(), timeout=30)[0]:
        assert time.monotonic() < deadline, "spin() never started"
        time.sleep(0.02)
    done, _ = ray.wait([ref], timeout=0.2)
    if done:
        ray.get(ref)  # it ended on its own: whatever it raised is the answer
        pytest.fail(f"spin() ended before it was cancelled: {ray.get(ref)!r}")
    ray.cancel(ref)
    while not ray.get(a.state.remote(), timeout=30)[1]:
        assert time.monotonic() < deadline, "is_canceled() never turned True"
        time.sleep(0.02)


# -- actors -------------------------------------------------------------------------------------
def test_actor_context(actors):
    named = Introspect.options(name="introspected", num_cpus=1).remote()
    plain = Introspect.remote()
    actors += [named, plain]
    got = ray.get(named.context.remote(), timeout=60)
    assert got["actor_id"] == named._actor_id.hex()
    assert got["actor_name"] == "introspected"
    assert got["task_name"] == "Introspect.context"
    assert got["function_name"] == f"{__name__}.Introspect.context"
    assert got["resources"] == {"CPU": 1.0}  # what the actor holds while it lives
    assert got["reconstructed"] is False
    assert got["pg"] is None
    unnamed = ray.get(plain.context.remote(), timeout=60)
    assert unnamed["actor_name"] == ""  # an actor without a name: "", as in Ray
    assert unnamed["resources"] == {}  # a default actor holds no CPU


def test_current_actor_is_a_working_handle(actors):
    a = Introspect.remote()
    actors.append(a)
    me = ray.get(a.myself.remote(), timeout=60)
    assert isinstance(me, ray.ActorHandle) and me == a
    assert ray.get(me.hello.remote(), timeout=60) == "hello"


def test_exit_actor_in_an_async_actor_raises_asyncio_actor_exit(actors):
    a = AsyncExit.remote()
    actors.append(a)
    assert ray.get(a.leave.remote(), timeout=60) == "AsyncioActorExit"
    b = AsyncExit.remote()
    actors.append(b)
    with pytest.raises(exc.ActorDiedError):
        ray.get(b.really_leave.remote(), timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the actor ends: later calls fail too
        try:
            ray.get(b.ping.remote(), timeout=30)
        except exc.RayActorError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the actor still answers after exit_actor()")


def test_duplicate_actor_name_raises_actor_already_exists(actors):
    first = Introspect.options(name="only-one").remote()
    actors.append(first)
    with pytest.raises(exc.ActorAlreadyExistsError, match="only-one") as info:
        Introspect.options(name="only-one").remote()
    assert isinstance(info.value, ValueError)  # Ray keeps it a ValueError for old code
    assert isinstance(info.value, exc.RayError)
    again = Introspect.options(name="only-one", get_if_exists=True).remote()
    assert again == first


# -- ids ----------------------------------------------------------------------------------------
def test_object_ref_task_id_is_a_task_id(cluster):
    ref = task_context.remote()
    tid = ref.task_id()
    assert isinstance(tid, ray.TaskID)
    assert re.fullmatch(r"[0-9a-f]{48}", tid.hex())
    assert repr(tid) == f"TaskID({tid.hex()})"
    assert ray.TaskID.from_hex(tid.hex()) == tid and tid.binary() == ref.binary()[:24]
    assert ray.get(ref, timeout=60)["task_id"] == tid.hex()
    assert pickle.loads(pickle.dumps(tid)) == tid
    assert ray.JobID.from_int(1).hex() == "01000000" and ray.JobID.from_int(1).int() == 1
    assert ray.TaskID.nil().is_nil() and not tid.is_nil()
    with pytest.raises(ValueError, match="24 bytes"):
        ray.TaskID(b"short")


# -- exceptions ---------------------------------------------------------------------------------
RAY_HIERARCHY = {  # class: its Ray 2.60 bases (python/ray/exceptions.py)
    "OutOfMemoryError": ("RayError",), "ActorAlreadyExistsError": ("ValueError", "RayError"),
    "PendingCallsLimitExceeded": ("RayError",), "ObjectFreedError": ("ObjectLostError",),
    "AsyncioActorExit": ("RayError",), "LocalRayletDiedError": ("RayError",),
    "ObjectReconstructionFailedError": ("ObjectLostError",),
    "ActorPlacementGroupRemoved": ("RayError",), "TaskPlacementGroupRemoved": ("RayError",),
    "UnserializableException": ("RayError",), "ObjectRefStreamEndOfStreamError": ("RayError",),
}
BUILTINS = {"ValueError": ValueError}


@pytest.mark.parametrize("name", sorted(RAY_HIERARCHY))
def test_ray_exception_classes(name):
    cls = getattr(exc, name)
    assert name in exc.__all__
    for base in RAY_HIERARCHY[name]:
        assert issubclass(cls, BUILTINS.get(base) or getattr(exc, base)), base
    arg = "the message"
    err = cls(arg) if name != "ObjectFreedError" and name != "ObjectReconstructionFailedError" \
        else cls("ab" * 14, arg)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(err) and arg in str(err)


def test_raylet_died_error_is_a_local_raylet_died_error():
    err = exc.RayletDiedError("raylet at 127.0.0.1:1 died", address="127.0.0.1:1", pid=7)
    assert isinstance(err, exc.LocalRayletDiedError)
    assert isinstance(err, exc.ClusterConnectionError) and isinstance(err, exc.NodeDiedError)
    assert "127.0.0.1:1" in str(err)
    assert "raylet died" in str(exc.LocalRayletDiedError())


# -- init() keywords (before anything starts) ----------------------------------------------------
def test_init_keywords_as_ray_checks_them(fresh_runtime):
    with pytest.raises(RuntimeError, match=r"Unknown keyword argument\(s\): typo_cpus"):
        ray.init(typo_cpus=2)
    with pytest.raises(RuntimeError, match="storage"):
        ray.init(storage="/tmp/x")
    with pytest.raises(RuntimeError, match="local_mode"):
        ray.init(local_mode=True)
    for key, value in [("include_dashboard", True), ("_system_config", {"x": 1}),
                       ("job_config", object()), ("enable_resource_isolation", True)]:
        with pytest.raises(ValueError, match=f"init\\({key}="):
            ray.init(**{key: value})
    assert not ray.is_initialized()
