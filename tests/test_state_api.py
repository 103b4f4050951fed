"""The state API (``ray.util.state``): nodes, actors, tasks, objects, workers, jobs and
placement groups as lists of records, with filters and limits — checked against
Ray's documented behaviour.

Every test but the last two shares the module's private 2-CPU ``cluster``. Task
events reach the GCS in batches about once a second, so task checks poll with
wait_for. The last two (the bounded task-event window, which needs a GCS started with
RUNTIME_TASK_EVENTS_MAX_TASKS=50, and a GCS that is killed) start their own cluster
in ``fresh_runtime``, which stops the module's cluster: they must stay last.
"""
from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

import runtime as ray
from runtime.exceptions import ClusterConnectionError
from runtime.util import placement_group, remove_placement_group
from runtime.util.state import (get_actor, list_actors, list_jobs, list_nodes, list_objects,
                                list_placement_groups, list_tasks, list_workers, summarize_tasks)

from helpers.gates import await_path
from conftest import wait_for

FINAL_STATES = {"FINISHED", "FAILED"}


# -- remote functions and classes ---------------------------------------------------------------
@ray.remote
def square(x):
    return x * x


@ray.remote
def fail_loudly():
    raise ValueError("state-api boom")


@ray.remote
def wait_file(path, timeout=60.0):
    await_path(path, timeout)
    return os.getpid()


@ray.remote
def noop(i):
    return i


@ray.remote
class StateProbe:
    def pid(self):
        return os.getpid()


@ray.remote
class OtherProbe:
    def pid(self):
        return os.getpid()


# -- helpers ------------------------------------------------------------------------------------
def tasks_named(name, **kw):
    return list_tasks(filters=[("name", "=", name)], limit=1000, **kw)


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- nodes and jobs -----------------------------------------------------------------------------
def test_list_nodes(cluster):
    nodes = list_nodes()
    assert len(nodes) == 1
    node = nodes[0]
    assert node["state"] == "ALIVE" and node.state == "ALIVE"
    assert node["node_id"] == ray.get_runtime_context().get_node_id()
    assert node["node_id"] == cluster.address_info["node_id"]
    assert node["resources_total"]["CPU"] == 2.0
    assert list_nodes(filters=[("state", "=", "DEAD")]) == []
    assert len(list_nodes(filters=[("state", "=", "alive")])) == 1


def test_list_jobs(cluster):
    job_id = ray.get_runtime_context().get_job_id()
    jobs = list_jobs()
    mine = [j for j in jobs if j["job_id"] == job_id]
    assert len(mine) == 1, jobs
    assert mine[0]["status"] == "RUNNING" and mine[0].status == "RUNNING"
    assert int(mine[0]["driver_info"]["pid"]) == os.getpid()
    running = list_jobs(filters=[("status", "=", "RUNNING")])
    assert job_id in {j["job_id"] for j in running}


# -- actors -------------------------------------------------------------------------------------
def test_list_actors_filters_limit_and_get(cluster):
    probes = [StateProbe.remote() for _ in range(3)]
    other = OtherProbe.remote()
    pids = ray.get([p.pid.remote() for p in probes] + [other.pid.remote()], timeout=60)
    try:
        alive = list_actors(filters=[("state", "=", "ALIVE")])
        ids = {a["actor_id"] for a in alive}
        assert {p._actor_id.hex() for p in probes + [other]} <= ids
        assert all(a["state"] == "ALIVE" and a.state == "ALIVE" for a in alive)

        mine = list_actors(filters=[("class_name", "=", "StateProbe")])
        assert {a.actor_id for a in mine} == {p._actor_id.hex() for p in probes}
        assert all(a["class_name"] == "StateProbe" for a in mine)

        assert len(list_actors(filters=[("class_name", "=", "StateProbe")], limit=2)) == 2
        assert len(list_actors(limit=1)) == 1

        rec = get_actor(probes[0]._actor_id.hex())
        assert rec is not None
        assert rec["pid"] == pids[0] and rec.pid == pids[0]
        assert rec["node_id"] == ray.get_runtime_context().get_node_id()
        assert rec["class_name"] == "StateProbe" and rec["state"] == "ALIVE"
        assert get_actor("00" * 16) is None

        with pytest.raises(ValueError):
            list_actors(filters=[("no_such_field", "=", "x")])
        with pytest.raises(ValueError):
            list_actors(filters=[("state", ">", "x")])

        ray.kill(other)
        dead = wait_for(lambda: (lambda r: r if r and r["state"] == "DEAD" else None)(
            get_actor(other._actor_id.hex())), 10, message="the killed actor to be DEAD")
        assert dead["death_cause"] and "kill" in dead["death_cause"].lower(), dead
        dead_ids = {a.actor_id for a in list_actors(filters=[("state", "=", "DEAD")])}
        assert other._actor_id.hex() in dead_ids
        assert other._actor_id.hex() not in {
            a.actor_id for a in list_actors(filters=[("state", "=", "ALIVE")])}
    finally:
        for h in probes + [other]:
            ray.kill(h)
    for pid in pids:
        wait_for(lambda pid=pid: pid_gone(pid), 15, message=f"actor process {pid} to exit")


