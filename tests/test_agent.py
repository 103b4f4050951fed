"""node-agent end to end: three "hosts" (agents on 127.0.0.1, .2 and .3) forming a
cluster, components killed with SIGKILL and restarted, the agent itself killed
and restarted, crash loops, join errors and the API's access rules.

The three-host cluster is module-scoped (starting it is most of the cost); its
tests run in file order and each leaves the cluster working for the next.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import time

import grpc
import psutil
import pytest

from agent_helpers import (Agent, Farm, alive_nodes, assert_driver_works, run_driver,
                           start_slow_driver, wait_for)
from runtime import rpc
from runtime.protocol import agent_pb2, agent_pb2_grpc


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    f = Farm(tmp_path_factory.mktemp("ag"))
    yield f
    f.cleanup()


@pytest.fixture(scope="module")
def cluster(farm):
    """Head on 127.0.0.1 started by `agentctl start --head` (which launches its
    agent in the background, as in a plain shell), a worker on 127.0.0.2 joined
    the same way, and an idle agent on 127.0.0.3 run directly as a daemon."""
    head = farm.agent("head", "127.0.0.1")
    out = head.ctl("start", "--head", "--node-ip", "127.0.0.1", "--port", str(head.ports["gcs"]),
                   "--json")
    assert out.returncode == 0, (out.stdout, out.stderr)
    started = json.loads(out.stdout)
    gcs = started["gcs_address"]
    token = started["token"]
    assert gcs == f"127.0.0.1:{head.ports['gcs']}"
    assert started["join_command"] == f"agentctl join {gcs} --token {token}"
    w2 = farm.agent("w2", "127.0.0.2")
    out = w2.ctl("join", gcs, "--token", token, "--node-ip", "127.0.0.2")
    assert out.returncode == 0, (out.stdout, out.stderr)
    w3 = farm.agent("w3", "127.0.0.3")
    w3.start_daemon()
    return {"head": head, "w2": w2, "w3": w3, "gcs": gcs, "token": token}


def _wait_three(c, timeout: float = 45) -> None:
    want = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    wait_for(lambda: alive_nodes(c["head"]) == want, timeout, message="three alive nodes")


def test_join_errors_then_third_host_joins(cluster, farm):
    w3: Agent = cluster["w3"]
    assert w3.status().role == "idle"
    # Wrong token: one clear error, quickly, and no retrying in the background.
    t0 = time.monotonic()
    bad = w3.ctl("join", cluster["gcs"], "--token", "not-the-token-" + "0" * 32, "--node-ip",
                 "127.0.0.3")
    assert bad.returncode != 0
    assert "authentication failed" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert time.monotonic() - t0 < 10
    st = w3.status()
    assert st.role == "idle" and not st.processes
    # Unreachable head: an error within the wait, and the agent keeps trying.
    nowhere = f"127.0.0.1:{farm.ports()['gcs']}"
    t0 = time.monotonic()
    unreachable = w3.ctl("join", nowhere, "--token", cluster["token"], "--node-ip", "127.0.0.3",
                         "--wait", "2")
    assert unreachable.returncode != 0
    assert "head unreachable" in unreachable.stderr, unreachable.stderr
    assert time.monotonic() - t0 < 10
    st = w3.status()
    assert st.role == "worker" and st.phase == "joining"
    assert st.message.startswith("joining: head unreachable: " + nowhere), st.message
    left = w3.ctl("leave")
    assert left.returncode == 0, left.stderr
    assert w3.status().role == "idle"
    # Now the real thing, with the token from a file.
    token_file = w3.dir / "token"
    token_file.write_text(cluster["token"] + "\n")
    ok = w3.ctl("join", cluster["gcs"], "--token-file", str(token_file), "--node-ip", "127.0.0.3")
    assert ok.returncode == 0, ok.stderr
    _wait_three(cluster)


def test_status_lists_all_three_hosts(cluster):
    _wait_three(cluster)
    head: Agent = cluster["head"]
    text = head.ctl("status")
    assert text.returncode == 0, text.stderr
    for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        assert ip in text.stdout
    assert "Nodes (3 alive" in text.stdout and "3 CPU" in text.stdout, text.stdout
    for component in ("gcs", "object_store", "raylet"):
        assert component in text.stdout
    data = head.ctl_json("status")
    assert data["role"] == "head" and data["gcs_address"] == cluster["gcs"]
    assert "token" not in data
    nodes = {n["ip"]: n for n in data["nodes"] if n["state"] == "ALIVE"}
    assert sorted(nodes) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    for n in nodes.values():
        assert len(n["id"]) == 56
        assert n["resources_total"]["CPU"] == 1.0
        assert "CPU" in n["resources_available"]
    procs = {p["component"]: p for p in data["processes"]}
    for component in ("gcs", "object_store", "raylet"):
        p = procs[component]
        assert p["state"] == "running" and psutil.pid_exists(p["pid"]) and p["restarts"] == 0
    # A worker host sees the same cluster and its own two components.
    w2 = cluster["w2"].ctl_json("status")
    assert w2["role"] == "worker"
    assert sorted(p["component"] for p in w2["processes"]
                  if p["supervised_by"] == "agent") == ["object_store", "raylet"]


def test_driver_gets_token_from_agent_or_env(cluster):
    _wait_three(cluster)
    rep = assert_driver_works(cluster["gcs"], token=cluster["token"])
    assert rep["alive"] == 3
    # address="auto" on an agent-run machine: GCS address and token from the local agent.
    assert_driver_works("auto", socket_path=cluster["head"].socket)
    # A worker host's agent knows the cluster too.
    assert_driver_works("auto", socket_path=cluster["w2"].socket)
    # A wrong token is one clear error at init().
    bad = run_driver(cluster["gcs"], token="wrong")
    assert bad.returncode != 0
    assert "AuthenticationError" in bad.stderr and "authentication failed" in bad.stderr


def test_socket_is_private_and_tcp_api_needs_the_token(cluster):
    head: Agent = cluster["head"]
    mode = os.stat(head.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    st = head.status()
    assert st.token == cluster["token"]  # the unix socket hands out the token
    assert st.api_address == f"127.0.0.1:{head.ports['agent']}"
    bare = grpc.insecure_channel(st.api_address)
    with pytest.raises(grpc.RpcError) as err:
        agent_pb2_grpc.NodeAgentStub(bare).Status(agent_pb2.StatusRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = rpc.sync_channel(st.api_address, "wrong")
    with pytest.raises(grpc.RpcError) as err:
        agent_pb2_grpc.NodeAgentStub(wrong).Leave(agent_pb2.LeaveRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    good = rpc.sync_channel(st.api_address, cluster["token"])
    remote = agent_pb2_grpc.NodeAgentStub(good).Status(agent_pb2.StatusRequest(), timeout=10)
    assert remote.role == "head" and len(remote.nodes) >= 3
    assert remote.token == ""  # never sent over the network
    for ch in (bare, wrong, good):
        ch.close()


def test_sigkill_worker_process(cluster):
    agents = [cluster["head"], cluster["w2"], cluster["w3"]]
    raylets = {a.name: a.process("raylet") for a in agents}
    driver = start_slow_driver(cluster["gcs"], cluster["token"])
    try:
        def leased():
            for a in agents:
                for p in a.status().processes:
                    if p.component.startswith("worker-") and p.state == "leased":
                        return p
            return None

        worker = wait_for(leased, 30, message="a worker running the driver's task")
        os.kill(worker.pid, signal.SIGKILL)
        out, err = driver.communicate(timeout=90)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, err[-3000:]
    # The task was retried on another worker; the raylet itself was not disturbed.
    assert json.loads(out)["pid"] != worker.pid
    for a in agents:
        after = a.process("raylet")
        assert (after.pid, after.restarts) == (raylets[a.name].pid, raylets[a.name].restarts)
    assert_driver_works(cluster["gcs"], token=cluster["token"])


def test_sigkill_object_store_restarts_it(cluster):
    head: Agent = cluster["head"]
    old = head.process("object_store")
    os.kill(old.pid, signal.SIGKILL)
    head.wait_restarted("object_store", old.pid)
    new = head.process("object_store")
    assert new.restarts == old.restarts + 1
    assert new.last_exit == "killed by signal SIGKILL"
    assert_driver_works(cluster["gcs"], token=cluster["token"])


def test_sigkill_raylet_restarts_it_as_a_new_node(cluster):
    head: Agent = cluster["head"]
    old = head.process("raylet")
    old_node = head.status().node_id
    os.kill(old.pid, signal.SIGKILL)
    head.wait_restarted("raylet", old.pid)
    st = head.status()
    assert st.node_id != old_node
    wait_for(lambda: {n.node_id: n.state for n in head.status().nodes}.get(old_node) == "DEAD",
             20, message="the old node to be reported dead")
    _wait_three(cluster)
    assert_driver_works(cluster["gcs"], token=cluster["token"])


def test_sigkill_gcs_restarts_it_and_raylets_register_again(cluster):
    head: Agent = cluster["head"]
    old = head.process("gcs")
    os.kill(old.pid, signal.SIGKILL)
    head.wait_restarted("gcs", old.pid)
    assert head.process("gcs").restarts == old.restarts + 1
    # Every raylet learns that the new GCS does not know it, exits, is restarted
    # by its agent and registers again.
    _wait_three(cluster, timeout=60)
    assert_driver_works(cluster["gcs"], token=cluster["token"])


def test_logs_command(cluster):
    head: Agent = cluster["head"]
    out = head.ctl("logs", "gcs", "-n", "5")
    assert out.returncode == 0, out.stderr
    assert 0 < len(out.stdout.splitlines()) <= 5
    unknown = head.ctl("logs", "nope")
    assert unknown.returncode != 0 and "no component 'nope' on this node" in unknown.stderr
    for name in ("gcs", "object_store", "raylet", "node-agent"):
        assert name in unknown.stderr, unknown.stderr
    own = head.ctl("logs", "node-agent", "-n", "50")
    assert own.returncode == 0 and "node-agent" in own.stdout, own.stderr


def _tail(stub: agent_pb2_grpc.NodeAgentStub, component: str) -> list:
    return [m.line for m in stub.TailLogs(agent_pb2.TailLogsRequest(component=component,
                                                                    lines=20), timeout=30)]


def test_tail_logs_reads_only_this_nodes_logs(cluster):
    """TailLogs takes a component name, never a path: names shaped like paths and
    unknown names are INVALID_ARGUMENT (naming the known ones), and a log that
    resolves outside the node's log directory is never read. Over the unix socket
    and over the TCP API alike."""
    head: Agent = cluster["head"]
    st = head.status()
    logs_dir = os.path.join(st.session_dir, "logs")
    secret = head.dir / "secret.log"
    secret.write_text("TOP SECRET\n")
    planted = os.path.join(logs_dir, "worker-deadbeef.out")
    os.symlink(secret, planted)
    tcp = rpc.sync_channel(st.api_address, cluster["token"])
    local = grpc.insecure_channel(f"unix:{head.socket}")
    try:
        for channel in (local, tcp):
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            assert _tail(stub, "gcs")  # a known component is served on both
            depth = os.path.relpath(head.dir, logs_dir)  # ../../../.. from the logs dir
            for name in (f"{depth}/secret", "gcs/../../../../secret", "..", "nope",
                         str(secret)[:-4]):
                with pytest.raises(grpc.RpcError) as err:
                    _tail(stub, name)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value)
                for known in ("gcs", "object_store", "raylet", "node-agent"):
                    assert known in err.value.details(), err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                _tail(stub, "worker-deadbeef")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
            assert "outside the node's log directory" in err.value.details()
            assert "TOP SECRET" not in err.value.details()
    finally:
        os.unlink(planted)
        tcp.close()
        local.close()


def test_agent_restart_restores_its_role(cluster):
    head: Agent = cluster["head"]
    agent_pid = head.pid()
    children = [p.pid for p in psutil.Process(agent_pid).children(recursive=True)]
    assert children
    os.kill(agent_pid, signal.SIGKILL)
    # Children never outlive the agent.
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status()
                             != psutil.STATUS_ZOMBIE for p in children), 15,
             message="the killed agent's children to exit")
    head.start_daemon()
    wait_for(lambda: head.status().role == "head" and head.status().phase == "running", 45,
             message="the head role to come back")
    assert head.status().gcs_address == cluster["gcs"]
    _wait_three(cluster, timeout=60)
    assert_driver_works(cluster["gcs"], token=cluster["token"])


def test_leave_drains_and_returns_to_idle(cluster):
    w3: Agent = cluster["w3"]
    node_id = w3.status().node_id
    pids = [p.pid for p in w3.status().processes if p.pid]
    out = w3.ctl("leave")
    assert out.returncode == 0, out.stderr
    st = w3.status()
    assert st.role == "idle" and not st.processes
    assert not os.path.exists(os.path.join(w3.state_dir, "token"))
    wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 10, message="w3's processes")
    states = {n.node_id: n.state for n in cluster["head"].status().nodes}
    assert states[node_id] == "DEAD"


def test_crash_loop_ends_in_failed_with_reason(tmp_path):
    farm = Farm(tmp_path)
    try:
        bad = farm.agent("c", "127.0.0.1", extra_config="""
