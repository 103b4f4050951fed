"""Where a task runs, and what it waits for, while it is still going (task events).

The owner reports, in its task-event batches, the node, worker and pid of each task
it has pushed to a worker, and RUNNING for the tasks its workers are running, so
the state API and raytop show them while they run (not only once they end). It
also reports which argument object a task still waits for. Tasks tell the test
where they really run through a file they write (their own os.getpid(), node id
and worker id), never through the state API under test.

The module runs on two nodes (the second on 127.0.0.2, with a `second` resource),
so a task spilled to the other node must show that node, not its owner's. Task
events reach the GCS about once a second: every check polls with a deadline.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import runtime as ray
from runtime.util.state import list_tasks

from helpers.gates import await_path
from helpers.nodes import cluster_with_nodes
from conftest import wait_for

# The events flush about once a second; a loaded 2-core machine can take a few more.
SHOWS_WITHIN_S = 15


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sessions"))
    with cluster_with_nodes(root, head_cpus=2) as (ctx, (second,)):
        yield ctx, second


def _where() -> dict:
    ctx = ray.get_runtime_context()
    return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "worker_id": ctx.get_worker_id()}


def _report(path: str) -> None:
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(_where()))
    os.rename(tmp, path)


@ray.remote
def report_then_wait(report: str, gate: str) -> int:
    _report(report)
    await_path(gate, 120)
    return os.getpid()


@ray.remote(max_retries=1)
def die_once_then_report(marker: str, report: str, gate: str) -> int:
    if not os.path.exists(marker):  # the first attempt's worker dies
        Path(marker).touch()
        os._exit(1)
    _report(report)
    await_path(gate, 120)
    return os.getpid()


@ray.remote
def wait_then_return(gate: str, value):
    await_path(gate, 120)
    return value


@ray.remote
def add(a, b):
    return a + b


@ray.remote
class Sleeper:
    def report_then_wait(self, report: str, gate: str) -> int:
        _report(report)
        await_path(gate, 120)
        return os.getpid()

    def add(self, a, b):
        return a + b


@ray.remote
class AsyncSleeper:
    async def report_then_wait(self, report: str, gate: str) -> int:
        import asyncio

        _report(report)
        while not os.path.exists(gate):
            await asyncio.sleep(0.02)
        return os.getpid()


def _task(name: str, actor=None):
    """The latest record of the task called `name` (of `actor`'s calls, if given: an
    actor call is named Class.method)."""
    filters = [("name", "=", name)]
    if actor is not None:
        filters.append(("actor_id", "=", actor._actor_id.hex()))
    recs = list_tasks(filters=filters, limit=10)
    return recs[0] if recs else None


def _read_report(path: str) -> dict:
    wait_for(lambda: os.path.exists(path), 60, message=f"the task to write {path}")
    return json.loads(Path(path).read_text())


def _wait_running_at(name: str, where: dict, actor=None) -> dict:
    """The record of `name` once it shows RUNNING where the task says it runs."""
    def shown():
        rec = _task(name, actor)
        if (rec and rec["state"] == "RUNNING" and rec["node_id"] == where["node_id"]
                and rec["worker_pid"] == where["pid"] and rec["worker_id"] == where["worker_id"]):
            return rec
        return None
    try:
        return wait_for(shown, SHOWS_WITHIN_S, message=f"{name} to show RUNNING at {where}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last record: {_task(name, actor)}") from None


def _check_running_task(tmp_path, fn, name: str, expect_node: str, actor=None) -> None:
    report, gate = str(tmp_path / f"{name}.json"), str(tmp_path / f"{name}.gate")
    ref = fn.remote(report, gate)
    try:
        where = _read_report(report)
        assert where["node_id"] == expect_node, where
        rec = _wait_running_at(name, where, actor)
        assert rec["start_time_ms"] and rec["end_time_ms"] is None, rec
        # Running, not just submitted: a filter on the state finds it, with its place.
        running = list_tasks(filters=[("state", "=", "RUNNING"), ("worker_pid", "=", where["pid"])],
                             limit=1000)
        assert name in {r["name"] for r in running}, running
    finally:
        Path(gate).touch()
    assert ray.get(ref, timeout=60) == where["pid"]
    done = wait_for(lambda: (lambda r: r if r and r["state"] == "FINISHED" else None)(
        _task(name, actor)),
                    SHOWS_WITHIN_S, message=f"{name} to show FINISHED")
    # The outcome keeps the place (and says the node it really ran on).
    assert (done["node_id"], done["worker_pid"], done["worker_id"]) == (
        where["node_id"], where["pid"], where["worker_id"]), done
    states = [e["state"] for e in done["events"]]
    assert states.count("RUNNING") == 1 and states.index("RUNNING") < states.index("FINISHED"), \
        states


def test_running_task_shows_its_node_worker_and_pid(two_nodes, tmp_path):
    ctx, _second = two_nodes
    _check_running_task(tmp_path, report_then_wait.options(name="placed_local"), "placed_local",
                        ctx.address_info["node_id"])


def test_task_on_another_node_shows_that_node(two_nodes, tmp_path):
    _ctx, second = two_nodes
    fn = report_then_wait.options(name="placed_remote", resources={"second": 1})
    _check_running_task(tmp_path, fn, "placed_remote", second.node_id.hex())


def test_running_actor_call_shows_the_actors_node_and_pid(two_nodes, tmp_path):
    _ctx, second = two_nodes
    actor = Sleeper.options(resources={"second": 0.5}).remote()
    try:
        _check_running_task(tmp_path, actor.report_then_wait, "Sleeper.report_then_wait",
                            second.node_id.hex(), actor)
    finally:
        ray.kill(actor)


def test_running_async_actor_calls_all_show_running(two_nodes, tmp_path):
    """An async actor runs its calls at once: each shows RUNNING, with the actor's pid."""
    ctx, _second = two_nodes
    actor = AsyncSleeper.remote()
    try:
        gate = str(tmp_path / "async.gate")
        reports = [str(tmp_path / f"async{i}.json") for i in range(2)]
        refs = [actor.report_then_wait.remote(reports[i], gate) for i in range(2)]
        try:
            where = [_read_report(r) for r in reports]  # both run at the same time
            assert where[0] == where[1] and where[0]["node_id"] == ctx.address_info["node_id"]

            def both_running():
                recs = list_tasks(filters=[("actor_id", "=", actor._actor_id.hex()),
                                           ("name", "=", "AsyncSleeper.report_then_wait")],
                                  limit=10)
                ok = [r for r in recs if r["state"] == "RUNNING"
                      and r["worker_pid"] == where[0]["pid"]
                      and r["node_id"] == where[0]["node_id"]]
                return recs if len(ok) == 2 else None
            wait_for(both_running, SHOWS_WITHIN_S, message="both async calls to show RUNNING")
        finally:
            Path(gate).touch()
        assert ray.get(refs, timeout=60) == [where[0]["pid"]] * 2
    finally:
        ray.kill(actor)


