"""raytop against a real 3-node cluster on loopback (agents on 127.0.0.1/2/3, started
with a scrubbed environment): the agent's views, "why is it pending?", actions,
read-only callers, the Textual app driven by a Pilot, `raytop --once`, and raytop
in a real terminal (tmux).

The tests share one cluster and run in file order: the destructive ones (drain a
node, stop the head's agent) come last.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List

import grpc
import pytest

from agent.client import AgentClient
from agent_helpers import NEUTRAL_CWD, PY, Farm, clean_env, wait_for
from runtime.protocol import agent_pb2, agent_pb2_grpc

pytest.importorskip("textual")

from tui.app import RaytopApp  # noqa: E402
from tui.screens import ConfirmScreen, DetailScreen  # noqa: E402
from tui.source import AgentSource  # noqa: E402

HEAD, W1, W2 = "127.0.0.1", "127.0.0.2", "127.0.0.3"

DRIVER = """
import json, sys, time, runtime as ray
from runtime.util.placement_group import placement_group
ray.init(address=sys.argv[1])

@ray.remote
class Counter:
    def __init__(self):
        self.n = 0
    def incr(self):
        self.n += 1
        return self.n

@ray.remote(num_gpus=1)
def needs_gpu():
    return 1

@ray.remote
def sleeper():
    time.sleep(600)

counters = [Counter.options(name=f"counter-{i}", scheduling_strategy="SPREAD").remote()
            for i in range(3)]
victim = Counter.options(name="victim").remote()
ray.get([c.incr.remote() for c in counters + [victim]], timeout=60)
gpu_task = needs_gpu.remote()
gpu_actor = Counter.options(name="gpu-actor", num_gpus=1).remote()
pg = placement_group([{"GPU": 1}], name="gpu-group")
big = ray.put(b"x" * 2_000_000)  # in the head's object store while the driver lives
long_task = sleeper.remote()
print(json.dumps({"gpu_task": gpu_task.task_id().hex(), "long_task": long_task.task_id().hex()}),
      flush=True)
sys.stdin.read()  # until the test is done
"""

JOB = """
import sys, time, runtime as ray
ray.init(address=sys.argv[1])
print("up", flush=True)
time.sleep(600)
"""

STATE_API = """
import json, sys, runtime as ray
from runtime.util import state
ray.init(address=sys.argv[1])
tasks = state.list_tasks(filters=[("name", "=", "needs_gpu")])
actors = state.list_actors(filters=[("name", "=", "gpu-actor")])
print(json.dumps({"tasks": [t.pending_reason for t in tasks],
                  "actors": [a.pending_reason for a in actors]}))
