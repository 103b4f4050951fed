"""raytop's objects view says where each object is held and whether it is spilled.

A real 2-node cluster on loopback (agents on 127.0.0.1 and 127.0.0.2, 64 MiB object
stores): a driver on the head puts more large objects than the head's store holds, so
the oldest are spilled to disk, and a task on the other node reads the newest, which
copies it into that node's store. The agent's objects view joins the owners' objects
with each node's store listing (ObjectStore.List), which needs the cluster token like
every store RPC.
"""
from __future__ import annotations

import asyncio
import json
import select
import subprocess
from typing import Dict, List

import grpc
import pytest

from agent.client import AgentClient
from agent_helpers import NEUTRAL_CWD, PY, Farm, clean_env, wait_for
from runtime import rpc
from runtime.object_store.client import StoreClient
from runtime.object_store.server import LIST_MAX
from runtime.object_store.store import ObjState, StoreState
from runtime.protocol import agent_pb2, object_store_pb2, object_store_pb2_grpc

HEAD, W1 = "127.0.0.1", "127.0.0.2"
MiB = 1 << 20
#: 8 objects of 12 MiB in a 64 MiB store: the 6th, 7th and 8th puts spill the 1st, 2nd, 3rd.
OBJECTS, OBJECT_MIB, SPILLED = 8, 12, 3

DRIVER = """
import json, sys, runtime as ray
from runtime.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1])
refs = [ray.put(bytes([i]) * (%d << 20)) for i in range(%d)]

@ray.remote
def read(x):
    return len(x)

w1 = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == sys.argv[2])
# Read on the other node: its store gets a copy of the newest object (still in the head's memory).
on_w1 = read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(w1, soft=False))
n = ray.get(on_w1.remote(refs[-1]), timeout=120)
print(json.dumps({"ids": [r.hex() for r in refs], "read": n}), flush=True)
sys.stdin.read()  # hold the refs until the test is done
""" % (OBJECT_MIB, OBJECTS)


class Cluster:
    def __init__(self, farm: Farm) -> None:
        self.farm = farm
        self.head = farm.agent("head", HEAD)
        self.w1 = farm.agent("w1", W1)
        self.token = ""
        self.ids: List[str] = []
        self.driver: subprocess.Popen | None = None

    def view(self, **kw) -> agent_pb2.ViewReply:
        with AgentClient(self.head.socket) as c:
            return c.stub.View(agent_pb2.ViewRequest(view="objects", **kw), timeout=60)

    def rows(self, **kw) -> Dict[str, Dict[str, str]]:
        reply = self.view(**kw)
        assert not reply.filter_error, reply.filter_error
        return {r.key: dict(zip(reply.table.columns, r.cells)) for r in reply.table.rows}

    def describe(self, key: str) -> Dict[str, str]:
        with AgentClient(self.head.socket) as c:
            reply = c.stub.Describe(agent_pb2.DescribeRequest(view="objects", key=key),
                                    timeout=60)
        return {f.name: f.value for f in reply.fields}

    def store_address(self) -> str:
        return f"{HEAD}:{self.head.ports['object_store']}"


