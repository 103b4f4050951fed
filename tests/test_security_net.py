"""What a peer without the cluster token can cost the cluster's servers: nothing much.

gRPC (runtime/rpc.py): a request without the token is refused before its body is
read, so 300 MB requests, unary or streaming, several at once, leave the server's
RSS flat while it goes on serving authenticated calls; a non-ASCII or binary
``authorization`` header gets UNAUTHENTICATED and a clear message, never a
traceback in the log.

The sync-actor call port (runtime/core_worker/actor_call_server.py, frames.py,
call_connection.py): a deadline for the whole hello, caps on connections that
have not authenticated (in all and per host) that push out the oldest, so that a
flood of silent connections locks no caller out, rate-limited refusal logs, a port
that survives a failed thread start, frame lengths checked before allocation at
both ends, and a caller that gives up on a port that never answers.

Connections that carry nothing (runtime/rpc.py, component.py): 1,500 idle HTTP/2
connections cannot use up the fds of a GCS started with a soft limit of 1,024,
cost it about 15 KB each, and are closed once idle for GRPC_MAX_CONNECTION_IDLE_S;
a driver's own idle connections are closed too and reconnect on the next call.

Everything runs against real processes (the module's private cluster, or a driver
script's), over raw sockets and gRPC channels without the token, on loopback.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import grpc
import psutil
import pytest

import runtime as ray
from runtime import frames, rpc
from runtime.component import raise_open_file_limit
from runtime.core_worker.call_connection import CallConnection
from runtime.core_worker.current import core_worker
from runtime.protocol import (common_pb2, gcs_pb2, gcs_pb2_grpc, object_store_pb2,
                              object_store_pb2_grpc, raylet_pb2_grpc)

from conftest import assert_all_gone, wait_for
from helpers.env import scrubbed_env
from helpers.raw_http2 import call as raw_grpc_call
from helpers.raw_http2 import closed_by_peer, idle_connections

MiB = 1 << 20
ATTACK_BYTES = 300 * MiB
# What an unauthenticated 300 MB request may add to a server's RSS (the bound).
RSS_BUDGET = 20 * MiB
# Options of a channel that is allowed to send what the servers' limit allows and more.
RAW_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 1 << 30),
                       ("grpc.max_receive_message_length", 1 << 30)]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
# Runs argv[1:] with the soft open-file limit at 1,024, as from a shell with the common
# default: the private cluster that driver starts inherits the limit.
_WITH_FD_LIMIT_1024 = ("import os, resource, sys\n"
                       "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
                       "resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))\n"
                       "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n")


@ray.remote
class Plain:
    def pid(self):
        return os.getpid()


# -- helpers ---------------------------------------------------------------------------------------
def _component(module: str) -> psutil.Process:
    """The cluster process running `python -m <module>` (GCS, raylet, object store)."""
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "-m" in cmd and module in cmd:
            return p
    raise AssertionError(f"no {module} process under the test process")


class RssPeak:
    """Samples a process's RSS every few ms while the block runs; `growth` is the peak
    over the RSS at entry."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.base = proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.002)

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _attack(address: str, method: str, kind: str, payload: bytes) -> Tuple[grpc.StatusCode, str]:
    """One call without the token on a fresh connection; its status code and details."""
    with grpc.insecure_channel(address, options=RAW_CHANNEL_OPTIONS) as channel:
        try:
            if kind == "unary_unary":
                channel.unary_unary(method)(payload, timeout=120)
            elif kind == "unary_stream":
                list(channel.unary_stream(method)(payload, timeout=120))
            else:
                list(channel.stream_stream(method)(iter([payload]), timeout=120))
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _serving_while(busy: "threading.Event", probe) -> List[float]:
    """Runs authenticated `probe()` calls until `busy` is cleared; their latencies (a
    failure raises)."""
    latencies = []
    while True:
        t0 = time.monotonic()
        probe()
        latencies.append(time.monotonic() - t0)
        if not busy.is_set():
            return latencies
        time.sleep(0.05)


