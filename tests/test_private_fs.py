"""A machine with other users on it: session roots, token files and discovery.

Another local user can create names in /tmp before us, plant a session_latest, a
cluster.json or an agent socket. These tests plant each of those (as root, chown to
`nobody` plays the other user) and check that init() refuses to use the root with a
one-line UnsafePathError, and that init(address="auto") neither connects to a planted
GCS address nor asks a planted agent: a listener stands in for the planted endpoint
and must see no connection. They also check that a process running init()/shutdown()
in a loop does not pile up session directories.
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

import runtime as ray
from runtime import config, session
from runtime.private_fs import (UnsafePathError, check_private_dir, default_session_root,
                                ensure_private_dir)

from conftest import assert_all_gone, wait_for
from helpers.env import scrubbed_env

DRIVER = str(Path(__file__).resolve().parent / "scripts" / "driver.py")
NOBODY = 65534
TOKEN_ENVS = ("RUNTIME_ADDRESS", "NODE_AGENT_TOKEN", "NODE_AGENT_TOKEN_FILE",
              "RUNTIME_CLUSTER_TOKEN")
needs_root = pytest.mark.skipif(os.getuid() != 0,
                                reason="playing another user needs chown, i.e. running as root")


# -- helpers ----------------------------------------------------------------------------------
class Tripwire:
    """A listener standing in for a planted endpoint: counts every connection made to it
    (accepting and closing at once, so a client fails fast instead of timing out)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.listen(16)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tripwire", daemon=True)
        self._thread.start()

    @classmethod
    def tcp(cls) -> "Tripwire":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        return cls(s)

    @classmethod
    def unix(cls, path: str) -> "Tripwire":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        return cls(s)

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()
        return f"{host}:{port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if ready:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()

    def close(self) -> int:
        """Stop listening; the number of connections made, counting one still queued (a
        client's connect() completed before it returned, so nothing is missed)."""
        self._stop.set()
        self._thread.join(5)
        if select.select([self.sock], [], [], 0)[0]:
            self.connections += 1
        self.sock.close()
        return self.connections


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def discovery_log():
    """What runtime.session logs while discovering (the "runtime" logger does not
    propagate once init() configured it, so caplog would not see it)."""
    handler = Records()
    logger = logging.getLogger("runtime.session")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def no_ambient_cluster(monkeypatch, tmp_path):
    """No token from the environment, and no real node agent on this machine: the agent
    socket points at a path where nothing listens."""
    for name in TOKEN_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(session.AGENT_SOCKET_ENV, str(tmp_path / "no-agent" / "agent.sock"))


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def assert_one_line_naming(exc: BaseException, path, *words: str) -> None:
    msg = str(exc)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for word in words:
        assert word in msg, msg


def chown_tree(path: Path, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, uid)
    os.lchown(path, uid, uid)


# -- the session root -------------------------------------------------------------------------
def test_symlink_root_is_refused(fresh_runtime, tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafePathError) as ei:
        ray.init(num_cpus=1, _temp_dir=str(link))
    assert_one_line_naming(ei.value, link, "symlink")
    assert not ray.is_initialized()
    assert os.listdir(real) == []  # nothing was created through the link
    assert mode_of(real) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770])
def test_root_writable_by_others_is_refused(fresh_runtime, tmp_path, mode):
    root = tmp_path / "root"
    root.mkdir()
    os.chmod(root, mode)  # the test's own directory, set up as another user could leave it
    with pytest.raises(UnsafePathError) as ei:
        ray.init(num_cpus=1, _temp_dir=str(root))
    assert_one_line_naming(ei.value, root, "writable by", f"{mode:04o}")
    assert not ray.is_initialized()
    assert os.listdir(root) == []
    assert mode_of(root) == mode  # refused, not repaired: nothing chmods what it did not create


@needs_root
def test_root_owned_by_another_user_is_refused(fresh_runtime, tmp_path):
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    os.chown(root, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError) as ei:
        ray.init(num_cpus=1, _temp_dir=str(root))
    assert_one_line_naming(ei.value, root, f"owned by uid {NOBODY}")
    assert os.listdir(root) == []
    # A root under a directory of another user is refused too: they could swap it.
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o755)
    os.chown(foreign, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError) as ei:
        ray.init(num_cpus=1, _temp_dir=str(foreign / "root"))
    assert_one_line_naming(ei.value, foreign, f"owned by uid {NOBODY}")


