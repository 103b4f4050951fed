"""Objects moving between nodes: the stores pull from each other over their transfer ports.

Two kinds of setup, all real processes on loopback:

* bare object stores on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (one per "node"), driven
  over gRPC, for what the stores promise on their own: one transfer per object
  however many ask, resuming from another holder when one dies mid-transfer, an
  explicit failure per holder, nothing left behind;
* a two-node cluster (the driver's node on 127.0.0.1, a second node on 127.0.0.2)
  for what a user sees: ``get`` of an object made on the other node.

A holder's serve rate can be capped (``--max-serve-bytes-per-s``), which gives a test
a transfer that lasts long enough to kill its holder in the middle of it.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import psutil
import pytest

import runtime as ray
from conftest import assert_all_gone, wait_for
from helpers.env import scrubbed_env
from runtime import frames
from runtime.core_worker.object_pull import ObjectPuller, Pulled, PullFailed, holders_of
from runtime.exceptions import ObjectLostError
from runtime.node import Node, NodeConfig
from runtime.object_store.client import StoreClient, map_object, write_object
from runtime.object_store.store import object_file_name
from runtime.protocol import object_store_pb2
from runtime.session import new_session_dir
from runtime.util.scheduling_strategies import NodeAffinitySchedulingStrategy

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
TOKEN = "test-token-" + uuid.uuid4().hex


def run(coro):
    return asyncio.run(coro)


def new_oid() -> bytes:
    return uuid.uuid4().bytes + uuid.uuid4().bytes[:12]


def pattern(size: int, seed: int) -> bytes:
    """Bytes that differ at every MiB, so a chunk written at the wrong offset shows."""
    block = np.arange(MiB // 8, dtype=np.uint64) * 2654435761 + seed
    out = bytearray()
    for i in range(size // MiB):
        out += (block + i).tobytes()
    out += bytes(size - len(out))
    return bytes(out)


# ---- bare stores -------------------------------------------------------------------------
class Stores:
    """Bare object store processes on one test's private shm dir; SIGKILLed by PID at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.shm = Path("/dev/shm") / f"rtx-test-{uuid.uuid4().hex[:12]}"
        self.shm.mkdir(mode=0o700)
        self.procs: List[subprocess.Popen] = []

    def start(self, host: str, capacity: int = 512 * MiB, *extra: str) -> "Store":
        session = self.tmp / f"store-{uuid.uuid4().hex[:8]}"
        session.mkdir()
        node_id = uuid.uuid4().hex + uuid.uuid4().hex[:24]
        ready = session / "ready"
        log = open(session / "store.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.object_store", "--node-id", node_id,
             "--session-dir", str(session), "--capacity", str(capacity), "--host", host,
             "--port", "0", "--ready-file", str(ready), "--shm-dir", str(self.shm), *extra],
            env=scrubbed_env(RUNTIME_CLUSTER_TOKEN=TOKEN), cwd=str(REPO), stdout=log,
            stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        wait_for(lambda: ready.exists() or proc.poll() is not None, 30,
                 message=f"the object store on {host} to be ready")
        assert proc.poll() is None, (session / "store.log").read_text()
        info = json.loads(ready.read_text())
        return Store(f"{host}:{info['port']}", node_id, proc, info["transfer_port"], self.shm)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        for name in os.listdir(self.shm):
            os.unlink(self.shm / name)
        self.shm.rmdir()


class Store:
    def __init__(self, address: str, node_id: str, proc: subprocess.Popen, transfer_port: int,
                 shm: Path) -> None:
        self.address, self.node_id, self.proc = address, node_id, proc
        self.transfer_port, self.shm = transfer_port, shm

    def call(self, fn: Callable) -> object:
        """Run fn(client) on a fresh client and event loop."""
        async def go():
            client = StoreClient(self.address, TOKEN)
            try:
                return await fn(client)
            finally:
                await client.close()
        return run(go())

    def stats(self) -> object_store_pb2.StoreStats:
        return self.call(lambda c: c.stats())

    def put(self, oid: bytes, data: bytes) -> None:
        async def go(c: StoreClient) -> None:
            path = await c.create(oid, len(data))
            write_object(path, [data])
            await c.seal([oid])
        self.call(go)

    def files(self) -> List[str]:
        prefix = f"rt-{self.node_id[:12]}-"
        return [n for n in os.listdir(self.shm) if n.startswith(prefix)]


@pytest.fixture
def stores(tmp_path):
    s = Stores(tmp_path)
    yield s
    s.cleanup()


