"""What the packaged agent relies on, checked without booting anything (these run on
any machine, as any user, except where a test says it needs root):

* the system agent's socket is reachable by its group, and clients trust it because
  only root can have made its directory (runtime.private_fs.system_dir_owner);
* agentctl's pieces for `up`: Ray's cluster YAML, ssh failures in one line, the token
  on standard input, `agentctl token`.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time

import pytest

from agent import client as agent_client
from agent import up
from agent_helpers import Farm, clean_env, wait_for
from runtime import private_fs
from runtime.private_fs import UnsafePathError

NOBODY = 65534


# ---- the agent's socket follows its directory --------------------------------------------


@pytest.mark.timeout(120)
def test_socket_is_group_usable_only_in_a_group_enterable_directory(tmp_path):
    farm = Farm(tmp_path)
    try:
        shared = farm.agent("shared", "127.0.0.1")
        sock_dir = tmp_path / "run-shared"
        sock_dir.mkdir(mode=0o750)
        os.chmod(sock_dir, 0o750)  # the admin's (systemd's RuntimeDirectoryMode) choice
        shared.socket = str(sock_dir / "agent.sock")
        shared.start_daemon()
        st = os.stat(shared.socket)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == os.getegid()

        private = farm.agent("private", "127.0.0.2")
        private.start_daemon()
        # its socket dir is the test's mkdir: 0755, open to everyone
        assert stat.S_IMODE(os.stat(os.path.dirname(private.socket)).st_mode) & 0o005
        assert stat.S_IMODE(os.stat(private.socket).st_mode) == 0o600
    finally:
        farm.cleanup()


# ---- who may serve in a system service directory -------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chowning to another user needs root")


@pytest.fixture
def nobody_dir():
    """A directory of nobody's in /tmp (where nobody can reach it, unlike pytest's
    tmp_path under root's private /tmp/pytest-of-root)."""
    path = tempfile.mkdtemp(prefix="na-trust-", dir="/tmp")
    os.chmod(path, 0o750)
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def service_dir(monkeypatch):
    """A directory like /run/node-agent: made by root in /run, owned by another user
    (nobody here, node-agent on a real host), 0750; registered as a service dir."""
    path = f"/run/na-trust-test-{os.getpid()}"
    os.mkdir(path, 0o750)
    os.chown(path, NOBODY, NOBODY)
    monkeypatch.setattr(private_fs, "SYSTEM_SERVICE_DIRS",
                        private_fs.SYSTEM_SERVICE_DIRS + (path,))
    yield path
    subprocess.run(["rm", "-rf", path], check=False)


def _serve_as(uid: int, path: str) -> subprocess.Popen:
    """A process of uid listening on the unix socket path (what an agent of that user is,
    to a client's SO_PEERCRED check)."""
    code = ("import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); "
            "s.listen(); print('ok', flush=True); time.sleep(60)")
    # Debian's python3: the test's own interpreter may live where uid cannot read.
    proc = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                             "/usr/bin/python3", "-c", code, path], stdout=subprocess.PIPE,
                            env=clean_env())
    assert proc.stdout.readline().strip() == b"ok"
    return proc


@needs_root
def test_the_owner_of_a_root_made_service_dir_is_trusted_there(service_dir, nobody_dir):
    assert private_fs.system_dir_owner(service_dir) == NOBODY
    sock = os.path.join(service_dir, "agent.sock")
    server = _serve_as(NOBODY, sock)
    try:
        assert private_fs.check_trusted_socket(sock) == sock
        assert NOBODY in private_fs.trusted_socket_uids(sock)
        assert agent_client.find_socket(sock) == sock  # SO_PEERCRED: uid 65534, trusted

        # The same user, the same socket, anywhere else: refused.
        elsewhere = os.path.join(nobody_dir, "agent.sock")
        other = _serve_as(NOBODY, elsewhere)
        try:
            assert private_fs.system_dir_owner(nobody_dir) is None
            with pytest.raises(agent_client.AgentNotRunning, match="owned by uid 65534"):
                agent_client.find_socket(elsewhere)
        finally:
            other.kill()
            other.wait()
    finally:
        server.kill()
        server.wait()


@needs_root
def test_a_service_dir_that_others_could_have_made_or_can_write_is_not_trusted(
        service_dir, monkeypatch, nobody_dir):
    # Group-writable: the group could put its own socket there.
    os.chmod(service_dir, 0o770)
    assert private_fs.system_dir_owner(service_dir) is None
    os.chmod(service_dir, 0o750)
    # Listed, but under /tmp: anyone can create names in a sticky directory.
    in_tmp = nobody_dir
    monkeypatch.setattr(private_fs, "SYSTEM_SERVICE_DIRS",
                        private_fs.SYSTEM_SERVICE_DIRS + (in_tmp,))
    assert private_fs.system_dir_owner(in_tmp) is None
    sock = os.path.join(in_tmp, "agent.sock")
    server = _serve_as(NOBODY, sock)
    try:
        with pytest.raises(UnsafePathError, match="owned by uid 65534"):
            private_fs.check_trusted_socket(sock)
    finally:
        server.kill()
        server.wait()


