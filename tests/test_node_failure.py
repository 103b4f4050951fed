"""A node that dies, as the GCS sees it (issue 12, section 2, GCS side).

* The placement-group reservation (runtime/gcs/pg_reservation.py), without sockets: a
  created group that loses a node keeps its other bundles and places the lost ones again;
  a restarted GCS undoes the attempt it found under way.
* End to end, with node agents on 127.0.0.1, .2 and .3: SIGKILL of node 3's agent and
  all its children. The node is marked DEAD with the reason within the timeout (and
  `agentctl status` says so); a detached actor that lived there, whose driver has
  exited, answers again from another node; a placement group's bundle that was there
  is placed on another node and takes tasks. A driver killed with SIGKILL has its job
  marked finished. A node whose raylet stops answering (SIGSTOP) is dead after
  NODE_DEATH_TIMEOUT_S.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import psutil
import pytest

from agent_helpers import NEUTRAL_CWD, PY, Agent, Farm, kill_all, wait_for, write_config
from helpers.env import scrubbed_env
from runtime import rpc
from runtime.gcs.pg_reservation import (Cancel, Commit, Created, GroupReservation, Outcome,
                                        Prepare, Retry, State)
from runtime.protocol import common_pb2, gcs_pb2, gcs_pb2_grpc

A, B, C = b"a" * 28, b"b" * 28, b"c" * 28


# -- the reservation state machine -----------------------------------------------------------


def created(placement) -> GroupReservation:
    r = GroupReservation(len(placement))
    prepares = r.begin(placement)
    commits = []
    for p in prepares:
        commits += r.prepared(p, Outcome.OK)
    out = []
    for c in commits:
        out += r.committed(c, Outcome.OK)
    assert out == [Created(tuple(placement))] and r.state is State.CREATED
    return r


def test_fsm_a_dead_node_loses_only_its_bundles():
    r = created([A, B, C])
    assert r.node_died(b"z" * 28) == ([], [])  # a node without bundles changes nothing
    lost, actions = r.node_died(C)
    assert lost == [2] and actions == [] and r.state is State.PENDING
    assert r.kept == {0: A, 1: B} and r.missing == [2]
    assert "died with bundle(s) [2]" in r.reason
    with pytest.raises(ValueError, match="bundles \\[2\\]"):
        r.begin([A, B, A])  # the kept bundles are not placed again
    prepares = r.begin({2: A})
    assert prepares == [Prepare(A, (2,))] and r.attempts == 2
    commits = r.prepared(prepares[0], Outcome.OK)
    assert commits == [Commit(A, (2,))]
    assert r.committed(commits[0], Outcome.OK) == [Created((A, B, A))]
    assert r.kept == {} and r.state is State.CREATED


def test_fsm_a_failed_replacement_undoes_only_its_own_bundles():
    r = created([A, B])
    r.node_died(B)
    prepares = r.begin({1: C})
    out = r.prepared(prepares[0], Outcome.REFUSED, "no room on C")
    assert out == [Retry("no room on C")] and r.state is State.PENDING
    assert r.kept == {0: A}  # bundle 0 never moved nor was cancelled


def test_fsm_a_kept_bundle_lost_during_an_attempt_undoes_the_attempt():
    r = created([A, B, C])
    r.node_died(C)
    prepares = r.begin({2: B})
    lost, actions = r.node_died(A)  # the node of kept bundle 0 dies while 2 is prepared
    assert lost == [0] and r.state is State.ABORTING and actions == []
    out = r.prepared(prepares[0], Outcome.OK)  # B prepared meanwhile: undone
    assert out == [Cancel(B, (2,)), ] and r.state is State.ABORTING
    assert r.cancelled(out[0], Outcome.OK) == [Retry(r.reason)]
    assert r.state is State.PENDING and r.missing == [0, 2] and r.kept == {1: B}


def test_fsm_removal_after_a_rescheduling_cancels_every_bundle_where_it_is():
    r = created([A, B])
    r.node_died(B)
    (p,) = r.begin({1: C})
    (c,) = r.prepared(p, Outcome.OK)
    assert r.committed(c, Outcome.OK) == [Created((A, C))]
    # Whatever the caller thinks is alive, the nodes holding bundles hear of the removal.
    cancels = r.remove([])
    assert {c.node for c in cancels} == {A, C} and all(c.remove for c in cancels)
    assert r.node_died(A) == ([], [])


def test_fsm_a_restarted_gcs_undoes_the_attempt_it_found_then_retries():
    # Mid-attempt when the GCS died (attempt 3 stored before its Prepares went out).
    r = GroupReservation.restored(2, State.PENDING, attempts=3)
    assert r.state is State.ABORTING
    cancels = r.recover([A, B])
    assert cancels == [Cancel(A, (0, 1)), Cancel(B, (0, 1))] and r.attempts == 3
    assert r.cancelled(cancels[0], Outcome.OK) == []
    assert r.cancelled(cancels[1], Outcome.LOST) == [Retry(r.reason)]
    assert r.state is State.PENDING and r.uncancelled == {B: (0, 1)}
    assert r.begin([A, B]) and r.attempts == 4  # a later Prepare than any cancelled one
    # Rescheduling when the GCS died: the bundles with a node stay, the others are undone.
    r = GroupReservation.restored(3, State.PENDING, attempts=5, placement=[A, b"", C])
    assert r.kept == {0: A, 2: C}
    assert r.recover([A, C]) == [Cancel(A, (1,)), Cancel(C, (1,))]
    # Nothing to undo without live nodes: PENDING at once.
    r = GroupReservation.restored(1, State.PENDING, attempts=1)
    assert r.recover([]) == [Retry(r.reason)] and r.state is State.PENDING
    # Created and removed groups stay as they were.
    done = GroupReservation.restored(2, State.CREATED, attempts=1, placement=[A, B])
    assert done.state is State.CREATED and done.recover([A]) == []
    assert done.node_died(B)[0] == [1]
    gone = GroupReservation.restored(2, State.REMOVED, attempts=1)
    assert gone.state is State.REMOVED and gone.node_died(A) == ([], [])


# -- end to end: three node agents, node 3 SIGKILLed --------------------------------------------

DEATH_TIMEOUT_S = 6.0

SETUP = """
import json, os, sys, runtime as ray
from runtime.util import placement_group, placement_group_table
from runtime.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], namespace="nf")
node3 = sys.argv[2]
@ray.remote(num_cpus=0)
class Mover:
    def __init__(self):
        self.n = 0
    def where(self):
        self.n += 1
        return ray.get_runtime_context().get_node_id(), os.getpid(), self.n