def read_copy(store: Store, oid: bytes, size: int) -> bytes:
    async def go(c: StoreClient) -> bytes:
        (obj,) = await c.get([oid], 5.0)
        assert obj.found and obj.size == size
        return bytes(map_object(obj.path, obj.size))
    return store.call(go)


def test_pull_copies_an_object_between_stores_and_counts_it(stores):
    a = stores.start("127.0.0.1")
    b = stores.start("127.0.0.2")
    oid, data = new_oid(), pattern(20 * MiB + 12345, seed=1)
    b.put(oid, data)

    reply = a.call(lambda c: c.pull(oid, [b.address]))
    assert reply.ok, reply
    assert reply.how == object_store_pb2.PullReply.TRANSFERRED and reply.size == len(data)
    assert read_copy(a, oid, len(data)) == data
    sa, sb = a.stats(), b.stats()
    assert (sa.pulls, sa.pulls_failed, sa.pulled_bytes) == (1, 0, len(data))
    assert sb.serves == 1
    wait_for(lambda: b.stats().served_bytes == len(data), 10, message="the bytes sent")
    assert sa.num_unsealed == 0 and sa.pulls_active == 0

    async def via_puller(c: StoreClient):
        return await ObjectPuller(c).pull(oid, [b.address])

    again = a.call(via_puller)  # here already: no transfer, and no new copy to report
    assert isinstance(again, Pulled) and again.how == "local" and not again.new_copy
    assert a.stats().pulls == 1


def test_concurrent_pulls_of_one_object_make_one_transfer(stores):
    """Five readers (five connections, as five worker processes would have) ask for the
    same object at once: one transfer, the four others join it."""
    a = stores.start("127.0.0.1")
    b = stores.start("127.0.0.2", 512 * MiB, "--max-serve-bytes-per-s", str(40 * MiB))
    oid, data = new_oid(), pattern(16 * MiB, seed=2)
    b.put(oid, data)

    async def many() -> list:
        clients = [StoreClient(a.address, TOKEN) for _ in range(5)]
        try:
            return await asyncio.gather(*(c.pull(oid, [b.address]) for c in clients))
        finally:
            for c in clients:
                await c.close()

    replies = run(many())
    assert all(r.ok for r in replies), replies
    hows = sorted(r.how for r in replies)
    assert hows == [object_store_pb2.PullReply.TRANSFERRED] + [object_store_pb2.PullReply.JOINED] * 4
    assert len({r.path for r in replies}) == 1
    sa = a.stats()
    assert (sa.pulls, sa.pulls_joined, sa.pulled_bytes) == (1, 4, len(data))
    assert b.stats().serves == 1
    wait_for(lambda: b.stats().served_bytes == len(data), 10, message="the bytes sent")
    assert read_copy(a, oid, len(data)) == data


def test_pulls_of_different_objects_go_at_once(stores):
    a = stores.start("127.0.0.1")
    b = stores.start("127.0.0.2", 512 * MiB, "--max-serve-bytes-per-s", str(8 * MiB))
    objects = {new_oid(): pattern(12 * MiB, seed=10 + i) for i in range(3)}
    for oid, data in objects.items():
        b.put(oid, data)
    seen: List[int] = []

    async def go():
        watcher = StoreClient(a.address, TOKEN)
        clients = [StoreClient(a.address, TOKEN) for _ in objects]
        try:
            pulls = asyncio.gather(*(c.pull(oid, [b.address]) for c, oid in zip(clients, objects)))
            while not pulls.done():
                seen.append((await watcher.stats()).pulls_active)
                await asyncio.sleep(0.05)
            return await pulls
        finally:
            for c in clients + [watcher]:
                await c.close()

    replies = run(go())
    assert all(r.ok for r in replies), replies
    assert max(seen) == 3, f"transfers under way at once: {sorted(set(seen))}"
    for oid, data in objects.items():
        assert read_copy(a, oid, len(data)) == data