def _attack_and_probe(proc: psutil.Process, attacks: list, probe) -> Tuple[RssPeak, list, List[float]]:
    """Runs `attacks` ((address, method, kind, payload) each) in parallel while probing."""
    busy = threading.Event()
    busy.set()
    with RssPeak(proc) as rss, ThreadPoolExecutor(len(attacks) + 1) as pool:
        probing = pool.submit(_serving_while, busy, probe)
        outcomes = [f.result(timeout=300) for f in [pool.submit(_attack, *a) for a in attacks]]
        busy.clear()
        latencies = probing.result(timeout=60)
    return rss, outcomes, latencies


def _actor_address(handle) -> common_pb2.Address:
    cw = core_worker()
    stub = gcs_pb2_grpc.GcsStub(rpc.sync_channel(cw.gcs_address, cw.token))
    reply = stub.GetActor(gcs_pb2.GetActorRequest(actor_id=handle._actor_id), timeout=10)
    assert reply.found and reply.actor.state == "ALIVE", reply
    return reply.actor.address


def _live_actor(actors) -> Tuple[object, int, common_pb2.Address]:
    a = Plain.remote()
    actors.append(a)
    pid = ray.get(a.pid.remote(), timeout=60)
    return a, pid, _actor_address(a)


def _worker_log(cluster, addr: common_pb2.Address) -> Path:
    return Path(cluster.address_info["session_dir"], "logs", f"worker-{addr.worker_id.hex()[:8]}.err")


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True once the peer closes `sock` (EOF or reset) within `seconds`; what it sends
    before (a refusal reason) is read and dropped."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            continue
        try:
            if not sock.recv(4096):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def _read_answer(s: socket.socket) -> bytes:
    """The call port's answer (a frame) to the hello sent on `s`, or b'' if it closed."""
    data = b""
    try:
        while len(data) < 4 or len(data) < 4 + struct.unpack("<I", data[:4])[0]:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _hello_answer(addr: common_pb2.Address, token: str, timeout: float = 10.0) -> bytes:
    """The call port's answer (a frame) to a hello with `token`, or b'' if it closed."""
    with socket.create_connection((addr.ip, addr.task_port), timeout=timeout) as s:
        s.sendall(frames.hello(token))
        return _read_answer(s)


def _connect(addr: common_pb2.Address, source: str = "127.0.0.1") -> socket.socket:
    """A connection to the call port from `source` (any 127/8 address is this host's)."""
    return socket.create_connection((addr.ip, addr.task_port), timeout=10,
                                    source_address=(source, 0))


def _waiting_connections(pid: int, port: int) -> int:
    """Connections the actor's process holds on its call port (the listener aside)."""
    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


class SilentFlood:
    """An attacker keeping a call port's table of unauthenticated connections full: it holds
    `count` connections from `source` that never send a byte, and opens a new one whenever
    the port closes one, from a thread of its own until the block ends."""

    def __init__(self, addr: common_pb2.Address, count: int, source: str = "127.0.0.1") -> None:
        self.target = (addr.ip, addr.task_port)
        self.count = count
        self.source = source
        self.opened = 0
        self.closed_by_port = 0
        self.connect_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="silent-flood", daemon=True)

    def __enter__(self) -> "SilentFlood":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        held = selectors.DefaultSelector()
        try:
            while not self._stop.is_set():
                while len(held.get_map()) < self.count and not self._stop.is_set():
                    try:
                        s = socket.create_connection(self.target, timeout=5,
                                                     source_address=(self.source, 0))
                    except OSError:
                        self.connect_errors += 1
                        time.sleep(0.01)
                        continue
                    held.register(s, selectors.EVENT_READ)
                    self.opened += 1
                for key, _mask in held.select(0.01):  # readable: refused, or closed
                    held.unregister(key.fileobj)
                    key.fileobj.close()
                    self.closed_by_port += 1
        finally:
            for key in list(held.get_map().values()):
                key.fileobj.close()
            held.close()


