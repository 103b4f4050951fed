"""Entrypoints on the node that holds their reservation: a head on 127.0.0.1 serving
the jobs API and a worker on 127.0.0.2 with a custom resource only it has.

A job with entrypoint_resources={"worker_only": 1} runs on the worker, started and
supervised there by the worker's agent at the head's request; its status, logs and
stop go through the head's API. The module's cluster is shared; the tests that kill
agents build a cluster of their own.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
import zipfile

import grpc
import psutil
import pytest

from agent.client import AgentClient
from agent.service import readonly_token
from agent_helpers import Farm, clean_env, wait_for
from helpers.jobs import http, join_worker, start_head, wait_status
from runtime import rpc
from runtime.protocol import agent_pb2, agent_pb2_grpc, gcs_pb2, gcs_pb2_grpc

WORKER_ONLY = {"worker_only": 1}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    farm = Farm(tmp_path_factory.mktemp("jobs2"))
    try:
        head, address, token = start_head(farm)
        worker = join_worker(farm, head, token, resources=WORKER_ONLY)
        yield {"head": head, "worker": worker, "address": address, "token": token,
               "farm": farm}
    finally:
        farm.cleanup()


def _submit(c, **body) -> str:
    code, reply = http(c["address"], "POST", "/api/jobs/", c["token"], body=body)
    assert code == 200, reply
    return reply["submission_id"]


def _job_processes(sid: str, cmdline: list) -> list:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if (p.info["cmdline"] == cmdline
                    and p.environ().get("RUNTIME_JOB_SUBMISSION_ID") == sid):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _package(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


WHERE = """
import json, os, stat, runtime as ray
ray.init()
@ray.remote
def square(x):
    return x * x
tf = os.environ["NODE_AGENT_TOKEN_FILE"]
print(json.dumps({"node": ray.get_runtime_context().get_node_id(),
                  "squares": ray.get([square.remote(i) for i in range(3)], timeout=60),
                  "address": os.environ["RUNTIME_ADDRESS"], "token_file": tf,
                  "mode": stat.S_IMODE(os.stat(tf).st_mode), "cwd": os.getcwd()}))