# -- tasks --------------------------------------------------------------------------------------
def test_finished_tasks_are_listed_with_events(cluster):
    assert ray.get([square.options(name="my_task").remote(i) for i in range(3)],
                   timeout=60) == [0, 1, 4]
    node_id = ray.get_runtime_context().get_node_id()

    def three_finished():
        recs = tasks_named("my_task")
        return recs if len(recs) == 3 and all(r["state"] == "FINISHED" for r in recs) else None

    recs = wait_for(three_finished, 15, message="3 FINISHED my_task records")
    for r in recs:
        assert r.name == "my_task" and r["type"] == "NORMAL_TASK"
        assert r["job_id"] == ray.get_runtime_context().get_job_id()
        assert r["node_id"] == node_id
        assert isinstance(r["worker_pid"], int) and r["worker_pid"] != os.getpid()
        assert r["error_type"] is None
        states = [e["state"] for e in r["events"]]
        assert states[0] in ("PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT"), states
        assert "RUNNING" in states and states[-1] == "FINISHED", states
        assert states.index("RUNNING") < states.index("FINISHED"), states
        times = [e["created_ms"] for e in r["events"]]
        assert times == sorted(times), f"event times go backwards: {r['events']}"
        assert r["start_time_ms"] and r["end_time_ms"] and r["start_time_ms"] <= r["end_time_ms"]
    assert len({r["task_id"] for r in recs}) == 3
    # the state filter
    finished = list_tasks(filters=[("name", "=", "my_task"), ("state", "=", "FINISHED")])
    assert len(finished) == 3
    assert list_tasks(filters=[("name", "=", "my_task"), ("state", "=", "FAILED")]) == []
    assert len(list_tasks(filters=[("name", "=", "my_task")], limit=2)) == 2


def test_failed_task_is_listed(cluster):
    ref = fail_loudly.options(name="failing_task", max_retries=0).remote()
    with pytest.raises(ValueError):
        ray.get(ref, timeout=30)
    rec = wait_for(lambda: (lambda rs: rs[0] if rs and rs[0]["state"] == "FAILED" else None)(
        tasks_named("failing_task")), 15, message="the FAILED failing_task record")
    assert rec["error_type"], rec
    assert "state-api boom" in (rec["error_message"] or ""), rec
    assert [e["state"] for e in rec["events"]][-1] == "FAILED"
    failed = list_tasks(filters=[("state", "=", "FAILED")], limit=1000)
    assert rec["task_id"] in {r["task_id"] for r in failed}


def test_running_task_is_in_a_non_final_state(cluster, tmp_path):
    gate = str(tmp_path / "gate")
    ref = wait_file.options(name="long_task").remote(gate)
    try:
        rec = wait_for(lambda: (lambda rs: rs[0] if rs else None)(tasks_named("long_task")), 15,
                       message="the long_task record")
        # The owner reports RUNNING at its next flush after the push (about a second);
        # until then the task shows as pending or submitted — never as finished
        assert rec["state"] in ("PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT",
                                "SUBMITTED_TO_WORKER", "RUNNING"), rec
        again = tasks_named("long_task")[0]
        assert again["state"] not in FINAL_STATES, again
    finally:
        Path(gate).touch()
    ray.get(ref, timeout=30)
    wait_for(lambda: tasks_named("long_task")[0]["state"] == "FINISHED", 15,
             message="long_task to show FINISHED")


def test_actor_tasks_and_summary(cluster):
    probe = StateProbe.remote()
    try:
        ray.get([probe.pid.remote() for _ in range(2)], timeout=30)
        ray.get([noop.options(name="summed").remote(i) for i in range(4)], timeout=30)
        for _ in range(2):
            with pytest.raises(ValueError):
                ray.get(fail_loudly.options(name="summed_fail", max_retries=0).remote(),
                        timeout=30)
        actor_id = probe._actor_id.hex()

        def actor_tasks():
            recs = list_tasks(filters=[("actor_id", "=", actor_id)], limit=1000)
            return recs if len(recs) >= 2 and all(r["state"] == "FINISHED" for r in recs) \
                else None
        recs = wait_for(actor_tasks, 15, message="the actor's method calls")
        assert all(r["type"] == "ACTOR_TASK" for r in recs)

        def summary_ready():
            s = summarize_tasks()["cluster"]["summary"]
            done = s.get("summed", {}).get("state_counts", {}).get("FINISHED")
            failed = s.get("summed_fail", {}).get("state_counts", {}).get("FAILED")
            return s if done == 4 and failed == 2 else None
        summary = wait_for(summary_ready, 15, message="4 FINISHED 'summed', 2 FAILED "
                                                      "'summed_fail' in the summary")
        assert summary["summed"]["state_counts"] == {"FINISHED": 4}
        assert summary["summed_fail"]["state_counts"] == {"FAILED": 2}
        assert summary["summed"]["type"] == "NORMAL_TASK"
        full = summarize_tasks()["cluster"]
        assert full["total_actor_tasks"] >= 2
        assert full["total_tasks"] >= 4 + 2 + 2
    finally:
        ray.kill(probe)


