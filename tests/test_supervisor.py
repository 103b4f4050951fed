"""Tests for runtime.supervisor with real child processes.

Every wait is a poll with a deadline; every process a test starts is accounted for
by the ``no_leaked_children`` fixture, which kills and reports leftovers (a zombie
counts as a leak: the supervisor must reap what it starts).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from helpers.env import scrubbed_env
from runtime import component
from runtime.supervisor import (
    ComponentStartError,
    ManagedProcess,
    ProcessSpec,
    ProcessState,
    RestartPolicy,
    Supervisor,
    describe_exit,
)

REPO = str(Path(__file__).resolve().parent.parent)
PARENT_PID_ENV = "RUNTIME_PARENT_PID"

# A server-like child: optional SIGTERM behaviour, announces itself in the ready
# file (argv[1]) with its pid and what it sees of its environment, then idles.
SERVER = r"""
import json, os, signal, sys, time
path, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
elif mode == "graceful":
    def on_term(signum, frame):
        print("got SIGTERM, exiting cleanly", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
print("child serving", flush=True)
info = {"pid": os.getpid(), "port": 4321,
        "parent_env": os.environ.get("RUNTIME_PARENT_PID"), "extra": os.environ.get("EXTRA")}
with open(path + ".tmp", "w") as fh:
    json.dump(info, fh)
os.replace(path + ".tmp", path)
while True:
    time.sleep(1)
"""


def wait_until(pred: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    """Poll pred until it is truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def wait_monitor_cycles(sup: Supervisor, n: int = 3) -> None:
    """Wait until the monitor has run n more iterations (to check nothing happens)."""
    for _ in range(n):
        mark = sup.heartbeat()
        wait_until(lambda mark=mark: sup.heartbeat() > mark, 5.0, "a monitor iteration")


def reaped(pid: int) -> bool:
    """True if our child pid is gone *and* reaped (a zombie is not reaped)."""
    try:
        proc = psutil.Process(pid)
        return proc.ppid() != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def dead(pid: int) -> bool:
    """True if pid no longer runs (a zombie of someone else's counts as dead)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def server_spec(tmp_path: Path, name: str = "srv", mode: str = "", **kw) -> ProcessSpec:
    return ProcessSpec(name=name, argv=[sys.executable, "-c", SERVER,
                                        str(tmp_path / f"{name}.ready"), mode],
                       log_path=str(tmp_path / "logs" / f"{name}.log"),
                       ready_file=str(tmp_path / f"{name}.ready"), **kw)


def script_spec(tmp_path: Path, name: str, code: str, **kw) -> ProcessSpec:
    return ProcessSpec(name=name, argv=[sys.executable, "-c", code],
                       log_path=str(tmp_path / "logs" / f"{name}.log"), **kw)


@pytest.fixture(autouse=True)
def no_leaked_children():
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leaked = [p for p in me.children(recursive=True) if p.pid not in before]
    for p in leaked:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leaked, timeout=5)
    assert not leaked, f"test left child processes behind: {leaked}"


class Events:
    """Thread-safe recorder for on_exit callbacks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[str, int]] = []

    def __call__(self, proc: ManagedProcess, rc: int) -> None:
        with self.lock:
            self.items.append((proc.spec.name, rc))

    def list(self) -> list[tuple[str, int]]:
        with self.lock:
            return list(self.items)


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def sup(events: Events):
    s = Supervisor(on_exit=events, poll_interval=0.02)
    yield s
    s.close()


# ---------------------------------------------------------------------------------------


def test_spawn_wait_ready(tmp_path: Path, sup: Supervisor) -> None:
    spec = server_spec(tmp_path, env={"EXTRA": "from-spec"})
    Path(spec.ready_file).write_text(json.dumps({"pid": 1, "port": 1}))  # stale
    proc = sup.spawn(spec, wait_ready=10)

    assert proc.state is ProcessState.RUNNING
    assert proc.info["pid"] == proc.pid and proc.info["port"] == 4321
    assert proc.info["parent_env"] == str(os.getpid())
    assert proc.info["extra"] == "from-spec"
    assert sup.get("srv") is proc and sup.processes() == [proc]

    lines = proc.tail_log()
    assert re.fullmatch(rf"=== srv started pid {proc.pid} at \S+ ===", lines[0]), lines
    assert "child serving" in lines

    snap = proc.snapshot()
    assert snap["name"] == "srv" and snap["pid"] == proc.pid and snap["state"] == "running"
    assert snap["restarts"] == 0 and snap["uptime"] >= 0 and snap["last_exit"] is None
    json.dumps(snap)  # status RPCs send it as JSON
    with pytest.raises(ValueError, match="already supervised"):
        sup.spawn(spec)