def test_a_reader_that_goes_away_does_not_stop_the_transfer_for_the_others(stores):
    a = stores.start("127.0.0.1")
    b = stores.start("127.0.0.2", 512 * MiB, "--max-serve-bytes-per-s", str(8 * MiB))
    oid, data = new_oid(), pattern(16 * MiB, seed=6)
    b.put(oid, data)

    async def poll(client: StoreClient, predicate) -> None:
        for _ in range(600):
            if predicate(await client.stats()):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the store's counters did not get there in 30 s")

    async def go():
        first, second, watcher = (StoreClient(a.address, TOKEN) for _ in range(3))
        try:
            leaving = asyncio.ensure_future(first.pull(oid, [b.address]))
            await poll(watcher, lambda s: s.pulled_bytes > 0)
            staying = asyncio.ensure_future(second.pull(oid, [b.address]))
            await poll(watcher, lambda s: s.pulls_joined == 1)
            leaving.cancel()  # the first reader's call goes away (as when its process dies)
            await first.close()
            return await staying
        finally:
            await second.close()
            await watcher.close()

    reply = run(go())
    assert reply.ok and reply.how == object_store_pb2.PullReply.JOINED, reply
    sa = a.stats()
    assert (sa.pulls, sa.pulls_failed, sa.pulled_bytes) == (1, 0, len(data))
    assert read_copy(a, oid, len(data)) == data


def test_a_holder_killed_mid_transfer_is_replaced_by_another_which_resumes(stores):
    a = stores.start("127.0.0.1")
    slow = stores.start("127.0.0.2", 512 * MiB, "--max-serve-bytes-per-s", str(8 * MiB))
    other = stores.start("127.0.0.3")
    oid, data = new_oid(), pattern(48 * MiB, seed=3)
    slow.put(oid, data)
    other.put(oid, data)

    result: Dict[str, object] = {}

    def pull() -> None:
        result["reply"] = a.call(lambda c: c.pull(oid, [slow.address, other.address]))

    t = threading.Thread(target=pull)
    t.start()
    try:
        wait_for(lambda: a.stats().pulled_bytes >= 4 * MiB, 60,
                 message="the transfer from the first holder to be under way")
        slow.proc.send_signal(signal.SIGKILL)
    finally:
        t.join(120)
    reply = result["reply"]
    assert reply.ok, reply
    assert [f.holder for f in reply.failures] == []  # a successful pull reports no failure
    assert read_copy(a, oid, len(data)) == data
    sa = a.stats()
    assert sa.pulls == 1 and sa.pull_failovers == 1 and sa.pulls_failed == 0
    resumed = other.stats().served_bytes
    assert 0 < resumed <= len(data) - 4 * MiB, "the second holder resent what had arrived"


def test_when_every_holder_fails_the_reply_says_why_for_each_and_nothing_is_left(stores):
    a = stores.start("127.0.0.1")
    b = stores.start("127.0.0.2")
    gone = stores.start("127.0.0.3")
    gone.proc.kill()
    gone.proc.wait(10)
    oid = new_oid()

    reply = a.call(lambda c: c.pull(oid, [gone.address, b.address]))
    assert not reply.ok
    kinds = [(f.holder, f.kind) for f in reply.failures]
    assert kinds == [(gone.address, object_store_pb2.HolderFailure.UNREACHABLE),
                     (b.address, object_store_pb2.HolderFailure.MISSING)]
    assert gone.address in reply.failures[0].message
    assert a.stats().pulls_failed == 1 and a.stats().num_unsealed == 0 and a.files() == []

    # The core worker's side: an explicit failure value, and the error a get() raises.
    async def via_puller(c: StoreClient):
        return await ObjectPuller(c).pull(oid, holders_of(gone.address, [b.address]))

    failed = a.call(via_puller)
    assert isinstance(failed, PullFailed) and failed.lost and failed.object_missing
    assert not failed.holders_unreachable
    err = failed.error(lambda h: f"node X ({h})")
    assert isinstance(err, ObjectLostError)
    assert f"node X ({gone.address}) is unreachable" in str(err)
    assert f"node X ({b.address}) is missing" in str(err)
    # The dead holder failed a moment ago: the next pull asks the live one first.
    again = a.call(lambda c: c.pull(oid, [gone.address, b.address]))
    assert [f.holder for f in again.failures] == [b.address, gone.address]


def test_a_holder_killed_mid_transfer_with_no_other_fails_the_pull_cleanly(stores):
    a = stores.start("127.0.0.1")
    slow = stores.start("127.0.0.2", 512 * MiB, "--max-serve-bytes-per-s", str(8 * MiB))
    oid, data = new_oid(), pattern(32 * MiB, seed=4)
    slow.put(oid, data)
    result: Dict[str, object] = {}

    async def via_puller(c: StoreClient):
        return await ObjectPuller(c).pull(oid, [slow.address])

    t = threading.Thread(target=lambda: result.update(r=a.call(via_puller)))
    t.start()
    try:
        wait_for(lambda: a.stats().pulled_bytes > 0, 60, message="the transfer to start")
        slow.proc.send_signal(signal.SIGKILL)
    finally:
        t.join(120)
    failed = result["r"]
    assert isinstance(failed, PullFailed) and failed.holders_unreachable
    assert slow.address in failed.failures[0].message or "closed" in failed.failures[0].message
    assert "of 33554432 bytes" in failed.failures[0].message
    sa = a.stats()
    assert sa.pulls_failed == 1 and sa.num_unsealed == 0 and sa.used == 0
    wait_for(lambda: a.files() == [], 10, message="the partial copy's file to be removed")


