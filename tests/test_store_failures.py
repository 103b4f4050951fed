"""The object store when parts fail: what dead processes leave in shared memory is
reclaimed, a dead store is named in errors, and reads of one object share one mapping.

Everything runs as real processes: drivers with private clusters, node agents,
bare object stores and writer processes, each killed with SIGKILL where the test
says so. Every process a test starts is killed by PID when it ends, even on failure.
"""
from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import psutil
import pytest

from agent_helpers import Farm, wait_for
from helpers.env import scrubbed_env
from runtime.exceptions import ClusterConnectionError
from runtime.object_store.client import StoreClient, map_object

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
SHM = Path("/dev/shm")
MiB = 1 << 20
TOKEN = "test-token-" + uuid.uuid4().hex

#: A driver with a private cluster: puts three 2 MiB arrays, reports its node and
#: processes, then holds everything until its stdin closes.
HOLDING_DRIVER = """
import json, sys
import numpy as np, psutil
import runtime as ray
ctx = ray.init(num_cpus=1, object_store_memory=64 << 20)
refs = [ray.put(np.full((2 << 20) // 8, i, dtype=np.float64)) for i in range(3)]
pids = [p.pid for p in psutil.Process().children(recursive=True)]
print(json.dumps({"node_id": ctx["node_id"], "pids": pids}), flush=True)
sys.stdin.readline()
ray.shutdown()
"""

#: Creates objects in a store and writes part of each, never seals them, prints
#: their paths, then waits to be killed. argv: store address, size, object ids (hex).
WRITER = """
import asyncio, os, sys
from runtime.object_store.client import StoreClient
async def main():
    client = StoreClient(sys.argv[1], os.environ["RUNTIME_CLUSTER_TOKEN"])
    paths = []
    for object_id in sys.argv[3:]:
        paths.append(await client.create(bytes.fromhex(object_id), int(sys.argv[2])))
        with open(paths[-1], "r+b") as fh:
            fh.write(b"w" * 4096)
    print(" ".join(paths), flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


# ---- helpers ------------------------------------------------------------------------------
def node_files(node_id_hex: str, directory: Path = SHM) -> List[str]:
    """The object files and the lock file of a node's store."""
    node = node_id_hex[:12]
    return sorted(n for n in os.listdir(directory)
                  if n.startswith(f"rt-{node}-") or n == f".rt-{node}.lock")


def object_files(node_id_hex: str, directory: Path = SHM) -> List[str]:
    return [n for n in node_files(node_id_hex, directory) if not n.startswith(".")]


