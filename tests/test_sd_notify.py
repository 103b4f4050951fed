"""systemd integration: the notify protocol on a NOTIFY_SOCKET the test owns, the
watchdog gate, journald-style logging, and `systemd-analyze verify` of the unit."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import uuid

import psutil
import pytest

from agent.sdnotify import Notifier, WatchdogGate
from agent_helpers import PY, REPO, Farm, clean_env, wait_for
from runtime.supervisor import ProcessSpec, Supervisor


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(0.2)
    yield path, sock
    sock.close()


class Messages:
    """Everything received on the notify socket, as a list of datagrams."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.items: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.items.append(self.sock.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                return self.items

    def lines(self) -> list[str]:
        return [ln for item in self.poll() for ln in item.split("\n")]

    def wait_line(self, pred, timeout: float = 20.0, message: str = "a notify line") -> str:
        return wait_for(lambda: next((ln for ln in self.lines() if pred(ln)), None), timeout,
                        message=message)


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_datagrams(tmp_path, abstract):
    if abstract:
        name = "@node-agent-test-" + uuid.uuid4().hex
        bind = "\0" + name[1:]
    else:
        name = bind = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(bind)
        srv.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000"})
        assert n.enabled and n.watchdog_interval == 2.0
        assert n.ready("idle · no node")
        assert srv.recv(4096) == b"READY=1\nSTATUS=idle \xc2\xb7 no node"
        assert n.watchdog()
        assert srv.recv(4096) == b"WATCHDOG=1"
        assert n.stopping()
        assert srv.recv(4096) == b"STOPPING=1"


def test_notifier_without_systemd_is_a_noop(tmp_path):
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    assert n.ready() is False and n.watchdog() is False
    # WATCHDOG_PID naming another process means the watchdog is not ours to feed.
    other = Notifier({"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "1000000",
                      "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None
    # A socket nobody listens on is not an error.
    assert other.notify("READY=1") is False


def test_watchdog_gate_stops_pinging_when_the_monitor_hangs(tmp_path):
    """A stuck supervisor monitor (here: blocked in its on_exit callback) must stop
    the pings, so systemd restarts the agent."""
    entered, release = threading.Event(), threading.Event()

    def on_exit(proc, rc):
        entered.set()
        release.wait(30)

    sup = Supervisor(on_exit=on_exit, poll_interval=0.05)
    try:
        gate = WatchdogGate(sup.heartbeat, max_age_s=0.5)
        wait_for(lambda: gate.check() is None, 5, message="a fresh heartbeat")
        sup.spawn(ProcessSpec(name="quitter", argv=[PY, "-c", "raise SystemExit(3)"],
                              log_path=str(tmp_path / "quitter.log")))
        assert entered.wait(10)
        problem = wait_for(gate.check, 5, message="the gate to notice the hung monitor")
        assert "has not run for" in problem
        release.set()
        wait_for(lambda: gate.check() is None, 5, message="the monitor to recover")
    finally:
        release.set()
        sup.close()


def test_agent_speaks_the_notify_protocol(tmp_path, notify_socket):
    path, sock = notify_socket
    msgs = Messages(sock)
    farm = Farm(tmp_path)
    try:
        agent = farm.agent("n", "127.0.0.1")
        env = clean_env(NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000", JOURNAL_STREAM="8:1234")
        proc = agent.start_daemon(env=env)
        msgs.wait_line(lambda ln: ln == "READY=1", message="READY=1")
        first = msgs.poll()[0]
        assert first.startswith("READY=1\nSTATUS=idle"), first
        # WATCHDOG=1 every half WatchdogSec (0.5 s here), from the supervision loop.
        wait_for(lambda: msgs.lines().count("WATCHDOG=1") >= 3, 10, message="three pings")
        out = agent.ctl("start", "--head", "--node-ip", "127.0.0.1")
        assert out.returncode == 0, out.stderr
        status = msgs.wait_line(lambda ln: ln.startswith("STATUS=head · 1 node"),
                                message="a STATUS= line for the head")
        assert status == "STATUS=head · 1 node · 0/1 CPU", status
        # systemd's variables are not passed on to the components.
        gcs = agent.process("gcs")
        environ = psutil.Process(gcs.pid).environ()
        assert "NOTIFY_SOCKET" not in environ and "WATCHDOG_USEC" not in environ
        children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, agent.daemon_output()
        assert "STOPPING=1" in msgs.lines()
        assert not [p for p in children if psutil.pid_exists(p)
                    and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        # Under journald (JOURNAL_STREAM set, no systemd-python) the log goes to
        # stderr with syslog priority prefixes, which journald parses.
        log = agent.daemon_output()
        assert "<6>agent: node-agent stopped" in log, log
        assert not os.path.exists(os.path.join(agent.state_dir, "logs", "node-agent.log"))
    finally:
        farm.cleanup()


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "systemd" / "node-agent.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "Restart=on-failure" in unit
    for key in ("RuntimeDirectory=node-agent", "StateDirectory=node-agent",
                "LogsDirectory=node-agent"):
        assert key in unit
    assert "PrivateDevices=yes" not in unit and "DynamicUser=yes" not in unit
    # /usr/bin/node-agent exists once the package is installed system-wide; here,
    # point it at the venv's console script (verify fails on an ExecStart that does
    # not exist).
    script = shutil.which("node-agent", path=clean_env()["PATH"])
    assert script, "the node-agent console script is not installed in the venv"
    local = unit.replace("ExecStart=/usr/bin/node-agent", f"ExecStart={script}")
    assert local != unit
    path = tmp_path / "node-agent.service"
    path.write_text(local)
    proc = subprocess.run([exe, "verify", "--man=no", str(path)], capture_output=True, text=True,
                          timeout=60, env=clean_env(), cwd=str(tmp_path))
    # Unknown keys are warnings with exit status 0: any output is a failure.
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), \
        proc.stdout + proc.stderr
