"""agentctl against real agents: errors (no agent, port in use, bad flags), stop and
start again, the event stream, and the agent's configuration and paths."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading

import grpc
import pytest

from agent import config as agent_config
from agent.client import AgentClient
from agent_helpers import PY, REPO, Farm, clean_env, wait_for
from runtime.protocol import agent_pb2


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    f = Farm(tmp_path_factory.mktemp("ctl"))
    yield f
    f.cleanup()


@pytest.fixture(scope="module")
def agent(farm):
    """An idle agent run as a plain daemon on 127.0.0.1."""
    a = farm.agent("a", "127.0.0.1")
    a.start_daemon()
    return a


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agentctl: "), proc.stderr
    return lines[0]


def test_no_agent_running(tmp_path):
    sock = str(tmp_path / "none.sock")
    for args in (["status"], ["status", "--json"], ["leave"], ["stop"], ["logs"]):
        proc = subprocess.run([PY, "-m", "agent.cli", *args, "--socket", sock],
                              capture_output=True, text=True, env=clean_env(), cwd=str(REPO),
                              timeout=60)
        line = _one_line_error(proc)
        assert "no node-agent is running" in line and sock in line


def test_bad_flags_are_one_line_errors(agent):
    line = _one_line_error(agent.ctl("start", "--head", "--resources", "{not json"))
    assert "--resources must be a JSON object" in line
    line = _one_line_error(agent.ctl("start", "--head", "--resources", '{"CPU": 4}'))
    assert "--num-cpus" in line
    line = _one_line_error(agent.ctl("join", "127.0.0.1:1"))
    assert "token is required" in line
    line = _one_line_error(agent.ctl("join", "nonsense", "--token", "t"))
    assert "malformed address" in line
    line = _one_line_error(agent.ctl("start", "--head", "--node-ip", "10.255.255.1"))
    assert "not an address of this machine" in line
    assert agent.status().role == "idle"


def test_port_in_use_names_the_holder(agent):
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", agent.ports["gcs"]))
        holder.listen()
        line = _one_line_error(agent.ctl("start", "--head", "--node-ip", "127.0.0.1"))
    assert f"127.0.0.1:{agent.ports['gcs']}" in line
    assert f"port {agent.ports['gcs']} is held by pid {os.getpid()}" in line, line
    st = agent.status()
    assert st.role == "idle" and not st.processes


def test_stop_keep_agent_then_start_resumes_the_role(agent):
    started = agent.ctl_json("start", "--head", "--node-ip", "127.0.0.1", "--num-cpus", "2",
                             "--resources", '{"accel": 2}')
    assert started["gcs_address"] == f"127.0.0.1:{agent.ports['gcs']}"
    again = agent.ctl("start", "--head", "--node-ip", "127.0.0.1")
    assert "already runs a head node" in _one_line_error(again)
    nodes = agent.ctl_json("status")["nodes"]
    assert nodes[0]["resources_total"]["CPU"] == 2.0 and nodes[0]["resources_total"]["accel"] == 2
    stopped = agent.ctl_json("stop", "--keep-agent")
    assert stopped["role"] == "idle" and not stopped["agent_exiting"]
    st = agent.status()
    assert st.role == "idle" and not st.processes
    resumed = agent.ctl_json("start")
    assert resumed["role"] == "head"
    st = agent.status()
    assert st.role == "head" and st.gcs_address == started["gcs_address"]
    assert st.token == started["token"]  # the same cluster token
    wait_for(lambda: agent.ctl_json("status")["nodes"][-1]["resources_total"].get("accel") == 2,
             20, message="the options to be kept across stop/start")


def test_watch_events_reports_a_component_restart(agent):
    if agent.status().role != "head":
        agent.ctl_json("start", "--head", "--node-ip", "127.0.0.1")
    events = []
    with AgentClient(agent.socket) as c:
        stream = c.stub.WatchEvents(agent_pb2.WatchEventsRequest(), timeout=60)

        def read():
            try:
                for ev in stream:
                    events.append(ev)
            except grpc.RpcError:
                pass

        t = threading.Thread(target=read, daemon=True)
        t.start()
        wait_for(lambda: any(e.kind == "process" and e.subject == "object_store" for e in events),
                 10, message="the initial snapshot")
        old = agent.process("object_store").pid
        os.kill(old, 9)
        agent.wait_restarted("object_store", old)
        wait_for(lambda: any(e.kind == "process" and e.subject == "object_store"
                             and e.state == "running" and e.pid not in (0, old) for e in events),
                 10, message="a running event with the new pid")
        stream.cancel()
        t.join(5)
    seen = [(e.subject, e.state) for e in events if e.subject == "object_store"]
    assert ("object_store", "exited") in seen, seen


def test_config_file_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[ports]\ngcs = 'x'\n")
    proc = subprocess.run([PY, "-m", "agent.daemon", "--config", str(bad), "--state-dir",
                           str(tmp_path / "s"), "--socket", str(tmp_path / "s.sock")],
                          capture_output=True, text=True, env=clean_env(), cwd=str(REPO),
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"node-agent: {bad}: [ports] gcs must be an integer, got 'x'"
    with pytest.raises(agent_config.ConfigError, match="unknown key 'cpus' in \\[resources\\]"):
        agent_config.parse({"resources": {"cpus": 2}})
    with pytest.raises(agent_config.ConfigError, match="needs head_address"):
        agent_config.parse({"node": {"role": "worker"}})
    cfg = agent_config.parse({"resources": {"num_cpus": 4, "custom": {"accel": 2}},
                              "component_env": {"raylet": {"A": 1}}})
    assert cfg.resources.num_cpus == 4.0 and cfg.resources.custom == {"accel": 2.0}
    assert cfg.component_env == {"raylet": {"A": "1"}}


def test_paths_fall_back_to_per_user_dirs(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setattr(agent_config, "SYSTEM_STATE_DIR", str(blocker / "node-agent"))
    monkeypatch.setattr(agent_config, "SYSTEM_RUNTIME_DIR", str(blocker / "run"))
    for name in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "LOGS_DIRECTORY", "NODE_AGENT_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    paths = agent_config.resolve_paths(agent_config.AgentConfig())
    assert paths.state_dir == str(tmp_path / "xdg-state" / "node-agent")
    assert paths.socket == str(tmp_path / "node-agent" / "agent.sock")
    assert paths.log_dir == os.path.join(paths.state_dir, "logs")
    assert any("per-user state dir" in n for n in paths.notes)
    assert any("per-user socket" in n for n in paths.notes)
    # systemd's directories win over both.
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/node-agent")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/node-agent")
    monkeypatch.setenv("LOGS_DIRECTORY", "/var/log/node-agent")
    paths = agent_config.resolve_paths(agent_config.AgentConfig())
    assert (paths.state_dir, paths.socket, paths.log_dir) == (
        "/var/lib/node-agent", "/run/node-agent/agent.sock", "/var/log/node-agent")


def test_second_agent_on_the_same_state_dir_is_refused(agent):
    proc = subprocess.run([PY, "-m", "agent.daemon", "--state-dir", agent.state_dir, "--socket",
                           agent.socket + ".2", "--config", agent.config], capture_output=True,
                          text=True, env=clean_env(), cwd=str(REPO), timeout=60)
    assert proc.returncode == 1
    assert f"another node-agent (pid {agent.pid()}) is using state dir" in proc.stderr
    proc = subprocess.run([PY, "-m", "agent.daemon", "--state-dir", agent.state_dir + "-2",
                           "--socket", agent.socket, "--config", agent.config],
                          capture_output=True, text=True, env=clean_env(), cwd=str(REPO),
                          timeout=60)
    assert proc.returncode == 1
    assert "another node-agent is already serving on" in proc.stderr
    assert json.loads(agent.ctl("status", "--json").stdout)["agent_pid"] == agent.pid()


def test_running_logs_are_rotated_by_copy_and_truncate(tmp_path, monkeypatch):
    from agent import host

    monkeypatch.setattr(host, "LOG_MAX_BYTES", 1000)
    log = tmp_path / "raylet.log"
    with open(log, "a") as writer:  # a component keeps its log open with O_APPEND
        writer.write("x" * 1500 + "\n")
        writer.flush()
        host.rotate_logs(str(tmp_path))
        assert (tmp_path / "raylet.log.1").stat().st_size == 1501
        assert log.stat().st_size == 0
        writer.write("after\n")
        writer.flush()
    assert log.read_text() == "after\n"  # written at the new end, no hole
    (tmp_path / "small.log").write_text("y")
    host.rotate_logs(str(tmp_path))
    assert not (tmp_path / "small.log.1").exists()