def test_deleting_an_object_while_it_is_pulled_stops_the_transfer(stores):
    a = stores.start("127.0.0.1")
    slow = stores.start("127.0.0.2", 512 * MiB, "--max-serve-bytes-per-s", str(8 * MiB))
    oid = new_oid()
    slow.put(oid, pattern(64 * MiB, seed=5))
    result: Dict[str, object] = {}
    t = threading.Thread(target=lambda: result.update(r=a.call(lambda c: c.pull(oid, [slow.address]))))
    t.start()
    try:
        wait_for(lambda: a.stats().pulled_bytes > 0, 60, message="the transfer to start")
        a.call(lambda c: c.delete([oid]))
    finally:
        t.join(60)
    reply = result["r"]
    assert not reply.ok and "freed while being pulled" in reply.message
    assert a.stats().used == 0
    assert a.stats().pulled_bytes < 64 * MiB
    wait_for(lambda: a.files() == [], 10, message="the partial copy's file to be removed")


def test_a_store_stopped_mid_pull_exits_at_once_and_leaves_no_file(stores):
    a = stores.start("127.0.0.1")
    slow = stores.start("127.0.0.2", 512 * MiB, "--max-serve-bytes-per-s", str(4 * MiB))
    oid = new_oid()
    slow.put(oid, pattern(64 * MiB, seed=7))
    result: Dict[str, object] = {}

    def pull() -> None:
        try:
            result["r"] = a.call(lambda c: c.pull(oid, [slow.address]))
        except Exception as exc:  # noqa: BLE001 - the store went away under the call
            result["r"] = exc

    t = threading.Thread(target=pull)
    t.start()
    try:
        wait_for(lambda: a.stats().pulled_bytes > 0, 60, message="the transfer to start")
        a.proc.terminate()
        assert a.proc.wait(10) == 0  # not held up by the transfer's blocked thread
    finally:
        t.join(60)
    assert not getattr(result["r"], "ok", False), result["r"]
    assert a.files() == []


def test_the_transfer_port_reads_nothing_before_the_token(stores):
    b = stores.start("127.0.0.2")
    oid = new_oid()
    b.put(oid, b"x" * MiB)
    host = "127.0.0.2"
    request = frames.frame(object_store_pb2.TransferRequest(object_id=oid).SerializeToString())

    with socket.create_connection((host, b.transfer_port), timeout=10) as s:
        s.sendall(frames.frame(frames.MAGIC + b"wrong-token") + request)
        answer = frames.recv_frame(s, frames.MAX_HELLO_BYTES)
        assert answer is not None and b"authentication failed" in answer
        try:  # closed: the request behind the hello was never answered
            assert s.recv(1) == b""
        except ConnectionResetError:  # closed with the request unread
            pass

    with socket.create_connection((host, b.transfer_port), timeout=10) as s:
        s.sendall(request)  # no hello at all: the request is taken for one, and refused
        answer = frames.recv_frame(s, frames.MAX_HELLO_BYTES)
        assert answer is not None and b"bad hello" in answer
    assert b.stats().serves == 0

    with socket.create_connection((host, b.transfer_port), timeout=10) as s:
        s.sendall(frames.hello(TOKEN) + request)
        assert frames.recv_frame(s, frames.MAX_HELLO_BYTES) == b""
        header = object_store_pb2.TransferHeader.FromString(frames.recv_frame(s, 1024))
        assert header.found and header.size == header.length == MiB
    wait_for(lambda: b.stats().serves == 1, 10, message="the served request to be counted")


# ---- a two-node cluster ---------------------------------------------------------------------
def store_stats(address: str, token: str) -> object_store_pb2.StoreStats:
    async def go():
        client = StoreClient(address, token)
        try:
            return await client.stats()
        finally:
            await client.close()
    return run(go())