mover = Mover.options(name="mover", lifetime="detached", max_restarts=1,
                      scheduling_strategy=NodeAffinitySchedulingStrategy(node3, soft=True)).remote()
node, pid, n = ray.get(mover.where.remote(), timeout=60)
pg = placement_group([{"CPU": 0.5}] * 3, strategy="SPREAD", name="spread", lifetime="detached")
ray.get(pg.ready(), timeout=60)
print(json.dumps({"node": node, "pid": pid, "n": n,
                  "bundles": placement_group_table(pg)["bundles_to_node_id"]}))
ray.shutdown()
"""

AFTER = """
import json, sys, time, runtime as ray
from runtime.exceptions import RayActorError
from runtime.util import get_placement_group, placement_group_table
from runtime.util.scheduling_strategies import PlacementGroupSchedulingStrategy
ray.init(address=sys.argv[1], namespace="nf")
dead, index = sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + 90
while True:
    try:
        node, pid, n = ray.get(ray.get_actor("mover").where.remote(), timeout=30)
        break
    except (RayActorError, ValueError):  # restarting (or briefly unknown by name)
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
pg = get_placement_group("spread")
while True:
    table = placement_group_table(pg)
    if table["state"] == "CREATED" and dead not in table["bundles_to_node_id"].values():
        break
    if time.monotonic() > deadline:
        raise AssertionError(f"the group was not rescheduled: {table}")
    time.sleep(0.2)
@ray.remote(num_cpus=0.5)
def node_of():
    return ray.get_runtime_context().get_node_id()
ran_on = ray.get(node_of.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
    pg, placement_group_bundle_index=index)).remote(), timeout=60)
print(json.dumps({"node": node, "pid": pid, "n": n, "bundles": table["bundles_to_node_id"],
                  "ran_on": ran_on}))