class Sampler:
    """Calls `probe` every few ms while the block runs; `values` holds what it returned."""

    def __init__(self, probe) -> None:
        self.probe = probe
        self.values: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.values.append(self.probe())
            time.sleep(0.02)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self.values.append(self.probe())


class _Recorder:
    """The handler side of a CallConnection: what came back and how it ended."""

    def __init__(self) -> None:
        self.results: list = []
        self.lost: List[Tuple[float, str]] = []

    def on_result(self, conn, result) -> None:
        self.results.append(result)

    def on_connection_lost(self, conn, error: str) -> None:
        self.lost.append((time.monotonic(), error))


def _call_connection_outcome(port: int, wait_s: float, **kwargs) -> Tuple[_Recorder, float, Optional[str]]:
    """Opens a CallConnection to 127.0.0.1:port on a loop of its own and waits up to
    wait_s for it to fail; (recorder, seconds until it failed, handshake_error)."""

    async def main():
        recorder = _Recorder()
        t0 = time.monotonic()
        conn = CallConnection(recorder, f"127.0.0.1:{port}", b"\x07" * 28, common_pb2.JobConfig(),
                              "not-the-token", control_address="127.0.0.1:1", **kwargs)
        conn.send(common_pb2.TaskSpec(task_id=b"\x01" * 24, method_name="pid"))
        while not recorder.lost and time.monotonic() - t0 < wait_s:
            await asyncio.sleep(0.02)
        error = conn.handshake_error
        conn.close()
        took = recorder.lost[0][0] - t0 if recorder.lost else float("inf")
        return recorder, took, error

    return asyncio.run(main())


# -- gRPC: requests without the token ---------------------------------------------------------------
def test_unauthenticated_300mb_unary_requests_cost_the_gcs_nothing(cluster):
    """Three 300 MB KvPut requests without the token, in parallel: UNAUTHENTICATED, the
    GCS's RSS stays within 20 MB, and it serves authenticated calls all along; after,
    authenticated 200 MB messages still go through."""
    gcs = _component("runtime.gcs")
    address = cluster.address_info["gcs_address"]
    token = core_worker().token
    payload = gcs_pb2.KvRequest(ns="attack", key=b"k", value=b"x" * ATTACK_BYTES).SerializeToString()
    authed = gcs_pb2_grpc.GcsStub(rpc.sync_channel(address, token))

    rss, outcomes, latencies = _attack_and_probe(
        gcs, [(address, "/runtime.protocol.Gcs/KvPut", "unary_unary", payload)] * 3,
        lambda: authed.GetAllNodes(common_pb2.Empty(), timeout=30))
    del payload

    assert [code for code, _ in outcomes] == [grpc.StatusCode.UNAUTHENTICATED] * 3, outcomes
    assert all("no cluster token" in details for _, details in outcomes), outcomes
    assert rss.growth < RSS_BUDGET, (f"3 unauthenticated 300 MB requests grew the GCS (pid "
                                     f"{gcs.pid}) by {rss.growth / MiB:.0f} MB")
    assert latencies and max(latencies) < 10, f"authenticated calls during the attack: {latencies}"
    assert gcs.is_running()

    big = b"y" * (200 * MiB)
    authed.KvPut(gcs_pb2.KvRequest(ns="large", key=b"k", value=big), timeout=120)
    try:
        assert authed.KvGet(gcs_pb2.KvRequest(ns="large", key=b"k"), timeout=120).value == big
    finally:
        authed.KvDel(gcs_pb2.KvRequest(ns="large", key=b"k"), timeout=60)