ray.shutdown()
"""


class Cluster:
    def __init__(self, farm: Farm) -> None:
        self.farm = farm
        self.head = farm.agent("head", HEAD)
        self.w1 = farm.agent("w1", W1)
        self.w2 = farm.agent("w2", W2)
        self.gcs = ""
        self.token = ""
        self.driver: subprocess.Popen | None = None
        self.ids: Dict[str, str] = {}

    def client(self) -> AgentClient:
        return AgentClient(self.head.socket)

    def view(self, view: str, **kw) -> agent_pb2.ViewReply:
        with self.client() as c:
            return c.stub.View(agent_pb2.ViewRequest(view=view, **kw), timeout=30)

    def rows(self, view: str, **kw) -> List[Dict[str, str]]:
        reply = self.view(view, **kw)
        return [dict(zip(reply.table.columns, r.cells), key=r.key) for r in reply.table.rows]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    farm = Farm(tmp_path_factory.mktemp("raytop"))
    c = Cluster(farm)
    try:
        for a in (c.head, c.w1, c.w2):
            a.start_daemon()
        r = c.head.ctl_json("start", "--head", "--node-ip", HEAD)
        c.gcs, c.token = r["gcs_address"], r["token"]
        for w in (c.w1, c.w2):
            proc = w.ctl("join", c.gcs, "--token", c.token, "--node-ip", w.node_ip)
            assert proc.returncode == 0, proc.stderr
        wait_for(lambda: len([n for n in c.head.status().nodes if n.state == "ALIVE"]) == 3,
                 60, message="3 alive nodes")
        # The driver names the farm's directory, so the farm's cleanup finds it by PID.
        c.driver = subprocess.Popen([PY, "-c", DRIVER, c.gcs, str(farm.root)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=NEUTRAL_CWD,
                                    env=clean_env(NODE_AGENT_TOKEN=c.token))
        line = c.driver.stdout.readline()
        assert line, c.driver.stderr.read()
        c.ids = json.loads(line)
        wait_for(lambda: any(r["STATE"] in ("SUBMITTED_TO_WORKER", "RUNNING") for r in c.rows(
            "tasks", filter="function=sleeper")), 60, message="the long task to run")
        yield c
    finally:
        if c.driver is not None and c.driver.poll() is None:
            c.driver.kill()
            c.driver.wait(10)
        farm.cleanup()


def run_app(source, body: Callable, size=(180, 50)) -> RaytopApp:
    """Run raytop headless on source and await body(app, pilot)."""
    app = RaytopApp(source, refresh=0.5)

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await body(app, pilot)

    asyncio.run(main())
    return app


async def until(pilot, predicate: Callable[[], object], timeout: float = 30,
                what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        await pilot.pause(0.1)
        last = predicate()
        if last:
            return last
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def shown(app: RaytopApp) -> List[Dict[str, str]]:
    data = app.main.data
    return [dict(zip(data.columns, r.cells), key=r.key) for r in data.rows]


def col(app: RaytopApp, name: str) -> List[str]:
    return [r.get(name, "") for r in shown(app)]


# ---- the agent's API -------------------------------------------------------------------------

def test_state_api_and_views_say_why_work_is_pending(cluster):
    # The GPU task: the raylet's scheduler recorded why, the GCS joined it to the task.
    want = "needs {CPU: 1, GPU: 1}; no alive node has GPU"
    rows = wait_for(lambda: [r for r in cluster.rows("tasks", filter="function=needs_gpu")
                             if want in r["ERROR"]], 30, message="the GPU task's reason")
    assert rows[0]["STATE"] == "PENDING_NODE_ASSIGNMENT"
    # The actor that needs a GPU, and the placement group that does.
    actor = wait_for(lambda: [r for r in cluster.rows("actors", filter="name==gpu-actor")
                              if "no alive node has GPU" in r["REASON"]], 30,
                     message="the GPU actor's reason")
    assert actor[0]["STATE"] == "PENDING_CREATION"
    (pg,) = cluster.rows("pgs", filter="name=gpu-group")
    assert pg["STATE"] == "PENDING" and "GPU" in pg["REASON"], pg
    # The state API returns the same reasons (Ray's field names).
    out = subprocess.run([PY, "-c", STATE_API, cluster.gcs], capture_output=True, text=True,
                         timeout=90, cwd=NEUTRAL_CWD,
                         env=clean_env(NODE_AGENT_TOKEN=cluster.token))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert any(r and want in r for r in got["tasks"]), got
    assert any(r and "no alive node has GPU" in r for r in got["actors"]), got
    # The header's pending demand carries the reason too.
    pending = cluster.view("nodes").cluster.pending
    assert any(want in d.reason and d.function_name == "needs_gpu" for d in pending), pending


def test_every_view_answers_with_rows_and_summaries(cluster):
    nodes = cluster.view("nodes", history=True)
    ips = sorted(r.cells[1] for r in nodes.table.rows)
    assert ips == [HEAD, W1, W2]
    assert nodes.cluster.nodes_alive == 3 and nodes.cluster.total["CPU"] == 3
    assert {h.node_id for h in nodes.history} == {r.key for r in nodes.table.rows}
    actors = cluster.view("actors")
    names = {dict(zip(actors.table.columns, r.cells))["NAME"] for r in actors.table.rows}
    assert {"counter-0", "counter-1", "counter-2", "victim", "gpu-actor"} <= names
    placed = {r.cells[0] for r in actors.aux.rows}
    assert len(placed) >= 2, list(actors.aux.rows)  # SPREAD put the counters on several nodes
    tasks = cluster.view("tasks")
    summary = {r.cells[0]: r.cells for r in tasks.aux.rows}
    assert summary["Counter.incr"][-1] == "4" and summary["sleeper"][-1] == "1", summary
    jobs = cluster.rows("jobs")
    assert any(j["STATUS"] == "RUNNING" for j in jobs)
    objects = cluster.rows("objects", filter="where=store")
    assert any(o["SIZE"] == "1.9 MiB" for o in objects), objects
    # The raylet reports its store's usage: the nodes view's STORE meter.
    head = wait_for(lambda: [r for r in cluster.view("nodes").table.rows
                             if r.cells[1] == HEAD and r.numbers["store_used"] >= 2_000_000],
                    30, message="the head's object store usage")
    assert head[0].numbers["store_total"] == 64 * 1024 * 1024
    procs = {r["COMPONENT"]: r for r in cluster.rows("procs")}
    assert {"gcs", "object_store", "raylet"} <= set(procs)
    assert procs["gcs"]["RSS"].endswith("MiB")
    remote = cluster.view("procs", node=W1)  # forwarded to 127.0.0.2's agent over TCP
    assert remote.node_ip == W1 and not remote.error, remote.error
    assert "gcs" not in {r.cells[0] for r in remote.table.rows}
    events = cluster.rows("events", filter="kind=node state=joined")
    assert {e["NODE"] for e in events} >= {HEAD, W1, W2}
    logs = {r["COMPONENT"] for r in cluster.rows("logs")}
    assert {"gcs", "raylet", "node-agent"} <= logs


def test_filter_sort_limit_run_where_the_data_is(cluster):
    reply = cluster.view("actors", filter="state=PENDING", limit=1)
    assert reply.table.matched >= 1 and len(reply.table.rows) == 1
    assert reply.table.total >= 5
    bad = cluster.view("tasks", filter="colour=red")
    assert "no field 'colour'" in bad.filter_error
    ordered = cluster.rows("tasks", sort="FUNCTION")
    funcs = [r["FUNCTION"] for r in ordered]
    assert funcs == sorted(funcs, key=str.lower)
    inverted = cluster.rows("tasks", filter="!Counter")
    assert inverted and all("Counter" not in r["FUNCTION"] for r in inverted)


def test_read_only_callers_cannot_act(cluster):
    meta = [("node-agent-readonly", "1")]
    with cluster.client() as c:
        reply = c.stub.View(agent_pb2.ViewRequest(view="nodes"), metadata=meta, timeout=30)
        assert reply.readonly and len(reply.table.rows) == 3
        for call, request in (("Act", agent_pb2.ActionRequest(action="kill_actor",
                                                              keys=["00" * 16])),
                              ("StopNode", agent_pb2.StopNodeRequest()),
                              ("Leave", agent_pb2.LeaveRequest())):
            with pytest.raises(grpc.RpcError) as info:
                getattr(c.stub, call)(request, metadata=meta, timeout=30)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "read-only" in info.value.details()
        status = c.stub.Status(agent_pb2.StatusRequest(local_only=True), metadata=meta, timeout=30)
        assert not status.token and not status.readonly_token


def test_read_only_token_reads_but_cannot_act_over_tcp(cluster):
    """The TCP API's check (agent.service.ApiAuth) in front of a real agent's service,
    asking the real cluster: the read-only token views, and is refused any action
    from its headers alone."""
    from agent import config as agent_config
    from agent.core import NodeAgent
    from agent.service import AgentService, make_tcp_server, readonly_token
    from runtime import rpc

    async def main() -> None:
        paths = agent_config.resolve_paths(agent_config.load(None),
                                           str(cluster.farm.root / "inproc"),
                                           str(cluster.farm.root / "inproc" / "a.sock"))
        agent = NodeAgent(agent_config.load(None), paths)
        agent.gcs_address, agent.token = cluster.gcs, cluster.token
        server = make_tcp_server(cluster.token)
        agent_pb2_grpc.add_NodeAgentServicer_to_server(AgentService(agent, local=False), server)
        port = rpc.bind(server, HEAD, 0)
        await server.start()
        try:
            ro = rpc.aio_channel(f"{HEAD}:{port}", readonly_token(cluster.token))
            full = rpc.aio_channel(f"{HEAD}:{port}", cluster.token)
            ro_stub, full_stub = agent_pb2_grpc.NodeAgentStub(ro), agent_pb2_grpc.NodeAgentStub(full)
            reply = await ro_stub.View(agent_pb2.ViewRequest(view="nodes"), timeout=30)
            assert reply.readonly and len(reply.table.rows) == 3
            with pytest.raises(grpc.RpcError) as info:
                await ro_stub.Act(agent_pb2.ActionRequest(action="kill_actor", keys=["00" * 16]),
                                  timeout=30)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "read-only token" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                await ro_stub.StopNode(agent_pb2.StopNodeRequest(), timeout=30)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # The cluster token may act (an unknown actor: refused for that reason only).
            out = await full_stub.Act(agent_pb2.ActionRequest(action="kill_actor",
                                                              keys=["00" * 16]), timeout=30)
            assert not out.results[0].ok and "no actor" in out.results[0].message
            assert not (await full_stub.View(agent_pb2.ViewRequest(view="nodes"),
                                             timeout=30)).readonly
            await ro.close()
            await full.close()
        finally:
            await server.stop(0)
            for ch in agent._channels.values():
                await ch.close()
            await asyncio.to_thread(agent.supervisor.close)

    asyncio.run(main())


def test_restart_process_cancel_task_and_stop_job(cluster):
    with cluster.client() as c:
        before = {r["COMPONENT"]: r for r in cluster.rows("procs", node=W1)}
        out = c.stub.Act(agent_pb2.ActionRequest(action="restart_process", node=W1,
                                                 keys=["object_store"]), timeout=60)
        assert out.results[0].ok, out.results[0].message

        def restarted():
            p = {r["COMPONENT"]: r for r in cluster.rows("procs", node=W1)}["object_store"]
            return p["STATE"] == "running" and p["PID"] != before["object_store"]["PID"] and p
        p = wait_for(restarted, 60, message="object_store on 127.0.0.2 to run again")
        assert p["RESTARTS"] == "1"
        wait_for(lambda: cluster.rows("events", filter=f"kind=process subject=object_store "
                                                       f"node={W1} state=exited"), 30,
                 message="the restart in the event log")
        # Cancel the running task: its worker gets the cancel, the task fails.
        out = c.stub.Act(agent_pb2.ActionRequest(action="cancel_task",
                                                 keys=[cluster.ids["long_task"]]), timeout=60)
        assert out.results[0].ok, out.results[0].message
        wait_for(lambda: [r for r in cluster.rows("tasks", filter="function=sleeper")
                          if r["STATE"] == "FAILED"], 60, message="the cancelled task to fail")
        # A pending task cannot be cancelled from outside its owner: said so.
        out = c.stub.Act(agent_pb2.ActionRequest(action="cancel_task",
                                                 keys=[cluster.ids["gpu_task"]]), timeout=60)
        assert not out.results[0].ok and "only its owner" in out.results[0].message
        # Stop a job: its driver gets SIGTERM from the agent of its node.
        job = subprocess.Popen([PY, "-c", JOB, cluster.gcs, str(cluster.farm.root)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=NEUTRAL_CWD, env=clean_env(NODE_AGENT_TOKEN=cluster.token))
        try:
            assert job.stdout.readline().strip() == "up", job.stderr.read()
            mine = wait_for(lambda: [r for r in cluster.rows("jobs")
                                     if r["DRIVER"] == str(job.pid)], 30, message="the job")
            out = c.stub.Act(agent_pb2.ActionRequest(action="stop_job", keys=[mine[0]["key"]]),
                             timeout=60)
            assert out.results[0].ok, out.results[0].message
            assert job.wait(30) != 0
        finally:
            if job.poll() is None:
                job.kill()
                job.wait(10)


# ---- the app (Pilot) ---------------------------------------------------------------------------

def test_app_renders_every_view_filters_sorts_and_details(cluster):
    async def body(app: RaytopApp, pilot) -> None:
        await until(pilot, lambda: sorted(col(app, "IP")) == [HEAD, W1, W2], what="3 nodes")
        assert "3 alive" in str(app.query_one("#meters").render())
        assert "no alive node has GPU" in str(app.query_one("#meters").render())
        for key, view, needle in (("2", "actors", "victim"), ("3", "tasks", "sleeper"),
                                  ("4", "jobs", "RUNNING"), ("5", "pgs", "gpu-group"),
                                  ("6", "objects", None), ("7", "procs", "raylet"),
                                  ("8", "events", "joined"), ("9", "logs", "gcs")):
            await pilot.press(key)

            def ready(view=view, needle=needle) -> bool:
                return bool(app.view == view and app.main.data.columns and (
                    needle is None or any(needle in " ".join(r.values()) for r in shown(app))))
            await until(pilot, ready, what=f"view {view}")
        # ":" grammar with a filter, then "/" to change it.
        await pilot.press("colon", *"actors state=ALIVE", "enter")
        await until(pilot, lambda: app.view == "actors" and shown(app)
                    and all(s == "ALIVE" for s in col(app, "STATE")), what="ALIVE actors")
        await pilot.press("slash", *"name=counter", "enter")
        await until(pilot, lambda: sorted(col(app, "NAME")) ==
                    ["counter-0", "counter-1", "counter-2"], what="the counters")
        # Sort by clicking a title, twice to invert.
        await pilot.press("escape")
        await until(pilot, lambda: "gpu-actor" in col(app, "NAME"), what="the filter cleared")
        names = lambda: [n for n in col(app, "NAME") if n]  # noqa: E731
        app.sort_by("NAME")
        await until(pilot, lambda: names() == sorted(names()) and len(names()) >= 5,
                    what="sorted by name")
        app.sort_by("NAME")
        await until(pilot, lambda: names() == sorted(names(), reverse=True), what="inverted")
        # Enter: the detail panel, with why the GPU actor waits.
        app.run_command("actors name==gpu-actor")
        await until(pilot, lambda: col(app, "NAME") == ["gpu-actor"], what="gpu-actor")
        app.main.focus()
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DetailScreen), what="details")
        fields = {f.name: f.value for f in app.screen.reply.fields}
        assert "no alive node has GPU" in fields["pending_reason"]
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, DetailScreen), what="closed")
        # The log view: tail the head's raylet and find in it.
        app.run_command("logs raylet")
        await until(pilot, lambda: len(app.logpane.lines) > 3, what="raylet log lines")
        assert any("raylet serving on" in line for line in app.logpane.lines)
        await pilot.press("slash", *"serving on", "enter")
        await until(pilot, lambda: app.logpane.matches >= 1, what="a match")
        await pilot.press("escape")
        await until(pilot, lambda: app.tailing is None, what="back from the log")

    run_app(AgentSource(socket=cluster.head.socket), body)


def test_app_kill_actor_action(cluster):
    async def body(app: RaytopApp, pilot) -> None:
        app.run_command("actors name==victim")
        await until(pilot, lambda: col(app, "NAME") == ["victim"] and
                    col(app, "STATE") == ["ALIVE"], what="the victim")
        app.main.focus()
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirm")
        assert "Kill 1 actor?" in app.screen.question
        await pilot.press("y")
        await until(pilot, lambda: col(app, "STATE") == ["DEAD"], what="the victim dead")
        assert "killed from raytop" in col(app, "REASON")[0]

    run_app(AgentSource(socket=cluster.head.socket), body)
    events = cluster.rows("events", filter="kind=action state=kill_actor")
    assert events and "killed" in events[0]["MESSAGE"]


def test_app_readonly_offers_no_actions(cluster):
    async def body(app: RaytopApp, pilot) -> None:
        app.run_command("actors name=counter")
        await until(pilot, lambda: len(shown(app)) == 3, what="the counters")
        app.main.focus()
        await pilot.press("x")
        await pilot.pause(0.5)
        assert not isinstance(app.screen, ConfirmScreen)
        assert "Kill" not in [b.binding.description for b in app.active_bindings.values()]
        assert "read-only" in str(app.query_one("#tabs").render())

    run_app(AgentSource(socket=cluster.head.socket, readonly=True), body)
    with pytest.raises(Exception, match="read-only"):
        AgentSource(socket=cluster.head.socket, readonly=True).act("kill_actor", ["00" * 16])


# ---- raytop as a command ----------------------------------------------------------------------

def test_once_prints_nodes_actors_and_the_task_summary(cluster, tmp_path):
    env = clean_env()
    out = subprocess.run(["raytop", "--once", "--socket", cluster.head.socket],
                         capture_output=True, text=True, timeout=60, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "NODES (3)" in out.stdout and all(ip in out.stdout for ip in (HEAD, W1, W2))
    assert "ACTORS" in out.stdout and "victim" in out.stdout and "TASKS" in out.stdout
    js = subprocess.run(["raytop", "--once", "--json", "--socket", cluster.head.socket],
                        capture_output=True, text=True, timeout=60, env=env, cwd=str(tmp_path))
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    assert sorted(n["ip"] for n in doc["nodes"]) == [HEAD, W1, W2]
    assert doc["cluster"]["nodes_alive"] == 3
    assert any(p["function"] == "needs_gpu" and "GPU" in p["reason"]
               for p in doc["cluster"]["pending"])
    assert {s["function"] for s in doc["tasks"]["summary"]} >= {"Counter.incr", "sleeper"}
    # From elsewhere: the head agent's TCP API with the cluster token from a file.
    token_file = tmp_path / "token"
    token_file.write_text(cluster.token + "\n")
    token_file.chmod(0o600)
    tcp = subprocess.run(["raytop", "--once", "--address",
                          f"{HEAD}:{cluster.head.ports['agent']}", "--token-file",
                          str(token_file)], capture_output=True, text=True, timeout=60, env=env,
                         cwd=str(tmp_path))
    assert tcp.returncode == 0 and "NODES (3)" in tcp.stdout, tcp.stderr
    for args in (["--once"], ["--once", "--json"]):
        bad = subprocess.run(["raytop", *args, "--socket", str(tmp_path / "none.sock")],
                             capture_output=True, text=True, timeout=60, env=env,
                             cwd=str(tmp_path))
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 1 and len(lines) == 1 and lines[0].startswith("raytop: "), \
            bad.stderr
        assert bad.stdout == ""


def test_raytop_in_a_real_terminal(cluster, tmp_path):
    tmux = shutil.which("tmux")
    if tmux is None:
        print("SKIPPED: tmux is not installed (apt-get install tmux)", file=sys.stderr)
        pytest.skip("tmux is not installed (apt-get install tmux)")
    sock = f"raytop-test-{os.getpid()}"
    env = clean_env(TERM="xterm-256color")

    def tm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([tmux, "-L", sock, *args], capture_output=True, text=True,
                              timeout=30, env=env)

    def screen() -> str:
        return tm("capture-pane", "-p", "-t", "ui").stdout

    command = f"raytop --socket {cluster.head.socket} --refresh 0.5"
    assert tm("new-session", "-d", "-s", "ui", "-x", "200", "-y", "50", "-c", str(tmp_path),
              command).returncode == 0
    try:
        wait_for(lambda: all(ip in screen() for ip in (HEAD, W1, W2)), 60,
                 message="the three nodes on screen")
        tm("send-keys", "-t", "ui", ":", "")
        wait_for(lambda: ":nodes :actors" in screen(), 30, message="the command prompt")
        tm("send-keys", "-t", "ui", "actors name=counter", "Enter")
        actors = cluster.rows("actors", filter="name=counter state=ALIVE")
        nodes = {a["NODE"] for a in actors}

        def actor_node_shown() -> bool:
            return any("counter-" in line and any(ip in line for ip in nodes)
                       for line in screen().splitlines())
        try:
            wait_for(actor_node_shown, 30, message="an actor's node on screen")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nthe screen:\n{screen()}") from None
        tm("send-keys", "-t", "ui", "q", "")
        wait_for(lambda: tm("has-session", "-t", "ui").returncode != 0, 30,
                 message="raytop to exit on q")
    finally:
        tm("kill-server")


# ---- destructive: last -----------------------------------------------------------------------

def test_app_drain_node_action(cluster):
    async def body(app: RaytopApp, pilot) -> None:
        await until(pilot, lambda: W2 in col(app, "IP"), what="node 127.0.0.3")
        app.main.cursor = col(app, "IP").index(W2)
        app.main.focus()
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirm")
        assert app.screen.question == "Drain and stop 1 node?" and not app.screen.warning
        await pilot.press("y")
        await until(pilot, lambda: [r["STATE"] for r in shown(app) if r["IP"] == W2] == ["DEAD"],
                    timeout=60, what="127.0.0.3 dead")

    run_app(AgentSource(socket=cluster.head.socket), body)
    # The agent becomes idle once its node has stopped, a moment after the GCS saw it go.
    wait_for(lambda: cluster.w2.status(local_only=True).role == "idle", 30,
             message="127.0.0.3's agent to be idle")


def test_app_stale_banner_when_the_head_agent_stops_and_reconnects(cluster):
    head = cluster.head

    async def body(app: RaytopApp, pilot) -> None:
        await until(pilot, lambda: HEAD in col(app, "IP"), what="the head")
        head.daemon.terminate()
        await until(pilot, lambda: app.main.stale, timeout=60, what="stale rows")
        banner = app.query_one("#banner")
        assert banner.display and "stale" in str(banner.render())
        assert HEAD in col(app, "IP")  # the last data stays on screen
        await asyncio.to_thread(head.daemon.wait, 60)
        await asyncio.to_thread(head.start_daemon)
        await until(pilot, lambda: not app.main.stale and HEAD in col(app, "IP"), timeout=90,
                    what="reconnected")
        assert not app.query_one("#banner").display

    run_app(AgentSource(socket=head.socket), body)