def test_exit_before_ready_raises_with_log_tail(tmp_path: Path, sup: Supervisor) -> None:
    code = ("import sys; print('loading config', flush=True); "
            "print('fatal: cannot bind port 1234', file=sys.stderr); sys.exit(3)")
    spec = script_spec(tmp_path, "gcs", code, ready_file=str(tmp_path / "gcs.ready"))
    with pytest.raises(ComponentStartError) as info:
        sup.spawn(spec, wait_ready=10)
    err = info.value
    msg = str(err)
    assert "gcs (pid " in msg and "exited before it was ready" in msg
    assert "exit status 3" in msg and "fatal: cannot bind port 1234" in msg
    assert err.returncode == 3 and reaped(err.pid)
    assert sup.get("gcs") is None  # a failed start is forgotten


def test_ready_timeout_stops_process(tmp_path: Path, sup: Supervisor) -> None:
    spec = script_spec(tmp_path, "slow", "import time; time.sleep(60)",
                       ready_file=str(tmp_path / "slow.ready"), stop_grace_s=2)
    with pytest.raises(ComponentStartError, match="did not write its ready file") as info:
        sup.spawn(spec, wait_ready=0.3)
    assert reaped(info.value.pid)
    assert sup.processes() == []


def test_unexecutable_argv(tmp_path: Path, sup: Supervisor) -> None:
    spec = ProcessSpec(name="bad", argv=[str(tmp_path / "no-such-binary")],
                       log_path=str(tmp_path / "bad.log"))
    with pytest.raises(ComponentStartError, match="bad could not be started"):
        sup.spawn(spec)
    spec = ProcessSpec(name="bare", argv=["no-such-program-anywhere"],
                       log_path=str(tmp_path / "bare.log"), env={"PATH": str(tmp_path)})
    with pytest.raises(ComponentStartError, match="bare could not be started.*not on PATH"):
        sup.spawn(spec)
    assert sup.processes() == []


def test_stop_sigterm(tmp_path: Path, sup: Supervisor, events: Events) -> None:
    proc = sup.spawn(server_spec(tmp_path, mode="graceful"), wait_ready=10)
    pid = proc.pid
    t0 = time.monotonic()
    assert proc.stop(grace=5) == 0
    assert time.monotonic() - t0 < 4  # the child's handler ran, no SIGKILL wait
    assert reaped(pid) and proc.pid is None
    assert proc.state is ProcessState.STOPPED and proc.last_exit == 0
    assert "got SIGTERM, exiting cleanly" in proc.tail_log()
    assert proc.stop() == 0  # idempotent
    wait_monitor_cycles(sup)
    assert events.list() == [] and proc.restarts == 0  # a requested stop is no crash


def test_stop_sigkill_when_sigterm_ignored(tmp_path: Path, sup: Supervisor) -> None:
    proc = sup.spawn(server_spec(tmp_path, mode="ignore-term",
                                 restart=RestartPolicy(restart=True)), wait_ready=10)
    pid = proc.pid
    t0 = time.monotonic()
    assert proc.stop(grace=0.3) == -signal.SIGKILL
    assert time.monotonic() - t0 >= 0.3
    assert reaped(pid) and proc.state is ProcessState.STOPPED
    wait_monitor_cycles(sup)
    assert proc.restarts == 0 and proc.state is ProcessState.STOPPED


def test_restart_with_backoff_after_sigkill(tmp_path: Path, sup: Supervisor,
                                            events: Events) -> None:
    policy = RestartPolicy(restart=True, backoff_initial_s=0.05)
    proc = sup.spawn(server_spec(tmp_path, restart=policy), wait_ready=10)
    first = proc.pid
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: proc.restarts == 1 and proc.state is ProcessState.RUNNING,
               what="restart after SIGKILL")
    assert proc.pid not in (None, first) and reaped(first)
    assert proc.info["pid"] == proc.pid  # ready file of the new incarnation
    assert proc.last_exit == -signal.SIGKILL
    assert events.list() == [("srv", -signal.SIGKILL)]
    log = Path(proc.spec.log_path).read_text()
    assert log.count("=== srv started pid ") == 2

    second = proc.pid
    proc.kill()  # force-cancel path: reported and restarted like any crash
    wait_until(lambda: proc.restarts == 2 and proc.state is ProcessState.RUNNING,
               what="restart after kill()")
    assert reaped(second)
    assert events.list() == [("srv", -9), ("srv", -9)]


