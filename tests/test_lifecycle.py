"""Cluster lifecycle: init/shutdown, processes and logs, no orphans, attaching to a
running cluster, token authentication, init keywords and cluster introspection.

Every cluster runs on loopback with its session root under pytest's tmp_path
(``_temp_dir`` in this process, ``RUNTIME_SESSION_ROOT`` for driver subprocesses), so
"auto" never finds a cluster that some other test run started. Driver
subprocesses run tests/scripts/driver.py; every process they report is killed by
PID when the test ends, whatever happened.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest

import runtime as ray
from runtime.protocol import (common_pb2, core_worker_pb2, core_worker_pb2_grpc, gcs_pb2_grpc,
                              object_store_pb2_grpc, raylet_pb2_grpc)

from helpers.env import scrubbed_env
from helpers.gates import await_path, meet
from conftest import assert_all_gone, cluster_pids, wait_for

SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "driver.py")
COMPONENTS = ("runtime.gcs", "runtime.object_store", "runtime.raylet", "runtime.worker")


# -- helpers ----------------------------------------------------------------------------------
@ray.remote
def getpid():
    return os.getpid()


@ray.remote
def wait_file(path, value=None, timeout=60.0):
    await_path(path, timeout)
    return value


@ray.remote
def barrier(directory, parties, timeout=30.0):
    """Arrive, then wait until `parties` tasks arrived: they must run at the same time."""
    meet(directory, parties, timeout)
    return os.getpid()


def component_of(proc: psutil.Process) -> str | None:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return None
    for name in COMPONENTS:
        if name in cmd:
            return name
    return None


def session_processes(session_dir: str) -> dict:
    """{component module: [pids]} of our descendants whose command line names session_dir."""
    out: dict = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if any(session_dir in arg for arg in cmd):
            out.setdefault(component_of(p), []).append(p.pid)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_token(ctx) -> str:
    with open(os.path.join(ctx.address_info["session_dir"], "token")) as fh:
        return fh.read().strip()


class Drivers:
    """Driver subprocesses running tests/scripts/driver.py; all killed by PID at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.root = str(tmp_path / "root")
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.procs: list = []
        self.pids: set = set()

    def start(self, mode: str, address: str | None = None, token: str | None = None,
              root: str | None = None) -> subprocess.Popen:
        n = len(self.procs) + 1
        out, log = str(self.tmp / f"driver-{n}.json"), str(self.tmp / f"driver-{n}.log")
        # A user's plain environment: nothing of ours (no token, no PYTHONPATH; the
        # project is installed), only what this driver is meant to see.
        env = scrubbed_env(RUNTIME_SESSION_ROOT=root or self.root)
        if token is not None:
            env["NODE_AGENT_TOKEN"] = token
        argv = [sys.executable, SCRIPT, out, mode] + ([address] if address else [])
        with open(log, "w") as fh:
            proc = subprocess.Popen(argv, cwd=str(self.tmp), env=env, stdout=fh,
                                    stderr=subprocess.STDOUT)
        proc.out, proc.log = out, log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log_of(self, proc) -> str:
        try:
            return Path(proc.log).read_text()[-4000:]
        except OSError:
            return "(no log)"

    def report(self, proc, timeout: float = 60.0, expect_error: bool = False) -> dict:
        wait_for(lambda: os.path.exists(proc.out) or proc.poll() is not None, timeout,
                 message="the driver's report")
        if not os.path.exists(proc.out):
            pytest.fail(f"driver exited with {proc.returncode} without a report:\n"
                        f"{self.log_of(proc)}")
        with open(proc.out) as fh:
            data = json.load(fh)
        self.pids.update(data.get("pids", []))
        if not expect_error and "error_type" in data:
            pytest.fail(f"driver failed: {data['error_type']}: {data['error']}\n"
                        f"{data.get('traceback', '')}")
        return data

    def finish(self, proc, timeout: float = 60.0) -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"driver did not exit within {timeout}s:\n{self.log_of(proc)}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.pids:  # only processes of our sessions (a pid may have been reused)
            try:
                p = psutil.Process(pid)
                if str(self.tmp) in " ".join(p.cmdline()):
                    p.kill()
            except psutil.Error:
                pass


@pytest.fixture
def drivers(fresh_runtime, tmp_path):
    """Depends on fresh_runtime so that the drivers are gone before it checks for leftovers."""
    d = Drivers(tmp_path)
    yield d
    d.close()


@pytest.fixture
def gate(tmp_path):
    path = tmp_path / "gate"
    yield str(path)
    path.touch()


