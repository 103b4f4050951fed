"""Per-task logs: a worker's stdout and stderr in two files (Ray's ``worker-*.out`` and
``.err``), and ``get_log(task_id=...)`` returning only the lines that task wrote, as Ray
does.

First the parts on their own: the worker-side recorder (runtime/core_worker/task_logs.py)
in a process of this test whose stdout and stderr are files, the index scan, and the
node's LogService serving a task's range. Then real clusters.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import List

import grpc
import pytest

import runtime as ray
from runtime import rpc
from runtime.core_worker.task_logs import find_range
from runtime.protocol import log_service_pb2_grpc
from runtime.util.state import get_log, list_logs, list_nodes

from conftest import wait_for
from helpers.env import scrubbed_env
from helpers.log_server import TOKEN, log_server, read_all, rpc_code

REPO = str(Path(__file__).resolve().parent.parent)


# A stand-in worker: its stdout and stderr are the files the test gave it; it records
# tasks A and B, then begins C and (with "hold") stays in it until killed.
RECORDER = r"""
import os, sys, time
from runtime.core_worker import task_logs
logs, mode = sys.argv[1], sys.argv[2]
sys.stdout.reconfigure(line_buffering=True)  # as runtime/worker/main.py does
assert task_logs.configure(logs, "worker-0badcafe")
for name in ("A", "B"):
    task_logs.begin(name.encode() * 4, 0)
    print(f"out of {name}")
    print(f"err of {name}", file=sys.stderr)
    sys.stdout.write(f"partial line of {name} ")  # no newline: flushed by end()
    task_logs.end(name.encode() * 4, 0)
task_logs.begin(b"EEEE", 0, actor_call=True)
print("out of the actor call E")
task_logs.end(b"EEEE", 0, actor_call=True)
print("between the tasks")
task_logs.begin(b"CCCC", 1)
print("out of C, still running")
if mode == "hold":
    open(os.path.join(logs, "holding"), "w").close()
    time.sleep(300)