def read_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The next stdout line of proc, failing with its stderr if it exits or stalls."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError(f"no output from pid {proc.pid} within {timeout}s")
    finally:
        sel.close()
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(f"pid {proc.pid} exited {proc.returncode}: "
                             f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
    return line


def gone(pids: List[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


class Processes:
    """Every process a test starts (and their descendants), SIGKILLed by PID at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.popens: List[subprocess.Popen] = []
        self.pids: set[int] = set()

    def start(self, argv: List[str], env: Dict[str, str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(argv, env=env, cwd=str(REPO), text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, **kw)
        self.popens.append(proc)
        return proc

    def driver(self, script: str) -> subprocess.Popen:
        return self.start([PY, "-c", script],
                          scrubbed_env(RUNTIME_SESSION_ROOT=str(self.tmp / "sessions")))

    def remember(self, pids: List[int]) -> None:
        self.pids.update(pids)

    def cleanup(self) -> None:
        for proc in self.popens:
            try:
                self.pids.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
            except psutil.Error:
                pass
            self.pids.add(proc.pid)
        victims = []
        for pid in self.pids:
            try:
                p = psutil.Process(pid)
                p.send_signal(signal.SIGKILL)
                victims.append(p)
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=10)
        for proc in self.popens:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.cleanup()


@pytest.fixture
def shm_dir():
    """A private directory on the real tmpfs, so a test's sweeps see only its own stores."""
    path = SHM / f"rtf-test-{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o700)
    yield path
    for name in os.listdir(path):
        os.unlink(path / name)
    path.rmdir()


@pytest.fixture
def start_store(tmp_path, shm_dir, processes) -> Callable[..., tuple]:
    """start_store(capacity, *args) -> (address, node_id hex, pid) of a bare store process."""
    def start(capacity: int, *extra: str) -> tuple:
        session = tmp_path / f"store-{uuid.uuid4().hex[:8]}"
        session.mkdir()
        node_id = uuid.uuid4().hex + uuid.uuid4().hex[:24]
        ready = session / "ready"
        proc = processes.start(
            [PY, "-m", "runtime.object_store", "--node-id", node_id, "--session-dir",
             str(session), "--capacity", str(capacity), "--host", "127.0.0.1", "--port", "0",
             "--ready-file", str(ready), "--shm-dir", str(shm_dir), *extra],
            scrubbed_env(RUNTIME_CLUSTER_TOKEN=TOKEN))
        wait_for(lambda: ready.exists() or proc.poll() is not None, 30,
                 message="the object store's ready file")
        assert proc.poll() is None, proc.stderr.read()
        port = json.loads(ready.read_text())["port"]
        return f"127.0.0.1:{port}", node_id, proc.pid
    return start


def run(coro):
    return asyncio.run(coro)


async def stats(address: str, token: str = TOKEN):
    client = StoreClient(address, token)
    try:
        return await client.stats()
    finally:
        await client.close()


# ---- 1. files of dead stores are swept --------------------------------------------------------
def test_files_of_a_sigkilled_driver_are_swept_by_the_next_cluster(processes):
    first = processes.driver(HOLDING_DRIVER)
    info = json.loads(read_line(first))
    processes.remember(info["pids"])
    node = info["node_id"]
    wait_for(lambda: len(object_files(node)) == 3, 30, message="the three objects' files")
    first.kill()
    first.wait(10)
    # Its private cluster dies with it (parent-death signal), store included.
    wait_for(lambda: gone(info["pids"]), 30, message="the killed driver's cluster to exit")

    second = processes.driver(HOLDING_DRIVER)
    info2 = json.loads(read_line(second))
    processes.remember(info2["pids"])
    wait_for(lambda: not node_files(node), 30,
             message=f"the new cluster's store to sweep node {node[:12]}'s files "
                     f"(left: {node_files(node)})")
    # Only provably dead stores are swept: the live one keeps its objects.
    assert len(object_files(info2["node_id"])) == 3
    second.stdin.close()
    assert second.wait(60) == 0, second.stderr.read()[-3000:]
    assert node_files(info2["node_id"]) == []  # a clean shutdown leaves nothing either


def test_store_and_agent_sigkilled_under_node_agent_leave_no_files(tmp_path):
    farm = Farm(tmp_path / "farm")
    try:
        head = farm.agent("head", "127.0.0.1")
        env = scrubbed_env()
        out = head.ctl("start", "--head", "--node-ip", "127.0.0.1", "--port",
                       str(head.ports["gcs"]), "--json", env=env)
        assert out.returncode == 0, (out.stdout, out.stderr)
        token = json.loads(out.stdout)["token"]
        address = f"127.0.0.1:{head.ports['object_store']}"

        def put_two() -> str:
            """Two sealed 1 MiB objects in the agent's store; the node prefix of their files."""
            async def main() -> str:
                client = StoreClient(address, token)
                try:
                    paths = [await client.put(uuid.uuid4().bytes, [b"x" * MiB])
                             for _ in range(2)]
                finally:
                    await client.close()
                return os.path.basename(paths[0]).split("-")[1]
            return run(main())

        # The store killed alone: restarted by its agent, and its old files are gone.
        node = put_two()
        assert len(object_files(node)) == 2
        old = head.process("object_store")
        os.kill(old.pid, signal.SIGKILL)
        head.wait_restarted("object_store", old.pid)
        wait_for(lambda: not object_files(node), 30,
                 message=f"the dead store's files to go (left: {object_files(node)})")

        # The agent killed, taking its whole node with it: the next start sweeps.
        wait_for(lambda: head.process("object_store").state == "running", 30,
                 message="the restarted store")
        node = wait_for(put_two, 30, message="a put into the restarted store")
        assert len(object_files(node)) >= 2
        agent_pid = head.pid()
        children = [p.pid for p in psutil.Process(agent_pid).children(recursive=True)]
        os.kill(agent_pid, signal.SIGKILL)
        wait_for(lambda: gone([agent_pid] + children), 30,
                 message="the killed agent and its children to exit")
        head.start_daemon(env=env)
        wait_for(lambda: head.status().phase == "running", 60, message="the node to come back")
        wait_for(lambda: not object_files(node), 30,
                 message=f"the new store to sweep the dead node's files "
                         f"(left: {object_files(node)})")
        if wait_for(put_two, 30, message="a put into the new store") != node:
            wait_for(lambda: not node_files(node), 30, message="the dead node's lock file to go")
    finally:
        farm.cleanup()


def test_sweeps_remove_dead_stores_files_and_leave_live_and_foreign_ones(start_store, shm_dir):
    """Sweeps remove only what provably belongs to a dead store of ours."""
    # A file named like an object but of a node with no lock file: maybe an older
    # store's, maybe somebody else's; never touched.
    stray = shm_dir / f"rt-{'ab' * 6}-{'cd' * 14}"
    stray.write_bytes(b"s")
    address, live, _ = start_store(8 * MiB)

    async def put() -> None:
        client = StoreClient(address, TOKEN)
        await client.put(uuid.uuid4().bytes, [b"y" * MiB])
        await client.close()
    run(put())
    # A dead store's leftovers: its lock file, which nobody holds, and an object.
    dead = "0123456789ab"
    (shm_dir / f".rt-{dead}.lock").write_text("1 1\n")
    (shm_dir / f"rt-{dead}-{'ef' * 14}").write_bytes(b"d" * 4096)
    start_store(8 * MiB)  # sweeps when it starts
    wait_for(lambda: not node_files(dead, shm_dir), 30,
             message=f"the dead store's files to be swept (left: {node_files(dead, shm_dir)})")
    assert len(object_files(live, shm_dir)) == 1  # alive: it holds its lock
    assert (shm_dir / f".rt-{live[:12]}.lock").exists()
    assert stray.exists()


# ---- 2. unsealed objects of dead writers are reclaimed ----------------------------------------
def test_unsealed_object_of_a_killed_writer_is_reclaimed(start_store, processes):
    address, _, _ = start_store(8 * MiB, "--no-spill")
    size = 6 * MiB
    before = run(stats(address)).used
    writer = processes.start([PY, "-c", WRITER, address, str(size), uuid.uuid4().hex],
                             scrubbed_env(RUNTIME_CLUSTER_TOKEN=TOKEN))
    path = read_line(writer).strip()
    assert run(stats(address)).used == before + size and os.path.exists(path)
    writer.kill()
    writer.wait(10)
    wait_for(lambda: run(stats(address)).used == before, 10,
             message="the dead writer's unsealed object to be freed")
    s = run(stats(address))
    assert (s.num_unsealed, s.reclaimed_objects) == (0, 1)
    wait_for(lambda: not os.path.exists(path), 10, message=f"{path} to be removed")

    async def fits() -> None:
        client = StoreClient(address, TOKEN)
        await client.put(uuid.uuid4().bytes, [np.zeros(size, dtype=np.uint8)])
        await client.close()
    run(fits())  # an object of the same size fits again


def test_object_recreated_after_its_writer_died_is_written_afresh(start_store, processes):
    """A retried writer (say, a task retried after its worker died) must not be told the
    object exists and seal the dead writer's half-written bytes."""
    address, _, _ = start_store(8 * MiB, "--no-spill")
    object_id = uuid.uuid4().bytes
    writer = processes.start([PY, "-c", WRITER, address, str(MiB), object_id.hex()],
                             scrubbed_env(RUNTIME_CLUSTER_TOKEN=TOKEN))
    read_line(writer)
    writer.kill()
    writer.wait(10)
    data = np.arange(MiB, dtype=np.uint8)

    async def main() -> bytes:
        client = StoreClient(address, TOKEN)
        try:
            await client.put(object_id, [data])  # at once: the store may not have seen the exit
            (obj,) = await client.get([object_id], 5)
            return bytes(map_object(obj.path, obj.size))
        finally:
            await client.close()
    assert run(main()) == data.tobytes()


def test_an_object_two_writers_create_is_freed_only_when_both_died(start_store, processes):
    """Two processes on a node may pull the same object at once (both Create it); the
    death of one must not free it under the other."""
    address, _, _ = start_store(16 * MiB, "--no-spill")
    shared, alone = uuid.uuid4().hex, uuid.uuid4().hex
    env = scrubbed_env(RUNTIME_CLUSTER_TOKEN=TOKEN)
    first = processes.start([PY, "-c", WRITER, address, str(2 * MiB), shared, alone], env)
    read_line(first)
    second = processes.start([PY, "-c", WRITER, address, str(2 * MiB), shared], env)
    read_line(second)
    assert run(stats(address)).used == 4 * MiB
    first.kill()
    first.wait(10)
    # Once the object only the first wrote is freed, the store has handled its exit.
    wait_for(lambda: run(stats(address)).used == 2 * MiB, 10,
             message="the first writer's own object to be freed")
    assert run(stats(address)).num_unsealed == 1  # the shared one: the second still writes it
    second.kill()
    second.wait(10)
    wait_for(lambda: run(stats(address)).used == 0, 10,
             message="the shared object to be freed with its last writer")


# ---- 3. errors name the store -------------------------------------------------------------------
def test_calls_to_a_dead_store_name_it(fresh_runtime):
    ray = fresh_runtime
    ctx = ray.init(num_cpus=1, object_store_memory=8 * MiB)
    address, node = ctx["object_store_address"], ctx["node_id"][:12]
    refs = [ray.put(np.full((3 * MiB) // 8, i, dtype=np.float64)) for i in range(3)]
    # The first array was spilled to make room: reading it needs the store.
    store = next(p for p in psutil.Process().children(recursive=True)
                 if "runtime.object_store" in p.cmdline())
    store.send_signal(signal.SIGKILL)
    store.wait(10)
    for what, call in (("put", lambda: ray.put(np.zeros(MiB))),
                       ("get", lambda: ray.get(refs[0], timeout=30))):
        with pytest.raises(ClusterConnectionError) as err:
            call()
        message = str(err.value)
        assert f"object store at {address} is gone" in message, (what, message)
        assert f"node {node}" in message, (what, message)


# ---- 4. one mapping per object per process -------------------------------------------------------
def test_two_gets_of_one_object_share_one_mapping(fresh_runtime):
    ray = fresh_runtime
    ctx = ray.init(num_cpus=1, object_store_memory=64 * MiB)
    ref = ray.put(np.arange((4 * MiB) // 8, dtype=np.float64))
    a = ray.get(ref)
    b = ray.get(ref)
    assert np.shares_memory(a, b) and a.ctypes.data == b.ctypes.data
    name = f"rt-{ctx['node_id'][:12]}-{ref.hex()}"

    def mapped() -> int:
        with open("/proc/self/maps") as fh:
            return sum(1 for line in fh if name in line)
    assert mapped() == 1
    del a, b, ref
    # Released with its last view (the object itself is freed too, asynchronously).
    wait_for(lambda: mapped() == 0, 10, message=f"{name} to be unmapped")


def test_a_recreated_object_is_not_read_from_a_stale_mapping(start_store):
    address, _, _ = start_store(8 * MiB)
    object_id = uuid.uuid4().bytes

    async def main() -> None:
        client = StoreClient(address, TOKEN)
        try:
            path = await client.put(object_id, [b"a" * MiB])
            first = map_object(path, MiB)
            again = map_object(path, MiB)
            assert np.shares_memory(np.frombuffer(first, np.uint8), np.frombuffer(again, np.uint8))
            await client.delete([object_id])
            assert await client.put(object_id, [b"b" * MiB]) == path  # same id, same name
            second = map_object(path, MiB)
            assert bytes(second[:4]) == b"bbbb"
            assert bytes(first[:4]) == b"aaaa"  # the old view still sees the old object
        finally:
            await client.close()
    run(main())
