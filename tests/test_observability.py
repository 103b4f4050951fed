"""Observability (issue 14 item 6), checked against Ray 2.60's documented behaviour:
``timeline()``, ``util.metrics`` (Counter, Gauge, Histogram) read back through the
state API, ``list_logs``/``get_log`` through each node's LogService, the summaries,
the ``get_*`` functions and ``StateApiClient``.

The LogService is first exercised on its own, served by a gRPC server of this test
with the real token interceptor; then everything runs on real clusters: the module's
private 2-CPU ``cluster``, and last (it stops that cluster) two nodes on 127.0.0.1 and
127.0.0.2 whose logs live in separate session directories.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
import warnings

import grpc
import pytest

import runtime as ray
from runtime import rpc
from runtime.protocol import log_service_pb2, log_service_pb2_grpc
from runtime.raylet import log_service
from runtime.util import metrics, placement_group, remove_placement_group
from runtime.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from runtime.util.state import (GetApiOptions, ListApiOptions, StateApiClient, StateResource,
                                SummaryResource, get_actor, get_job, get_log, get_node,
                                get_objects, get_placement_group, get_task, get_worker,
                                list_cluster_events, list_logs, list_metrics, list_nodes,
                                list_workers, summarize_actors, summarize_objects)

from conftest import wait_for
from helpers.env import scrubbed_env
from helpers.log_server import TOKEN, log_server, read_all, rpc_code
from helpers.nodes import cluster_with_nodes
from runtime.protocol.common_pb2 import FAILED, FINISHED, PENDING_NODE_ASSIGNMENT, RUNNING
from runtime.util.timeline import task_trace_events

# -- the LogService on its own ------------------------------------------------------------------
def test_log_service_serves_only_the_logs_dir_and_only_with_the_token(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [f"line {i}\n".encode() for i in range(10)]
    (logs / "worker-1a2b3c4d.log").write_bytes(
        b"=== worker-1a2b3c4d started pid 4242 at 2025-01-01T00:00:00 ===\n" + b"".join(lines))
    (logs / "raylet.log").write_bytes(b"no newline at the end")
    (tmp_path / "secret").write_text("the token of another cluster\n")
    os.symlink(tmp_path / "secret", logs / "evil.log")
    os.mkfifo(logs / "pipe.log")
    with log_server(str(logs)) as address:
        ch = rpc.sync_channel(address, TOKEN)
        stub = log_service_pb2_grpc.LogServiceStub(ch)
        try:
            files = {f.name: f for f in stub.ListLogs(log_service_pb2.ListLogsRequest(),
                                                      timeout=10).files}
            # the symlink and the FIFO are not regular files of the directory
            assert sorted(files) == ["raylet.log", "worker-1a2b3c4d.log"]
            assert files["worker-1a2b3c4d.log"].pid == 4242
            assert files["raylet.log"].pid == 0
            assert [f.name for f in stub.ListLogs(log_service_pb2.ListLogsRequest(
                glob="worker-*"), timeout=10).files] == ["worker-1a2b3c4d.log"]

            whole = read_all(stub, filename="worker-1a2b3c4d.log")
            assert whole.endswith(b"".join(lines)) and whole.startswith(b"=== worker-")
            assert read_all(stub, filename="worker-1a2b3c4d.log", tail_lines=3) == \
                b"".join(lines[-3:])
            assert read_all(stub, filename="raylet.log", tail_lines=1) == \
                b"no newline at the end"
            assert read_all(stub, pid=4242, tail_lines=1) == lines[-1]
            assert read_all(stub, filename="worker-1a2b3c4d.log", from_end=True) == b""
            assert read_all(stub, filename="raylet.log", start_offset=3, end_offset=10) == \
                b"newline"

            for bad in ("../secret", "/etc/passwd", "..", "a/../../secret", ""):
                code = rpc_code(lambda bad=bad: read_all(stub, filename=bad, pid=0))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (bad, code)
            assert rpc_code(lambda: read_all(stub, filename="evil.log")) == \
                grpc.StatusCode.PERMISSION_DENIED
            assert rpc_code(lambda: read_all(stub, filename="pipe.log")) == \
                grpc.StatusCode.PERMISSION_DENIED  # refused, not a hang on the FIFO
            assert rpc_code(lambda: read_all(stub, filename="missing.log")) == \
                grpc.StatusCode.NOT_FOUND
            assert rpc_code(lambda: read_all(stub, pid=999999)) == grpc.StatusCode.NOT_FOUND
        finally:
            ch.close()

        for token in (None, "u" * 64):  # no token, and a wrong one
            raw = grpc.insecure_channel(address)
            ch = rpc.AuthChannel(raw, token) if token else raw
            stub = log_service_pb2_grpc.LogServiceStub(ch)
            try:
                assert rpc_code(lambda s=stub: s.ListLogs(log_service_pb2.ListLogsRequest(),
                                                          timeout=10)) == \
                    grpc.StatusCode.UNAUTHENTICATED
                assert rpc_code(lambda s=stub: read_all(s, filename="worker-1a2b3c4d.log")) == \
                    grpc.StatusCode.UNAUTHENTICATED
            finally:
                raw.close()


def test_tail_offset_edges(tmp_path):
    path = tmp_path / "f"
    cases = [(b"", 3, 0), (b"a\nb\nc\n", 1, 4), (b"a\nb\nc\n", 3, 0), (b"a\nb\nc\n", 9, 0),
             (b"a\nb\nc", 1, 4), (b"a\nb\nc", 2, 2), (b"\n\n\n", 2, 1),
             (b"x" * 200_000 + b"\nlast\n", 1, 200_001)]
    for data, n, want in cases:
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert log_service.tail_offset(fd, 0, len(data), n) == want, (data[:20], n)
        finally:
            os.close(fd)


# -- metrics: Ray's checks -------------------------------------------------------------------------
def test_bad_metric_use_raises_as_ray_does():
    with pytest.raises(ValueError, match="Empty name is not allowed"):
        metrics.Counter("")
    with pytest.raises(TypeError, match="tag_keys should be a tuple type"):
        metrics.Counter("obs_bad_tags", tag_keys=["route"])
    with pytest.raises(TypeError, match="Tag keys must be str"):
        metrics.Gauge("obs_bad_key", tag_keys=(1,))
    with pytest.raises(ValueError, match="boundaries argument should be provided"):
        metrics.Histogram("obs_no_bounds")
    with pytest.raises(ValueError, match=r"Invalid `boundaries` argument at index 1"):
        metrics.Histogram("obs_neg_bounds", boundaries=[1.0, -2.0])
    c = metrics.Counter("obs_checked", tag_keys=("route",))
    with pytest.raises(ValueError, match=r"Missing value for tag key\(s\): route\."):
        c.inc()
    with pytest.raises(ValueError, match="value must be >0, got 0"):
        c.inc(0, tags={"route": "/"})
    with pytest.raises(TypeError, match="value must be int or float"):
        c.inc("1", tags={"route": "/"})
    with pytest.raises(TypeError, match="Tag values must be str"):
        c.inc(1, tags={"route": 5})
    with pytest.raises(ValueError, match="Unrecognized tag key other"):
        c.set_default_tags({"other": "x"})
    assert c.set_default_tags({"route": "/home"}) is c
    assert c.info == {"name": "obs_checked", "description": "", "tag_keys": ("route",),
                      "default_tags": {"route": "/home"}}
    with pytest.raises(ValueError, match="already a counter"):
        metrics.Gauge("obs_checked")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        discarded = metrics.Gauge("0bad-name")
    assert any("Invalid metric name: 0bad-name" in str(w.message) for w in caught)
    discarded.set(1.0)  # recorded nowhere, as in Ray
    assert "0bad-name" not in metrics._registry.series


def test_metrics_index_slots_stay_dense_under_races():
    """Processes claim the first free index slot; a slot taken between the search and
    the claim moves the claimer on, so readers (who stop at the first gap) see all."""
    kv = {}

    def found(key):
        return key in kv

    def put_new(key):
        if key in kv:
            return False
        kv[key] = b"x"
        return True

    assert [metrics.claim_slot(found, put_new) for _ in range(37)] == list(range(37))
    stolen = {"done": False}

    def racing_put(key):  # another process takes the slot we found, once
        if not stolen["done"]:
            stolen["done"] = True
            kv[key] = b"other"
            return False
        return put_new(key)

    assert metrics.claim_slot(found, racing_put) == 38
    assert sorted(int(k.split(b"/")[1]) for k in kv) == list(range(39))
    records = {metrics.INDEX_PREFIX + str(i).encode(): f"proc/{i}".encode() for i in range(3)}
    records[b"proc/0"] = json.dumps({"pid": 1, "metrics": []}).encode()
    records[b"proc/2"] = json.dumps({"pid": 3, "metrics": []}).encode()
    assert [r["pid"] for r in metrics.stored_records(records.get)] == [1, 3]


def test_timeline_events_pair_each_end_with_its_start():
    rec = {"task_id": "ab", "name": "f", "func_or_class_name": "f", "node_ip": "10.0.0.1",
           "worker_id": "cd", "attempt_number": 1}
    # attempt 0 ran and its worker died (no end); attempt 1 ran and finished
    states = [PENDING_NODE_ASSIGNMENT, RUNNING, PENDING_NODE_ASSIGNMENT, RUNNING, RUNNING,
              FINISHED]
    times = [1.0, 2.0, 3.0, 4.0, 4.5, 6.0]
    (event,) = task_trace_events(rec, states, times)
    assert event["ts"] == 4.5e6 and event["dur"] == 1.5e6
    assert (event["pid"], event["tid"], event["ph"]) == ("10.0.0.1", "worker:cd", "X")
    assert task_trace_events(rec, [PENDING_NODE_ASSIGNMENT, FAILED], [1.0, 2.0]) == []
    assert task_trace_events(rec, [RUNNING], [1.0]) == []


# -- timeline ----------------------------------------------------------------------------------------
@ray.remote
def traced(seconds):
    time.sleep(seconds)
    return os.getpid()


@ray.remote
def traced_failure():
    raise ValueError("timeline boom")


def test_timeline_has_one_event_per_finished_task(cluster, tmp_path):
    before = time.time()
    refs = [traced.options(name="tl_task").remote(0.05) for _ in range(4)]
    pids = ray.get(refs, timeout=60)
    bad = traced_failure.options(name="tl_fail", max_retries=0).remote()
    with pytest.raises(ValueError):
        ray.get(bad, timeout=60)
    after = time.time()
    ids = {r.task_id().hex() for r in refs}

    def ours():
        events = ray.timeline()
        mine = [e for e in events if e["args"]["task_id"] in ids | {bad.task_id().hex()}]
        return events if len(mine) == 5 else None

    wait_for(ours, 20, message="5 timeline events for our tasks")
    path = tmp_path / "timeline.json"
    assert ray.timeline(filename=str(path)) is None
    events = json.loads(path.read_text())
    assert isinstance(events, list)
    done = [e for e in events if e["args"]["task_id"] in ids]
    assert sorted(e["args"]["task_id"] for e in done) == sorted(ids), "one event per task"
    node_ip = list_nodes()[0]["node_ip"]
    for e in done:
        assert e["ph"] == "X" and e["name"] == "task::tl_task"
        assert e["cat"] == f"task::{e['args']['func_or_class_name']}"
        assert e["pid"] == node_ip
        assert e["tid"].startswith("worker:") and len(e["tid"]) > len("worker:")
        assert before * 1e6 <= e["ts"] <= after * 1e6, (before, e["ts"], after)
        assert 0.04e6 <= e["dur"] <= (after - before) * 1e6, e["dur"]
        assert e["args"]["worker_pid"] in pids and e["args"]["state"] == "FINISHED"
    (failed,) = [e for e in events if e["args"]["task_id"] == bad.task_id().hex()]
    assert failed["args"]["state"] == "FAILED" and failed["cname"] == "terrible"
    assert failed["args"]["error_type"]


# -- metrics read back through the state API -----------------------------------------------------
@ray.remote
def record_in_task(route):
    from runtime.util.metrics import Counter, Histogram

    requests = Counter("obs_requests", "requests served", tag_keys=("route",))
    requests.inc(tags={"route": route})
    requests.inc(2, tags={"route": route})
    latency = Histogram("obs_latency_s", "latency", boundaries=[0.1, 1.0],
                        tag_keys=("route",)).set_default_tags({"route": route})
    for v in (0.05, 0.5, 0.7, 5.0):
        latency.observe(v)
    return os.getpid()


@ray.remote
class MetricActor:
    def __init__(self):
        from runtime.util.metrics import Gauge

        self.depth = Gauge("obs_queue_depth", "items waiting", tag_keys=("queue",))

    def set(self, value):
        self.depth.set(value, tags={"queue": "jobs"})
        return os.getpid()


def metric_rows(name):
    return list_metrics(filters=[("name", "=", name)])


def test_metrics_from_a_task_and_an_actor_are_readable(cluster, actors):
    task_pid = ray.get(record_in_task.remote("/home"), timeout=60)
    a = MetricActor.remote()
    actors.append(a)
    ray.get(a.set.remote(3), timeout=60)
    actor_pid = ray.get(a.set.remote(7), timeout=60)
    driver = metrics.Counter("obs_driver_events", "driver side", tag_keys=("kind",))
    driver.inc(tags={"kind": "start"})

    rows = wait_for(lambda: [r for r in metric_rows("obs_requests") if r["pid"] == task_pid
                             and r["value"] == 3.0], 20, message="the task's counter")
    (req,) = rows
    assert req["type"] == "COUNTER" and req["tags"] == {"route": "/home"}
    assert req["description"] == "requests served"
    assert req["node_id"] == ray.get_runtime_context().get_node_id()

    (lat,) = wait_for(lambda: [r for r in metric_rows("obs_latency_s")
                               if r["pid"] == task_pid and r["count"] == 4], 20,
                      message="the task's histogram")
    assert lat["type"] == "HISTOGRAM" and lat["tags"] == {"route": "/home"}
    assert lat["boundaries"] == [0.1, 1.0] and lat["buckets"] == [1, 2, 1]
    assert lat["sum"] == pytest.approx(6.25)

    (gauge,) = wait_for(lambda: [r for r in metric_rows("obs_queue_depth")
                                 if r["pid"] == actor_pid and r["value"] == 7.0], 20,
                        message="the actor's gauge at its last value")
    assert gauge["type"] == "GAUGE" and gauge["tags"] == {"queue": "jobs"}

    (mine,) = wait_for(lambda: [r for r in metric_rows("obs_driver_events")
                                if r["pid"] == os.getpid()], 20, message="the driver's counter")
    assert mine["value"] == 1.0 and mine["tags"] == {"kind": "start"}
    assert metrics.flush() is True
    listed = StateApiClient().list("metrics", ListApiOptions(
        filters=[("name", "=", "obs_driver_events")]))
    assert [r["pid"] for r in listed] == [os.getpid()]


_EXITING_DRIVER = """
import os, sys
import runtime as ray
from runtime.util.metrics import Counter
ray.init(address=sys.argv[1])
c = Counter("obs_exit_flush", tag_keys=("step",))
c.inc(tags={"step": "a"})   # pushed at once (the first change)
c.inc(41, tags={"step": "a"})  # within the report interval: only exit pushes it
print(os.getpid(), flush=True)
"""


def test_a_driver_pushes_its_last_metrics_at_exit(cluster, tmp_path):
    with open(os.path.join(cluster.address_info["session_dir"], "token")) as fh:
        token = fh.read().strip()
    env = scrubbed_env(NODE_AGENT_TOKEN=token, RUNTIME_SESSION_ROOT=str(tmp_path / "root"),
                       RUNTIME_METRICS_REPORT_INTERVAL_S="600")
    proc = subprocess.run([sys.executable, "-c", _EXITING_DRIVER,
                           cluster.address_info["gcs_address"]], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    pid = int(proc.stdout.split()[0])
    (row,) = [r for r in metric_rows("obs_exit_flush") if r["pid"] == pid]
    assert row["value"] == 42.0 and row["tags"] == {"step": "a"}


# -- logs -------------------------------------------------------------------------------------------
@ray.remote
class Talker:
    def say(self, text):
        print(text, flush=True)
        return os.getpid()


@ray.remote
def say(text):
    print(text, flush=True)
    return os.getpid()


def log_text(**kw) -> str:
    try:
        return "".join(get_log(**kw))
    except FileNotFoundError:  # the task's record has not reached the GCS yet
        return ""


def test_list_logs_shows_raylet_gcs_and_worker_logs(cluster):
    ray.get(say.remote("warm up a worker"), timeout=60)
    node = list_nodes()[0]
    logs = list_logs(node_id=node["node_id"])
    assert "raylet.log" in logs["raylet"] and "gcs.log" in logs["gcs_server"], logs
    assert logs["worker_out"] and all(n.startswith("worker-") for n in logs["worker_out"])
    by_ip = list_logs(node_ip=node["node_ip"])
    assert (by_ip["raylet"], by_ip["gcs_server"]) == (logs["raylet"], logs["gcs_server"])
    assert set(logs["worker_out"]) <= set(by_ip["worker_out"])  # workers may start meanwhile
    assert set(list_logs(node_id=node["node_id"], glob_filter="worker-*")) == {"worker_out", "worker_err"}
    with pytest.raises(ValueError, match="node_id or node_ip"):
        list_logs()
    with pytest.raises(ValueError, match="no node"):
        list_logs(node_id="ab" * 28)


def test_get_log_of_an_actor_a_task_a_pid_and_a_file(cluster, actors):
    node = list_nodes()[0]
    talker = Talker.remote()
    actors.append(talker)
    actor_line = f"actor says {uuid.uuid4().hex}"
    actor_pid = ray.get(talker.say.remote(actor_line), timeout=60)
    lines = list(get_log(actor_id=talker._actor_id.hex()))
    assert f"{actor_line}\n" in lines, lines[-5:]
    assert all(isinstance(line, str) and line.endswith("\n") for line in lines)

    task_line = f"task says {uuid.uuid4().hex}"
    ref = say.remote(task_line)
    task_pid = ray.get(ref, timeout=60)
    wait_for(lambda: task_line in log_text(task_id=ref.task_id().hex()), 20,
             message="the task's line in its log")
    assert task_line in log_text(node_id=node["node_id"], pid=task_pid)
    assert actor_line in log_text(node_ip=node["node_ip"], pid=actor_pid)

    last = list(get_log(actor_id=talker._actor_id.hex(), tail=1))
    assert last == [f"{actor_line}\n"]
    raw = list(get_log(actor_id=talker._actor_id.hex(), tail=1, encoding=None))
    assert raw == [f"{actor_line}\n".encode()]

    head = next(iter(get_log(node_id=node["node_id"], filename="raylet.log")))
    assert head.startswith("=== raylet started pid ")

    with pytest.raises(FileNotFoundError, match="no log file"):
        list(get_log(node_id=node["node_id"], filename="nope.log"))
    with pytest.raises(ValueError, match="refusing log file name"):
        list(get_log(node_id=node["node_id"], filename="../token"))
    with pytest.raises(ValueError, match="At least one of them is required"):
        list(get_log(node_id=node["node_id"]))
    with pytest.raises(ValueError, match="Only one of them"):
        list(get_log(node_id=node["node_id"], node_ip=node["node_ip"], filename="raylet.log"))
    with pytest.raises(ValueError, match="Invalid suffix"):
        list(get_log(actor_id=talker._actor_id.hex(), suffix="txt"))
    with pytest.raises(ValueError, match="not found"):
        list(get_log(actor_id="ab" * 16))


def test_get_log_follow_streams_new_lines(cluster, actors):
    talker = Talker.remote()
    actors.append(talker)
    ray.get(talker.say.remote("before following"), timeout=60)
    got: "queue.Queue[str]" = queue.Queue()
    later = f"later {uuid.uuid4().hex}"

    def follow():
        for line in get_log(actor_id=talker._actor_id.hex(), follow=True, tail=1,
                            _interval=0.1):
            got.put(line)
            if later in line:
                return  # closes the generator, which cancels the stream

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    # the last line already there comes first: the stream is open from then on
    assert got.get(timeout=30) == "before following\n"
    ray.get(talker.say.remote(later), timeout=60)
    assert got.get(timeout=30) == f"{later}\n"
    reader.join(10)
    assert not reader.is_alive()


# -- summaries, get_*, StateApiClient, cluster events ------------------------------------------
@ray.remote
class Summed:
    def ping(self):
        return os.getpid()


def test_summaries_have_rays_shapes(cluster, actors):
    group = [Summed.remote() for _ in range(2)]
    actors.extend(group)
    ray.get([g.ping.remote() for g in group], timeout=60)
    s = summarize_actors()
    assert set(s) == {"cluster"} and s["cluster"]["summary_by"] == "class"
    entry = s["cluster"]["summary"]["Summed"]
    assert entry == {"class_name": "Summed", "state_counts": {"ALIVE": 2}}
    assert s["cluster"]["total_actors"] >= 2

    ref = ray.put(b"x" * 300_000)
    o = summarize_objects()["cluster"]
    assert o["summary_by"] == "callsite" and o["callsite_enabled"] is False
    per = o["summary"]["disabled"]
    assert set(per) == {"total_objects", "total_size_mb", "total_num_workers",
                        "total_num_nodes", "task_state_counts", "ref_type_counts"}
    assert per["total_objects"] >= 1 and per["ref_type_counts"].get("LOCAL_REFERENCE", 0) >= 1
    assert o["total_objects"] >= 1 and o["total_size_mb"] >= 300_000 / 1024 ** 2
    assert StateApiClient().summary(SummaryResource.ACTORS)["cluster"]["summary"]["Summed"] \
        == entry
    del ref


def test_get_functions_return_the_record_or_none(cluster, actors):
    node_id = ray.get_runtime_context().get_node_id()
    assert get_node(node_id)["node_id"] == node_id
    assert get_node("00" * 28) is None

    ref = say.remote("for get_task")
    ray.get(ref, timeout=60)
    rec = wait_for(lambda: get_task(ref), 20, message="the task's record")
    assert rec["task_id"] == ref.task_id().hex() and rec.name == "say"
    assert get_task(ref.task_id().hex())["task_id"] == rec["task_id"]
    assert get_task("ff" * 24) is None

    job_id = ray.get_runtime_context().get_job_id()
    assert get_job(job_id)["job_id"] == job_id
    assert get_job("no-such-submission") is None

    w = [w for w in list_workers(limit=1000) if w["worker_id"]][0]
    assert get_worker(w["worker_id"])["pid"] == w["pid"]
    assert get_worker("ab" * 28) is None

    obj = ray.put("an object to get")
    (o,) = get_objects(obj.hex())
    assert o["object_id"] == obj.hex() and o["pid"] == os.getpid()
    assert get_objects("cd" * 28) == []

    pg = placement_group([{"CPU": 1}], name="obs-pg")
    try:
        assert pg.wait(30)
        p = get_placement_group(pg.id.hex())
        assert p["name"] == "obs-pg" and p["state"] == "CREATED"
        assert p["bundles"] == [{"bundle_id": {"placement_group_id": pg.id.hex(),
                                               "bundle_index": 0},
                                 "node_id": node_id, "unit_resources": {"CPU": 1.0}}]
    finally:
        remove_placement_group(pg)
    assert get_placement_group("ef" * 18) is None

    a = Summed.remote()
    actors.append(a)
    ray.get(a.ping.remote(), timeout=60)
    client = StateApiClient(address="auto")
    assert client.get(StateResource.ACTORS, a._actor_id.hex(),
                      GetApiOptions(timeout=10))["class_name"] == "Summed"
    assert client.get("nodes", node_id)["node_id"] == node_id
    alive = client.list(StateResource.ACTORS, ListApiOptions(
        filters=[("class_name", "=", "Summed"), ("state", "=", "ALIVE")]))
    assert a._actor_id.hex() in {r["actor_id"] for r in alive}
    with pytest.raises(ValueError, match="unsupported resource"):
        client.list("no_such_resource")
    with pytest.raises(ValueError, match="hex string"):
        get_actor("not hex")
    with pytest.raises(ValueError, match="cannot query"):
        list_nodes(address="127.0.0.1:1")

    events = list_cluster_events(limit=1000)
    assert events and set(events[0]) >= {"severity", "time", "source_type", "message",
                                         "event_id", "custom_fields"}


# -- logs of another node (last: stops the module's cluster) ------------------------------------
def test_logs_of_another_node_come_from_that_node(tmp_path):
    with cluster_with_nodes(str(tmp_path)) as (ctx, (second,)):
        here = NodeAffinitySchedulingStrategy(node_id=second.node_id.hex(), soft=False)
        talker = Talker.options(scheduling_strategy=here).remote()
        line = f"from the second node {uuid.uuid4().hex}"
        ray.get(talker.say.remote(line), timeout=60)
        assert line in "".join(get_log(actor_id=talker._actor_id.hex()))

        theirs = list_logs(node_ip="127.0.0.2")
        ours = list_logs(node_id=ctx.address_info["node_id"])
        assert "raylet.log" in theirs["raylet"] and "gcs_server" not in theirs, theirs
        assert "gcs.log" in ours["gcs_server"]
        (second_raylet,) = [n for n in list_nodes() if n["node_ip"] == "127.0.0.2"]
        head = next(iter(get_log(node_ip="127.0.0.2", filename="raylet.log")))
        assert head.startswith(f"=== raylet started pid {second_raylet['raylet_pid']} "), head
        ray.kill(talker)