def test_unauthenticated_300mb_streaming_requests_cost_nothing(cluster):
    """The same for streaming methods: ObjectStore.Read (one request, a stream back) and
    Raylet.Connect (streams both ways)."""
    token = core_worker().token
    info = cluster.address_info
    cases = [
        ("runtime.object_store", info["object_store_address"], "/runtime.protocol.ObjectStore/Read",
         "unary_stream", object_store_pb2.StoreGetRequest(object_ids=[b"x" * ATTACK_BYTES]),
         lambda: object_store_pb2_grpc.ObjectStoreStub(
             rpc.sync_channel(info["object_store_address"], token)).Stats(common_pb2.Empty(), timeout=30)),
        ("runtime.raylet", info["raylet_address"], "/runtime.protocol.Raylet/Connect",
         "stream_stream", None,
         lambda: raylet_pb2_grpc.RayletStub(rpc.sync_channel(info["raylet_address"], token))
         .GetNodeStats(common_pb2.Empty(), timeout=30)),
    ]
    for module, address, method, kind, message, probe in cases:
        payload = message.SerializeToString() if message is not None else b"x" * ATTACK_BYTES
        proc = _component(module)
        rss, outcomes, latencies = _attack_and_probe(
            proc, [(address, method, kind, payload)] * 2, probe)
        del payload
        assert [code for code, _ in outcomes] == [grpc.StatusCode.UNAUTHENTICATED] * 2, (method, outcomes)
        assert rss.growth < RSS_BUDGET, (f"2 unauthenticated 300 MB {method} requests grew the "
                                         f"{module} (pid {proc.pid}) by {rss.growth / MiB:.0f} MB")
        assert latencies and max(latencies) < 10, (method, latencies)
        probe()


@pytest.mark.parametrize("header,expected", [
    (("authorization", b"Bearer t\xf6k\xe9n"), "non-ASCII authorization header"),  # latin-1
    (("authorization", "Bearer tökén".encode()), "non-ASCII authorization header"),  # UTF-8
    (("authorization", None), "non-ASCII authorization header"),  # the token, one byte added
    (("authorization-bin", "QmVhcmVyIHTDtmvDqW4"), "binary metadata (authorization-bin)"),
])
def test_non_ascii_authorization_is_refused_cleanly(cluster, header, expected):
    token = core_worker().token
    if header[1] is None:
        header = ("authorization", f"Bearer {token}".encode() + b"\xe9")
    host, port = cluster.address_info["gcs_address"].rsplit(":", 1)
    reply = raw_grpc_call((host, int(port)), "/runtime.protocol.Gcs/GetAllNodes", [header])
    assert reply.status == grpc.StatusCode.UNAUTHENTICATED.value[0], reply
    assert expected in reply.message and "authentication failed" in reply.message, reply
    # The same raw client with the right token gets through: the refusal is the header's.
    ok = raw_grpc_call((host, int(port)), "/runtime.protocol.Gcs/GetAllNodes",
                       [("authorization", f"Bearer {token}")])
    assert ok.status == 0, ok
    log = Path(cluster.address_info["session_dir"], "logs", "gcs.log").read_text()
    assert "Traceback" not in log and "Invalid encoding" not in log, log[-3000:]