ray.shutdown()
"""

PINNED = """
import json, os, sys, runtime as ray
from runtime.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], namespace="nf")
@ray.remote(num_cpus=0)
class Pinned:
    def pid(self):
        return os.getpid()
p = Pinned.options(name="pinned", lifetime="detached", max_restarts=0,
                   scheduling_strategy=NodeAffinitySchedulingStrategy(sys.argv[2], soft=False)
                   ).remote()
print(json.dumps({"pid": ray.get(p.pid.remote(), timeout=60)}))
ray.shutdown()
"""

IDLE_DRIVER = """
import sys, time, runtime as ray
ray.init(address=sys.argv[1])
print(ray.get_runtime_context().get_job_id(), flush=True)
time.sleep(600)
"""


def _config(agent: Agent, env: Dict[str, str]) -> None:
    write_config(Path(agent.config), agent.ports, cpus=2, crash_loop_failures=5, env=env)


@pytest.fixture(scope="module")
def three_hosts(tmp_path_factory):
    farm = Farm(tmp_path_factory.mktemp("nodefail"))
    env = {"RUNTIME_NODE_DEATH_TIMEOUT_S": str(DEATH_TIMEOUT_S)}
    try:
        head = farm.agent("head", "127.0.0.1")
        _config(head, env)
        out = head.ctl("start", "--head", "--node-ip", "127.0.0.1", "--port",
                       str(head.ports["gcs"]), "--json")
        assert out.returncode == 0, (out.stdout, out.stderr)
        started = json.loads(out.stdout)
        gcs, token = started["gcs_address"], started["token"]
        hosts = {"head": head}
        for name, ip in (("w2", "127.0.0.2"), ("w3", "127.0.0.3")):
            a = farm.agent(name, ip)
            _config(a, env)
            out = a.ctl("join", gcs, "--token", token, "--node-ip", ip)
            assert out.returncode == 0, (out.stdout, out.stderr)
            hosts[name] = a
        stub = gcs_pb2_grpc.GcsStub(rpc.sync_channel(gcs, token))
        wait_for(lambda: len(_alive(stub)) == 3, 60, message="three alive nodes")
        yield {"farm": farm, "gcs": gcs, "token": token, "stub": stub, **hosts}
    finally:
        farm.cleanup()


def _alive(stub) -> Dict[str, gcs_pb2.NodeInfo]:
    return {n.node_ip: n for n in stub.GetAllNodes(common_pb2.Empty(), timeout=10).nodes
            if n.alive}


def _run(script: str, *args: str, token: str) -> dict:
    proc = subprocess.run([PY, "-c", script, *args], capture_output=True, text=True, timeout=180,
                          env=scrubbed_env({"NODE_AGENT_TOKEN": token}), cwd=NEUTRAL_CWD)
    assert proc.returncode == 0, f"driver failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _agent_tree(agent: Agent) -> List[int]:
    pid = agent.pid()
    return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]


def test_a_killed_node_is_dead_and_its_actor_and_bundle_move(three_hosts):
    c = three_hosts
    stub = c["stub"]
    node3 = _alive(stub)["127.0.0.3"]
    node3_hex = node3.node_id.hex()
    before = _run(SETUP, c["gcs"], node3_hex, token=c["token"])  # its driver has exited
    assert before["node"] == node3_hex and before["n"] == 1, before
    lost = [int(i) for i, n in before["bundles"].items() if n == node3_hex]
    assert len(lost) == 1, before  # SPREAD: one bundle per node

    t0 = time.monotonic()
    kill_all(_agent_tree(c["w3"]))  # the host is gone: agent, raylet, store, workers
    wait_for(lambda: node3.node_id not in {n.node_id for n in _alive(stub).values()},
             DEATH_TIMEOUT_S + 5, interval=0.05, message="node 3 to be marked dead")
    detected = time.monotonic() - t0
    dead = {n.node_id: n for n in stub.GetAllNodes(common_pb2.Empty(), timeout=10).nodes}
    reason = dead[node3.node_id].death_reason
    assert f"127.0.0.3:{node3.raylet_port}" in reason, reason
    assert "refuses connections" in reason or "no resource report" in reason, reason
    status = c["head"].ctl_json("status")
    row = [n for n in status["nodes"] if n["id"] == node3_hex][0]
    assert row["state"] == "DEAD" and row["death_reason"] == reason, row

    after = _run(AFTER, c["gcs"], node3_hex, str(lost[0]), token=c["token"])
    assert after["node"] != node3_hex and after["pid"] != before["pid"], after
    assert after["n"] == 1  # a new process: the actor was restarted, not moved
    assert after["ran_on"] == after["bundles"][str(lost[0])] != node3_hex, after
    for i, n in before["bundles"].items():  # the other bundles stayed where they were
        if int(i) != lost[0]:
            assert after["bundles"][i] == n, (before, after)
    actors = {a.name: a for a in stub.ListActors(common_pb2.Empty(), timeout=10).actors}
    mover = actors["mover"]
    assert mover.state == "ALIVE" and mover.num_restarts == 1 and mover.node_id != node3.node_id
    print(f"\nnode SIGKILLed: marked dead after {detected:.2f}s ({reason})")


def test_a_driver_killed_with_sigkill_has_its_job_finished(three_hosts):
    c = three_hosts
    drv = subprocess.Popen([PY, "-c", IDLE_DRIVER, c["gcs"]], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           env=scrubbed_env({"NODE_AGENT_TOKEN": c["token"]}), cwd=NEUTRAL_CWD)
    try:
        job_hex = drv.stdout.readline().strip()
        assert job_hex, drv.stderr.read()[-3000:]
        jobs = {j.job_id.hex(): j for j in c["stub"].GetAllJobs(common_pb2.Empty(),
                                                                timeout=10).jobs}
        assert not jobs[job_hex].is_dead
    finally:
        drv.send_signal(signal.SIGKILL)
        drv.wait(10)

    def finished() -> bool:
        jobs = {j.job_id.hex(): j for j in c["stub"].GetAllJobs(common_pb2.Empty(),
                                                                timeout=10).jobs}
        return jobs[job_hex].is_dead and jobs[job_hex].end_time > 0
    wait_for(finished, 20, message=f"job {job_hex} to be marked finished")


def test_a_node_that_stops_answering_is_dead_after_the_timeout(three_hosts):
    c = three_hosts
    stub = c["stub"]
    node2 = _alive(stub)["127.0.0.2"]
    pinned = _run(PINNED, c["gcs"], node2.node_id.hex(), token=c["token"])
    raylet = c["w2"].process("raylet").pid
    os.kill(raylet, signal.SIGSTOP)  # its port still accepts connections: no refusal
    try:
        t0 = time.monotonic()
        wait_for(lambda: node2.node_id not in {n.node_id for n in _alive(stub).values()},
                 DEATH_TIMEOUT_S + 10, interval=0.05, message="node 2 to be marked dead")
        took = time.monotonic() - t0
    finally:
        os.kill(raylet, signal.SIGCONT)
    dead = {n.node_id: n for n in stub.GetAllNodes(common_pb2.Empty(), timeout=10).nodes}
    reason = dead[node2.node_id].death_reason
    assert "no resource report for" in reason and f"NODE_DEATH_TIMEOUT_S={DEATH_TIMEOUT_S:g}" \
        in reason and f"127.0.0.2:{node2.raylet_port} is unreachable" in reason, reason
    assert took >= DEATH_TIMEOUT_S - 1.5, took
    # Its actor is told: dead (no restarts left), the node's death as the reason, although
    # its process may well still run behind the silent raylet.
    actor = {a.name: a for a in stub.ListActors(common_pb2.Empty(), timeout=10).actors}["pinned"]
    assert actor.state == "DEAD", actor
    assert f"its node {node2.node_id.hex()[:8]} (127.0.0.2) (worker pid {pinned['pid']}) died: " \
           f"no resource report" in actor.death_cause, actor.death_cause
    # The raylet, answering again, learns it is dead and exits; its agent starts a new node.
    c["w2"].wait_restarted("raylet", raylet, timeout=60)
    wait_for(lambda: "127.0.0.2" in _alive(stub), 60, message="node 2 back as a new node")
    assert _alive(stub)["127.0.0.2"].node_id != node2.node_id
    print(f"\nraylet stopped: node marked dead after {took:.2f}s")