# -- objects, workers, placement groups ---------------------------------------------------------
def test_list_objects_shows_driver_put(cluster):
    payload = b"x" * 4096
    ref = ray.put(payload)
    recs = [o for o in list_objects(limit=10_000) if o["object_id"] == ref.hex()]
    assert len(recs) == 1, f"put object {ref.hex()} not listed"
    o = recs[0]
    assert o["reference_type"] == "LOCAL_REFERENCE" and o.reference_type == "LOCAL_REFERENCE"
    assert o["object_size"] >= len(payload)
    assert o["type"] == "DRIVER" and o["pid"] == os.getpid()
    filtered = list_objects(filters=[("object_id", "=", ref.hex())])
    assert [x["object_id"] for x in filtered] == [ref.hex()]
    del ref


def test_list_workers(cluster):
    ray.get(square.remote(2), timeout=30)
    workers = list_workers(limit=1000)
    drivers = [w for w in workers if w["worker_type"] == "DRIVER"]
    assert os.getpid() in {w["pid"] for w in drivers}, drivers
    others = [w for w in workers if w["worker_type"] == "WORKER"]
    assert others, workers
    for w in others:
        assert w.pid > 0 and psutil.pid_exists(w.pid), w
        assert w["node_id"] == ray.get_runtime_context().get_node_id()
    only_workers = list_workers(filters=[("worker_type", "=", "WORKER")], limit=1000)
    assert only_workers and all(w["worker_type"] == "WORKER" for w in only_workers)


def test_list_placement_groups(cluster):
    created = placement_group([{"CPU": 1}], name="state-created")
    pending = placement_group([{"CPU": 100}], name="state-pending")
    try:
        assert created.wait(10) is True
        recs = {p["placement_group_id"]: p for p in list_placement_groups()}
        assert created.id.hex() in recs and pending.id.hex() in recs
        assert recs[created.id.hex()]["state"] == "CREATED"
        assert recs[created.id.hex()].name == "state-created"
        assert recs[pending.id.hex()]["state"] == "PENDING"
        only_created = {p["placement_group_id"]
                        for p in list_placement_groups(filters=[("state", "=", "CREATED")])}
        assert created.id.hex() in only_created and pending.id.hex() not in only_created
        only_pending = {p["placement_group_id"]
                        for p in list_placement_groups(filters=[("state", "=", "PENDING")])}
        assert pending.id.hex() in only_pending and created.id.hex() not in only_pending
        by_name = list_placement_groups(filters=[("name", "=", "state-pending")])
        assert [p["placement_group_id"] for p in by_name] == [pending.id.hex()]
    finally:
        remove_placement_group(created)
        remove_placement_group(pending)
    removed = {p["placement_group_id"]
               for p in list_placement_groups(filters=[("state", "=", "REMOVED")])}
    assert {created.id.hex(), pending.id.hex()} <= removed


def _cmdline(p: psutil.Process) -> list:
    try:
        return p.cmdline()
    except psutil.Error:  # exited meanwhile (a zombie has no command line)
        return []


def test_unanswering_raylet_is_named_or_left_out(cluster):
    """A raylet that does not answer (stopped here with SIGSTOP) fails list_workers and
    list_objects with an error naming it and its address; with
    raise_on_missing_output=False its node is left out instead (Ray's behaviour)."""
    (node,) = list_nodes()
    address = f"{node['node_ip']}:{node['raylet_port']}"
    (raylet,) = [p for p in psutil.Process().children(recursive=True)
                 if "runtime.raylet" in _cmdline(p)]
    raylet.suspend()
    try:
        for call in (list_workers, list_objects):
            with pytest.raises(ClusterConnectionError) as ei:
                call(timeout=2)
            message = str(ei.value)
            assert f"raylet of node {node['node_id'][:8]} at {address} did not answer in time" \
                in message, message
            assert call(timeout=2, raise_on_missing_output=False) == []
    finally:
        raylet.resume()
    assert list_workers()  # answers again once resumed