def test_retried_task_shows_its_new_worker(two_nodes, tmp_path):
    """A task whose worker died runs again elsewhere: it shows its new worker and pid,
    and its attempt number, not the dead one's."""
    ctx, _second = two_nodes
    marker, report = str(tmp_path / "died"), str(tmp_path / "retry.json")
    gate = str(tmp_path / "retry.gate")
    ref = die_once_then_report.options(name="placed_retry").remote(marker, report, gate)
    try:
        where = _read_report(report)
        rec = _wait_running_at("placed_retry", where)
        assert rec["attempt_number"] == 1, rec
        assert where["node_id"] == ctx.address_info["node_id"]
    finally:
        Path(gate).touch()
    assert ray.get(ref, timeout=60) == where["pid"]


def _pending_reason(name: str, actor=None):
    rec = _task(name, actor)
    return rec and rec["state"] == "PENDING_ARGS_AVAIL" and rec["pending_reason"]


def test_task_waiting_for_an_argument_names_the_object(two_nodes, tmp_path):
    gate_a, gate_b = str(tmp_path / "a.gate"), str(tmp_path / "b.gate")
    slow_a = wait_then_return.remote(gate_a, 1)
    slow_b = wait_then_return.remote(gate_b, 2)
    ref = add.options(name="waits_for_args").remote(slow_a, slow_b)
    try:
        reason = wait_for(lambda: _pending_reason("waits_for_args"), SHOWS_WITHIN_S,
                          message="waits_for_args to show what it waits for")
        assert reason == f"waiting for argument object {slow_a.hex()}", reason
        # The first argument arrives: the reason moves on to the second.
        Path(gate_a).touch()
        assert ray.get(slow_a, timeout=60) == 1
        reason = wait_for(lambda: (lambda r: r if r and slow_b.hex() in r else None)(
            _pending_reason("waits_for_args")), SHOWS_WITHIN_S,
            message="the reason to name the second argument")
        assert reason == f"waiting for argument object {slow_b.hex()}", reason
    finally:
        Path(gate_a).touch()
        Path(gate_b).touch()
    assert ray.get(ref, timeout=60) == 3
    done = wait_for(lambda: (lambda r: r if r and r["state"] == "FINISHED" else None)(
        _task("waits_for_args")), SHOWS_WITHIN_S, message="waits_for_args to finish")
    assert done["pending_reason"] is None, done


def test_actor_call_waiting_for_an_argument_names_the_object(two_nodes, tmp_path):
    gate = str(tmp_path / "gate")
    actor = Sleeper.remote()
    try:
        slow = wait_then_return.remote(gate, 5)
        ref = actor.add.remote(slow, 1)
        try:
            reason = wait_for(lambda: _pending_reason("Sleeper.add", actor), SHOWS_WITHIN_S,
                              message="the actor call to show what it waits for")
            assert reason == f"waiting for argument object {slow.hex()}", reason
        finally:
            Path(gate).touch()
        assert ray.get(ref, timeout=60) == 6
    finally:
        ray.kill(actor)