[component_env.raylet]
RUNTIME_RESOURCE_REPORT_INTERVAL_S = "not-a-number"
""")
        out = bad.ctl("start", "--head", "--node-ip", "127.0.0.1")
        assert out.returncode != 0
        assert "raylet did not start" in out.stderr and "not-a-number" in out.stderr, out.stderr

        def failed():
            p = bad.process("raylet")
            return p if p is not None and p.state == "failed" else None

        p = wait_for(failed, 30, message="the raylet to be marked failed")
        assert p.restarts == 2 and p.pid == 0 and p.last_exit == "exit status 1"
        assert "crash loop: 3 exits" in p.failure_reason
        assert "ValueError: could not convert string to float: 'not-a-number'" in p.failure_reason
        st = bad.status()
        assert st.phase == "failed" and "raylet failed: crash loop" in st.message
        assert bad.process("gcs").state == "running"
        time.sleep(0.5)
        assert bad.process("raylet").restarts == 2  # no more restarts once failed
        stopped = bad.ctl("stop")
        assert stopped.returncode == 0, stopped.stderr
        wait_for(lambda: not os.path.exists(bad.socket), 15, message="the agent to exit")
    finally:
        farm.cleanup()


def test_worker_agent_restart_rejoins(tmp_path):
    """A worker whose agent is killed comes back as a worker of the same head."""
    farm = Farm(tmp_path)
    try:
        head = farm.agent("h", "127.0.0.1")
        head.start_daemon()
        r = head.ctl_json("start", "--head", "--node-ip", "127.0.0.1")
        w = farm.agent("w", "127.0.0.2")
        w.start_daemon()
        out = w.ctl("join", r["gcs_address"], "--token", r["token"], "--node-ip", "127.0.0.2")
        assert out.returncode == 0, out.stderr
        wait_for(lambda: alive_nodes(head) == ["127.0.0.1", "127.0.0.2"], 30,
                 message="two nodes")
        old_node = w.status().node_id
        w.daemon.kill()
        w.daemon.wait(10)
        w.start_daemon()
        wait_for(lambda: w.status().role == "worker" and w.status().phase == "running", 30,
                 message="the worker role to come back")
        new_node = w.status().node_id
        assert new_node != old_node
        wait_for(lambda: {n.node_id: n.state for n in head.status().nodes}.get(new_node)
                 == "ALIVE", 30, message="the restarted worker to register with the head")
    finally:
        farm.cleanup()