ray.shutdown()
"""


def test_entrypoint_runs_on_the_node_holding_its_resources(two):
    """The package is uploaded to the head and reaches the worker; the entrypoint runs
    there, its driver attaches to the worker's node, its token file is private and
    gone afterwards, and its log lives on the worker but reads through the head."""
    a, t = two["address"], two["token"]
    head, worker = two["head"].status(), two["worker"].status()
    name = "_ray_pkg_multinode0000000001.zip"
    assert http(a, "PUT", f"/api/packages/gcs/{name}", t,
                data=_package({"where.py": WHERE}))[0] == 200
    sid = _submit(two, entrypoint="python where.py", entrypoint_resources=WORKER_ONLY,
                  runtime_env={"working_dir": f"gcs://{name}"})
    info = wait_status(a, t, sid, ("SUCCEEDED", "FAILED"), timeout=90)
    logs = http(a, "GET", f"/api/jobs/{sid}/logs", t)[1]["logs"]
    assert info["status"] == "SUCCEEDED", (info, logs)
    assert info["driver_node_id"] == worker.node_id and info["driver_exit_code"] == 0
    assert logs.startswith(f"Running entrypoint for job {sid}: python where.py")
    seen = json.loads(logs.strip().splitlines()[-1])
    assert seen["node"] == worker.node_id != head.node_id
    assert seen["squares"] == [0, 1, 4]
    assert seen["address"] == head.gcs_address
    assert seen["mode"] == 0o600 and not os.path.exists(seen["token_file"])
    assert seen["token_file"].startswith(worker.session_dir + os.sep)
    assert seen["cwd"].startswith(worker.session_dir + os.sep) and seen["cwd"].endswith(
        name[:-len(".zip")])
    log_name = f"job-driver-{sid}.log"
    assert os.path.exists(os.path.join(worker.session_dir, "logs", log_name))
    assert not os.path.exists(os.path.join(head.session_dir, "logs", log_name))
    wait_for(lambda: two["head"].status().available.get("worker_only") == 1.0, 20,
             message="the entrypoint's reservation to be released")


def test_logs_follow_and_stop_reach_the_worker(two, tmp_path):
    """Following the logs through the head streams the worker's log; stop kills the
    whole process group there, and the job is STOPPED."""
    a, t = two["address"], two["token"]
    sid = _submit(two, entrypoint="echo begun; sleep 300 & sleep 300",
                  entrypoint_resources=WORKER_ONLY)
    wait_status(a, t, sid, ("RUNNING",), timeout=60)
    sleeps = wait_for(lambda: (lambda f: f if len(f) >= 2 else None)(
        _job_processes(sid, ["sleep", "300"])), 30, message="the job's two sleeps")
    worker_pid, head_pid = two["worker"].pid(), two["head"].pid()
    for p in sleeps:
        ancestors = {q.pid for q in p.parents()}
        assert worker_pid in ancestors and head_pid not in ancestors
    follower = subprocess.Popen(["agentctl", "job", "logs", "--socket", two["head"].socket,
                                 "-f", sid], stdout=subprocess.PIPE, text=True,
                                env=clean_env(), cwd=str(tmp_path))
    try:
        wait_for(lambda: "begun" in http(a, "GET", f"/api/jobs/{sid}/logs", t)[1]["logs"], 30,
                 message="the job's first line")
        assert http(a, "POST", f"/api/jobs/{sid}/stop", t)[1] == {"stopped": True}
        info = wait_status(a, t, sid, ("STOPPED",), timeout=60)
        _, alive = psutil.wait_procs(sleeps, timeout=20)
        assert not alive, f"the job's processes outlived its stop: {alive}"
        out, _ = follower.communicate(timeout=30)
    finally:
        follower.kill()
        follower.wait()
    assert "begun" in out and f"Job {sid} was stopped" in out
    assert info["driver_node_id"] == two["worker"].status().node_id


def test_failure_on_the_worker_has_exit_code_and_log_then_delete(two):
    a, t = two["address"], two["token"]
    sid = _submit(two, entrypoint="echo oops-from-the-worker; exit 3",
                  entrypoint_resources=WORKER_ONLY)
    info = wait_status(a, t, sid, ("FAILED", "SUCCEEDED"), timeout=60)
    assert info["status"] == "FAILED" and info["driver_exit_code"] == 3
    assert info["error_type"] == "JOB_ENTRYPOINT_COMMAND_ERROR"
    assert "oops-from-the-worker" in info["message"]
    log_path = os.path.join(two["worker"].status().session_dir, "logs", f"job-driver-{sid}.log")
    assert os.path.exists(log_path)
    assert http(a, "DELETE", f"/api/jobs/{sid}", t)[1] == {"deleted": True}
    wait_for(lambda: not os.path.exists(log_path), 20,
             message="the worker to delete the job's log")


def test_a_large_log_reads_whole_through_the_head(two):
    """A log of several MiB (more than one read of the node's log) comes back whole,
    in order, from GET .../logs."""
    a, t = two["address"], two["token"]
    code = ("import sys; w = sys.stdout.write; "
            "[w('%07d %s\\n' % (i, 'x' * 120)) for i in range(25000)]")
    sid = _submit(two, entrypoint=f'python -c "{code}"', entrypoint_resources=WORKER_ONLY)
    wait_status(a, t, sid, ("SUCCEEDED",), timeout=60)
    logs = http(a, "GET", f"/api/jobs/{sid}/logs", t)[1]["logs"]
    numbered = [line for line in logs.splitlines() if line[:7].isdigit()]
    assert len(logs) > 3_000_000
    assert [int(line[:7]) for line in numbered] == list(range(25000))


def test_job_process_rpcs_need_the_cluster_token(two):
    """The RPCs that start entrypoints take the full cluster token over TCP only (not
    the read-only token, not the unix socket) and start only what the GCS holds as a
    PENDING job whose reservation is on this node."""
    worker, token = two["worker"], two["token"]
    api = worker.status(local_only=True).api_address
    assert api == f"127.0.0.2:{worker.ports['agent']}"
    request = agent_pb2.StartJobProcessRequest(submission_id="forged-1",
                                               placement_group_id=b"\x01" * 18)
    marker = os.path.join(str(worker.dir), "forged-ran")

    def call(channel, method="StartJobProcess", req=request):
        try:
            return getattr(agent_pb2_grpc.NodeAgentStub(channel), method)(req, timeout=30)
        finally:
            channel.close()

    with pytest.raises(grpc.RpcError) as err:
        call(grpc.insecure_channel(api))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        call(rpc.sync_channel(api, readonly_token(token)))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with AgentClient(worker.socket) as c, pytest.raises(grpc.RpcError) as err:
        c.stub.StartJobProcess(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "TCP API" in err.value.details()
    for method, req in (("ReadJobLog", agent_pb2.ReadJobLogRequest(submission_id="x")),
                        ("StopJobProcess", agent_pb2.StopJobProcessRequest(submission_id="x"))):
        with pytest.raises(grpc.RpcError) as err:
            call(rpc.sync_channel(api, readonly_token(token)), method, req)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
    # the cluster token, but no such job in the GCS
    with pytest.raises(grpc.RpcError) as err:
        call(rpc.sync_channel(api, token))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "forged-1" in err.value.details()
    # a PENDING record written straight into the GCS, without a reservation here
    gcs_channel = rpc.sync_channel(two["head"].status().gcs_address, token)
    gcs = gcs_pb2_grpc.GcsStub(gcs_channel)
    job = gcs_pb2.SubmittedJob(submission_id="forged-1", status="PENDING",
                               entrypoint=f"touch {marker}")
    try:
        assert gcs.PutSubmittedJob(gcs_pb2.PutSubmittedJobRequest(job=job, create_only=True),
                                   timeout=10).ok
        with pytest.raises(grpc.RpcError) as err:
            call(rpc.sync_channel(api, token))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "reservation" in err.value.details()
        time.sleep(0.5)  # nothing may have been started that could still create it
        assert not os.path.exists(marker)
    finally:
        job.status = "FAILED"
        gcs.PutSubmittedJob(gcs_pb2.PutSubmittedJobRequest(job=job), timeout=10)
        gcs.DeleteSubmittedJob(gcs_pb2.SubmittedJobRequest(submission_id="forged-1"),
                               timeout=10)
        gcs_channel.close()


def test_node_death_fails_its_job_and_head_death_stops_remote_jobs(tmp_path):
    """Two workers. SIGKILL the first's raylet: that node is dead (its agent starts a new
    one), so its job is FAILED with Ray's JOB_SUPERVISOR_ACTOR_DIED and a message naming
    the node, and its process group, which outlived the raylet, is killed. Then SIGKILL
    the head's agent: the job on the second worker, whose agent lives on, is stopped
    there once nobody supervises it."""
    farm = Farm(tmp_path)
    try:
        head, a, t = start_head(farm)
        w1 = join_worker(farm, head, t, resources={"first": 1})
        w2 = join_worker(farm, head, t, "127.0.0.3", "worker2", resources={"second": 1})
        first = {"address": a, "token": t}
        s1 = _submit(first, entrypoint="sleep 301", entrypoint_resources={"first": 1})
        s2 = _submit(first, entrypoint="sleep 302", entrypoint_resources={"second": 1})
        wait_status(a, t, s1, ("RUNNING",), timeout=60)
        wait_status(a, t, s2, ("RUNNING",), timeout=60)
        p1 = wait_for(lambda: _job_processes(s1, ["sleep", "301"]), 30, message="job 1")
        p2 = wait_for(lambda: _job_processes(s2, ["sleep", "302"]), 30, message="job 2")
        dead = w1.status().node_id
        os.kill(w1.process("raylet").pid, signal.SIGKILL)
        info = wait_status(a, t, s1, ("FAILED",), timeout=60)
        assert info["error_type"] == "JOB_SUPERVISOR_ACTOR_DIED"
        assert f"node {dead[:8]} (127.0.0.2)" in info["message"], info
        assert "raylet" in info["message"], info
        _, alive = psutil.wait_procs(p1, timeout=20)
        assert not alive, "the job of a dead node still runs"
        assert http(a, "GET", f"/api/jobs/{s2}", t)[1]["status"] == "RUNNING"
        os.kill(head.pid(), signal.SIGKILL)
        _, alive = psutil.wait_procs(p2, timeout=60)
        assert not alive, "a job on a worker outlived the head's agent"
        assert w2.status(local_only=True).role == "worker"
    finally:
        farm.cleanup()
