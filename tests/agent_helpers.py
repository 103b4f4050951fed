"""Fixtures' building blocks for node-agent tests: real agents on loopback aliases.

Every "host" is an agent with its own state dir, socket and config under the
test's temporary directory, bound to 127.0.0.1, 127.0.0.2 or 127.0.0.3. Ports are
picked free for each test. Cleanup is by PID: every process whose command line
names the test's directory (agents, GCS, raylets, object stores, workers all
carry it in --socket or --session-dir) is SIGKILLed and waited for, plus the
descendants of every agent pid seen, even when the test failed.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import psutil

from agent.client import AgentClient
from helpers.env import scrubbed_env
from runtime.protocol import agent_pb2

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
#: Where drivers run: not the checkout, so they import the installed project.
NEUTRAL_CWD = tempfile.gettempdir()
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")

DRIVER = """
import json, os, sys, runtime as ray
ray.init(address=sys.argv[1])
@ray.remote
def square(x):
    return x * x, os.getpid()
out = ray.get([square.remote(i) for i in range(4)], timeout=60)
big = ray.get(ray.put(b"x" * 300_000), timeout=60)   # through the object store
print(json.dumps({"squares": [v for v, _ in out], "big": len(big),
                  "alive": sum(1 for n in ray.nodes() if n["Alive"])}))
ray.shutdown()
"""

SLOW_DRIVER = """
import json, os, sys, time, runtime as ray
ray.init(address=sys.argv[1])
@ray.remote(max_retries=3)
def slow():
    time.sleep(3)
    return os.getpid()
print(json.dumps({"pid": ray.get(slow.remote(), timeout=90)}))
ray.shutdown()
"""


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.1,
             message: str = "condition") -> object:
    """Poll predicate() until truthy; AssertionError naming what was awaited otherwise."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # e.g. the agent is restarting: keep polling
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last: {last!r})")


def free_port(hosts: Iterable[str] = HOSTS, taken: Optional[set] = None) -> int:
    """A TCP port free on every host address (tests use the same ports on each alias)."""
    taken = taken if taken is not None else set()
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in taken:
            continue
        ok = True
        for host in hosts:
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
                    break
        if ok:
            taken.add(port)
            return port
    raise RuntimeError("no free port found")


def clean_env(**extra: str) -> Dict[str, str]:
    """What a user's plain shell gives a process (see helpers.env), plus extra.

    Nothing of pytest's environment: no PYTHONPATH (the project is installed in the
    venv, as a user's is), no GRPC_ENABLE_FORK_SUPPORT, no agent socket or token."""
    return scrubbed_env(extra)


def write_config(path: Path, ports: Dict[str, int], extra: str = "", cpus: int = 1,
                 crash_loop_failures: int = 3, env: Optional[Dict[str, str]] = None) -> Path:
    """A small, fast agent.toml: `cpus` CPUs (1), 64 MiB store, quick backoff, short grace;
    `env`: RUNTIME_* tunables for every component ([component_env.all])."""
    if env:
        extra += "\n[component_env.all]\n" + "".join(f'{k} = "{v}"\n' for k, v in env.items())
    path.write_text(f"""
[ports]
gcs = {ports['gcs']}
agent = {ports['agent']}
raylet = {ports['raylet']}
object_store = {ports['object_store']}
object_transfer = {ports.get('object_transfer', 0)}

[resources]
num_cpus = {cpus}
object_store_memory = 67108864
memory = 1000000000

[supervision]
backoff_initial_s = 0.2
backoff_max_s = 2.0
stable_after_s = 5.0
crash_loop_failures = {crash_loop_failures}
crash_loop_window_s = 30.0
stop_grace_s = 2.0
drain_timeout_s = 5.0
{extra}
""")
    return path