# -- init / shutdown ------------------------------------------------------------------------------
def test_init_starts_processes_with_logs_and_shutdown_stops_them(fresh_runtime, tmp_path):
    assert not ray.is_initialized()
    ctx = ray.init(_temp_dir=str(tmp_path))
    assert ray.is_initialized()
    sd = ctx.address_info["session_dir"]
    assert os.path.isdir(sd) and os.path.realpath(sd).startswith(os.path.realpath(tmp_path))
    latest = os.path.join(sd, "..", "session_latest")
    assert os.path.islink(latest)
    assert os.path.realpath(latest) == os.path.realpath(sd)

    procs = wait_for(lambda: (lambda m: m if all(c in m for c in COMPONENTS) else None)(
        session_processes(sd)), 30, message="gcs, object store, raylet and a worker")
    for name in ("runtime.gcs", "runtime.object_store", "runtime.raylet"):
        assert len(procs[name]) == 1, procs
        assert psutil.Process(procs[name][0]).ppid() == os.getpid()
    assert len(procs["runtime.worker"]) >= 1

    logs = os.path.join(sd, "logs")
    for name in ("gcs.log", "raylet.log", "object_store.log"):
        assert os.path.isfile(os.path.join(logs, name)), os.listdir(logs)
    wait_for(lambda: any(f.startswith("worker-") and f.endswith(".out") for f in os.listdir(logs)),
             10, message="a worker-*.out")
    assert ray.get(getpid.remote(), timeout=60) in procs["runtime.worker"] + [
        p for ps in session_processes(sd).values() for p in ps]

    pids = [p for ps in procs.values() for p in ps] + cluster_pids()
    ray.shutdown()
    assert not ray.is_initialized()
    assert_all_gone(pids)
    ray.shutdown()  # a second shutdown is a no-op
    assert not ray.is_initialized()


def test_default_init(fresh_runtime):
    ctx = ray.init()
    assert ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == float(os.cpu_count())
    assert ray.get(getpid.remote(), timeout=60) != os.getpid()
    assert os.path.isdir(ctx.address_info["session_dir"])