def test_root_from_the_environment_is_checked_too(tmp_path, monkeypatch):
    root = tmp_path / "env-root"
    root.mkdir()
    os.chmod(root, 0o777)
    monkeypatch.setattr(config, "SESSION_ROOT", str(root))
    with pytest.raises(UnsafePathError) as ei:
        session.new_session_dir()
    assert_one_line_naming(ei.value, root, "writable by others")


def test_default_root_is_per_user_and_private(fresh_runtime, tmp_path, monkeypatch):
    """A driver started with nothing set (no RUNTIME_SESSION_ROOT, no _temp_dir) puts its
    session under $XDG_RUNTIME_DIR/runtime-cluster, everything private to its user."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    out = tmp_path / "driver.json"
    env = scrubbed_env(XDG_RUNTIME_DIR=str(xdg))
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen([sys.executable, DRIVER, str(out), "exit"], cwd=str(tmp_path),
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    pids = [proc.pid]
    try:
        assert proc.wait(120) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        rep = json.loads(out.read_text())
        pids += rep["pids"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert_all_gone([p for p in pids if psutil.pid_exists(p)])
    sd = rep["session_dir"]
    root = xdg / "runtime-cluster"
    assert os.path.dirname(sd) == str(root)
    assert mode_of(root) == 0o700 and mode_of(sd) == 0o700
    for name in ("token", "cluster.json"):
        st = os.lstat(os.path.join(sd, name))
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid(), name
        assert stat.S_IMODE(st.st_mode) == 0o600, name
    assert os.readlink(root / "session_latest") == os.path.basename(sd)

    # Without a private XDG_RUNTIME_DIR the default is /tmp/runtime-cluster-<uid>.
    per_user = f"/tmp/runtime-cluster-{os.getuid()}"
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert default_session_root() == per_user
    shared = tmp_path / "shared-xdg"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))
    assert default_session_root() == per_user
    assert session.user_agent_socket() == f"/tmp/node-agent-{os.getuid()}/agent.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert default_session_root() == str(root)
    assert session.user_agent_socket() == str(xdg / "node-agent" / "agent.sock")


def test_token_file_is_not_written_through_a_planted_symlink(tmp_path):
    sd = Path(session.new_session_dir(str(tmp_path / "root")))
    victims = {}
    for name in ("token", "cluster.json"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious")
        os.chmod(victim, 0o644)
        (sd / name).symlink_to(victim)
        victims[name] = victim
    session.write_cluster_file(str(sd), {"gcs_address": "127.0.0.1:1"}, "the-token")
    for name, victim in victims.items():
        assert victim.read_text() == "precious", name
        assert mode_of(victim) == 0o644, name
        st = os.lstat(sd / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, name
    assert (sd / "token").read_text() == "the-token"
    assert not [n for n in os.listdir(sd) if ".tmp." in n]  # no temporary names left over


def test_ensure_private_dir_checks_what_it_finds(tmp_path):
    made = ensure_private_dir(str(tmp_path / "a" / "b"))
    assert mode_of(made) == 0o700 and mode_of(tmp_path / "a") == 0o700
    assert check_private_dir(made) == made
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o775)
    with pytest.raises(UnsafePathError) as ei:
        ensure_private_dir(str(loose / "c"))  # the parent is checked as an ancestor
    assert_one_line_naming(ei.value, loose, "writable by its group")


def test_every_directory_of_a_session_is_private(fresh_runtime, tmp_path):
    """logs/, run/ (ready files) and the rest are 0700 whatever the umask: another user
    cannot even list which components a session runs."""
    root = tmp_path / "root"
    old_umask = os.umask(0o022)
    try:
        ray.init(num_cpus=1, _temp_dir=str(root))
    finally:
        os.umask(old_umask)
    (name,) = session_names(root)
    sd = root / name
    dirs = [Path(d) for d, _, _ in os.walk(sd)]
    assert {sd / "logs", sd / "run"} <= set(dirs), dirs
    loose = {str(d): f"{mode_of(d):04o}" for d in dirs if mode_of(d) != 0o700}
    assert not loose, loose


def test_ensure_private_dir_creates_nothing_under_a_refused_ancestor(tmp_path):
    """The ancestors are checked before anything is created: a refused path leaves no
    directory of ours behind in a place another user controls."""
    open_parent = tmp_path / "openparent"
    open_parent.mkdir()
    os.chmod(open_parent, 0o777)
    for target in (open_parent / "sub", open_parent / "sub" / "deeper"):
        with pytest.raises(UnsafePathError) as ei:
            ensure_private_dir(str(target))
        assert_one_line_naming(ei.value, open_parent, "writable by others")
        assert os.listdir(open_parent) == [], os.listdir(open_parent)


def test_agent_does_not_default_to_a_system_dir_others_can_write(tmp_path, monkeypatch):
    """A /run/node-agent (or /var/lib/node-agent) that someone made writable for all is
    not taken as the agent's default, even by a user who can write it: the per-user
    paths are used and the start-up notes say why."""
    from agent import config as agent_config

    run_dir, state_dir = tmp_path / "run-node-agent", tmp_path / "var-lib-node-agent"
    for d in (run_dir, state_dir):
        d.mkdir()
        os.chmod(d, 0o777)
    monkeypatch.setattr(agent_config, "SYSTEM_RUNTIME_DIR", str(run_dir))
    monkeypatch.setattr(agent_config, "SYSTEM_STATE_DIR", str(state_dir))
    for name in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "NODE_AGENT_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    paths = agent_config.resolve_paths(agent_config.AgentConfig())
    assert paths.socket == str(xdg / "node-agent" / "agent.sock")
    assert paths.state_dir == str(tmp_path / "xdg-state" / "node-agent")
    assert any(str(run_dir) in n and "writable by others" in n for n in paths.notes), paths.notes
    assert any(str(state_dir) in n and "writable by others" in n for n in paths.notes), paths.notes
    # Once private (ours, or root's), the system locations are the defaults again.
    os.chmod(run_dir, 0o755)
    os.chmod(state_dir, 0o700)
    paths = agent_config.resolve_paths(agent_config.AgentConfig())
    assert paths.socket == str(run_dir / "agent.sock") and paths.state_dir == str(state_dir)


# -- discovery: planted session files ---------------------------------------------------------
def plant_session(root: Path, gcs_address: str, token: str = "planted-token") -> Path:
    """A session dir as our own init() would leave it (private, ours), pointing at
    gcs_address; each test then spoils one thing about it."""
    root.mkdir(mode=0o700, exist_ok=True)
    sd = root / "session_2020-01-01_00-00-00_000000_4242"
    sd.mkdir(mode=0o700)
    (sd / "logs").mkdir(mode=0o700)
    for name, text in (("token", token), ("cluster.json", json.dumps(
            {"gcs_address": gcs_address, "node_id": "00" * 28, "session_dir": str(sd)}))):
        fd = os.open(sd / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    (root / "session_latest").symlink_to(sd.name)
    return sd


def _foreign_root(root: Path, sd: Path) -> str:
    chown_tree(root, NOBODY)
    os.chmod(root, 0o755)
    return f"owned by uid {NOBODY}"


def _shared_root(root: Path, sd: Path) -> str:
    os.chmod(root, 0o1777)
    return "writable by others"


def _latest_of_other(root: Path, sd: Path) -> str:
    os.lchown(root / "session_latest", NOBODY, NOBODY)
    return f"owned by uid {NOBODY}"


def _session_of_other(root: Path, sd: Path) -> str:
    chown_tree(sd, NOBODY)
    return f"owned by uid {NOBODY}"


def _cluster_json_of_other(root: Path, sd: Path) -> str:
    os.chown(sd / "cluster.json", NOBODY, NOBODY)
    return f"owned by uid {NOBODY}"


def _token_of_other(root: Path, sd: Path) -> str:
    os.chown(sd / "token", NOBODY, NOBODY)
    return f"owned by uid {NOBODY}"


def _cluster_json_is_symlink(root: Path, sd: Path) -> str:
    elsewhere = root.parent / "elsewhere.json"
    os.rename(sd / "cluster.json", elsewhere)
    (sd / "cluster.json").symlink_to(elsewhere)
    return "symlink"


def _latest_points_outside(root: Path, sd: Path) -> str:
    outside = root.parent / "outside"
    os.rename(sd, outside)
    os.unlink(root / "session_latest")
    (root / "session_latest").symlink_to(outside)
    return "points outside"


PLANTS = {
    "foreign-root": (_foreign_root, True),
    "root-writable-by-others": (_shared_root, False),
    "session_latest-of-other-user": (_latest_of_other, True),
    "session-dir-of-other-user": (_session_of_other, True),
    "cluster.json-of-other-user": (_cluster_json_of_other, True),
    "token-of-other-user": (_token_of_other, True),
    "cluster.json-is-symlink": (_cluster_json_is_symlink, False),
    "session_latest-points-outside-root": (_latest_points_outside, False),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_auto_does_not_connect_to_a_planted_session(fresh_runtime, tmp_path, no_ambient_cluster,
                                                     discovery_log, plant):
    spoil, as_root = PLANTS[plant]
    if as_root and os.getuid() != 0:
        pytest.skip("playing another user needs chown, i.e. running as root")
    gcs = Tripwire.tcp()
    try:
        root = tmp_path / "root"
        sd = plant_session(root, gcs.address)
        reason = spoil(root, sd)
        with pytest.raises(ConnectionError) as ei:
            ray.init(address="auto", _temp_dir=str(root))
        assert not ray.is_initialized()
    finally:
        connections = gcs.close()
    assert connections == 0, f"init(address='auto') connected to the planted GCS: {ei.value}"
    assert any(reason in line for line in discovery_log.lines), discovery_log.lines
    with pytest.raises(ConnectionError) as ei:
        session.require_running_cluster(str(root))
    assert_one_line_naming(ei.value, root, reason)


def test_auto_connects_to_an_unspoiled_session(fresh_runtime, tmp_path, no_ambient_cluster):
    """The control for the test above: the same planted session, all ours and private,
    is used, so the tripwire does see a connection when discovery trusts it."""
    gcs = Tripwire.tcp()
    try:
        plant_session(tmp_path / "root", gcs.address)
        with pytest.raises(ConnectionError):  # the tripwire is no GCS
            ray.init(address="auto", _temp_dir=str(tmp_path / "root"))
    finally:
        connections = gcs.close()
    assert connections >= 1


# -- discovery: planted agent sockets ---------------------------------------------------------
def _socket_of_other(sock_dir: Path, path: Path) -> str:
    os.chown(path, NOBODY, NOBODY)
    return f"owned by uid {NOBODY}"


def _socket_dir_writable(sock_dir: Path, path: Path) -> str:
    os.chmod(sock_dir, 0o777)
    return "writable by others"


def _socket_dir_of_other(sock_dir: Path, path: Path) -> str:
    os.chown(sock_dir, NOBODY, NOBODY)
    return f"owned by uid {NOBODY}"


def _socket_path_is_symlink(sock_dir: Path, path: Path) -> str:
    elsewhere = sock_dir.parent / "elsewhere.sock"
    os.rename(path, elsewhere)  # the listener stays bound to the moved socket
    os.symlink(elsewhere, path)
    return "symlink"


SOCKET_PLANTS = {
    "socket-of-other-user": (_socket_of_other, True),
    "socket-dir-writable-by-others": (_socket_dir_writable, False),
    "socket-dir-of-other-user": (_socket_dir_of_other, True),
    "socket-path-is-symlink": (_socket_path_is_symlink, False),
}


@pytest.mark.parametrize("plant", sorted(SOCKET_PLANTS) + ["control"])
def test_auto_does_not_ask_a_planted_agent(fresh_runtime, tmp_path, monkeypatch,
                                           no_ambient_cluster, discovery_log, plant):
    """$NODE_AGENT_SOCKET names a socket someone else could have bound: it is not even
    connected to. The control (our own socket in a private directory) is."""
    sock_dir = tmp_path / "agent"
    sock_dir.mkdir(mode=0o700)
    path = sock_dir / "agent.sock"
    agent = Tripwire.unix(str(path))
    reason = None
    try:
        if plant != "control":
            spoil, as_root = SOCKET_PLANTS[plant]
            if as_root and os.getuid() != 0:
                pytest.skip("playing another user needs chown, i.e. running as root")
            reason = spoil(sock_dir, path)
        monkeypatch.setenv(session.AGENT_SOCKET_ENV, str(path))
        with pytest.raises(ConnectionError):
            ray.init(address="auto", _temp_dir=str(tmp_path / "no-root"))
        assert not ray.is_initialized()
    finally:
        connections = agent.close()
    if plant == "control":
        assert connections >= 1
        return
    assert connections == 0, "the planted agent socket was connected to"
    assert any(reason in line and str(path) in line for line in discovery_log.lines), \
        discovery_log.lines
    with pytest.raises(ConnectionError) as ei:
        session.require_running_cluster(str(tmp_path / "no-root"))
    assert_one_line_naming(ei.value, path, reason)


# -- session directories do not pile up -------------------------------------------------------
def session_names(root: Path) -> list:
    return sorted(n for n in os.listdir(root) if n.startswith("session_2"))


def test_session_dirs_do_not_pile_up(fresh_runtime, tmp_path, monkeypatch):
    """20 init()/shutdown() cycles in one process leave the newest SESSIONS_KEPT finished
    sessions (plus the last), never a live session of another driver, never another
    user's directory."""
    monkeypatch.setattr(config, "SESSIONS_KEPT", 6, raising=False)
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    # A live cluster of another driver, older than everything this test makes.
    out = tmp_path / "driver.json"
    env = scrubbed_env(RUNTIME_SESSION_ROOT=str(root))
    with open(tmp_path / "driver.log", "w") as log:
        other = subprocess.Popen([sys.executable, DRIVER, str(out), "sleep"], cwd=str(tmp_path),
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
    other_pids = [other.pid]
    try:
        wait_for(lambda: out.exists() or other.poll() is not None, 90, message="the driver's report")
        assert out.exists(), (tmp_path / "driver.log").read_text()[-3000:]
        rep = json.loads(out.read_text())
        other_pids += rep["pids"]
        live_other = os.path.basename(rep["session_dir"])
        # A dead session of ours that is older still (its GCS pid is long gone), and one of
        # another user's: the first goes, the second is not ours to touch.
        stale = root / "session_2000-01-01_00-00-00_000000_999999999"
        stale.mkdir(mode=0o700)
        (stale / "cluster.json").write_text(json.dumps({"gcs_pid": 999999999}))
        foreign = root / "session_2000-01-01_00-00-00_000001_999999999"
        foreign.mkdir(mode=0o700)
        if os.getuid() == 0:
            os.chown(foreign, NOBODY, NOBODY)
        # One still starting: no cluster.json yet, made just now by a process that lives.
        starting = root / f"session_2000-01-01_00-00-00_000002_{other.pid}"
        starting.mkdir(mode=0o700)

        cycles = 20
        made = []
        for _ in range(cycles):
            ctx = ray.init(num_cpus=1, _temp_dir=str(root))
            sd = ctx.address_info["session_dir"]
            made.append(os.path.basename(sd))
            assert os.path.isdir(sd) and os.readlink(root / "session_latest") == made[-1]
            assert (root / live_other).is_dir(), "a live session of another driver was removed"
            ray.shutdown()

        # The newest SESSIONS_KEPT finished ones and the last one remain; the live session
        # of the other driver and the other user's directory are untouched; the rest went.
        left = session_names(root)
        expected = made[-(config.SESSIONS_KEPT + 1):] + [live_other, starting.name]
        if os.getuid() == 0:
            expected.append(foreign.name)
        assert sorted(left) == sorted(expected), left
        assert len(expected) < cycles
    finally:
        for pid in other_pids[:1]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        other.wait(30)
        assert_all_gone([p for p in other_pids if psutil.pid_exists(p)])