def test_crash_loop_marks_failed(tmp_path: Path, sup: Supervisor, events: Events) -> None:
    policy = RestartPolicy(restart=True, backoff_initial_s=0.01, backoff_max_s=0.02,
                           crash_loop_failures=3, crash_loop_window_s=30)
    spec = script_spec(tmp_path, "crasher",
                       "import sys; print('crashing now', flush=True); sys.exit(1)",
                       restart=policy)
    proc = sup.spawn(spec)
    wait_until(lambda: proc.state is ProcessState.FAILED, what="crash loop detection")
    reason = proc.failure_reason
    assert reason.startswith("crash loop: 3 exits in 30s; last exit status 1"), reason
    assert "crashing now" in reason
    assert proc.restarts == 2 and proc.pid is None
    # on_exit runs after the state change, outside the lock: wait for the third call.
    wait_until(lambda: len(events.list()) == 3, what="third on_exit call")
    assert events.list() == [("crasher", 1)] * 3
    wait_monitor_cycles(sup)
    assert proc.restarts == 2  # no restart after FAILED


def test_exit_without_restart_policy(tmp_path: Path, sup: Supervisor, events: Events) -> None:
    ok = sup.spawn(script_spec(tmp_path, "ok", "print('done')"))
    wait_until(lambda: ok.state is ProcessState.EXITED, what="clean exit")
    assert ok.last_exit == 0 and ok.failure_reason == ""

    victim = sup.spawn(server_spec(tmp_path, name="victim"), wait_ready=10)
    victim.kill()
    wait_until(lambda: victim.state is ProcessState.FAILED, what="killed process FAILED")
    assert "victim killed by signal SIGKILL" in victim.failure_reason
    assert "child serving" in victim.failure_reason
    wait_until(lambda: len(events.list()) == 2, what="on_exit calls")
    assert sorted(events.list()) == [("ok", 0), ("victim", -9)]


def test_on_exit_exception_does_not_kill_monitor(tmp_path: Path) -> None:
    seen: list[int] = []

    def boom(proc: ManagedProcess, rc: int) -> None:
        seen.append(rc)
        raise RuntimeError("callback bug")

    with Supervisor(on_exit=boom, poll_interval=0.02) as s:
        a = s.spawn(script_spec(tmp_path, "a", "raise SystemExit(2)"))
        wait_until(lambda: seen == [2], what="first callback")
        b = s.spawn(script_spec(tmp_path, "b", "raise SystemExit(4)"))
        wait_until(lambda: seen == [2, 4], what="second callback after a failing one")
        assert a.state is b.state is ProcessState.FAILED
        wait_monitor_cycles(s)


def test_die_with_parent_env(tmp_path: Path, sup: Supervisor, monkeypatch) -> None:
    # As inside a raylet: our own RUNTIME_PARENT_PID names the driver.
    monkeypatch.setenv(PARENT_PID_ENV, "12345")
    watched = sup.spawn(server_spec(tmp_path, name="watched"), wait_ready=10)
    assert watched.info["parent_env"] == str(os.getpid())
    free = sup.spawn(server_spec(tmp_path, name="free", die_with_parent=False), wait_ready=10)
    assert free.info["parent_env"] is None


def test_spawn_from_short_lived_thread_survives_thread_exit(tmp_path: Path,
                                                            sup: Supervisor) -> None:
    """PR_SET_PDEATHSIG follows the forking thread; children must outlive callers' threads."""
    box: list[ManagedProcess] = []
    t = threading.Thread(target=lambda: box.append(sup.spawn(server_spec(tmp_path),
                                                             wait_ready=10)))
    t.start()
    t.join(15)
    proc = box[0]
    wait_monitor_cycles(sup, 5)
    assert proc.poll() is None and proc.state is ProcessState.RUNNING