task_logs.end(b"CCCC", 1)
task_logs.close()
"""


_recorders: List[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_recorders():
    """Every recorder a test started is gone after it, whatever the test did."""
    yield
    while _recorders:
        proc = _recorders.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def run_recorder(logs: Path, mode: str, **env: str) -> subprocess.Popen:
    logs.mkdir(exist_ok=True)
    out = open(logs / "worker-0badcafe.out", "ab")
    err = open(logs / "worker-0badcafe.err", "ab")
    with out, err:
        proc = subprocess.Popen([sys.executable, "-c", RECORDER, str(logs), mode], cwd=REPO,
                                stdout=out, stderr=err, env=scrubbed_env(env))
    _recorders.append(proc)
    return proc


def cut(path: Path, start: int, end) -> str:
    return path.read_bytes()[start:end].decode()


def index_range(logs: Path, task: bytes, attempt: int):
    fd = os.open(logs / "worker-0badcafe.tasks", os.O_RDONLY)
    try:
        return find_range(fd, task.hex(), attempt)
    finally:
        os.close(fd)


def test_each_task_attempt_gets_its_own_byte_ranges(tmp_path):
    logs = tmp_path / "logs"
    proc = run_recorder(logs, "run")
    assert proc.wait(timeout=60) == 0, (logs / "worker-0badcafe.err").read_text()
    out, err = logs / "worker-0badcafe.out", logs / "worker-0badcafe.err"
    for name in ("A", "B"):
        r = index_range(logs, name.encode() * 4, 0)
        assert r is not None and r.finished, r
        assert cut(out, r.out_start, r.out_end) == f"out of {name}\npartial line of {name} "
        assert cut(err, r.err_start, r.err_end) == f"err of {name}\n"
    c = index_range(logs, b"CCCC", 1)
    assert cut(out, c.out_start, c.out_end) == "out of C, still running\n"
    assert index_range(logs, b"CCCC", 0) is None  # another attempt
    assert index_range(logs, b"DDDD", 0) is None
    assert index_range(logs, b"EEEE", 0) is None  # actor calls: not by default, as in Ray


def test_actor_calls_get_ranges_when_asked_for(tmp_path):
    logs = tmp_path / "logs"
    proc = run_recorder(logs, "run", RUNTIME_ENABLE_RECORD_ACTOR_TASK_LOGGING="1")
    assert proc.wait(timeout=60) == 0, (logs / "worker-0badcafe.err").read_text()
    e = index_range(logs, b"EEEE", 0)
    assert cut(logs / "worker-0badcafe.out", e.out_start, e.out_end) == \
        "out of the actor call E\n"


def test_a_running_task_is_recorded_within_the_flush_interval(tmp_path):
    logs = tmp_path / "logs"
    proc = run_recorder(logs, "hold")
    try:
        wait_for(lambda: (logs / "holding").exists() or proc.poll() is not None, 60,
                 message="the recorder to hold task C")
        assert proc.poll() is None, (logs / "worker-0badcafe.err").read_text()
        started = time.monotonic()
        c = wait_for(lambda: (logs / "worker-0badcafe.tasks").exists()
                     and index_range(logs, b"CCCC", 1), 10, interval=0.01,
                     message="task C's start in the index")
        assert time.monotonic() - started < 5
        assert not c.finished
        text = (logs / "worker-0badcafe.out").read_bytes()[c.out_start:].decode()
        assert text == "out of C, still running\n"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_the_index_is_scanned_back_across_blocks(tmp_path):
    path = tmp_path / "worker-0badcafe.tasks"
    lines = [f"T {i:048x} 0 {i * 10} {i * 20} {i * 10 + 5} {i * 20 + 7}\n" for i in range(6000)]
    lines.insert(3000, f"R {7:048x} 2 11 22\n")
    lines.append(f"R {7:048x} 2 11 22\n")  # a later word on the same attempt ...
    lines.append(f"T {7:048x} 2 11 22 33 44\n")  # ... and the latest
    path.write_text("".join(lines))
    assert path.stat().st_size > 5 * 64 * 1024
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in (0, 1, 2999, 3000, 5999):
            r = find_range(fd, f"{i:048x}", 0)
            assert (r.out_start, r.err_start, r.out_end, r.err_end) == \
                (i * 10, i * 20, i * 10 + 5, i * 20 + 7), i
        r = find_range(fd, f"{7:048x}", 2)
        assert (r.out_start, r.err_start, r.out_end, r.err_end) == (11, 22, 33, 44)
        assert find_range(fd, f"{7:048x}", 1) is None
        assert find_range(fd, f"{6000:048x}", 0) is None
    finally:
        os.close(fd)


def test_the_log_service_serves_a_tasks_range_and_a_pids_stream(tmp_path):
    logs = tmp_path / "logs"
    proc = run_recorder(logs, "run")
    assert proc.wait(timeout=60) == 0
    header = b"=== worker-0badcafe started pid 4242 at 2025-01-01T00:00:00 ===\n"
    for suffix in ("out", "err"):  # the header the supervisor writes, at the top of both
        path = logs / f"worker-0badcafe.{suffix}"
        body = path.read_bytes()
        path.write_bytes(header + body)
    index = logs / "worker-0badcafe.tasks"  # the worker's offsets, moved past the header
    shifted = []
    for line in index.read_text().splitlines():
        kind, task, attempt, *offsets = line.split()
        shifted.append(" ".join([kind, task, attempt] + [str(int(o) + len(header))
                                                         for o in offsets]))
    index.write_text("\n".join(shifted) + "\n")
    with log_server(str(logs)) as address:
        ch = rpc.sync_channel(address, TOKEN)
        stub = log_service_pb2_grpc.LogServiceStub(ch)
        try:
            task = dict(task_id=b"BBBB", task_attempt=0)
            assert read_all(stub, filename="worker-0badcafe.out", **task) == \
                b"out of B\npartial line of B "
            assert read_all(stub, filename="worker-0badcafe.err", **task) == b"err of B\n"
            assert read_all(stub, filename="worker-0badcafe.out", tail_lines=1, **task) == \
                b"partial line of B "
            assert read_all(stub, pid=4242, suffix="err", **task) == b"err of B\n"
            assert read_all(stub, pid=4242, suffix="out", tail_lines=1) == \
                b"out of C, still running\n"
            assert b"err of A" in read_all(stub, pid=4242, suffix="err")
            assert rpc_code(lambda: read_all(stub, filename="worker-0badcafe.out",
                                             task_id=b"ZZZZ")) == grpc.StatusCode.NOT_FOUND
            assert rpc_code(lambda: read_all(stub, filename="worker-0badcafe.tasks",
                                             task_id=b"BBBB")) == \
                grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as info:
                read_all(stub, filename="worker-0badcafe.out", task_id=b"ZZZZ")
            assert "recorded no output range for task 5a5a5a5a" in info.value.details()
        finally:
            ch.close()


# -- on a cluster ------------------------------------------------------------------------------------
@ray.remote
def speak(tag: str, gate: str = "") -> int:
    print(f"stdout of {tag}")
    print(f"stderr of {tag}", file=sys.stderr)
    if gate:
        while not os.path.exists(gate):
            time.sleep(0.02)
        print(f"after the gate of {tag}")
    return os.getpid()


def task_log(ref, suffix: str = "out") -> str:
    """The task's log, "" while its record has not reached the GCS (about a second)."""
    try:
        return "".join(get_log(task_id=ref.task_id().hex(), suffix=suffix, timeout=20))
    except FileNotFoundError:
        return ""


