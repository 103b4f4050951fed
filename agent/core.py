"""The node agent's logic: roles, the node it supervises, drain, status and events.

Everything here runs on the agent's asyncio loop, except what blocks (starting
and stopping processes, which waits for ready files and for exits): that runs in
a worker thread. One operation that changes the role runs at a time
(``_op_lock``); status calls never wait for it.

Roles:

* idle: the agent is up and serves its API; no node runs.
* head: GCS + object store + raylet; the agent created (or was given) the token.
* worker: object store + raylet, registered with the head's GCS.

The role is saved in the state directory, and an agent that starts again takes
it again (a worker keeps trying to reach its head with backoff until it can).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import grpc
import psutil

from agent import host, tokens
from agent.cluster import ClusterViews
from agent.cluster_actions import ClusterActions
from agent.config import AgentConfig, ResolvedPaths
from agent.errors import AgentError
from agent.state import AgentState, StateStore
from agent.views import brief_reason, cpu_summary, last_log_line, process_info, short_rpc_reason
from runtime import rpc
from runtime.net import split_address
from runtime.node import COMPONENTS, Node, NodeConfig
from runtime.protocol import (agent_pb2, common_pb2, gcs_pb2, gcs_pb2_grpc, raylet_pb2,
                              raylet_pb2_grpc)
from runtime.session import new_session_dir, write_cluster_file
from runtime.supervisor import ComponentStartError, ManagedProcess, Supervisor, describe_exit

log = logging.getLogger("agent")

#: Old session directories kept in the session root besides the current one.
SESSIONS_KEPT = 5
JOIN_BACKOFF_MAX_S = 30.0
HEAD_PROBE_TIMEOUT_S = 3.0
GCS_QUERY_TIMEOUT_S = 2.0


def valid_token(token: str, source: str) -> str:
    """token, or AgentError(INVALID_ARGUMENT) saying why it is refused (agent/tokens.py)."""
    try:
        return tokens.check_token(token, source)
    except tokens.InvalidToken as exc:
        raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


class NodeAgent:
    """The agent's state machine. Create it on the loop that will run it."""

    def __init__(self, cfg: AgentConfig, paths: ResolvedPaths, *, under_systemd: bool = False,
                 detached: bool = False, request_exit: Optional[Callable[[], None]] = None) -> None:
        self.cfg = cfg
        self.paths = paths
        self.under_systemd = under_systemd
        self.detached = detached
        self._request_exit = request_exit or (lambda: None)
        self.store = StateStore(paths.state_dir)
        self.state = AgentState()
        self.loop = asyncio.get_running_loop()
        self.supervisor = Supervisor(on_exit=self._on_exit)
        self.node: Optional[Node] = None
        self.token = ""
        self.gcs_address = ""
        self.phase = "idle"
        self.message = ""
        self.started = time.monotonic()
        self.api_address = ""
        self.node_ip = ""
        self._op_lock = asyncio.Lock()
        self._join_task: Optional[asyncio.Task] = None
        self._subscribers: Set[asyncio.Queue] = set()
        self._channels: Dict[Tuple[str, str], Any] = {}
        self._proc_seen: Dict[str, Tuple[str, int]] = {}
        self._nodes_seen: Dict[str, str] = {}
        self._cluster: Optional[gcs_pb2.ClusterStatus] = None
        self._cluster_error = ""
        self._closing = False
        self._exiting = False  # StopNode asked this agent to exit (no service manager)
        self.views = ClusterViews(self)
        self.actions = ClusterActions(self, self.views)

    # ---- start-up -----------------------------------------------------------------------

    def lock_state_dir(self) -> None:
        try:
            self.store.acquire_lock()
        except RuntimeError as exc:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        self.state = self.store.load()

    async def restore(self) -> None:
        """Take the saved role again (or the one agent.toml names on first start).

        Under the operations lock: the agent serves its socket (and tells systemd it is
        ready) before this runs, and an `agentctl start` arriving meanwhile must find the
        restored node, not start a second one beside it."""
        async with self._op_lock:
            await self._restore()

    async def _restore(self) -> None:
        state = self.state
        fresh = not os.path.exists(self.store.path("state.json"))
        if fresh and self.cfg.role != "idle":
            log.info("no saved role; taking role %s from %s", self.cfg.role, self.cfg.source)
            state.role = self.cfg.role
            state.head_address = self.cfg.head_address
            if self.cfg.token_file:
                try:
                    self.store.write_token(tokens.read_token_file(self.cfg.token_file))
                except OSError as exc:
                    self._set_phase("failed", f"cannot read token_file {self.cfg.token_file} "
                                    f"({self.cfg.source}): {exc.strerror or exc}")
                    return
                except tokens.InvalidToken as exc:
                    self._set_phase("failed", f"{exc} ([node] token_file in {self.cfg.source})")
                    return
            self._save()
        if state.role == "idle":
            self._set_phase("idle", "no role: run `agentctl start --head` or `agentctl join`")
            return
        token = self.store.read_token()
        if token:
            problem = tokens.token_problem(token)
            if problem is not None:
                self._set_phase("failed", f"the saved cluster token in {self.store.path('token')} "
                                f"{problem}; run `agentctl leave`, then start or join again")
                log.error("not restoring role %s: %s", state.role, self.message)
                return
        log.info("restoring role %s from %s", state.role, self.store.path("state.json"))
        try:
            if state.role == "head":
                await self._start_head(state.options, token or rpc.new_cluster_token(),
                                       port_wait_s=15.0)
            else:
                if not token:
                    self._set_phase("failed", "the saved worker role has no token file "
                                    f"({self.store.path('token')}); run `agentctl join` again")
                    return
                self.token = token
                self.gcs_address = state.head_address
                self._set_phase("joining", f"joining {state.head_address}")
                self._join_task = asyncio.ensure_future(
                    self._join_loop(state.head_address, token, state.options))
        except AgentError as exc:
            if self.node is None:  # else the node runs, degraded, and the supervisor retries
                self._set_phase("failed", f"could not restore role {state.role}: {exc.message}")
            log.error("restoring role %s: %s", state.role, exc.message)

    # ---- events ---------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=1000)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)

    def emit(self, kind: str, subject: str, state: str, message: str = "", pid: int = 0) -> None:
        ev = agent_pb2.AgentEvent(time=time.time(), kind=kind, subject=subject, state=state,
                                  message=message, pid=pid)
        self.views.note_event(ev)
        for q in list(self._subscribers):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:  # a stuck watcher loses events, never blocks the agent
                pass

    def _set_phase(self, phase: str, message: str = "") -> None:
        changed = (phase, message) != (self.phase, self.message)
        self.phase, self.message = phase, message
        if changed:
            log.info("phase %s%s", phase, f": {message}" if message else "")
            self.emit("phase", self.state.role, phase, message)

    def _save(self) -> None:
        self.store.save(self.state)
        self.emit("role", "agent", self.state.role)

    # ---- node configuration ------------------------------------------------------------

    def _node_config(self, head: bool, options: Dict[str, Any], token: str,
                     gcs_address: str = "") -> NodeConfig:
        res = self.cfg.resources
        node_ip = options.get("node_ip") or self.cfg.node_ip
        if not node_ip:
            node_ip = host.detect_node_ip(split_address(gcs_address)[0] if gcs_address else "")
        custom = dict(res.custom)
        custom.update(options.get("resources") or {})

        def pick(name: str) -> Any:
            return options[name] if name in options else getattr(res, name)

        return NodeConfig(
            head=head, node_ip=node_ip, gcs_address=gcs_address,
            gcs_port=int(options.get("gcs_port") or self.cfg.ports.gcs) if head else 0,
            num_cpus=pick("num_cpus"), num_gpus=pick("num_gpus"), resources=custom,
            object_store_memory=pick("object_store_memory"), memory=pick("memory"),
            token=token, raylet_port=self.cfg.ports.raylet,
            object_store_port=self.cfg.ports.object_store,
            object_transfer_port=self.cfg.ports.object_transfer,
            restart=self.cfg.supervision.restart_policy(),
            component_env=self._component_env(head),
            stop_grace_s=self.cfg.supervision.stop_grace_s)

    def gcs_store_path(self) -> str:
        """The head's GCS tables (SQLite), in the state dir rather than the session dir,
        so they survive a restart of the agent (`systemctl restart node-agent`) as well as
        of the GCS: raylets, actors and drivers elsewhere keep running and reconnect."""
        return os.path.join(self.paths.state_dir, "gcs", "gcs_state.sqlite3")

    def _component_env(self, head: bool) -> Dict[str, Dict[str, str]]:
        env = {name: dict(values) for name, values in self.cfg.component_env.items()}
        chosen = {**env.get("all", {}), **env.get("gcs", {})}
        if head and "RUNTIME_GCS_STORAGE" not in chosen:  # an admin's choice wins
            env.setdefault("gcs", {})["RUNTIME_GCS_STORAGE"] = self.gcs_store_path()
        return env

    def _forget_gcs_store(self) -> None:
        """A head stopped on purpose ends its cluster: the next start is a fresh one."""
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(self.gcs_store_path() + suffix)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove the GCS store %s: %s", self.gcs_store_path() + suffix,
                            exc)

    def _check_ports(self, ncfg: NodeConfig) -> None:
        if ncfg.head:
            host.check_port(ncfg.node_ip, ncfg.gcs_port, "GCS")
        host.check_port(ncfg.node_ip, ncfg.object_store_port, "object store")
        if ncfg.object_transfer_port:
            host.check_port(ncfg.node_ip, ncfg.object_transfer_port, "object transfer")
        host.check_port(ncfg.node_ip, ncfg.raylet_port, "raylet")

    async def _wait_ports(self, ncfg: NodeConfig, wait_s: float) -> None:
        """Check the ports, retrying for wait_s: after the agent was killed its old
        children may still be on their way out."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._check_ports(ncfg)
                return
            except AgentError as exc:
                if exc.code != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)

    def _start_node_blocking(self, ncfg: NodeConfig) -> Node:
        """Create the session dir and start the node (worker thread)."""
        ncfg.session_dir = new_session_dir(self.paths.session_root)
        node = Node(ncfg, supervisor=self.supervisor)
        self.node = node  # before start(): on_exit may need it while components come up
        try:
            node.start()
        except BaseException:
            node.stop()
            self.node = None
            raise
        write_cluster_file(ncfg.session_dir, {
            "gcs_address": node.gcs_address, "node_id": node.node_id.hex(),
            "session_dir": ncfg.session_dir, "raylet_address": node.raylet_address,
            "store_address": node.store_address, "agent_pid": os.getpid()}, node.token)
        self._prune_sessions(ncfg.session_dir)
        return node

    def _prune_sessions(self, current: str) -> None:
        root = self.paths.session_root
        try:
            entries = sorted(e for e in os.listdir(root) if e.startswith("session_2"))
        except OSError:
            return
        old = [e for e in entries if os.path.join(root, e) != current]
        for name in old[:-SESSIONS_KEPT] if len(old) > SESSIONS_KEPT else []:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    async def _run_node(self, ncfg: NodeConfig) -> Node:
        try:
            node = await asyncio.to_thread(self._start_node_blocking, ncfg)
        except ComponentStartError as exc:
            raise AgentError(grpc.StatusCode.INTERNAL,
                             f"the {exc.name} did not start: {str(exc).splitlines()[0]} "
                             f"(log {exc.log_path})") from None
        self.node_ip = ncfg.node_ip
        if node.start_errors:
            self._set_phase("degraded", self._start_error_text(node))
        else:
            self._set_phase("running", "")
        return node

    @staticmethod
    def _start_error_text(node: Node) -> str:
        name, exc = next(iter(node.start_errors.items()))
        status = f", {describe_exit(exc.returncode)}" if exc.returncode is not None else ""
        last = last_log_line(exc.log_tail)
        return (f"the {name} did not start ({exc.reason}{status}{': ' + last if last else ''}); "
                f"the agent keeps restarting it: see `agentctl status` and `agentctl logs {name}`")

    def api_endpoint(self) -> Optional[Tuple[str, int, str]]:
        """(host, port, token) the TCP API should serve on, None when it should not:
        without a cluster token there is nothing to authenticate remote callers with."""
        port = self.cfg.ports.agent
        if not port or not self.token or not (self.cfg.api_host or self.node_ip):
            return None
        return self.cfg.api_host or self.node_ip, port, self.token

    # ---- operations ------------------------------------------------------------------------

    def _refuse_if_exiting(self) -> None:
        if self._exiting or self._closing:
            raise AgentError(grpc.StatusCode.UNAVAILABLE, (
                "this node-agent is exiting (`agentctl stop` ends an agent that no service "
                "manager runs); run the command again and agentctl starts a new one"))

    def _require_idle(self) -> None:
        if self.state.role != "idle":
            where = f" at {self.gcs_address}" if self.gcs_address else ""
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"this machine already runs a {self.state.role} node{where} "
                             f"({self.phase}); run `agentctl stop` or `agentctl leave` first")

    async def start_head(self, options: Dict[str, Any], token: str) -> agent_pb2.StartHeadReply:
        if token:
            valid_token(token, "the StartHead request")
        async with self._op_lock:
            self._refuse_if_exiting()
            self._require_idle()
            self._forget_gcs_store()  # `start --head` begins a new cluster
            return await self._start_head(options, token or rpc.new_cluster_token())

    async def _start_head(self, options: Dict[str, Any], token: str,
                          port_wait_s: float = 0.0) -> agent_pb2.StartHeadReply:
        ncfg = self._node_config(True, options, token)
        await self._wait_ports(ncfg, port_wait_s)
        self._set_phase("starting", f"starting head node on {ncfg.node_ip}")
        self.token = token
        try:
            node = await self._run_node(ncfg)
        except AgentError as exc:
            self._set_phase("failed", exc.message)
            raise
        self.gcs_address = node.gcs_address
        self.store.write_token(token)
        self.state = dataclasses.replace(self.state, role="head", head_address="",
                                         options=dict(options))
        self._save()
        join = f"agentctl join {node.gcs_address} --token {token}"
        if node.start_errors:
            raise AgentError(grpc.StatusCode.UNAVAILABLE,
                             f"head node started, but {self._start_error_text(node)}")
        log.info("head node %s up; GCS at %s. Join other machines with `agentctl join %s "
                 "--token-file FILE` (the token is in %s)", node.node_id.hex()[:8],
                 node.gcs_address, node.gcs_address, self.store.path("token"))
        return agent_pb2.StartHeadReply(gcs_address=node.gcs_address, token=token,
                                        join_command=join, node_id=node.node_id.hex(),
                                        session_dir=node.session_dir)

    async def _probe_head(self, head: str, token: str,
                          timeout: float = HEAD_PROBE_TIMEOUT_S) -> Tuple[str, str]:
        """("ok", "") / ("auth", why) / ("unreachable", why) for the head's GCS."""
        stub = gcs_pb2_grpc.GcsStub(self._channel(head, token))
        try:
            await stub.GetAllNodes(common_pb2.Empty(), timeout=max(0.5, timeout))
            return "ok", ""
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                await self._drop_channel(head, token)  # a wrong token is not kept around
                return "auth", (f"authentication failed: the head at {head} rejected the "
                                f"cluster token; use the token printed by `agentctl start "
                                f"--head` on the head")
            return "unreachable", f"head unreachable: {head}: {short_rpc_reason(exc)}"

    async def join(self, head: str, token: str, options: Dict[str, Any],
                   wait_s: float) -> agent_pb2.JoinReply:
        try:
            split_address(head)
        except ValueError as exc:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if not token:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT,
                             "a cluster token is required to join: pass --token-file FILE, "
                             f"--token T or set {tokens.TOKEN_ENV} (it is printed by `agentctl "
                             "start --head` on the head)")
        valid_token(token, "the Join request")
        async with self._op_lock:
            self._require_idle()
            ncfg = self._node_config(False, options, token, gcs_address=head)
            self._check_ports(ncfg)
            self._set_phase("joining", f"joining {head}")
            deadline = time.monotonic() + max(0.0, wait_s)
            while True:
                remaining = deadline - time.monotonic()
                kind, why = await self._probe_head(head, token,
                                                   min(HEAD_PROBE_TIMEOUT_S, remaining))
                if kind != "unreachable" or time.monotonic() + 0.5 > deadline:
                    break
                await asyncio.sleep(0.5)
            if kind == "auth":
                self._set_phase("idle", f"last join failed: {why}")
                raise AgentError(grpc.StatusCode.PERMISSION_DENIED, why)
            self.token, self.gcs_address = token, head
            self.store.write_token(token)
            self.state = dataclasses.replace(self.state, role="worker", head_address=head,
                                             options=dict(options))
            self._save()
            if kind == "unreachable":
                self._set_phase("joining", f"joining: {why}")
                self._join_task = asyncio.ensure_future(
                    self._join_loop(head, token, options, first_delay=1.0))
                raise AgentError(grpc.StatusCode.UNAVAILABLE,
                                 f"{why} (tried for {wait_s:g}s); the agent keeps retrying in "
                                 f"the background: see `agentctl status`, cancel with "
                                 f"`agentctl leave`")
            node = await self._start_worker(ncfg)
            if node.start_errors:
                raise AgentError(grpc.StatusCode.UNAVAILABLE,
                                 f"joined, but {self._start_error_text(node)}")
            return agent_pb2.JoinReply(gcs_address=head, node_id=node.node_id.hex(),
                                       session_dir=node.session_dir)

    async def _start_worker(self, ncfg: NodeConfig) -> Node:
        self._set_phase("starting", f"starting worker node on {ncfg.node_ip}")
        try:
            return await self._run_node(ncfg)
        except AgentError as exc:
            self._set_phase("failed", exc.message)
            raise

    async def _join_loop(self, head: str, token: str, options: Dict[str, Any],
                         first_delay: float = 0.0) -> None:
        """Reach the head with backoff, then start the worker node. An auth failure
        ends the loop: retrying a wrong token only floods the head's log."""
        delay = 1.0
        await asyncio.sleep(first_delay)
        while True:
            kind, why = await self._probe_head(head, token)
            if kind == "ok":
                async with self._op_lock:
                    if self.state.role != "worker" or self.node is not None:
                        return
                    ncfg = self._node_config(False, options, token, gcs_address=head)
                    try:
                        await self._wait_ports(ncfg, 15.0)
                        await self._start_worker(ncfg)
                    except AgentError as exc:
                        self._set_phase("failed", exc.message)
                    return
            if kind == "auth":
                self._set_phase("failed", f"join failed: {why}")
                log.error("%s; not retrying (run `agentctl leave`, then join with the right "
                          "token)", why)
                return
            self._set_phase("joining", f"joining: {why}")
            log.warning("%s; retrying in %.0fs", why, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, JOIN_BACKOFF_MAX_S)

    async def _cancel_join(self) -> None:
        task, self._join_task = self._join_task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    async def leave(self, drain_timeout_s: float) -> agent_pb2.NodeActionReply:
        """Drain, stop the node and forget the cluster (role idle, token removed)."""
        await self._cancel_join()
        async with self._op_lock:
            st = self.state
            was = st.role
            msg = await self._stop_node(drain_timeout_s)
            self.state = AgentState()
            self.store.forget_token()
            self.token = self.gcs_address = ""
            self._save()
            self._set_phase("idle", f"left the cluster ({was})" if was != "idle" else "")
            if not msg:
                msg = f"stopped trying to join {st.head_address}" if was == "worker" else "already idle"
            return agent_pb2.NodeActionReply(role="idle", message=msg)

    async def stop_node(self, drain_timeout_s: float, exit_agent: bool) -> agent_pb2.NodeActionReply:
        """Drain and stop the node; the role is kept as last_role for StartNode."""
        await self._cancel_join()
        async with self._op_lock:
            st = self.state
            msg = await self._stop_node(drain_timeout_s)
            if st.role == "head":
                self._forget_gcs_store()
            if st.role != "idle":
                self.state = AgentState(last_role=st.role, last_head_address=st.head_address,
                                        last_options=st.options)
            self.gcs_address = ""
            self._save()
            self._set_phase("idle", "node stopped; `agentctl start` (StartNode) starts it again")
            exiting = exit_agent and not self.under_systemd
            if exiting:
                self._exiting = True
                self.loop.call_later(0.2, self._request_exit)
            return agent_pb2.NodeActionReply(role="idle", message=msg or "no node was running",
                                              agent_exiting=exiting)

    async def start_node(self) -> agent_pb2.NodeActionReply:
        """Start the node again: after StopNode (the last role), or to retry a node
        whose components failed (the current role)."""
        self._refuse_if_exiting()
        await self._cancel_join()
        async with self._op_lock:
            st = self.state
            if st.role != "idle" and self.node is not None and self.phase == "running":
                return agent_pb2.NodeActionReply(
                    role=st.role, message=f"the {st.role} node already runs"
                    + (f" (GCS {self.gcs_address})" if self.gcs_address else ""))
            if st.role != "idle":
                await self._stop_node(0.0)
                role, head, options = st.role, st.head_address, st.options
            elif st.last_role:
                role, head, options = st.last_role, st.last_head_address, st.last_options
            else:
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                                 "nothing to start: this agent has no role; use `agentctl start "
                                 "--head` or `agentctl join HOST:PORT --token T`")
            token = self.store.read_token()
            if token:
                valid_token(token, self.store.path("token"))
            if role == "head":
                await self._start_head(options, token or rpc.new_cluster_token())
                return agent_pb2.NodeActionReply(role="head", message=f"head node started at "
                                                 f"{self.gcs_address}")
            if not token:
                raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                                 "no saved cluster token; run `agentctl join` again")
            self.state = dataclasses.replace(st, role="worker", head_address=head, options=options)
            self.token, self.gcs_address = token, head
            self._save()
            self._set_phase("joining", f"joining {head}")
            self._join_task = asyncio.ensure_future(self._join_loop(head, token, options))
            return agent_pb2.NodeActionReply(role="worker", message=f"joining {head}")

    async def _stop_node(self, drain_timeout_s: float) -> str:
        node = self.node
        if node is None:
            return ""
        self._set_phase("stopping", "draining")
        timeout = drain_timeout_s if drain_timeout_s > 0 else self.cfg.supervision.drain_timeout_s
        drained = await self.drain(timeout)
        self._set_phase("stopping", "stopping processes")
        await asyncio.to_thread(node.stop)
        self.node = None
        return f"node {node.node_id.hex()[:8]} stopped ({drained})"

    async def drain(self, timeout_s: float) -> str:
        """Put the raylet in drain mode (new work goes to other nodes or fails), then wait,
        at most timeout_s, until it has no leased worker and no queued lease request."""
        node = self.node
        raylet = node.supervisor.get("raylet") if node else None
        if node is None or raylet is None or raylet.poll() is not None:
            return "nothing to drain"
        stub = raylet_pb2_grpc.RayletStub(self._channel(node.raylet_address, node.token))
        try:
            await stub.Drain(raylet_pb2.DrainRequest(draining=True), timeout=5)
        except grpc.RpcError as exc:
            log.warning("raylet did not accept drain mode: %s", exc.code().name)
        deadline = time.monotonic() + timeout_s
        busy = -1
        while True:
            try:
                stats = await stub.GetNodeStats(common_pb2.Empty(), timeout=2)
                busy = sum(1 for w in stats.workers if w.leased and not w.is_driver)
                busy += stats.pending_leases
            except grpc.RpcError:
                return "raylet not answering; not drained"
            if busy == 0:
                return "drained"
            if time.monotonic() >= deadline:
                log.warning("drain timed out after %gs with %d leases/requests left", timeout_s,
                            busy)
                return f"drain timed out after {timeout_s:g}s with {busy} leases left"
            await asyncio.sleep(0.2)

    async def shutdown(self) -> None:
        """Agent exit: drain (bounded), stop the node, reap everything. The role is
        kept, so the next start of the agent brings the node back."""
        if self._closing:
            return
        self._closing = True
        await self._cancel_join()
        try:
            await asyncio.wait_for(self._stop_node(self.cfg.supervision.drain_timeout_s),
                                   self.cfg.supervision.drain_timeout_s
                                   + 4 * self.cfg.supervision.stop_grace_s + 5)
        except (asyncio.TimeoutError, Exception):
            log.exception("stopping the node failed; killing what is left")
        await asyncio.to_thread(self.supervisor.close)
        host.kill_descendants()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    # ---- supervision callbacks (monitor thread) -----------------------------------------

    def _on_exit(self, proc: ManagedProcess, returncode: int) -> None:
        node = self.node
        old_id = None
        if node is not None and proc.name in COMPONENTS:
            try:
                old_id = node.on_component_exit(proc, returncode)
            except Exception:
                log.exception("preparing the restart of %s failed", proc.name)
        try:
            self.loop.call_soon_threadsafe(self._after_exit, proc.name, returncode, old_id)
        except RuntimeError:
            pass  # the loop is closed: the agent is exiting

    def _after_exit(self, name: str, returncode: int, old_node_id: Optional[bytes]) -> None:
        self.emit("process", name, "exited", describe_exit(returncode))
        if old_node_id is not None and self.gcs_address and self.token:
            asyncio.ensure_future(self._unregister(old_node_id, returncode))

    async def _unregister(self, node_id: bytes, returncode: int) -> None:
        stub = gcs_pb2_grpc.GcsStub(self._channel(self.gcs_address, self.token))
        reason = f"raylet exited ({describe_exit(returncode)}); restarted as a new node"
        try:
            await stub.UnregisterNode(gcs_pb2.NodeId(node_id=node_id, reason=reason), timeout=5)
        except grpc.RpcError:
            pass  # the GCS is down too: a new GCS does not know the old node anyway

    # ---- status --------------------------------------------------------------------------

    async def _drop_channel(self, address: str, token: str) -> None:
        ch = self._channels.pop((address, token), None)
        if ch is not None:
            await ch.close()

    def _channel(self, address: str, token: str) -> Any:
        key = (address, token)
        ch = self._channels.get(key)
        if ch is None:
            ch = self._channels[key] = rpc.aio_channel(address, token)
        return ch

    def process_snapshots(self) -> List[Dict[str, Any]]:
        node = self.node
        return [p.snapshot() for p in node.processes()] if node is not None else []

    async def workers(self) -> List[agent_pb2.ProcessInfo]:
        """The raylet's worker processes (supervised by the raylet, not by us)."""
        node = self.node
        raylet = node.supervisor.get("raylet") if node else None
        if node is None or raylet is None or raylet.state.value != "running":
            return []
        stub = raylet_pb2_grpc.RayletStub(self._channel(node.raylet_address, node.token))
        try:
            stats = await stub.GetNodeStats(common_pb2.Empty(), timeout=GCS_QUERY_TIMEOUT_S)
        except grpc.RpcError:
            return []
        out = []
        now = time.time()
        for w in stats.workers:
            if w.is_driver:
                continue
            try:
                started = psutil.Process(w.pid).create_time()
            except psutil.Error:
                continue
            state = "blocked" if w.blocked else ("leased" if w.leased else "idle")
            out.append(agent_pb2.ProcessInfo(
                component=f"worker-{w.worker_id.hex()[:8]}", pid=w.pid, state=state,
                uptime_s=max(0.0, now - started), start_time=started, supervised_by="raylet",
                log_path=os.path.join(node.session_dir, "logs",
                                      f"worker-{w.worker_id.hex()[:8]}.out")))
        return out

    async def refresh_cluster(self) -> None:
        """Ask the GCS for the cluster's nodes, resources and demand."""
        if not self.gcs_address or not self.token or self.node is None:
            self._cluster, self._cluster_error = None, ""
            return
        stub = gcs_pb2_grpc.GcsStub(self._channel(self.gcs_address, self.token))
        try:
            self._cluster = await stub.GetClusterStatus(common_pb2.Empty(),
                                                        timeout=GCS_QUERY_TIMEOUT_S)
            self._cluster_error = ""
        except grpc.RpcError as exc:
            self._cluster = None
            self._cluster_error = f"GCS at {self.gcs_address} unreachable: {short_rpc_reason(exc)}"
            return
        self.views.sample(self._cluster)
        await self.views.publish()

    def effective_phase(self) -> Tuple[str, str]:
        """The phase, refined by the components' states while a node runs."""
        if self.phase not in ("running", "degraded"):
            return self.phase, self.message
        snaps = self.process_snapshots()
        failed = [s for s in snaps if s["state"] == "failed"]
        if failed:
            return "failed", f"{failed[0]['name']} failed: {brief_reason(failed[0]['failure_reason'])}"
        waiting = [s["name"] for s in snaps if s["state"] in ("backoff", "starting")]
        if waiting:
            return "degraded", f"restarting: {', '.join(waiting)}"
        if self._cluster_error:
            return "degraded", self._cluster_error
        return "running", ""

    def summary(self) -> str:
        """One line for systemd's STATUS=: "head · 3 nodes · 12/16 CPU"."""
        role = self.state.role
        phase, message = self.effective_phase()
        if role == "idle":
            return "idle · no node" + (f" · {message}" if message and phase == "failed" else "")
        if phase in ("running",) and self._cluster is not None:
            alive = [n for n in self._cluster.nodes if n.alive]
            return (f"{role} · {len(alive)} node{'s' if len(alive) != 1 else ''} · "
                    f"{cpu_summary(dict(self._cluster.total), dict(self._cluster.available))}")
        if message.startswith(phase):
            return f"{role} · {message}"
        return f"{role} · {phase}" + (f": {message}" if message else "")

    async def status(self, include_token: bool, local_only: bool) -> agent_pb2.StatusReply:
        if not local_only:
            await self.refresh_cluster()
        node = self.node
        phase, message = self.effective_phase()
        reply = agent_pb2.StatusReply(
            role=self.state.role, phase=phase, message=message, gcs_address=self.gcs_address,
            agent_pid=os.getpid(), agent_uptime_s=time.monotonic() - self.started,
            api_address=self.api_address, state_dir=self.paths.state_dir,
            socket_path=self.paths.socket, exiting=self._exiting or self._closing)
        if include_token:
            reply.token = self.token
            if self.token:
                from agent.service import readonly_token

                reply.readonly_token = readonly_token(self.token)
        if node is not None:
            reply.node_id = node.node_id.hex()
            reply.node_ip = node.cfg.node_ip
            reply.session_dir = node.session_dir
            reply.raylet_address = node.raylet_address
            reply.object_store_address = node.store_address
        reply.processes.extend(process_info(s) for s in self.process_snapshots())
        if local_only:
            return reply
        reply.processes.extend(await self.workers())
        reply.summary = self.summary()
        reply.cluster_error = self._cluster_error
        cs = self._cluster
        if cs is not None:
            for n in cs.nodes:
                reply.nodes.add(node_id=n.node_id.hex(), node_ip=n.node_ip,
                                state="ALIVE" if n.alive else "DEAD", is_head=n.is_head,
                                resources_total=n.resources_total,
                                resources_available=n.resources_available if n.alive else {},
                                death_reason=n.death_reason, hostname=n.hostname)
            reply.total.update(cs.total)
            reply.available.update(cs.available)
            for d in cs.pending:
                reply.pending.add(shape=d.shape, count=d.count, infeasible=d.infeasible,
                                  reason=d.reason, function_name=d.function_name)
        return reply

    # ---- housekeeping (called periodically by the daemon) -----------------------------

    def diff_processes(self) -> None:
        """Emit an event for every component whose state or pid changed."""
        seen = {}
        for s in self.process_snapshots():
            key = (s["state"], s["pid"] or 0)
            seen[s["name"]] = key
            if self._proc_seen.get(s["name"]) != key:
                self.emit("process", s["name"], s["state"], brief_reason(s["failure_reason"]),
                          s["pid"] or 0)
        self._proc_seen = seen

    def diff_nodes(self) -> None:
        seen = {}
        if self._cluster is not None:
            for n in self._cluster.nodes:
                state = "ALIVE" if n.alive else "DEAD"
                seen[n.node_id.hex()] = state
                if self._nodes_seen.get(n.node_id.hex()) != state:
                    self.emit("node", n.node_id.hex(), state,
                              n.death_reason or f"{n.node_ip}{' (head)' if n.is_head else ''}")
        self._nodes_seen = seen

    def housekeeping(self) -> None:
        """Rotate component logs that grew too big; reap orphans we adopted."""
        node = self.node
        if node is not None:
            host.rotate_logs(os.path.join(node.session_dir, "logs"))
        host.reap_orphans({p.pid for p in self.supervisor.processes() if p.pid})