# -- the call port ----------------------------------------------------------------------------------
def test_a_dribbled_hello_is_cut_off_at_the_deadline(actors):
    """One byte every half second: each read succeeds, but the hello as a whole has
    HANDSHAKE_TIMEOUT_S, then the connection is closed."""
    _a, pid, addr = _live_actor(actors)
    limit = frames.HANDSHAKE_TIMEOUT_S
    with socket.create_connection((addr.ip, addr.task_port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(struct.pack("<I", 1000) + frames.MAGIC)
        closed = False
        while not closed and time.monotonic() - t0 < limit + 5:
            try:
                s.sendall(b"0")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            closed = _closed_within(s, 0.5)
        took = time.monotonic() - t0
    assert closed, f"a hello dribbled for {took:.1f}s is still open (deadline {limit}s)"
    assert took < limit + 5, took
    assert ray.get(_a.pid.remote(), timeout=30) == pid


def test_beyond_the_caps_the_oldest_unauthenticated_connections_go_first(actors):
    """Silent connections from four hosts fill the port's table, a host's share each. A
    host's next connection pushes out that host's oldest, not the oldest of all; five
    from a fifth host push out the five oldest of all. The younger ones wait, and the
    caller that authenticated before keeps calling."""
    a, pid, addr = _live_actor(actors)
    per_host = frames.MAX_UNAUTHENTICATED_PER_HOST
    hosts = frames.MAX_UNAUTHENTICATED // per_host
    assert hosts * per_host == frames.MAX_UNAUTHENTICATED, "the test fills the table exactly"
    silent: List[socket.socket] = []
    later: List[socket.socket] = []
    try:
        for i in range(hosts):
            silent += [_connect(addr, f"127.0.0.{2 + i}") for _ in range(per_host)]
        for s in silent:  # each is accepted in turn: nothing was pushed out yet
            assert not _closed_within(s, 0.01), "a connection within the caps was closed"
        later.append(_connect(addr, "127.0.0.3"))  # the second host, beyond its share
        assert _closed_within(silent[per_host], 5), "a host beyond its share kept its oldest"
        assert not any(_closed_within(s, 0.2) for s in silent[:3] + later), "others wait"
        later += [_connect(addr, f"127.0.0.{2 + hosts}") for _ in range(5)]  # a full table
        assert all(_closed_within(s, 5) for s in silent[:5]), "the oldest were not pushed out"
        assert not any(_closed_within(s, 0.2) for s in silent[5:8] + later), "the younger wait"
        assert _waiting_connections(pid, addr.task_port) <= frames.MAX_UNAUTHENTICATED + 1
        assert ray.get([a.pid.remote() for _ in range(20)], timeout=30) == [pid] * 20
    finally:
        for s in silent + later:
            s.close()
    token = core_worker().token
    wait_for(lambda: _hello_answer(addr, token) == frames.frame(b""), 20,
             message="the call port to accept a new caller after the flood")


@ray.remote
def _call_pid(handle) -> int:
    return ray.get(handle.pid.remote(), timeout=60)


def test_a_flood_of_silent_connections_does_not_lock_out_callers(actors):
    """An attacker holds more silent connections than the port lets wait, and opens a new
    one whenever one is closed. New callers are still served (the driver's first call and
    a task's, each on a connection of its own), and the port never holds more than its
    cap of connections waiting to authenticate."""
    a = Plain.remote()
    actors.append(a)
    info = wait_for(lambda: _alive_actor_info(a), 60, message="the actor to be alive")
    port = info.address.task_port
    with SilentFlood(info.address, frames.MAX_UNAUTHENTICATED + 64) as flood:
        wait_for(lambda: flood.opened >= flood.count and flood.closed_by_port >= 64, 60,
                 message="the flood to fill the port's table")
        with Sampler(lambda: _waiting_connections(info.pid, port)) as held:
            assert ray.get(a.pid.remote(), timeout=60) == info.pid
            assert ray.get(_call_pid.remote(a), timeout=60) == info.pid
        churned = flood.closed_by_port
    assert churned >= 100, f"the port closed only {churned} flood connections: no pressure"
    # The driver and the task's worker hold a connection each besides the waiting ones.
    assert held.values and max(held.values) <= frames.MAX_UNAUTHENTICATED + 2, held.values
    assert ray.get(a.pid.remote(), timeout=30) == info.pid


def test_a_flood_from_one_host_cannot_push_out_a_slow_caller_from_another(actors):
    """A caller whose hello comes late (a slow link, a busy loop) is not pushed out by a
    flood from another host, however many connections that host churns through: a host
    only ever pushes out its own."""
    a, pid, addr = _live_actor(actors)
    token = core_worker().token
    with SilentFlood(addr, frames.MAX_UNAUTHENTICATED + 64, source="127.0.0.2") as flood:
        wait_for(lambda: flood.opened >= flood.count, 60, message="the flood to fill the table")
        with _connect(addr, "127.0.0.3") as slow:
            churned = flood.closed_by_port
            wait_for(lambda: flood.closed_by_port - churned >= frames.MAX_UNAUTHENTICATED, 5,
                     message="the flood to churn through a table's worth of connections")
            slow.sendall(frames.hello(token))
            answer = _read_answer(slow)
        held = _waiting_connections(pid, addr.task_port)
    assert answer == frames.frame(b""), f"the slow caller was refused: {answer!r}"
    # The flooding host's share, and the driver's authenticated connection.
    assert held <= frames.MAX_UNAUTHENTICATED_PER_HOST + 1, held
    assert ray.get(a.pid.remote(), timeout=30) == pid


def test_a_hundred_bad_hellos_make_a_few_log_lines(cluster, actors):
    a, pid, addr = _live_actor(actors)
    log = _worker_log(cluster, addr)
    for _ in range(100):
        assert b"a wrong cluster token" in _hello_answer(addr, "0" * 64)

    def refused() -> Tuple[int, int]:
        """(lines about the refusals, refusals they account for)."""
        lines = [line for line in log.read_text().splitlines() if "a wrong cluster token" in line]
        total = 0
        for line in lines:
            m = re.search(r"(\d+) more in the last", line)
            total += (int(m.group(1)) if m else 0) + (0 if m and "not logged" not in line else 1)
        return len(lines), total

    wait_for(lambda: refused()[1] >= 100, 60, message="the refusals to be accounted for in the log")
    lines, total = refused()
    assert lines <= 3 and total == 100, f"{lines} log lines for {total} refusals"
    assert ray.get(a.pid.remote(), timeout=30) == pid


def test_oversized_frames_before_auth_are_refused_unallocated(actors):
    """Server: a hello header claiming 4 GiB, twenty times at once, is refused unread,
    and the actor's RSS stays flat. Caller: a port answering the hello with a frame
    claiming 100 MB fails the connection at that header, not after 100 MB."""
    a, pid, addr = _live_actor(actors)
    worker = psutil.Process(pid)
    with RssPeak(worker) as rss:
        conns = [socket.create_connection((addr.ip, addr.task_port), timeout=10) for _ in range(20)]
        try:
            for s in conns:
                s.sendall(struct.pack("<I", 0xFFFFFFFF) + b"x" * 1024)
            assert all(_closed_within(s, 10) for s in conns)
        finally:
            for s in conns:
                s.close()
    assert rss.growth < 5 * MiB, f"the actor grew by {rss.growth / MiB:.1f} MB"
    assert ray.get(a.pid.remote(), timeout=30) == pid

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def answer_big() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(struct.pack("<I", 100 * MiB) + b"z" * 4096)
                _closed_within(conn, 15)

        server = threading.Thread(target=answer_big, daemon=True)
        server.start()
        recorder, took, error = _call_connection_outcome(listener.getsockname()[1], wait_s=5)
        server.join(20)
    assert recorder.lost, "the caller waited for a 100 MB answer to its hello"
    assert took < 5 and "over the 1024-byte limit" in recorder.lost[0][1], recorder.lost
    assert error == recorder.lost[0][1]


def test_a_port_that_never_answers_the_hello_fails_the_caller_in_time():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepted by the kernel, never answered
        port = listener.getsockname()[1]
        recorder, took, error = _call_connection_outcome(port, wait_s=10, handshake_timeout_s=1.0)
    assert recorder.lost, "the caller is still waiting for the hello's answer"
    message = recorder.lost[0][1]
    assert 0.9 < took < 4, took
    assert f"127.0.0.1:{port}" in message and "did not answer the hello within 1s" in message, message
    assert error == message


def test_a_failed_thread_start_does_not_close_the_port(actors):
    """With its address space capped, the actor's worker cannot start the caller's
    thread ("can't start new thread"): that caller is closed, the port stays open and
    serves the next one once threads can start again."""
    a, pid, addr = _live_actor(actors)
    token = core_worker().token
    worker = psutil.Process(pid)
    limit = worker.rlimit(psutil.RLIMIT_AS)
    worker.rlimit(psutil.RLIMIT_AS, (worker.memory_info().vms + 4 * MiB, limit[1]))
    try:
        answer = _hello_answer(addr, token)
    finally:
        worker.rlimit(psutil.RLIMIT_AS, limit)
    assert answer == b"", f"a thread started after all ({answer!r}); the test proves nothing"
    assert _hello_answer(addr, token) == frames.frame(b""), "the call port died with the thread"
    assert ray.get(a.pid.remote(), timeout=30) == pid


def _alive_actor_info(handle) -> Optional[gcs_pb2.ActorInfo]:
    cw = core_worker()
    stub = gcs_pb2_grpc.GcsStub(rpc.sync_channel(cw.gcs_address, cw.token))
    reply = stub.GetActor(gcs_pb2.GetActorRequest(actor_id=handle._actor_id), timeout=10)
    return reply.actor if reply.found and reply.actor.state == "ALIVE" else None


def test_a_stopped_actor_fails_calls_in_time_and_its_handle_recovers(actors, monkeypatch):
    """The actor's process is stopped (SIGSTOP) before this caller first connects: the
    kernel accepts the connection, nobody answers the hello. The caller tries again at
    once, a few times, then fails the call with an error that says so (not a restart
    that never happened), in seconds; once the process runs again the handle works."""
    monkeypatch.setattr(frames, "HANDSHAKE_TIMEOUT_S", 1.0)
    a = Plain.remote()
    actors.append(a)
    info = wait_for(lambda: _alive_actor_info(a), 60, message="the actor to be alive")
    assert info.address.task_port, "a sync actor has a call port"
    worker = psutil.Process(info.pid)
    worker.suspend()
    try:
        t0 = time.monotonic()
        with pytest.raises(ray.exceptions.RayActorError) as caught:
            ray.get(a.pid.remote(), timeout=60)
        took = time.monotonic() - t0
    finally:
        worker.resume()
    message = str(caught.value)
    assert took < 15, f"the call failed after {took:.1f}s"
    assert a._actor_id.hex() in message, message
    assert "did not answer the hello within 1s" in message, message
    assert "restarted" not in message and "died" not in message, message
    assert ray.get(a.pid.remote(), timeout=30) == info.pid
    assert ray.get([a.pid.remote() for _ in range(5)], timeout=30) == [info.pid] * 5


# -- gRPC: connections that carry nothing --------------------------------------------------------
class _Driver:
    """A driver script run as a user would (scrubbed environment, soft fd limit 1,024), with
    its report; it and every process it reported are killed by PID at the end."""

    def __init__(self, tmp_path: Path, script: str, *args: str, **env: str) -> None:
        root = tmp_path / "sessions"
        root.mkdir(mode=0o700)
        self.out = str(tmp_path / "report.json")
        self.log = tmp_path / "driver.log"
        self.argv = [sys.executable, "-c", _WITH_FD_LIMIT_1024, str(SCRIPTS / script),
                     self.out, *args]
        self.env = scrubbed_env(RUNTIME_SESSION_ROOT=str(root), **env)
        self.cwd = str(tmp_path)
        self.proc: Optional[subprocess.Popen] = None
        self.pids: List[int] = []

    def __enter__(self) -> "_Driver":
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=fh,
                                         stderr=subprocess.STDOUT)
        return self

    def report(self, timeout: float) -> dict:
        wait_for(lambda: os.path.exists(self.out) or self.proc.poll() is not None, timeout,
                 message="the driver's report")
        assert os.path.exists(self.out), (f"the driver exited with {self.proc.returncode} "
                                          f"and no report:\n{self.log.read_text()[-4000:]}")
        with open(self.out) as fh:
            data = json.load(fh)
        self.pids = data.get("pids", [])
        assert "error_type" not in data, (f"{data['error_type']}: {data['error']}\n"
                                          f"{data.get('traceback', '')}")
        return data

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        assert_all_gone(self.pids, 30)  # they die with the driver; killed by PID if not


def _process_of(pids: List[int], module: str) -> psutil.Process:
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if module in p.cmdline():
                return p
        except psutil.Error:
            continue
    raise AssertionError(f"no {module} process among {pids}")


def test_idle_connections_cannot_exhaust_the_gcs(tmp_path):
    """1,500 connections that finish the HTTP/2 handshake and open no stream, against the
    GCS of a cluster whose driver started with a soft fd limit of 1,024: a new client with
    the token is still served at once (the GCS raised its limit to the hard one), each
    idle connection costs the GCS about 15 KB, and the GCS closes them all once they have
    carried no call for GRPC_MAX_CONNECTION_IDLE_S (10 s here)."""
    n = 1500
    if raise_open_file_limit() < n + 500:
        pytest.skip("this test needs an open-file limit of 2,000 to open 1,500 connections")
    idle_s = 10.0
    with _Driver(tmp_path, "driver.py", "sleep",
                 RUNTIME_GRPC_MAX_CONNECTION_IDLE_S=str(idle_s)) as driver:
        report = driver.report(90)
        gcs = _process_of(report["pids"], "runtime.gcs")
        address = report["gcs_address"]
        token = Path(report["session_dir"], "token").read_text().strip()
        host, port = address.rsplit(":", 1)
        fds, rss = gcs.num_fds(), gcs.memory_info().rss
        socks, answered = idle_connections((host, int(port)), n)
        try:
            grown_fds, grown_rss = gcs.num_fds() - fds, gcs.memory_info().rss - rss
            t0 = time.monotonic()
            stub = gcs_pb2_grpc.GcsStub(rpc.sync_channel(address, token))
            try:
                nodes = stub.GetAllNodes(common_pb2.Empty(), timeout=10).nodes
            except grpc.RpcError as exc:
                pytest.fail(f"a new client with the token was not served during the flood "
                            f"({exc.code()}: {exc.details()}); the GCS (pid {gcs.pid}) holds "
                            f"{gcs.num_fds()} fds, limit {gcs.rlimit(psutil.RLIMIT_NOFILE)}")
            took = time.monotonic() - t0
            assert len(nodes) == 1 and took < 5, (nodes, took)
            assert answered == n and grown_fds >= n, (answered, grown_fds)
            assert gcs.rlimit(psutil.RLIMIT_NOFILE)[0] > 1024
            per_connection = grown_rss / n
            assert per_connection < 25 * 1024, f"{per_connection / 1024:.1f} KB per idle connection"
            wait_for(lambda: all(closed_by_peer(s) for s in socks), idle_s * 1.1 + 30,
                     message=f"the GCS to close connections idle for {idle_s}s")
        finally:
            for s in socks:
                s.close()
        wait_for(lambda: gcs.num_fds() <= fds + 20, 30,
                 message="the GCS's fds to come back to what they were")
        # The client's own connection went idle and was closed too: it reconnects.
        assert len(stub.GetAllNodes(common_pb2.Empty(), timeout=10).nodes) == 1


def test_clients_reconnect_to_servers_that_closed_idle_connections(tmp_path):
    """A driver's connections that carry no call are closed by its servers (the idle
    timeout, 2 s here); its next calls reconnect without an error, on the core worker's
    asyncio channels and on a blocking channel alike, and its raylet stream is kept."""
    with _Driver(tmp_path, "idle_driver.py", RUNTIME_GRPC_MAX_CONNECTION_IDLE_S="2") as driver:
        report = driver.report(180)
    before, idle, after = report["before"], report["idle"], report["after"]
    assert report["second"] == report["first"], report
    assert before["gcs"] and not set(before["gcs"]) & set(idle["gcs"]), report
    assert before["store"] and not set(before["store"]) & set(idle["store"]), report
    assert after["gcs"] and after["store"], report
    # Raylet.Connect is a call open all along: its connection is never idle.
    assert len(before["raylet"]) == 1 and after["raylet"] == before["raylet"], report
