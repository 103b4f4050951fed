"""agentctl against real agents: errors (no agent, port in use, bad flags), stop and
start again, the event stream, and the agent's configuration and paths."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from concurrent import futures
from typing import List, Tuple

import grpc
import psutil
import pytest

from agent import config as agent_config
from agent.client import AgentClient
from agent_helpers import Farm, clean_env, wait_for
from runtime.protocol import agent_pb2

#: A well-formed token no cluster uses.
SOME_TOKEN = "0123456789abcdef" * 4
NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0,
                                reason="playing another user needs chown, i.e. running as root")


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
        proc = subprocess.run(["agentctl", *args, "--socket", sock],
                              capture_output=True, text=True, env=clean_env(), cwd=str(tmp_path),
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
    line = _one_line_error(agent.ctl("join", "nonsense", "--token", SOME_TOKEN))
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
    proc = subprocess.run(["node-agent", "--config", str(bad), "--state-dir",
                           str(tmp_path / "s"), "--socket", str(tmp_path / "s.sock")],
                          capture_output=True, text=True, env=clean_env(), cwd=str(tmp_path),
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
    proc = subprocess.run(["node-agent", "--state-dir", agent.state_dir, "--socket",
                           agent.socket + ".2", "--config", agent.config], capture_output=True,
                          text=True, env=clean_env(), cwd=str(agent.dir), timeout=60)
    assert proc.returncode == 1
    assert f"another node-agent (pid {agent.pid()}) is using state dir" in proc.stderr
    proc = subprocess.run(["node-agent", "--state-dir", agent.state_dir + "-2",
                           "--socket", agent.socket, "--config", agent.config],
                          capture_output=True, text=True, env=clean_env(), cwd=str(agent.dir),
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


# ---- cluster tokens: what the agent accepts, and where agentctl takes one from ----------


def test_bad_tokens_are_refused_by_agentctl(agent, tmp_path):
    """Too short, a space, a control or non-ASCII character: one line naming where the
    token came from and what is wrong, without repeating it; the agent's role does not
    change."""
    before = agent.status()
    short = "s3cr3t-but-short"
    line = _one_line_error(agent.ctl("join", "127.0.0.1:1", "--token", short))
    assert "from --token is 16 characters long" in line and "at least 32" in line, line
    assert short not in line
    line = _one_line_error(agent.ctl("start", "--head", "--token", short))
    assert "from --token is 16 characters long" in line, line
    line = _one_line_error(agent.ctl("join", "127.0.0.1:1", "--token", "é" * 40))
    assert "non-ASCII character (U+00E9) at position 1" in line, line
    line = _one_line_error(agent.ctl("join", "127.0.0.1:1", "--token", "a" * 20 + " " + "b" * 20))
    assert "a space (U+0020) at position 21" in line, line
    token_file = tmp_path / "token"
    token_file.write_text("a" * 31 + "\n")
    line = _one_line_error(agent.ctl("join", "127.0.0.1:1", "--token-file", str(token_file)))
    assert f"from {token_file} is 31 characters long" in line, line
    token_file.write_text("a" * 20 + "\x07" + "b" * 20 + "\n")
    line = _one_line_error(agent.ctl("join", "127.0.0.1:1", "--token-file", str(token_file)))
    assert "a control character (U+0007)" in line, line
    line = _one_line_error(agent.ctl("join", "127.0.0.1:1",
                                     env=clean_env(NODE_AGENT_TOKEN=short)))
    assert "from $NODE_AGENT_TOKEN is 16 characters long" in line, line
    line = _one_line_error(agent.ctl("join", "127.0.0.1:1", "--token", SOME_TOKEN,
                                     "--token-file", str(token_file)))
    assert "either --token or --token-file" in line
    st = agent.status()
    assert (st.role, st.gcs_address, st.node_id) == (before.role, before.gcs_address,
                                                     before.node_id)


def test_bad_tokens_are_refused_by_the_agent_api(agent):
    """The daemon checks too: a caller of the API is not necessarily agentctl."""
    before = agent.status()
    with AgentClient(agent.socket) as c:
        for call, request in (
                (c.stub.Join, agent_pb2.JoinRequest(head_address="127.0.0.1:1", token="short")),
                (c.stub.StartHead, agent_pb2.StartHeadRequest(token="ü" * 40))):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert "cluster token" in err.value.details()
    assert (agent.status().role, agent.status().node_id) == (before.role, before.node_id)


def test_join_takes_the_token_from_a_file_or_the_environment(farm):
    """--token-file and $NODE_AGENT_TOKEN both work, so the token need not be in argv."""
    head = farm.agent("tok-head", "127.0.0.1")
    started = head.ctl_json("start", "--head", "--node-ip", "127.0.0.1")
    token, gcs = started["token"], started["gcs_address"]
    # The agent agentctl launched passes no PYTHONPATH of its own to the cluster: the
    # project is installed, and user tasks must not find our source tree on their path.
    gcs_env = psutil.Process(head.process("gcs").pid).environ()
    assert "PYTHONPATH" not in gcs_env, gcs_env.get("PYTHONPATH")
    via_env = farm.agent("tok-env", "127.0.0.2")
    out = via_env.ctl("join", gcs, "--node-ip", "127.0.0.2",
                      env=clean_env(NODE_AGENT_TOKEN=token))
    assert out.returncode == 0, out.stderr
    via_file = farm.agent("tok-file", "127.0.0.3")
    token_file = via_file.dir / "cluster-token"
    token_file.write_text(token + "\n")
    out = via_file.ctl("join", gcs, "--node-ip", "127.0.0.3", "--token-file", str(token_file))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: sorted(n.node_ip for n in head.status().nodes if n.state == "ALIVE")
             == ["127.0.0.1", "127.0.0.2", "127.0.0.3"], 45, message="three alive nodes")
    for a in (via_env, via_file, head):
        assert a.ctl("stop").returncode == 0
    for a in (via_env, via_file, head):
        wait_for(lambda a=a: not os.path.exists(a.socket), 30, message=f"{a.name} to exit")


def test_agent_refuses_bad_tokens_from_its_config_and_state(farm):
    """A token_file in agent.toml, or a saved token, that is not a valid token: the
    agent starts, says what is wrong in its status, and runs nothing."""
    cfg_agent = farm.agent("tok-cfg", "127.0.0.1", extra_config="""
