"""``node-agent``: the per-machine daemon.

    node-agent [--config /etc/node-agent/agent.toml] [--state-dir DIR] [--socket PATH]
               [--dashboard-port 8265]

It serves the NodeAgent API on a unix socket at once (and tells systemd
READY=1), then takes its saved role again in the background. Its main loop
watches the supervised processes (events, systemd STATUS=, WATCHDOG=1 pings
that stop when the supervisor's monitor is stuck), keeps the TCP API in step
with the cluster token, serves the Jobs REST API while this machine is a head
(agent/jobs/), rotates component logs and reaps orphans. SIGTERM stops the jobs,
drains the node (bounded), sends STOPPING=1 and stops every child in order.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import logging.handlers
import os
import signal
import stat
import sys
import time
from typing import Any, List, Optional, Tuple

import grpc
import grpc.aio

from agent import config as agent_config
from agent.client import socket_alive
from agent.core import AgentError, NodeAgent
from agent.jobs.runner import JobRunner, NodeContext
from agent.sdnotify import Notifier, PriorityPrefixFormatter, WatchdogGate, journal_handler
from agent.service import AgentService, make_tcp_server
from runtime import rpc
from runtime.net import describe_port_holder as rpc_port_holder
from runtime.private_fs import UnsafePathError, ensure_private_dir
from runtime.protocol import agent_pb2_grpc

log = logging.getLogger("agent")

TICK_S = 0.5
CLUSTER_REFRESH_S = 2.0
HOUSEKEEPING_S = 10.0
#: The supervisor's monitor loop runs every 0.1 s; this much silence means it hangs.
MONITOR_MAX_AGE_S = 5.0
_PR_SET_CHILD_SUBREAPER = 36


class StartupError(RuntimeError):
    """The agent cannot start; the message is the one line the user sees."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="node-agent", description="Run this machine's node of the cluster (see docs/agent.md).")
    p.add_argument("--config", default=None,
                   help=f"TOML config (default {agent_config.DEFAULT_CONFIG_PATH} if it exists)")
    p.add_argument("--state-dir", default=None,
                   help="where the role and token are kept (default /var/lib/node-agent, or a "
                        "per-user dir when that is not writable)")
    p.add_argument("--socket", default=None,
                   help="control socket (default $NODE_AGENT_SOCKET, /run/node-agent/agent.sock, "
                        "or a per-user path)")
    p.add_argument("--dashboard-port", type=int, default=None, metavar="PORT",
                   help="where a head serves Ray's Jobs REST API, on its node IP (default "
                        "[ports] dashboard in the config, 8265; 0 turns it off)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--detached", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def setup_logging(log_dir: str, notifier: Notifier, detached: bool, level: str) -> str:
    """journald when systemd started us, else a rotated file (and stderr in the
    foreground). Returns where the log goes, for the first log line."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    handler = journal_handler(notifier.journal_stream)
    if handler is not None:
        root.addHandler(handler)
        return "journald"
    if notifier.journal_stream:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(PriorityPrefixFormatter("%(name)s: %(message)s"))
        root.addHandler(h)
        return "journald (stderr stream)"
    os.makedirs(log_dir, mode=0o750, exist_ok=True)
    path = os.path.join(log_dir, "node-agent.log")
    fh = logging.handlers.RotatingFileHandler(path, maxBytes=10 * 1024 * 1024, backupCount=3)
    fmt = logging.Formatter("%(asctime)s %(levelname)s node-agent pid=%(process)d %(name)s: "
                            "%(message)s")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if not detached:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)
    return path


def become_subreaper() -> None:
    """Orphans of our children (e.g. workers whose raylet died) become ours, so
    the agent can reap and, at exit, kill them instead of leaking them to init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def socket_mode(directory: str) -> int:
    """0660 when the socket's directory lets its group in and nobody else (0750:
    systemd's RuntimeDirectory for the packaged unit), else 0600. Such a directory
    is the admin's statement that the group may use the agent; the socket follows
    it. A directory open to everyone (0755, any mkdir's default) says nothing of the
    kind, and the socket stays private.

    Whoever may connect may ask for the cluster token (Status on the socket returns
    it), run drivers, start and stop the node: group membership is as strong as
    `sudo -u node-agent`, since drivers run arbitrary code as the agent's user on
    every node, which could read the token file anyway (docs/agent.md, "Trust")."""
    try:
        st = os.stat(directory)
    except OSError:
        return 0o600
    mode = stat.S_IMODE(st.st_mode)
    return 0o660 if mode & 0o050 == 0o050 and not mode & 0o007 else 0o600


def _group_name(gid: int) -> str:
    try:
        import grp
        return grp.getgrgid(gid).gr_name
    except (KeyError, ImportError):
        return str(gid)


class Daemon:
    def __init__(self, cfg: agent_config.AgentConfig, paths: agent_config.ResolvedPaths,
                 notifier: Notifier, args: argparse.Namespace) -> None:
        self.cfg = cfg
        self.paths = paths
        self.notifier = notifier
        self.args = args
        self.stop = asyncio.Event()
        self.unix_server: Optional[grpc.aio.Server] = None
        self.tcp_server: Optional[grpc.aio.Server] = None
        self.tcp_endpoint: Optional[Tuple[str, int, str]] = None
        self.agent: Optional[NodeAgent] = None
        self.status_sent = ""
        self.jobs_server: Optional[Any] = None  # agent.jobs.server.JobServer
        self.jobs_endpoint: Optional[Tuple[str, int, str, str, str]] = None
        self._jobs_switch: Optional[asyncio.Task] = None
        # Runs the entrypoints placed on this node: for this head's job manager, or for
        # the head's over the TCP API (agent/jobs/runner.py).
        self.job_runner = JobRunner(self._node_context, cfg.jobs)

    def _node_context(self) -> Optional[NodeContext]:
        agent = self.agent
        node = agent.node if agent is not None else None
        if node is None or not agent.gcs_address or not agent.token:
            return None
        return NodeContext(session_dir=node.session_dir, node_id=node.node_id.hex(),
                           node_ip=node.cfg.node_ip, gcs_address=agent.gcs_address,
                           token=agent.token, socket_path=self.paths.socket,
                           is_head=agent.state.role == "head")

    async def _serve_unix(self, agent: NodeAgent) -> None:
        path = self.paths.socket
        parent = os.path.dirname(path)
        try:
            # Whoever can write the directory could replace our socket with theirs;
            # the system one (/run/node-agent) may be root's.
            ensure_private_dir(parent, allow_root=True)
        except UnsafePathError as exc:
            raise StartupError(f"cannot use {path}: {exc}") from None
        if os.path.lexists(path):
            if socket_alive(path):
                raise StartupError(f"another node-agent is already serving on {path}; use it "
                                   f"(agentctl --socket {path} status) or pass another --socket")
            os.unlink(path)  # left by an agent that was killed
        # No token on the socket: who may connect is who may reach it (socket_mode).
        server = grpc.aio.server(options=rpc.SERVER_OPTIONS)
        agent_pb2_grpc.add_NodeAgentServicer_to_server(
            AgentService(agent, local=True, jobs=self.job_runner), server)
        old = os.umask(0o177)
        try:
            if not server.add_insecure_port(f"unix:{path}"):
                raise StartupError(f"cannot listen on unix socket {path}")
            await server.start()
        finally:
            os.umask(old)
        mode = socket_mode(parent)
        os.chmod(path, mode)
        if mode & 0o060:
            log.info("%s is 0%o: members of group %s may use agentctl", path, mode,
                     _group_name(os.stat(path).st_gid))
        self.unix_server = server

    async def _sync_tcp(self, agent: NodeAgent) -> None:
        """Serve the TCP API on the endpoint the agent wants (or stop serving)."""
        wanted = agent.api_endpoint()
        if wanted == self.tcp_endpoint:
            return
        if self.tcp_server is not None:
            await self.tcp_server.stop(0.5)
            self.tcp_server = None
            agent.api_address = ""
        self.tcp_endpoint = wanted
        if wanted is None:
            return
        host, port, token = wanted
        server = make_tcp_server(token)
        agent_pb2_grpc.add_NodeAgentServicer_to_server(
            AgentService(agent, local=False, jobs=self.job_runner), server)
        try:
            bound = rpc.bind(server, host, port)
        except rpc.PortInUseError as exc:
            log.error("TCP API not served: %s", exc)
            return
        await server.start()
        self.tcp_server = server
        agent.api_address = f"{host}:{bound}"
        log.info("TCP API serving on %s (cluster token required)", agent.api_address)

    def _jobs_wanted(self, agent: NodeAgent) -> Optional[Tuple[str, int, str, str, str]]:
        """(host, port, token, GCS address, session dir) the Jobs API should serve
        with, None when it should not: only a running head serves it, and it stops as
        soon as the node starts stopping, so its jobs are stopped and recorded while
        the GCS is still there. A restarted raylet (a new node id) or GCS changes none
        of these: running jobs carry on."""
        # `agentctl start --head --dashboard-port P` is kept with the role; else the config.
        port = agent.state.options.get("dashboard_port", self.cfg.ports.dashboard)
        node = agent.node
        if (not port or node is None or agent.state.role != "head" or not agent.token
                or not agent.gcs_address or agent.phase not in ("running", "degraded")):
            return None
        return node.cfg.node_ip, port, agent.token, agent.gcs_address, node.session_dir

    def _sync_jobs(self, agent: NodeAgent) -> None:
        wanted = self._jobs_wanted(agent)
        if wanted == self.jobs_endpoint:
            if self.jobs_server is not None and agent.node is not None:
                self.jobs_server.manager.set_node_id(agent.node.node_id.hex())
            return
        if self._jobs_switch is not None and not self._jobs_switch.done():
            return  # the next tick looks again
        self.jobs_endpoint = wanted
        self._jobs_switch = asyncio.ensure_future(self._switch_jobs(wanted))

    async def _close_jobs(self) -> None:
        server, self.jobs_server = self.jobs_server, None
        if server is not None:
            try:
                await server.close()
            except Exception:
                log.exception("stopping the jobs API failed")
            log.info("jobs API stopped")

    async def _switch_jobs(self, wanted: Optional[Tuple[str, int, str, str, str]]) -> None:
        await self._close_jobs()
        if wanted is None:
            return
        from agent.jobs.manager import HeadInfo, JobManager
        from agent.jobs.server import JobServer

        host, port, token, gcs_address, session_dir = wanted
        node_id = self.agent.node.node_id.hex() if self.agent and self.agent.node else ""
        head = HeadInfo(gcs_address=gcs_address, token=token, node_id=node_id, node_ip=host,
                        session_dir=session_dir, http_address=f"http://{host}:{port}")
        server = JobServer(JobManager(head, self.cfg.jobs, runner=self.job_runner), token)
        try:
            await server.start(host, port)
        except OSError as exc:
            holder = rpc_port_holder(port)
            log.error("jobs API not served on %s:%d: %s%s", host, port, exc.strerror or exc,
                      f" ({holder})" if holder else "")
            return
        except Exception:
            log.exception("jobs API not served on %s:%d", host, port)
            return
        self.jobs_server = server
        log.info("jobs API (Ray's REST API) serving on http://%s:%d (cluster token required)",
                 host, port)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        agent = NodeAgent(self.cfg, self.paths, under_systemd=self.notifier.enabled
                          or bool(os.environ.get("INVOCATION_ID")),
                          detached=self.args.detached, request_exit=self.stop.set)
        self.agent = agent
        try:
            agent.lock_state_dir()
        except AgentError as exc:
            raise StartupError(exc.message) from None
        await self._serve_unix(agent)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored: restart the "
                                                                "agent to reload agent.toml"))
        log.info("node-agent pid %d serving on %s (state dir %s)", os.getpid(), self.paths.socket,
                 self.paths.state_dir)
        self.notifier.ready(agent.summary())
        restore = asyncio.ensure_future(agent.restore())
        try:
            await self._main_loop(agent)
        finally:
            self.notifier.stopping("stopping: draining and stopping the node")
            log.info("node-agent stopping")
            if not restore.done():
                restore.cancel()
            if self._jobs_switch is not None and not self._jobs_switch.done():
                await asyncio.gather(self._jobs_switch, return_exceptions=True)
            await self._close_jobs()  # first: jobs are recorded STOPPED while the GCS runs
            await self.job_runner.close()  # those this node ran for the head's manager
            await agent.shutdown()
            if self.tcp_server is not None:
                await self.tcp_server.stop(0.5)
            if self.unix_server is not None:
                await self.unix_server.stop(0.5)
            try:
                os.unlink(self.paths.socket)
            except OSError:
                pass
            log.info("node-agent stopped")
        return 0

    async def _refresh_cluster(self, agent: NodeAgent) -> None:
        """Ask the GCS, emit node events, update systemd's STATUS= line."""
        try:
            await agent.refresh_cluster()
            agent.diff_nodes()
            summary = agent.summary()
            if summary != self.status_sent:
                self.notifier.status(summary)
                self.status_sent = summary
        except Exception:
            log.exception("refreshing the cluster view failed")

    async def _main_loop(self, agent: NodeAgent) -> None:
        gate = WatchdogGate(agent.supervisor.heartbeat, MONITOR_MAX_AGE_S)
        interval = self.notifier.watchdog_interval
        if interval is not None:
            gate.max_age_s = max(1.0, min(MONITOR_MAX_AGE_S, interval))
        tick = min(TICK_S, interval / 2) if interval else TICK_S
        last_ping = last_refresh = last_house = 0.0
        withheld = False
        refresh: Optional[asyncio.Task] = None
        while not self.stop.is_set():
            now = time.monotonic()
            if interval is not None and now - last_ping >= interval:
                problem = gate.check(now)
                if problem is None:
                    self.notifier.watchdog()
                    last_ping = now
                    withheld = False
                elif not withheld:
                    log.error("withholding systemd watchdog pings: %s", problem)
                    withheld = True
            try:
                agent.diff_processes()
                # The GCS query runs as its own task: a slow head must not
                # delay the watchdog pings or the process events.
                if now - last_refresh >= CLUSTER_REFRESH_S and (refresh is None or refresh.done()):
                    last_refresh = now
                    refresh = asyncio.ensure_future(self._refresh_cluster(agent))
                await self._sync_tcp(agent)
                self._sync_jobs(agent)
                self.job_runner.sync()
                if now - last_house >= HOUSEKEEPING_S:
                    last_house = now
                    agent.housekeeping()
            except Exception:  # the loop must survive any bug in one iteration
                log.exception("agent main loop iteration failed; continuing")
            try:
                await asyncio.wait_for(self.stop.wait(), tick)
            except asyncio.TimeoutError:
                pass


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = agent_config.load(args.config)
    except agent_config.ConfigError as exc:
        print(f"node-agent: {exc}", file=sys.stderr)
        return 2
    if args.dashboard_port is not None:
        if not 0 <= args.dashboard_port <= 65535:
            print(f"node-agent: --dashboard-port must be a TCP port (0-65535), got "
                  f"{args.dashboard_port}", file=sys.stderr)
            return 2
        cfg.ports.dashboard = args.dashboard_port
    paths = agent_config.resolve_paths(cfg, args.state_dir, args.socket)
    notifier = Notifier()
    try:
        ensure_private_dir(paths.state_dir)
    except UnsafePathError as exc:
        print(f"node-agent: unsafe state dir: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"node-agent: cannot create state dir {paths.state_dir}: {exc}", file=sys.stderr)
        return 1
    try:
        where = setup_logging(paths.log_dir, notifier, args.detached, args.log_level.upper())
    except OSError as exc:
        print(f"node-agent: cannot create log dir {paths.log_dir}: {exc}", file=sys.stderr)
        return 1
    log.info("node-agent starting; config %s; logging to %s", cfg.source, where)
    for note in paths.notes:
        log.info("%s", note)
    become_subreaper()
    try:
        return asyncio.run(Daemon(cfg, paths, notifier, args).run())
    except StartupError as exc:
        log.error("%s", exc)
        print(f"node-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
