"""The cluster works when started the way a user starts it: from a plain environment.

Every process here gets its environment from ``scrubbed_env()`` (PATH, HOME, LANG and
what the test sets on purpose), so nothing leaks in from pytest, in particular not the
GRPC_ENABLE_FORK_SUPPORT=false that ``import runtime`` sets in this process and that
once hid a node agent whose every child crashed (SIGSEGV/SIGABRT between fork and
exec, in gRPC's fork handlers) when it was started from a login shell.

The fix is structural (children are spawned with vfork+exec, which runs no fork
handlers), so these tests also set GRPC_ENABLE_FORK_SUPPORT=true on purpose: the
variable must not matter.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from agent_helpers import Agent, Farm, assert_driver_works, wait_for
from helpers.env import scrubbed_env

SCRIPTS = Path(__file__).resolve().parent / "scripts"
COMPONENTS = ("gcs", "object_store", "raylet")
#: What a child crashing in gRPC's fork handlers leaves in the logs.
CRASH_MARKS = re.compile(r"SIGSEGV|SIGABRT|fork\(\) handlers|epoll_wait error|Fatal Python error")


def _fork_env(fork_support: Optional[str], **more: str) -> Dict[str, str]:
    extra = {} if fork_support is None else {"GRPC_ENABLE_FORK_SUPPORT": fork_support}
    return scrubbed_env(extra, **more)


def _crash_lines(agent: Agent) -> List[str]:
    """Lines of the agent's own output and of every component log that show a crash."""
    files = [agent.dir / "daemon.out", Path(agent.state_dir) / "logs" / "node-agent.log"]
    files += sorted(Path(agent.state_dir).glob("sessions/session_*/logs/*.log"))
    found = []
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        found += [f"{path.name}: {line}" for line in text.splitlines() if CRASH_MARKS.search(line)]
    return found


@pytest.fixture
def farm(tmp_path):
    f = Farm(tmp_path)
    try:
        yield f
    finally:
        f.cleanup()


@pytest.mark.parametrize("fork_support", [None, "true"], ids=["unset", "true"])
def test_head_start_stop_cycles_from_a_plain_environment(farm: Farm, fork_support) -> None:
    """node-agent and agentctl from a plain shell: three head start/stop cycles, every
    component up at the first try, a driver's tasks run, and no crash in any log."""
    env = _fork_env(fork_support)
    agent = farm.agent("head", "127.0.0.1")
    agent.start_daemon(env=env)
    for cycle in range(3):
        proc = agent.ctl("start", "--head", "--node-ip", "127.0.0.1", env=env)
        assert proc.returncode == 0, (f"cycle {cycle}: agentctl start --head failed: "
                                      f"{proc.stderr.strip()}\ncrash lines: {_crash_lines(agent)}")
        procs = {p.component: p for p in agent.status().processes}
        for name in COMPONENTS:
            assert name in procs, f"cycle {cycle}: {name} missing from {sorted(procs)}"
            assert procs[name].state == "running" and procs[name].restarts == 0, (
                f"cycle {cycle}: {name} is {procs[name].state} after {procs[name].restarts} "
                f"restarts ({procs[name].last_exit}); crash lines: {_crash_lines(agent)}")
        if cycle == 2:  # the raylet spawns workers too: give it tasks
            assert_driver_works(agent.status().gcs_address, socket_path=agent.socket)
        stop = agent.ctl("stop", "--keep-agent", env=env)
        assert stop.returncode == 0, stop.stderr
        wait_for(lambda: agent.status(local_only=True).phase == "idle", 30,
                 message="the node to stop")
    assert _crash_lines(agent) == []
    assert agent.daemon.poll() is None, agent.daemon_output()


@pytest.mark.parametrize("fork_support", [None, "true"], ids=["unset", "true"])
def test_supervisor_spawns_safely_while_grpc_is_busy(tmp_path: Path, fork_support) -> None:
    """30 spawns through the supervisor from a process that imported gRPC first and has
    calls in flight on another thread: every child becomes ready, and gRPC never runs
    its fork handlers (its "skipping fork() handlers" line would be on stderr)."""
    n = 30
    proc = subprocess.run([sys.executable, str(SCRIPTS / "grpc_busy_spawner.py"), str(tmp_path),
                           str(n)], capture_output=True, text=True, timeout=150,
                          env=_fork_env(fork_support), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["failures"] == [] and result["ready"] == result["spawned"] == n, result
    assert result["calls_during_spawns"] > 0, result  # gRPC really was busy meanwhile
    assert "fork() handlers" not in proc.stderr, proc.stderr[-3000:]
    for i in range(n):
        log = (tmp_path / "logs" / f"child-{i}.log").read_text()
        assert not CRASH_MARKS.search(log), log