def test_get_of_an_object_whose_only_holder_dies_mid_pull_names_it(tmp_path, fresh_runtime):
    root = str(tmp_path / "sessions")
    ctx = ray.init(num_cpus=1, object_store_memory=256 * MiB, _temp_dir=root)
    token = open(os.path.join(ctx.address_info["session_dir"], "token")).read()
    second = Node(NodeConfig(
        head=False, node_ip="127.0.0.2", gcs_address=ctx.address_info["gcs_address"],
        num_cpus=1, resources={"second": 1}, session_dir=new_session_dir(root), token=token,
        object_store_memory=256 * MiB,
        component_env={"object_store": {"RUNTIME_OBJECT_SERVE_MAX_BYTES_PER_S": str(8 * MiB)}}))
    second.start()
    try:
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 30,
                 message="the second node to register")
        local = ctx.address_info["object_store_address"]

        @ray.remote(resources={"second": 1}, max_retries=0)
        def make():
            return np.ones(48 * MiB // 8)

        ref = make.remote()
        ray.wait([ref], timeout=120)
        errors: List[BaseException] = []

        def get() -> None:
            try:
                ray.get(ref, timeout=120)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                errors.append(exc)

        t = threading.Thread(target=get)
        t.start()
        try:
            wait_for(lambda: store_stats(local, token).pulled_bytes > 0, 60,
                     message="the pull from node 2 to start")
            os.kill(second.pids["object_store"], signal.SIGKILL)
        finally:
            t.join(120)
        assert len(errors) == 1 and isinstance(errors[0], ObjectLostError), errors
        message = str(errors[0])
        assert ref.hex() in message and second.store_address in message
        assert "unreachable" in message
        stats = store_stats(local, token)
        assert stats.num_unsealed == 0 and stats.pulls_failed == 1
        shm_dir = stats.shm_dir
        partial = object_file_name(stats.node_id, ref.binary())
        assert not os.path.exists(os.path.join(shm_dir, partial))
    finally:
        second.stop()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    if ray.is_initialized():
        ray.shutdown()
    root = str(tmp_path_factory.mktemp("sessions"))
    ctx = ray.init(num_cpus=4, object_store_memory=768 * MiB, _temp_dir=root)
    token = open(os.path.join(ctx.address_info["session_dir"], "token")).read()
    second = Node(NodeConfig(head=False, node_ip="127.0.0.2",
                             gcs_address=ctx.address_info["gcs_address"], num_cpus=1,
                             resources={"second": 1}, session_dir=new_session_dir(root),
                             token=token, object_store_memory=512 * MiB))
    second.start()
    pids = [p.pid for p in psutil.Process().children(recursive=True)]
    try:
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 30,
                 message="the second node to register")
        yield ctx, second, token
    finally:
        second.stop()
        ray.shutdown()
        assert_all_gone(pids)


@ray.remote(resources={"second": 1})
def make_on_second(n: int, seed: int):
    return np.arange(n, dtype=np.int64) * 7 + seed


def test_a_100mb_object_made_on_node_2_is_read_on_node_1(two_nodes):
    ctx, second, token = two_nodes
    local = ctx.address_info["object_store_address"]
    before, served_before = store_stats(local, token), store_stats(second.store_address, token)
    n = 100 * MiB // 8
    ref = make_on_second.remote(n, 3)
    ray.wait([ref], timeout=120)
    arr = ray.get(ref, timeout=120)
    assert arr.shape == (n,) and np.array_equal(arr, np.arange(n, dtype=np.int64) * 7 + 3)
    assert not arr.flags.writeable  # a zero-copy view of the local copy
    after, served = store_stats(local, token), store_stats(second.store_address, token)
    assert after.pulls - before.pulls == 1
    assert after.pulled_bytes - before.pulled_bytes >= 100 * MiB
    assert served.served_bytes - served_before.served_bytes >= 100 * MiB


def test_many_tasks_of_one_node_reading_a_remote_object_pull_it_once(two_nodes):
    ctx, second, token = two_nodes
    local = ctx.address_info["object_store_address"]
    head_id = ctx["node_id"]
    n = 64 * MiB // 8
    ref = make_on_second.remote(n, 5)
    ray.wait([ref], timeout=120)
    before = store_stats(local, token)

    @ray.remote(scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False))
    def total(refs):
        arr = ray.get(refs[0])
        return int(arr[-1]), int(arr.sum() % 1_000_003), os.getpid()

    results = ray.get([total.remote([ref]) for _ in range(4)], timeout=180)
    expect = np.arange(n, dtype=np.int64) * 7 + 5
    assert {r[:2] for r in results} == {(int(expect[-1]), int(expect.sum() % 1_000_003))}
    after = store_stats(local, token)
    assert after.pulls - before.pulls == 1, "the object was transferred more than once"
    assert 64 * MiB <= after.pulled_bytes - before.pulled_bytes < 65 * MiB