def test_spawn_runs_no_fork_handlers(tmp_path: Path, sup: Supervisor) -> None:
    """Children are spawned with vfork+exec: no at-fork handler runs (gRPC registers
    some; run in a child that copied gRPC's busy threads, they crash it)."""
    forks: list[int] = []
    os.register_at_fork(before=lambda: forks.append(1))  # stays registered: harmless
    procs = [sup.spawn(server_spec(tmp_path, name=f"c{i}"), wait_ready=10) for i in range(3)]
    assert all(p.state is ProcessState.RUNNING for p in procs)
    assert forks == [], "the supervisor forked (a preexec_fn?) instead of vfork+exec"


PDEATHSIG_CHILD = r"""
import ctypes, json, os, sys
sig = ctypes.c_int(0)
ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
with open(sys.argv[1] + ".tmp", "w") as fh:
    json.dump({"pid": os.getpid(), "pdeathsig": sig.value}, fh)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
import time
time.sleep(60)
"""


def test_generic_child_has_parent_death_signal(tmp_path: Path, sup: Supervisor) -> None:
    """A child that is not one of our components (no die_with_parent() of its own)
    still gets PR_SET_PDEATHSIG=SIGKILL, armed before its argv runs; die_with_parent
    =False gets none."""
    def spec(name: str, **kw) -> ProcessSpec:
        ready = str(tmp_path / f"{name}.ready")
        return ProcessSpec(name=name, argv=[sys.executable, "-c", PDEATHSIG_CHILD, ready],
                           log_path=str(tmp_path / f"{name}.log"), ready_file=ready, **kw)

    armed = sup.spawn(spec("armed"), wait_ready=10)
    assert armed.info["pdeathsig"] == signal.SIGKILL
    assert armed.info["pid"] == armed.pid  # setpriv execs in place: same pid
    free = sup.spawn(spec("free", die_with_parent=False), wait_ready=10)
    assert free.info["pdeathsig"] == 0


def test_without_setpriv_components_still_arm_the_signal(tmp_path: Path, sup: Supervisor,
                                                        monkeypatch) -> None:
    """Where no setpriv can arm the signal, a generic child goes without it, but a
    component (die_with_parent()) arms it itself."""
    import runtime.supervisor as supervisor_module

    monkeypatch.setattr(supervisor_module, "_setpriv_checked", True)
    monkeypatch.setattr(supervisor_module, "_setpriv_prefix", [])
    generic_ready = str(tmp_path / "generic.ready")
    generic = sup.spawn(ProcessSpec(name="generic", argv=[sys.executable, "-c", PDEATHSIG_CHILD,
                                                          generic_ready],
                                    log_path=str(tmp_path / "generic.log"),
                                    ready_file=generic_ready), wait_ready=10)
    assert generic.info["pdeathsig"] == 0
    comp_ready = str(tmp_path / "comp.ready")
    code = ("import sys, time; from runtime import component; component.die_with_parent(); "
            "component.announce_ready(sys.argv[1], pdeathsig=component.parent_death_signal()); "
            "time.sleep(60)")
    comp = sup.spawn(ProcessSpec(name="comp", argv=[sys.executable, "-c", code, comp_ready],
                                 log_path=str(tmp_path / "comp.log"), ready_file=comp_ready),
                     wait_ready=30)
    assert comp.info["pdeathsig"] == signal.SIGKILL


def test_component_arms_parent_death_signal_itself(tmp_path: Path) -> None:
    """die_with_parent() arms PR_SET_PDEATHSIG in the component (for machines without
    setpriv), and exits at once when its parent is already gone."""
    code = ("import json; from runtime import component; before = "
            "component.parent_death_signal(); component.die_with_parent(); "
            "print(json.dumps([before, component.parent_death_signal()]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=str(tmp_path),
                          env=scrubbed_env({PARENT_PID_ENV: str(os.getpid())}))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [0, signal.SIGKILL]
    # Started by a parent that is not the one named: as if ours died before we armed.
    orphan = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=str(tmp_path),
                            env=scrubbed_env({PARENT_PID_ENV: "1"}))
    assert orphan.returncode == 1 and orphan.stdout == "", (orphan.stdout, orphan.stderr)


def test_arm_parent_death_signal_in_this_process() -> None:
    assert component.arm_parent_death_signal(signal.SIGKILL) is True