# -- Ray 2.60's fields ------------------------------------------------------------------------------
#: The fields of Ray 2.60's ray.util.state.common dataclasses (TaskState, ActorState, ...).
RAY_FIELDS = {
    "tasks": {"task_id", "attempt_number", "name", "state", "job_id", "actor_id", "type",
              "func_or_class_name", "parent_task_id", "node_id", "worker_id", "worker_pid",
              "error_type", "language", "required_resources", "runtime_env_info",
              "placement_group_id", "events", "profiling_data", "creation_time_ms",
              "start_time_ms", "end_time_ms", "task_log_info", "error_message",
              "is_debugger_paused", "call_site", "label_selector"},
    "actors": {"actor_id", "class_name", "state", "job_id", "name", "node_id", "pid",
               "ray_namespace", "serialized_runtime_env", "required_resources", "death_cause",
               "is_detached", "placement_group_id", "repr_name", "num_restarts",
               "num_restarts_due_to_lineage_reconstruction"},
    "nodes": {"node_id", "node_ip", "is_head_node", "state", "state_message", "node_name",
              "resources_total", "labels", "start_time_ms", "end_time_ms"},
    "workers": {"worker_id", "is_alive", "worker_type", "exit_type", "node_id", "ip", "pid",
                "exit_detail", "worker_launch_time_ms", "worker_launched_time_ms",
                "start_time_ms", "end_time_ms", "debugger_port", "num_paused_threads"},
    "objects": {"object_id", "object_size", "task_status", "reference_type", "call_site",
                "type", "pid", "ip"},
    "placement_groups": {"placement_group_id", "name", "creator_job_id", "state", "bundles",
                         "is_detached", "stats"},
}


def test_records_carry_rays_fields(cluster):
    probe = StateProbe.remote()
    ref = ray.put(b"fields")
    pg = placement_group([{"CPU": 1}], name="state-fields")
    try:
        ray.get(probe.pid.remote(), timeout=60)
        assert pg.wait(30)
        got = {
            "tasks": wait_for(lambda: list_tasks(limit=1), 15, message="a task record"),
            "actors": list_actors(filters=[("actor_id", "=", probe._actor_id.hex())]),
            "nodes": list_nodes(), "workers": list_workers(limit=1),
            "objects": list_objects(filters=[("object_id", "=", ref.hex())]),
            "placement_groups": list_placement_groups(filters=[("name", "=", "state-fields")]),
        }
        for kind, fields in RAY_FIELDS.items():
            assert got[kind], f"no {kind} listed"
            missing = fields - set(got[kind][0])
            assert not missing, f"{kind} records lack Ray's fields {sorted(missing)}"
        assert got["objects"][0]["call_site"] == "disabled"
        bundle = got["placement_groups"][0]["bundles"][0]
        assert bundle["unit_resources"] == {"CPU": 1.0} and bundle["node_id"]
    finally:
        remove_placement_group(pg)
        ray.kill(probe)


# -- the bounded task-event window (must stay last: it stops the module's cluster) ---------------
def test_task_events_window_is_bounded(fresh_runtime, monkeypatch):
    from runtime.util.state.records import _tasks

    # read by the GCS process at import time: set before init() so the GCS inherits it
    monkeypatch.setenv("RUNTIME_TASK_EVENTS_MAX_TASKS", "50")
    ray.init(num_cpus=2)
    assert ray.get([noop.remote(i) for i in range(200)], timeout=120) == list(range(200))

    def window_full():
        reply = _tasks(0)
        return reply if reply.dropped >= 150 else None
    reply = wait_for(window_full, 20, message="150 dropped task records")
    assert len(reply.tasks) <= 50
    listed = list_tasks(limit=1000)
    assert 0 < len(listed) <= 50
    assert summarize_tasks()["cluster"]["dropped"] >= 150


# -- a GCS that is gone (stops the module's cluster too: stays at the end) ---------------------
def test_state_api_names_the_gcs_when_it_is_gone(fresh_runtime, tmp_path):
    """Every list_*/summarize_* raises ClusterConnectionError naming the GCS and its
    address, never a raw grpc.RpcError."""
    ray.init(num_cpus=1, _temp_dir=str(tmp_path))
    assert list_nodes()  # the state API works before
    (gcs,) = [p for p in psutil.Process().children(recursive=True)
              if "runtime.gcs" in p.cmdline()]
    gcs.kill()
    gcs.wait(30)
    calls = {"list_nodes": list_nodes, "list_jobs": list_jobs, "list_actors": list_actors,
             "get_actor": lambda: get_actor("ab" * 16), "list_tasks": list_tasks,
             "summarize_tasks": summarize_tasks, "list_workers": list_workers,
             "list_objects": list_objects, "list_placement_groups": list_placement_groups}
    for name, call in calls.items():
        with pytest.raises(ClusterConnectionError) as ei:
            call()
        message = str(ei.value)
        assert "GCS at" in message and ":" in message.split("GCS at", 1)[1], (name, message)
