"""The sync-actor call port (runtime/core_worker/actor_call_server.py, runtime/frames.py):
who gets one, that it wants the cluster token before it reads anything, that calls
from several callers still run one at a time, and how cancel treats actor calls.

The framing itself is checked without sockets (FrameBuffer, check_hello); the
rest talks to real actor processes of the module's private cluster.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import pytest

import runtime as ray
from runtime import frames, rpc
from runtime.core_worker.current import core_worker
from runtime.exceptions import TaskCancelledError
from runtime.protocol import gcs_pb2, gcs_pb2_grpc

from helpers.gates import await_path
from conftest import wait_for


@ray.remote
class Plain:
    def __init__(self):
        self.inside = 0
        self.most_inside = 0

    def pid(self):
        return os.getpid()

    def enter(self, hold_s):
        """Count how many calls are inside at once."""
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        time.sleep(hold_s)
        self.inside -= 1
        return self.most_inside

    def gate(self, started, gate):
        Path(started).touch()
        await_path(gate, 60)
        return "finished"


@ray.remote
class Async:
    async def ping(self):
        return "pong"


@ray.remote
def call_enter(handle, n, hold_s):
    return ray.get([handle.enter.remote(hold_s) for _ in range(n)])


def actor_address(handle):
    cw = core_worker()
    stub = gcs_pb2_grpc.GcsStub(rpc.sync_channel(cw.gcs_address, cw.token))
    reply = stub.GetActor(gcs_pb2.GetActorRequest(actor_id=handle._actor_id), timeout=10)
    assert reply.found and reply.actor.state == "ALIVE", reply
    return reply.actor.address


def read_frame(sock) -> bytes:
    sock.settimeout(10)
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        assert chunk, "the call port closed without answering"
        header += chunk
    (n,) = struct.unpack("<I", header)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk
        data += chunk
    return data


def closed_by_peer(sock) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- framing, no sockets ---------------------------------------------------------------------------
def test_frame_buffer_reassembles_split_and_joined_frames():
    stream = frames.frame(b"first") + frames.frame(b"") + frames.frame(b"x" * 1000)
    buf = frames.FrameBuffer()
    got = []
    for i in range(0, len(stream), 7):  # chunks that cut headers and payloads
        got.extend(buf.feed(stream[i:i + 7]))
    assert got == [b"first", b"", b"x" * 1000]
    assert frames.FrameBuffer().feed(stream) == got


def test_frame_over_the_limit_is_refused_before_it_is_buffered():
    buf = frames.FrameBuffer(limit=100)
    with pytest.raises(frames.FrameError, match="over the 100-byte limit"):
        buf.feed(struct.pack("<I", 101))


def test_hello_check():
    assert frames.check_hello(frames.hello("secret")[4:], "secret") is None
    assert "a wrong cluster token" in frames.check_hello(frames.hello("guess")[4:], "secret")
    assert "no cluster token" in frames.check_hello(frames.MAGIC, "secret")
    assert "bad hello" in frames.check_hello(b"GET / HTTP/1.1", "secret")


# -- real actors -------------------------------------------------------------------------------------
def test_only_sync_actors_get_a_call_port(actors):
    plain, threaded, asynchronous = (Plain.remote(), Plain.options(max_concurrency=2).remote(),
                                     Async.remote())
    actors.extend([plain, threaded, asynchronous])
    ray.get([plain.pid.remote(), threaded.pid.remote(), asynchronous.ping.remote()], timeout=30)
    addr = actor_address(plain)
    assert addr.task_port and addr.task_port != addr.port
    assert actor_address(threaded).task_port == 0
    assert actor_address(asynchronous).task_port == 0


@pytest.mark.parametrize("hello,expected", [
    (frames.hello("0" * 64), "a wrong cluster token"),
    (frames.frame(frames.MAGIC), "no cluster token"),
    (frames.frame(b"PRI * HTTP/2.0"), "bad hello"),
])
def test_call_port_refuses_a_bad_hello_and_reads_nothing_more(actors, hello, expected):
    a = Plain.remote()
    actors.append(a)
    pid = ray.get(a.pid.remote(), timeout=30)
    addr = actor_address(a)
    with socket.create_connection((addr.ip, addr.task_port), timeout=10) as s:
        # A call frame right behind the hello: it must never run.
        s.sendall(hello + frames.frame(b"\x0a\x02xx"))
        assert expected in read_frame(s).decode()
        assert closed_by_peer(s)
    assert ray.get(a.pid.remote(), timeout=30) == pid, "the actor must be unharmed"


def test_oversized_hello_is_dropped_unread(actors):
    a = Plain.remote()
    actors.append(a)
    ray.get(a.pid.remote(), timeout=30)
    addr = actor_address(a)
    with socket.create_connection((addr.ip, addr.task_port), timeout=10) as s:
        s.sendall(struct.pack("<I", 1 << 30))  # claims a 1 GiB hello
        assert closed_by_peer(s)


def test_calls_from_several_callers_run_one_at_a_time(actors):
    a = Plain.remote()
    actors.append(a)
    ray.get(a.pid.remote(), timeout=30)
    tasks = [call_enter.remote(a, 5, 0.05) for _ in range(2)]  # two more callers
    mine = [a.enter.remote(0.05) for _ in range(5)]
    most = max(ray.get(mine, timeout=60) + sum(ray.get(tasks, timeout=60), []))
    assert most == 1, f"{most} calls ran inside one sync actor at once"


def test_cancel_of_actor_calls(cluster, actors, tmp_path):
    a = Plain.remote()
    actors.append(a)
    ray.get(a.pid.remote(), timeout=30)
    log = Path(cluster.address_info["session_dir"], "logs",
               f"worker-{actor_address(a).worker_id.hex()[:8]}.err")
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    running = a.gate.remote(started, gate)
    queued = a.pid.remote()
    with pytest.raises(ValueError, match="force=True is not supported for actor calls"):
        ray.cancel(running, force=True)
    wait_for(lambda: os.path.exists(started), 30, message="the first call to start")
    ray.cancel(queued)
    ray.cancel(running)  # as in Ray: a running call of a sync actor is not interrupted
    wait_for(lambda: f"cancel of {running.task_id().hex()}: a running actor call, not "
                     f"interrupted" in log.read_text()
             and f"cancel of {queued.task_id().hex()}: not running here" in log.read_text(),
             30, message="both cancels to reach the actor's worker")
    Path(gate).touch()
    assert ray.get(running, timeout=30) == "finished"
    with pytest.raises(TaskCancelledError):
        ray.get(queued, timeout=30)
    assert isinstance(ray.get(a.pid.remote(), timeout=30), int)