def test_init_return_value_and_context_manager(fresh_runtime, tmp_path):
    with ray.init(_temp_dir=str(tmp_path)) as ctx:
        info = ctx.address_info
        assert os.path.isfile(os.path.join(info["session_dir"], "token"))
        host, port = info["gcs_address"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert len(info["node_id"]) == 56 and int(info["node_id"], 16) >= 0
        assert ray.is_initialized()
        assert ray.get(getpid.remote(), timeout=60) != os.getpid()
        pids = cluster_pids()
        assert pids
    assert not ray.is_initialized()
    assert_all_gone(pids)


# -- no orphans ----------------------------------------------------------------------------------
def test_sigkilled_driver_leaves_no_processes(drivers):
    proc = drivers.start("sleep")
    rep = drivers.report(proc)
    pids = rep["pids"]
    names = {component_of(psutil.Process(pid)) for pid in pids}
    assert set(COMPONENTS) <= names, (names, drivers.log_of(proc))
    for pid in pids:
        assert rep["session_dir"] in " ".join(psutil.Process(pid).cmdline())
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert_all_gone(pids, timeout=5)


def test_interpreter_exit_without_shutdown_leaves_no_processes(drivers):
    proc = drivers.start("exit")
    rep = drivers.report(proc)
    started = {c for cmd in rep["cmdlines"] for c in COMPONENTS if c in cmd}
    assert started == set(COMPONENTS), rep["cmdlines"]
    assert drivers.finish(proc) == 0, drivers.log_of(proc)
    assert_all_gone(rep["pids"], timeout=5)


# -- attaching -------------------------------------------------------------------------------------
def test_auto_attaches_to_cluster_of_another_driver(drivers):
    first = drivers.start("sleep")
    rep1 = drivers.report(first)
    second = drivers.start("attach", "auto")
    rep2 = drivers.report(second)
    assert drivers.finish(second) == 0, (rep2, drivers.log_of(second))
    assert rep2["gcs_address"] == rep1["gcs_address"]
    assert rep2["node_id"] == rep1["node_id"]
    assert rep2["session_dir"] == rep1["session_dir"]
    assert rep2["task"]["node_id"] == rep1["node_id"]
    assert rep2["pids"] == []  # attaching starts no processes of its own
    assert rep2["job_id"] != rep1["job_id"]
    # The second driver leaving does not stop the first one's cluster.
    with open(os.path.join(rep1["session_dir"], "cluster.json")) as fh:
        cluster = json.load(fh)
    assert psutil.pid_exists(cluster["gcs_pid"])
    for pid, cmd in zip(rep1["pids"], rep1["cmdlines"]):
        if "runtime.raylet" in cmd or "runtime.object_store" in cmd:
            assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, cmd
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert_all_gone(rep1["pids"], timeout=5)


def test_auto_attaches_to_cluster_of_this_process(drivers):
    ctx = ray.init(num_cpus=2, _temp_dir=drivers.root)
    proc = drivers.start("attach", "auto")
    rep = drivers.report(proc)
    assert drivers.finish(proc) == 0, (rep, drivers.log_of(proc))
    assert rep["gcs_address"] == ctx.address_info["gcs_address"]
    assert rep["node_id"] == ctx.address_info["node_id"]
    assert rep["task"]["node_id"] == ctx.address_info["node_id"]
    assert rep["task"]["pid"] not in (os.getpid(), rep["driver_pid"])  # ran on a worker
    # Our own driver still works after the other one left.
    assert ray.get(getpid.remote(), timeout=60) != os.getpid()


def test_auto_without_running_cluster_raises_connection_error(drivers, tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(ConnectionError):
        ray.init(address="auto", _temp_dir=str(empty))
    assert not ray.is_initialized()
    assert cluster_pids() == []
    # A root whose newest cluster has exited counts as no cluster too.
    proc = drivers.start("exit")
    drivers.report(proc)
    assert drivers.finish(proc) == 0
    with pytest.raises(ConnectionError):
        ray.init(address="auto", _temp_dir=drivers.root)
    assert not ray.is_initialized()


def test_attach_by_address_needs_the_right_token(drivers, tmp_path):
    ctx = ray.init(num_cpus=1, _temp_dir=drivers.root)
    gcs = ctx.address_info["gcs_address"]
    token = read_token(ctx)
    nowhere = str(tmp_path / "nowhere")  # no session files to borrow a token from
    ok = drivers.start("attach", gcs, token=token, root=nowhere)
    rep = drivers.report(ok)
    assert drivers.finish(ok) == 0, (rep, drivers.log_of(ok))
    assert rep["node_id"] == ctx.address_info["node_id"]
    assert rep["task"]["node_id"] == ctx.address_info["node_id"]

    bad = drivers.start("attach", gcs, token="x" + token, root=nowhere)
    rep = drivers.report(bad, expect_error=True)
    assert drivers.finish(bad) == 3, (rep, drivers.log_of(bad))
    assert rep["error_type"] == "AuthenticationError", rep
    assert "RayError" in rep["error_mro"]
    assert "authentication failed" in rep["error"].lower(), rep["error"]
    assert token not in rep["error"]
    # The cluster is unaffected by the rejected driver.
    assert ray.get(getpid.remote(), timeout=60) != os.getpid()


def test_dead_address_raises_connection_error(fresh_runtime, monkeypatch, tmp_path):
    assert issubclass(ray.exceptions.ClusterConnectionError, ConnectionError)
    monkeypatch.setenv("NODE_AGENT_TOKEN", "some-token")
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as ei:
        ray.init(address=f"127.0.0.1:{port}", _temp_dir=str(tmp_path))
    elapsed = time.monotonic() - t0
    assert elapsed < 15, f"took {elapsed:.1f}s to report an unreachable cluster"
    assert isinstance(ei.value, ray.exceptions.ClusterConnectionError)
    assert f"127.0.0.1:{port}" in str(ei.value)
    assert not ray.is_initialized()


def test_every_endpoint_requires_the_token(fresh_runtime, tmp_path):
    ctx = ray.init(num_cpus=1, _temp_dir=str(tmp_path))
    info = ctx.address_info
    sd = info["session_dir"]
    token = read_token(ctx)
    for name in ("token", "cluster.json"):
        mode = stat.S_IMODE(os.stat(os.path.join(sd, name)).st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    from runtime.core_worker.current import core_worker_or_none

    cw = core_worker_or_none()
    endpoints = [
        ("gcs", info["gcs_address"], gcs_pb2_grpc.GcsStub, "GetAllNodes", common_pb2.Empty()),
        ("raylet", info["raylet_address"], raylet_pb2_grpc.RayletStub, "GetNodeStats",
         common_pb2.Empty()),
        ("object store", info["object_store_address"], object_store_pb2_grpc.ObjectStoreStub,
         "Stats", common_pb2.Empty()),
        ("driver core worker", f"{cw.address[0]}:{cw.address[1]}",
         core_worker_pb2_grpc.CoreWorkerStub, "GetObjectStatus",
         core_worker_pb2.ObjectStatusRequest(object_ids=[b"\0" * 28], timeout_s=0.1)),
    ]
    for name, addr, stub_cls, method, request in endpoints:
        with grpc.insecure_channel(addr) as ch:
            call = getattr(stub_cls(ch), method)
            for metadata in (None, (("authorization", "Bearer wrong"),),
                             (("authorization", token),)):  # no "Bearer " prefix
                with pytest.raises(grpc.RpcError) as ei:
                    call(request, timeout=10, metadata=metadata)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED, \
                    (name, metadata, ei.value.code(), ei.value.details())
                assert "authentication failed" in (ei.value.details() or "")
            # The right token is accepted: the rejection above was about the token.
            call(request, timeout=10, metadata=(("authorization", f"Bearer {token}"),))


# -- init keywords -----------------------------------------------------------------------------------
def test_init_resources_keywords(fresh_runtime, tmp_path):
    ray.init(num_cpus=3, resources={"foo": 2}, _temp_dir=str(tmp_path))
    total = ray.cluster_resources()
    assert total["CPU"] == 3.0 and total["foo"] == 2.0
    wait_for(lambda: ray.available_resources().get("foo") == 2.0, 10, message="foo available")

    @ray.remote(resources={"foo": 2}, num_cpus=0)
    def uses_foo():
        return "ran"

    assert ray.get(uses_foo.remote(), timeout=60) == "ran"


def test_init_rejects_unknown_keyword(fresh_runtime):
    with pytest.raises(TypeError, match="bogus"):
        ray.init(bogus=1)
    assert not ray.is_initialized()
    assert cluster_pids() == []  # nothing was started


def test_init_accepts_ray_keywords_and_reinit(fresh_runtime, tmp_path):
    ctx = ray.init(num_cpus=1, namespace="ns", logging_level=logging.WARNING,
                   include_dashboard=False, _temp_dir=str(tmp_path))
    try:
        assert ray.get_runtime_context().namespace == "ns"
        again = ray.init(ignore_reinit_error=True)
        assert again.address_info["session_dir"] == ctx.address_info["session_dir"]
        with pytest.raises(RuntimeError, match="init"):
            ray.init()
        assert ray.is_initialized()
        assert ray.get(getpid.remote(), timeout=60) != os.getpid()
    finally:
        logging.getLogger("runtime").setLevel(logging.INFO)


# -- introspection ---------------------------------------------------------------------------------------
def test_nodes_resources_and_runtime_context(fresh_runtime, tmp_path, gate):
    ctx = ray.init(num_cpus=2, _temp_dir=str(tmp_path))
    nodes = ray.nodes()
    assert len(nodes) == 1
    n = nodes[0]
    for key in ("NodeID", "Alive", "NodeManagerAddress", "NodeManagerPort", "Resources"):
        assert key in n, n.keys()
    assert n["NodeID"] == ctx.address_info["node_id"]
    assert len(n["NodeID"]) == 56 and int(n["NodeID"], 16) >= 0
    assert n["Alive"] is True
    assert n["NodeManagerAddress"] == "127.0.0.1"
    assert isinstance(n["NodeManagerPort"], int)
    assert ctx.address_info["raylet_address"] == f"127.0.0.1:{n['NodeManagerPort']}"
    assert n["Resources"]["CPU"] == 2.0

    total = ray.cluster_resources()
    assert total["CPU"] == 2.0 and total["memory"] > 0 and total["object_store_memory"] > 0
    avail = wait_for(lambda: (lambda a: a if a.get("CPU") == 2.0 else None)(
        ray.available_resources()), 10, message="2 CPUs available")
    assert avail["memory"] > 0 and avail["object_store_memory"] > 0

    rc = ray.get_runtime_context()
    assert rc.get_node_id() == n["NodeID"]
    job = rc.get_job_id()
    assert isinstance(job, str) and len(job) == 8 and int(job, 16) >= 0
    assert job == ctx.address_info["job_id"]

    ref = wait_file.remote(gate, "done")
    wait_for(lambda: ray.available_resources().get("CPU", 0.0) == 1.0, 15,
             message="available CPU to drop to 1 while the task runs")
    Path(gate).touch()
    assert ray.get(ref, timeout=60) == "done"
    wait_for(lambda: ray.available_resources().get("CPU", 0.0) == 2.0, 15,
             message="available CPU to come back to 2")


def test_task_workers_match_num_cpus(fresh_runtime, tmp_path):
    ray.init(num_cpus=2, _temp_dir=str(tmp_path / "root"))
    # The first task runs without waiting for the whole pool.
    assert ray.get(getpid.remote(), timeout=60) != os.getpid()
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    pids = ray.get([barrier.remote(str(meeting), 2) for _ in range(2)], timeout=60)
    assert len(set(pids)) == 2, pids
    workers = {p.pid for p in psutil.Process().children(recursive=True)
               if component_of(p) == "runtime.worker"}
    assert set(pids) <= workers