[node]
role = "worker"
head_address = "127.0.0.1:1"
token_file = "TOKEN_FILE"
""")
    token_file = cfg_agent.dir / "token.txt"
    token_file.write_text("tooshort\n")
    cfg_path = cfg_agent.config
    with open(cfg_path) as fh:
        text = fh.read().replace("TOKEN_FILE", str(token_file))
    with open(cfg_path, "w") as fh:
        fh.write(text)
    cfg_agent.start_daemon()
    st = wait_for(lambda: (lambda s: s if s.phase == "failed" else None)(cfg_agent.status()),
                  20, message="the agent to refuse its configured token")
    assert f"from {token_file} is 8 characters long" in st.message, st.message
    assert "token_file" in st.message and not st.processes

    saved = farm.agent("tok-saved", "127.0.0.1")
    os.makedirs(saved.state_dir, mode=0o700)
    with open(os.path.join(saved.state_dir, "state.json"), "w") as fh:
        json.dump({"role": "head", "options": {"node_ip": "127.0.0.1"}}, fh)
    with open(os.path.join(saved.state_dir, "token"), "w") as fh:
        fh.write("tooshort\n")
    saved.start_daemon()
    st = wait_for(lambda: (lambda s: s if s.phase == "failed" else None)(saved.status()),
                  20, message="the agent to refuse its saved token")
    assert "saved cluster token" in st.message and "8 characters long" in st.message, st.message
    assert not st.processes


# ---- private directories ----------------------------------------------------------------


def test_agent_refuses_a_socket_or_state_dir_others_can_write(tmp_path):
    """Whoever can write the socket's directory could put their socket in its place;
    whoever can write the state dir could read or replace the token."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    private = tmp_path / "private"
    proc = subprocess.run(["node-agent", "--state-dir", str(private / "state"), "--socket",
                           str(shared / "agent.sock")], capture_output=True, text=True,
                          env=clean_env(), cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 1
    assert f"{shared} is writable by others (mode 0777)" in proc.stderr, proc.stderr
    assert not (shared / "agent.sock").exists()
    proc = subprocess.run(["node-agent", "--state-dir", str(shared), "--socket",
                           str(private / "agent.sock")], capture_output=True, text=True,
                          env=clean_env(), cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 1
    assert "unsafe state dir" in proc.stderr and "writable by others" in proc.stderr, proc.stderr
    # What the agent creates itself is private from the start.
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700


# ---- agentctl never hands the token to an agent it cannot trust --------------------------


class FakeAgent:
    """A NodeAgent server standing in for one a local attacker planted: it answers
    every call (Status with the agent pid it is told to claim) and records each
    call's name and raw request bytes, so a test can tell whether the token reached it."""

    REPLIES = {"Status": agent_pb2.StatusReply, "Join": agent_pb2.JoinReply,
               "StartHead": agent_pb2.StartHeadReply, "StartNode": agent_pb2.NodeActionReply}

    def __init__(self, path: str, claimed_pid: int = 0) -> None:
        self.calls: List[Tuple[str, bytes]] = []
        self.claimed_pid = claimed_pid
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((self._Handler(self),))
        if not self.server.add_insecure_port(f"unix:{path}"):
            raise RuntimeError(f"cannot bind the fake agent to {path}")
        self.server.start()

    class _Handler(grpc.GenericRpcHandler):
        def __init__(self, fake: "FakeAgent") -> None:
            self.fake = fake

        def service(self, details):
            name = details.method.rsplit("/", 1)[-1]

            def handle(request: bytes, context) -> bytes:
                self.fake.calls.append((name, request))
                reply = self.fake.REPLIES.get(name, agent_pb2.NodeActionReply)()
                if name == "Status":
                    reply.role, reply.agent_pid = "idle", self.fake.claimed_pid
                if name == "Join":
                    reply.gcs_address, reply.node_id = "127.0.0.1:1", "f" * 56
                return reply.SerializeToString()
            return grpc.unary_unary_rpc_method_handler(handle)

    def names(self) -> List[str]:
        return [name for name, _ in self.calls]

    def saw_token(self, token: str) -> bool:
        return any(token.encode() in request for _, request in self.calls)

    def stop(self) -> None:
        self.server.stop(None).wait(10)


@pytest.fixture
def here(tmp_path):
    """Kills, by pid, every process whose command line names this test's directory
    (a node-agent agentctl launched), even when the test failed."""
    f = Farm(tmp_path)
    yield f
    f.cleanup()


def _token_file(tmp_path) -> str:
    path = tmp_path / "cluster-token"
    path.write_text(SOME_TOKEN + "\n")
    os.chmod(path, 0o600)
    return str(path)


PLANTED_DIRS = {  # name: (owner, mode, what the refusal says)
    "dir-of-another-user": (NOBODY, 0o755, f"owned by uid {NOBODY}"),
    "dir-writable-by-others": (0, 0o777, "writable by others (mode 0777)"),
    "world-writable-dir-of-another-user": (NOBODY, 0o777, f"owned by uid {NOBODY}"),
}


@needs_root
@pytest.mark.parametrize("plant", sorted(PLANTED_DIRS))
def test_join_and_start_do_not_send_the_token_to_a_planted_socket(tmp_path, here, plant):
    """Another local user made the agent's socket directory first (as anyone can with
    /tmp/node-agent-<uid>) and serves a fake NodeAgent in it: agentctl refuses the
    path at once, launches nothing and sends the fake no request, let alone the token."""
    owner, mode, problem = PLANTED_DIRS[plant]
    planted = tmp_path / "node-agent-planted"
    planted.mkdir()
    sock = planted / "agent.sock"
    fake = FakeAgent(str(sock))
    state_dir = tmp_path / "state"
    try:
        os.chown(sock, owner, owner)
        os.chown(planted, owner, owner)
        os.chmod(planted, mode)
        for args in (["join", "127.0.0.1:1"], ["start", "--head"]):
            proc = subprocess.run(
                ["agentctl", *args, "--token-file", _token_file(tmp_path), "--state-dir",
                 str(state_dir)], capture_output=True, text=True, timeout=90, cwd=str(tmp_path),
                env=clean_env(NODE_AGENT_SOCKET=str(sock)))
            line = _one_line_error(proc)
            assert f"cannot launch node-agent on {sock}" in line and str(planted) in line, line
            assert problem in line, line
    finally:
        fake.stop()
    assert fake.calls == [], fake.names()
    assert not state_dir.exists()  # nothing was launched


def test_launch_trusts_only_the_agent_it_started(tmp_path, here):
    """The socket's directory is ours and private, but while the agent agentctl
    launched starts up, another process of ours binds the socket (and claims, in its
    Status reply, to be that agent). agentctl checks who listens (the kernel's
    SO_PEERCRED pid), sees it is not the agent it started and sends it nothing; it
    reports both that and why its agent exited (the socket was taken)."""
    sock_dir = tmp_path / "agent"
    sock_dir.mkdir(mode=0o700)
    sock = sock_dir / "agent.sock"
    state_dir = tmp_path / "state"
    ctl = subprocess.Popen(
        ["agentctl", "join", "127.0.0.1:1", "--token-file", _token_file(tmp_path),
         "--socket", str(sock), "--state-dir", str(state_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
        env=clean_env())
    fake = None
    try:
        # Hold the launched agent still (SIGSTOP) while the stand-in binds its socket,
        # so the stand-in is there first whatever the machine's speed.
        launched = None
        deadline = time.monotonic() + 60
        while launched is None and time.monotonic() < deadline and ctl.poll() is None:
            launched = next((c for c in psutil.Process(ctl.pid).children()
                             if "agent.daemon" in " ".join(c.cmdline())), None)
            if launched is None:
                time.sleep(0.005)
        assert launched is not None, "agentctl launched no node-agent"
        launched.suspend()
        try:
            assert not sock.exists(), "the launched agent bound its socket before the stand-in"
            fake = FakeAgent(str(sock), claimed_pid=launched.pid)
        finally:
            launched.resume()
        out, err = ctl.communicate(timeout=90)
    finally:
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait(10)
        if fake is not None:
            fake.stop()
    assert ctl.returncode != 0, out
    announce, line = err.strip().splitlines()  # "starting one in the background", the error
    assert announce.startswith("no node-agent running; starting one"), err
    assert line.startswith("agentctl: "), err
    assert "another node-agent is already serving on" in line, line
    assert (f"{sock} is served by pid {os.getpid()} (uid {os.getuid()}), not by the node-agent "
            f"started here (pid {launched.pid})") in line, line
    assert "Join" not in fake.names() and "StartHead" not in fake.names(), fake.names()
    assert not fake.saw_token(SOME_TOKEN)


def test_start_right_after_stop_gets_a_new_agent(here):
    """`agentctl stop` ends an agent no service manager runs; a `start` right after must
    wait for it to go and launch a new one, not reach the exiting agent ("supervisor is
    closed")."""
    a = here.agent("s", "127.0.0.1")
    started = a.ctl_json("start", "--head", "--node-ip", "127.0.0.1")
    for _ in range(2):
        assert a.ctl("stop").returncode == 0
        out = a.ctl("start")
        assert out.returncode == 0, out.stderr
        st = a.status()
        assert st.role == "head" and st.gcs_address == started["gcs_address"]


def test_start_while_a_restarted_agent_restores_its_role(here):
    """A daemon restarted by hand restores its role while `agentctl start` arrives: the
    two never start two nodes side by side (the restore holds the operations lock), and
    the node ends up running with each component once. The restore is held up on purpose:
    its GCS port is busy (as when the old GCS is still on its way out) until the start
    has been sent."""
    a = here.agent("r", "127.0.0.1")
    a.start_daemon()
    a.ctl_json("start", "--head", "--node-ip", "127.0.0.1")
    a.daemon.send_signal(signal.SIGTERM)
    a.daemon.wait(60)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", a.ports["gcs"]))
    blocker.listen(1)
    try:
        a.start_daemon()  # serving; its restore waits for the GCS port
        starter = subprocess.Popen(
            ["agentctl", "start", "--socket", a.socket, "--state-dir", a.state_dir, "--config",
             a.config], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=clean_env(), cwd=str(a.dir))
        wait_for(lambda: any("StartNode requested" in line for line in _agent_log(a))
                 or starter.poll() is not None, 30, interval=0.05,
                 message="the start to reach the agent")
    finally:
        blocker.close()
    out, err = starter.communicate(timeout=90)
    assert starter.returncode == 0, err
    wait_for(lambda: a.status().phase == "running", 60, message="the node to run")
    names = sorted(p.component for p in a.status().processes if p.supervised_by == "agent")
    assert names == ["gcs", "object_store", "raylet"], names
    assert all(p.restarts == 0 for p in a.status().processes), a.status().processes


def _agent_log(a) -> list:
    try:
        with open(os.path.join(a.state_dir, "logs", "node-agent.log")) as fh:
            return fh.read().splitlines()
    except OSError:
        return []