class Agent:
    """One fake host: a node agent's directories, config and commands."""

    def __init__(self, root: Path, name: str, node_ip: str, ports: Dict[str, int],
                 extra_config: str = "") -> None:
        self.name = name
        self.node_ip = node_ip
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.dir / "agent.sock")
        self.state_dir = str(self.dir / "state")
        self.ports = ports
        self.config = str(write_config(self.dir / "agent.toml", ports, extra_config))
        self.daemon: Optional[subprocess.Popen] = None

    # -- agentctl
    def ctl(self, *args: str, timeout: float = 90, env: Optional[Dict[str, str]] = None
            ) -> subprocess.CompletedProcess:
        """Run `agentctl ARGS --socket S` (start/join also get --state-dir and --config,
        for the agent they may launch): the console script found on PATH, as a user
        runs it."""
        argv = ["agentctl", *args, "--socket", self.socket]
        if args and args[0] in ("start", "join"):
            argv += ["--state-dir", self.state_dir, "--config", self.config]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=env or clean_env(), cwd=str(self.dir))

    def ctl_json(self, *args: str) -> dict:
        proc = self.ctl(*args, "--json")
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return json.loads(proc.stdout)

    # -- the daemon run directly (as systemd or a shell would)
    def start_daemon(self, env: Optional[Dict[str, str]] = None, wait: bool = True
                     ) -> subprocess.Popen:
        out = open(self.dir / "daemon.out", "ab")
        self.daemon = subprocess.Popen(
            ["node-agent", "--socket", self.socket, "--state-dir", self.state_dir,
             "--config", self.config], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            env=env or clean_env(), cwd=str(self.dir))
        out.close()
        if wait:
            wait_for(lambda: self.daemon.poll() is not None or self.status(local_only=True),
                     30, message=f"agent {self.name} to serve on {self.socket}")
            assert self.daemon.poll() is None, self.daemon_output()
        return self.daemon

    def daemon_output(self) -> str:
        try:
            return (self.dir / "daemon.out").read_text()[-3000:]
        except OSError:
            return ""

    # -- API
    def status(self, local_only: bool = False) -> agent_pb2.StatusReply:
        with AgentClient(self.socket) as c:
            return c.status(local_only=local_only, timeout=10)

    def pid(self) -> int:
        with open(os.path.join(self.state_dir, "agent.lock")) as fh:
            return int(fh.read().strip())

    def process(self, component: str) -> Optional[agent_pb2.ProcessInfo]:
        for p in self.status().processes:
            if p.component == component or (component == "worker"
                                             and p.component.startswith("worker-")):
                return p
        return None

    def wait_restarted(self, component: str, old_pid: int, timeout: float = 30) -> None:
        """Until component runs again under a new pid."""
        def back() -> bool:
            p = self.process(component)
            return p is not None and p.state == "running" and p.pid not in (0, old_pid)
        wait_for(back, timeout, message=f"{component} of {self.name} to run again")


def alive_nodes(agent: Agent) -> List[str]:
    return sorted(n.node_ip for n in agent.status().nodes if n.state == "ALIVE")


def _driver_env(token: Optional[str], socket_path: Optional[str]) -> Dict[str, str]:
    extra = {}
    if token is not None:
        extra["NODE_AGENT_TOKEN"] = token
    if socket_path is not None:
        extra["NODE_AGENT_SOCKET"] = socket_path
    return clean_env(**extra)


def run_driver(address: str, token: Optional[str] = None, socket_path: Optional[str] = None,
               timeout: float = 90) -> subprocess.CompletedProcess:
    """A driver in its own process: init(address), tasks and a put through the store."""
    return subprocess.run([PY, "-c", DRIVER, address], capture_output=True, text=True,
                          timeout=timeout, env=_driver_env(token, socket_path), cwd=NEUTRAL_CWD)


def start_slow_driver(address: str, token: str) -> subprocess.Popen:
    """A driver whose one task sleeps 3 s (retried if its worker dies); prints its pid."""
    return subprocess.Popen([PY, "-c", SLOW_DRIVER, address], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_driver_env(token, None),
                            cwd=NEUTRAL_CWD)


def assert_driver_works(address: str, **kw) -> dict:
    proc = run_driver(address, **kw)
    assert proc.returncode == 0, f"driver failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rep["squares"] == [0, 1, 4, 9] and rep["big"] == 300_000, rep
    return rep


def pids_under(root: Path, agents: Iterable[Agent] = ()) -> List[int]:
    """Every process started for this test: by command line (names root) and as a
    descendant of an agent."""
    me = os.getpid()
    found = set()
    needle = str(root)
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] != me and any(needle in a for a in (p.info["cmdline"] or ())):
                found.add(p.info["pid"])
        except psutil.Error:
            pass
    for agent in agents:
        try:
            pid = agent.pid()
            found.add(pid)
            found.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except (OSError, ValueError, psutil.Error):
            pass
    found.discard(me)
    return sorted(found)


def kill_all(pids: Iterable[int]) -> None:
    """SIGKILL by pid and wait until they are gone (or zombies of someone else)."""
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGKILL)
            procs.append(proc)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


class Farm:
    """The agents of one test (or module); kills everything they started at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.agents: List[Agent] = []
        self.taken: set = set()

    def ports(self) -> Dict[str, int]:
        return {k: free_port(taken=self.taken)
                for k in ("gcs", "agent", "raylet", "object_store", "object_transfer")}

    def agent(self, name: str, node_ip: str, ports: Optional[Dict[str, int]] = None,
              extra_config: str = "") -> Agent:
        a = Agent(self.root, name, node_ip, ports or self.ports(), extra_config)
        self.agents.append(a)
        return a

    def cleanup(self) -> None:
        for a in self.agents:
            if a.daemon is not None and a.daemon.poll() is None:
                a.daemon.kill()
        kill_all(pids_under(self.root, self.agents))
        for a in self.agents:
            if a.daemon is not None:
                try:
                    a.daemon.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        left = [p for p in pids_under(self.root)
                if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes left behind: {left}"