@pytest.fixture
def one_cpu(fresh_runtime, tmp_path):
    """A cluster with one CPU: every task runs on the same worker."""
    yield ray.init(num_cpus=1, _temp_dir=str(tmp_path / "sessions"))


def test_a_tasks_log_is_its_own_lines_out_and_err_apart(one_cpu):
    a_tag, b_tag = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    a = speak.remote(a_tag)
    pid_a = ray.get(a, timeout=60)
    b = speak.remote(b_tag)
    assert ray.get(b, timeout=60) == pid_a, "the two tasks did not share a worker"
    assert wait_for(lambda: task_log(a), 30, message="task a's log") == f"stdout of {a_tag}\n"
    assert wait_for(lambda: task_log(b), 30, message="task b's log") == f"stdout of {b_tag}\n"
    assert task_log(a, "err") == f"stderr of {a_tag}\n"
    assert task_log(b, "err") == f"stderr of {b_tag}\n"

    # The worker's files hold both tasks' lines, each stream in its own file.
    node = list_nodes()[0]
    out = "".join(get_log(node_id=node["node_id"], pid=pid_a, suffix="out"))
    err = "".join(get_log(node_id=node["node_id"], pid=pid_a, suffix="err"))
    assert f"stdout of {a_tag}\n" in out and f"stdout of {b_tag}\n" in out
    assert "stderr of" not in out
    assert f"stderr of {a_tag}\n" in err and f"stderr of {b_tag}\n" in err
    assert "stdout of" not in err


def test_list_logs_shows_a_workers_out_and_err(one_cpu):
    pid = ray.get(speak.remote("listed"), timeout=60)
    node = list_nodes()[0]
    logs = list_logs(node_id=node["node_id"])
    outs, errs = logs.get("worker_out", []), logs.get("worker_err", [])
    assert outs and all(n.startswith("worker-") and n.endswith(".out") for n in outs), logs
    assert errs and all(n.startswith("worker-") and n.endswith(".err") for n in errs), logs
    assert {n[:-4] for n in outs} == {n[:-4] for n in errs}
    assert not any(n.endswith(".tasks") for names in logs.values() for n in names), logs
    session = Path(one_cpu.address_info["session_dir"], "logs")
    mine = [n for n in outs if f"started pid {pid} " in (session / n).read_text()]
    assert len(mine) == 1, (pid, outs)


def test_a_running_tasks_log_is_read_to_now(one_cpu, tmp_path):
    gate = str(tmp_path / "gate")
    tag = f"r-{uuid.uuid4().hex[:8]}"
    ref = speak.remote(tag, gate)
    try:
        text = wait_for(lambda: task_log(ref), 60, message="the running task's log")
        assert text == f"stdout of {tag}\n"
    finally:
        Path(gate).touch()
    ray.get(ref, timeout=60)
    later = speak.remote("the next task")
    ray.get(later, timeout=60)
    wait_for(lambda: task_log(later), 30, message="the next task's log")
    assert task_log(ref) == f"stdout of {tag}\nafter the gate of {tag}\n"


@ray.remote
class Speaker:
    def speak(self, tag: str) -> int:
        print(f"actor stdout of {tag}")
        return os.getpid()


def test_an_actor_calls_log_is_its_lines_when_the_actor_records_them(one_cpu):
    plain = Speaker.remote()
    ref = plain.speak.remote("plain")
    ray.get(ref, timeout=60)

    def refusal() -> str:
        try:
            return "read: " + "".join(get_log(task_id=ref.task_id().hex(), timeout=20))
        except FileNotFoundError as exc:  # "" while the call's record is not in the GCS
            return str(exc) if "RUNTIME_ENABLE_RECORD_ACTOR_TASK_LOGGING" in str(exc) else ""
    assert "get_log(actor_id=...)" in wait_for(refusal, 30, message="the refusal, with why")
    assert "actor stdout of plain\n" in "".join(get_log(actor_id=plain._actor_id.hex()))
    ray.kill(plain)

    env = {"env_vars": {"RUNTIME_ENABLE_RECORD_ACTOR_TASK_LOGGING": "1"}}
    recording = Speaker.options(runtime_env=env).remote()
    first, second = recording.speak.remote("one"), recording.speak.remote("two")
    ray.get([first, second], timeout=60)
    assert wait_for(lambda: task_log(first), 30, message="the first call's log") == \
        "actor stdout of one\n"
    assert wait_for(lambda: task_log(second), 30, message="the second call's log") == \
        "actor stdout of two\n"
    ray.kill(recording)