def _first_line(proc: subprocess.Popen, timeout: float, farm: Farm) -> str:
    """The driver's report, waited for with a deadline; on failure, what it and the
    agents said."""
    ready = select.select([proc.stdout], [], [], timeout)[0]
    line = proc.stdout.readline() if ready else ""
    if line:
        return line
    if ready:  # end of file: it is exiting
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    why = f"exited {proc.poll()} before its report" if proc.poll() is not None else \
        f"printed no report in {timeout}s"
    proc.kill()
    proc.wait(10)
    logs = "".join(f"\n--- {path.relative_to(farm.root)}:\n{path.read_text()[-1500:]}"
                   for path in sorted(farm.root.glob("*/state/**/*.log")))
    raise AssertionError(f"the driver {why}:\n{proc.stderr.read()[-4000:]}{logs}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    farm = Farm(tmp_path_factory.mktemp("objects"))
    c = Cluster(farm)
    try:
        for a in (c.head, c.w1):
            a.start_daemon()
        r = c.head.ctl_json("start", "--head", "--node-ip", HEAD)
        gcs, c.token = r["gcs_address"], r["token"]
        proc = c.w1.ctl("join", gcs, "--token", c.token, "--node-ip", W1)
        assert proc.returncode == 0, proc.stderr
        wait_for(lambda: len([n for n in c.head.status().nodes if n.state == "ALIVE"]) == 2,
                 60, message="2 alive nodes")
        # The driver names the farm's directory, so the farm's cleanup finds it by PID.
        c.driver = subprocess.Popen([PY, "-c", DRIVER, gcs, W1, str(farm.root)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=NEUTRAL_CWD,
                                    env=clean_env(NODE_AGENT_TOKEN=c.token))
        out = json.loads(_first_line(c.driver, 150, farm))
        assert out["read"] == OBJECT_MIB * MiB, out
        c.ids = out["ids"]
        yield c
    finally:
        if c.driver is not None and c.driver.poll() is None:
            c.driver.kill()
            c.driver.wait(10)
        farm.cleanup()


def _ours(cluster: Cluster) -> Dict[str, Dict[str, str]]:
    """The driver's objects as the view shows them, once all of them are listed."""
    rows = cluster.rows()
    return {i: rows[i] for i in cluster.ids} if all(i in rows for i in cluster.ids) else {}


def test_spilled_and_resident_objects_show_where_they_are_held(cluster):
    rows = wait_for(lambda: _ours(cluster), 60, message="the driver's objects in the view")
    spilled, resident = cluster.ids[:SPILLED], cluster.ids[SPILLED:]
    for i in spilled:
        assert rows[i]["SPILLED"] == "yes", rows[i]
        assert rows[i]["WHERE"] == f"store {HEAD} (spilled)", rows[i]
        assert rows[i]["SIZE"] == f"{OBJECT_MIB:.1f} MiB", rows[i]
    for i in resident[:-1]:
        assert rows[i]["SPILLED"] == "no", rows[i]
        assert rows[i]["WHERE"] == f"store {HEAD}", rows[i]
    # The newest was read on the other node: two copies, both in memory.
    newest = rows[cluster.ids[-1]]
    assert newest["SPILLED"] == "no" and newest["WHERE"] == f"store {HEAD}, {W1}", newest


def test_filters_on_store_fields_and_limits(cluster):
    wait_for(lambda: _ours(cluster), 60, message="the driver's objects in the view")
    reply = cluster.view(filter="spilled=yes", limit=2)
    assert reply.table.matched == SPILLED and len(reply.table.rows) == 2, reply.table
    assert {r.key for r in reply.table.rows} <= set(cluster.ids[:SPILLED])
    on_w1 = cluster.rows(filter=f"where={W1}")
    assert list(on_w1) == [cluster.ids[-1]], on_w1
    resident = cluster.rows(filter="spilled==no size>10000000", sort="OBJECT")
    assert sorted(resident) == sorted(cluster.ids[SPILLED:]), resident


def test_describe_shows_each_copy_and_its_state(cluster):
    wait_for(lambda: _ours(cluster), 60, message="the driver's objects in the view")
    first = cluster.describe(cluster.ids[0])
    (line,) = first["locations"].splitlines()
    assert f"node_ip={HEAD}" in line and "state=spilled" in line and "disk_copy=True" in line, \
        first
    assert first["spilled"] == "yes"
    newest = cluster.describe(cluster.ids[-1])
    lines = sorted(newest["locations"].splitlines())
    assert len(lines) == 2, newest
    assert f"node_ip={HEAD}" in lines[0] and "state=sealed" in lines[0], lines
    assert f"node_ip={W1}" in lines[1] and "state=sealed" in lines[1], lines


def test_store_list_needs_the_token_and_is_bounded(cluster):
    address = cluster.store_address()
    ids = [bytes.fromhex(i) for i in cluster.ids]
    request = object_store_pb2.ListObjectsRequest(object_ids=ids)
    with grpc.insecure_channel(address) as plain:
        stub = object_store_pb2_grpc.ObjectStoreStub(plain)
        for metadata in ((), (("authorization", "Bearer " + "0" * 64),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.List(request, metadata=metadata, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
    authed = object_store_pb2_grpc.ObjectStoreStub(rpc.sync_channel(address, cluster.token))
    reply = authed.List(request, timeout=30)
    states = {o.object_id.hex(): o.state for o in reply.objects}
    assert states == {i: "spilled" if k < SPILLED else "sealed"
                      for k, i in enumerate(cluster.ids)}, states
    assert reply.total >= OBJECTS and not reply.truncated and reply.node_id
    # With no ids: the largest objects, at most `limit` of them.
    top = authed.List(object_store_pb2.ListObjectsRequest(limit=2), timeout=30)
    assert len(top.objects) == 2 and top.truncated, top
    assert all(o.size >= OBJECT_MIB * MiB for o in top.objects), top
    too_many = [k.to_bytes(3, "big") for k in range(LIST_MAX + 1)]
    for bad, word in ((object_store_pb2.ListObjectsRequest(limit=LIST_MAX + 1), "limit"),
                      (object_store_pb2.ListObjectsRequest(object_ids=too_many), "ids")):
        with pytest.raises(grpc.RpcError) as err:
            authed.List(bad, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert word in err.value.details(), err.value.details()

    async def listed() -> List[object_store_pb2.StoreObjectInfo]:
        client = StoreClient(address, cluster.token)
        try:
            return await client.list_objects(ids[:1])
        finally:
            await client.close()

    (only,) = asyncio.run(listed())
    assert only.object_id == ids[0] and only.state == "spilled" and only.disk_copy


def test_store_state_listing_is_bounded_and_skips_unknown_ids():
    state = StoreState(100)
    for k, size in enumerate((10, 30, 20)):
        state.add_created(bytes([k + 1]), size, f"/shm/{k}")
    state.seal(b"\x02")
    entries, truncated = state.listing(None, 2)
    assert [e.size for e in entries] == [30, 20] and truncated
    entries, truncated = state.listing([b"\x03", b"\x09", b"\x02"], 10)
    assert [(e.object_id, e.state) for e in entries] == [(b"\x03", ObjState.CREATED),
                                                        (b"\x02", ObjState.SEALED)]
    assert not truncated