# ---- Ray's cluster YAML --------------------------------------------------------------------

RAY_FILE = {
    "cluster_name": "demo",
    "max_workers": 2,
    "provider": {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2", "node-3"]},
    "auth": {"ssh_user": "ubuntu"},
    "setup_commands": ["pip install -U ray"],
    "head_start_ray_commands": ["ray stop", "ray start --head --port=6379"],
    "file_mounts": {},
}


def test_a_ray_local_cluster_file_is_accepted_as_it_is():
    spec = up.parse_cluster_config(RAY_FILE, "c.yaml")
    assert (spec.name, spec.head_ip, spec.worker_ips) == ("demo", "10.0.0.1",
                                                           ["10.0.0.2", "node-3"])
    assert (spec.ssh_user, spec.ssh_port, spec.gcs_port) == ("ubuntu", 22, 6379)
    assert spec.head_address == "10.0.0.1:6379"
    # Ray's keys that the package replaces are named (empty ones are not worth a word).
    assert spec.ignored == ["max_workers", "setup_commands", "head_start_ray_commands"]


@pytest.mark.parametrize("change, message", [
    ({"provder": {}}, "unknown key 'provder'"),
    ({"provider": {"type": "aws"}}, 'provider.type must be "local"'),
    ({"provider": {"type": "local", "head_ip": "-oProxyCommand=sh"}},
     "not a host name or IP address"),
    ({"provider": {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.1"]}},
     "10.0.0.1 is listed twice"),
    ({"provider": {"type": "local", "head_ip": "10.0.0.1", "ssh_port": 0}},
     "provider.ssh_port must be a port number"),
    ({"auth": {"ssh_user": "ubuntu", "ssh_password": "x"}}, "unknown key auth.ssh_password"),
    ({"auth": {"ssh_user": "ubuntu", "ssh_private_key": "/nonexistent/key"}},
     "auth.ssh_private_key /nonexistent/key does not exist"),
    ({"auth": {"ssh_user": "-l root"}}, "auth.ssh_user must be a user name"),
])
def test_a_bad_cluster_file_is_one_line_naming_the_key(change, message):
    with pytest.raises(up.ClusterConfigError) as info:
        up.parse_cluster_config({**RAY_FILE, **change}, "c.yaml")
    assert message in str(info.value) and str(info.value).startswith("c.yaml: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("stderr, expected", [
    ("ssh: connect to host 10.0.0.9 port 22: Connection refused",
     "unreachable: nothing accepts ssh on 10.0.0.9 port 22 (connection refused)"),
    ("root@10.0.0.9: Permission denied (publickey).",
     "ssh refused the key for root@10.0.0.9"),
    ("ssh: connect to host 10.0.0.9 port 22: Connection timed out", "unreachable: 10.0.0.9"),
    ("Host key verification failed.", "ssh-keygen -R 10.0.0.9"),
])
def test_ssh_failures_become_one_line_saying_which_and_why(stderr, expected):
    line = up.describe_ssh_failure("10.0.0.9", "root", 22, stderr)
    assert expected in line and "\n" not in line


# ---- agentctl: the token over stdin, `agentctl token` --------------------------------------


def test_join_reads_the_token_from_standard_input(tmp_path):
    proc = subprocess.run(["agentctl", "join", "127.0.0.1:1", "--token-file", "-", "--socket",
                           str(tmp_path / "none.sock")], input="too-short\n", text=True,
                          capture_output=True, timeout=60, env=clean_env())
    assert proc.returncode == 1
    assert "the cluster token from standard input is 9 characters long" in proc.stderr, \
        proc.stderr


@pytest.mark.timeout(120)
def test_agentctl_token_prints_the_head_token_for_scripts(tmp_path):
    farm = Farm(tmp_path)
    try:
        head = farm.agent("head", "127.0.0.1")
        head.start_daemon()
        idle = head.ctl("token")
        assert idle.returncode == 1 and "no cluster token (role idle)" in idle.stderr
        started = head.ctl_json("start", "--head", "--node-ip", "127.0.0.1")
        wait_for(lambda: head.status().phase == "running", 60, message="the head to run")
        proc = head.ctl("token")
        assert proc.returncode == 0 and proc.stdout.strip() == started["token"], proc.stderr
        with open(os.path.join(head.state_dir, "token")) as fh:
            assert fh.read().strip() == started["token"]
    finally:
        farm.cleanup()


def test_up_refuses_a_missing_deb_before_connecting(tmp_path):
    key = tmp_path / "id"
    key.write_text("not a key")
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("cluster_name: t\nprovider: {type: local, head_ip: 127.0.0.1}\n"
                   f"auth: {{ssh_user: root, ssh_private_key: {key}}}\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        pytest.skip("PyYAML is not installed in this environment (the .deb bundles it)")
    t0 = time.monotonic()
    proc = subprocess.run(["agentctl", "up", str(cfg), "--deb", str(tmp_path / "no.deb")],
                          capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 1 and "--deb" in proc.stderr and "no such file" in proc.stderr
    assert time.monotonic() - t0 < 30