def _grandchild_case(tmp_path: Path, grandchild_argv: str) -> None:
    """A middle process (plain environment, gRPC imported first) supervises a
    grandchild; SIGKILL the middle: the grandchild must die too."""
    report = tmp_path / "report.json"
    middle_code = f"""
import json, os, sys, time
import grpc
from runtime.supervisor import ProcessSpec, Supervisor
sup = Supervisor()
proc = sup.spawn(ProcessSpec(name="grandchild", argv={grandchild_argv},
                             log_path={str(tmp_path / 'gc.log')!r},
                             ready_file={str(tmp_path / 'gc.ready')!r}), wait_ready=30)
with open({str(report) + '.tmp'!r}, "w") as fh:
    json.dump({{"grandchild": proc.pid, "info": proc.info}}, fh)
os.replace({str(report) + '.tmp'!r}, {str(report)!r})
while True:
    time.sleep(1)
"""
    with open(tmp_path / "middle.log", "ab") as log:
        middle = subprocess.Popen([sys.executable, "-c", middle_code], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=str(tmp_path),
                                  env=scrubbed_env(GRPC_ENABLE_FORK_SUPPORT="true"))
    grandchild = None
    try:
        wait_until(lambda: report.exists() or middle.poll() is not None, 30, "middle's report")
        assert report.exists(), (tmp_path / "middle.log").read_text()
        data = json.loads(report.read_text())
        grandchild = data["grandchild"]
        assert data["info"].get("parent_env", str(middle.pid)) == str(middle.pid)
        assert not dead(grandchild)
        middle.kill()
        middle.wait(5)
        wait_until(lambda: dead(grandchild), 5, "grandchild to die with its parent")
    finally:
        if middle.poll() is None:
            middle.kill()
            middle.wait(5)
        if grandchild is not None and not dead(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_grandchild_dies_with_sigkilled_parent(tmp_path: Path) -> None:
    """A generic child (python -c): killed through the signal setpriv armed."""
    ready = str(tmp_path / "gc.ready")
    _grandchild_case(tmp_path, repr([sys.executable, "-c", SERVER, ready]))


def test_component_grandchild_dies_with_sigkilled_parent(tmp_path: Path) -> None:
    """A component-like child that calls die_with_parent() and then idles."""
    ready = str(tmp_path / "gc.ready")
    code = ("import os, time; from runtime import component; component.die_with_parent(); "
            f"component.announce_ready({ready!r}, port=1); time.sleep(120)")
    _grandchild_case(tmp_path, repr([sys.executable, "-c", code]))


def test_log_rotation(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "rot.log"
    log.parent.mkdir()
    spec = ProcessSpec(name="rot", argv=[sys.executable, "-c", "print('run output')"],
                       log_path=str(log), log_max_bytes=1000, log_backups=2)
    proc = ManagedProcess(spec)
    for i in range(1, 4):
        with open(log, "a") as fh:
            fh.write(f"round-{i}\n" * 200)  # > log_max_bytes
        proc.start()
        wait_until(lambda: proc.poll() is not None, what="short child to exit")
    assert proc.state is ProcessState.EXITED
    assert "round-" not in log.read_text() and "run output" in log.read_text()
    assert log.read_text().startswith("=== rot started pid ")
    assert "round-3" in Path(f"{log}.1").read_text()
    assert "round-2" in Path(f"{log}.2").read_text()
    assert not Path(f"{log}.3").exists()  # round-1 fell off (log_backups=2)
    # A small log is appended to, not rotated.
    proc.start()
    wait_until(lambda: proc.poll() is not None, what="short child to exit")
    assert log.read_text().count("=== rot started pid ") == 2


def test_stop_all_leaves_no_child(tmp_path: Path, events: Events) -> None:
    sup = Supervisor(on_exit=events, poll_interval=0.02)
    try:
        procs = [sup.spawn(server_spec(tmp_path, name="gcs", mode="graceful"), wait_ready=10),
                 sup.spawn(server_spec(tmp_path, name="raylet", mode="ignore-term"),
                           wait_ready=10),
                 sup.spawn(server_spec(tmp_path, name="store", mode="ignore-term"),
                           wait_ready=10)]
        backoff = sup.spawn(script_spec(tmp_path, "flaky", "raise SystemExit(1)",
                                        restart=RestartPolicy(restart=True,
                                                              backoff_initial_s=30)))
        wait_until(lambda: backoff.state is ProcessState.BACKOFF, what="BACKOFF")
        pids = [p.pid for p in procs]

        t0 = time.monotonic()
        sup.stop_all(grace=0.6)
        elapsed = time.monotonic() - t0
        # One shared deadline: two SIGTERM-ignoring children cost one grace, not two.
        assert 0.6 <= elapsed < 1.15, elapsed
        assert all(reaped(pid) for pid in pids)
        mine = {c.pid for c in psutil.Process().children(recursive=True)}
        assert not mine & set(pids)
        assert [p.state for p in procs] == [ProcessState.STOPPED] * 3
        assert procs[0].last_exit == 0 and procs[1].last_exit == -9
        assert backoff.state is ProcessState.STOPPED
        wait_monitor_cycles(sup)
        assert backoff.restarts == 0  # the pending restart was cancelled
        assert events.list() == [("flaky", 1)]
        sup.stop_all()  # idempotent
    finally:
        sup.close()
    sup.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        sup.spawn(server_spec(tmp_path, name="late"))


def test_heartbeat_and_close(tmp_path: Path) -> None:
    s = Supervisor(poll_interval=0.02)
    proc = s.spawn(server_spec(tmp_path), wait_ready=10)
    wait_monitor_cycles(s)
    assert time.monotonic() - s.heartbeat() < 1.0
    s.remove(proc)  # stops it first: never an unwatched child
    assert s.processes() == [] and proc.state is ProcessState.STOPPED
    s.close()
    assert not s._thread.is_alive()


def test_describe_exit() -> None:
    assert describe_exit(0) == "exit status 0"
    assert describe_exit(-9) == "killed by signal SIGKILL"
    assert describe_exit(None) == "still running"


def test_stderr_to_its_own_file_and_in_every_crash_report(tmp_path: Path,
                                                          sup: Supervisor) -> None:
    """With err_path (workers: Ray's worker-<id>.out and .err) stdout and stderr go to
    two files, each opened by the supervisor's header; what is quoted when the process
    fails, or fails to start, includes stderr, where a traceback goes."""
    code = ("import sys; print('to stdout', flush=True); "
            "print('to stderr', file=sys.stderr, flush=True); "
            "raise RuntimeError('boom in the child')")
    out, err = tmp_path / "logs" / "w.out", tmp_path / "logs" / "w.err"
    spec = ProcessSpec(name="w", argv=[sys.executable, "-c", code], log_path=str(out),
                       err_path=str(err))
    proc = sup.spawn(spec)
    wait_until(lambda: proc.state is ProcessState.FAILED, what="the child to fail")
    header = rf"=== w started pid {proc.last_pid} at \S+ ==="
    out_lines, err_lines = out.read_text().splitlines(), err.read_text().splitlines()
    assert re.fullmatch(header, out_lines[0]) and re.fullmatch(header, err_lines[0])
    assert "to stdout" in out_lines and "to stderr" not in out_lines
    assert "to stderr" in err_lines and "to stdout" not in err_lines
    assert any("RuntimeError: boom in the child" in line for line in err_lines)
    assert not any("boom" in line for line in out_lines)
    for text in (proc.failure_reason, "\n".join(proc.tail_log())):
        assert "RuntimeError: boom in the child" in text and "to stdout" in text, text
        assert str(err) in text and str(out) in text, text
    assert proc.snapshot()["err_path"] == str(err)

    # Failing before it is ready: the error quotes stderr too.
    spec = ProcessSpec(name="v", argv=[sys.executable, "-c", code],
                       log_path=str(tmp_path / "logs" / "v.out"),
                       err_path=str(tmp_path / "logs" / "v.err"),
                       ready_file=str(tmp_path / "v.ready"))
    with pytest.raises(ComponentStartError) as info:
        sup.spawn(spec, wait_ready=10)
    assert "RuntimeError: boom in the child" in str(info.value)
    assert "v.err" in str(info.value)


def test_stderr_file_is_rotated_like_the_log(tmp_path: Path) -> None:
    out, err = tmp_path / "logs" / "r.out", tmp_path / "logs" / "r.err"
    out.parent.mkdir()
    err.write_text("old-err\n" * 200)
    spec = ProcessSpec(name="r", argv=[sys.executable, "-c", "print('x')"], log_path=str(out),
                       err_path=str(err), log_max_bytes=1000, log_backups=1)
    proc = ManagedProcess(spec)
    proc.start()
    wait_until(lambda: proc.poll() is not None, what="short child to exit")
    assert "old-err" in Path(f"{err}.1").read_text()
    assert err.read_text().startswith("=== r started pid ")
