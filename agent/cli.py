"""``agentctl``: control this machine's node agent.

    agentctl start --head [--port 6379] [--num-cpus N] [--num-gpus N] [--resources JSON]
                          [--node-ip IP] [--object-store-memory BYTES]
                          [--token T | --token-file F]
    agentctl start                      start the node again with its saved role
    agentctl join HOST:PORT [--token T | --token-file F] [--node-ip IP] [--num-cpus N] ...
                                        (the token may also come from $NODE_AGENT_TOKEN)
    agentctl leave | stop [--drain-timeout S]
    agentctl status
    agentctl logs [COMPONENT] [-f] [-n N]
    agentctl token                      the cluster token, for scripts
    agentctl job submit|list|status|logs [-f]|stop|delete   the head's jobs API
                                        (Ray's `ray job`; agent/jobs/cli.py)
    agentctl up CLUSTER.yaml [--deb PATH] [-o SSH_OPTION]...
    agentctl down CLUSTER.yaml [-o SSH_OPTION]...

Every command takes --socket and --json. Where no agent runs (a plain shell, no
systemd), ``start`` and ``join`` launch ``node-agent`` in the background first;
where the packaged unit is installed they ask for ``systemctl start node-agent``
instead. ``up`` and ``down`` act on a whole cluster over ssh (agent/up.py).
Errors are one line on stderr and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import grpc

from agent import client as agent_client
from agent import tokens
from agent.config import ConfigError
from agent.jobs import cli as job_cli
from agent.views import brief_reason, fmt_duration
from runtime.protocol import agent_pb2

EXIT_ERROR = 1
JOIN_WAIT_S = 10.0


class CliError(Exception):
    """Printed as "agentctl: <message>" with a non-zero exit status."""


# ---- formatting -------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"


def fmt_amount(name: str, value: float) -> str:
    return fmt_bytes(value) if "memory" in name else f"{value:g}"


def _shown_resources(total: Dict[str, float]) -> List[str]:
    order = ["CPU", "GPU", "memory", "object_store_memory"]
    names = [n for n in order if n in total]
    names += sorted(n for n in total if n not in order and not n.startswith("node:"))
    return names


def format_status(s: agent_pb2.StatusReply) -> str:
    """Text like `ray status`: nodes, resources used/total, unplaceable demand, and
    this node's processes."""
    out: List[str] = []
    title = f"{s.role} node" if s.role != "idle" else "idle (no node)"
    out.append(f"======== Node agent: {title} ========")
    line = f"phase: {s.phase}"
    if s.message.startswith(s.phase):
        line = f"phase: {s.message}"
    elif s.message:
        line += f" ({s.message})"
    out.append(line)
    if s.node_id:
        out.append(f"node: {s.node_id[:8]} on {s.node_ip}; GCS {s.gcs_address}")
    elif s.gcs_address:
        out.append(f"GCS: {s.gcs_address}")
    if s.cluster_error:
        out.append(f"cluster: {s.cluster_error}")
    if s.nodes:
        alive = [n for n in s.nodes if n.state == "ALIVE"]
        out.append("")
        out.append(f"Nodes ({len(alive)} alive, {len(s.nodes) - len(alive)} dead):")
        for n in sorted(s.nodes, key=lambda n: (n.state != "ALIVE", not n.is_head, n.node_ip)):
            parts = [f" {n.state:<6}", n.node_id[:8], f"{n.node_ip:<15}",
                     "head" if n.is_head else "    "]
            if n.state == "ALIVE":
                for name in _shown_resources(dict(n.resources_total)):
                    if name in ("memory", "object_store_memory"):
                        continue
                    total = n.resources_total[name]
                    used = total - n.resources_available.get(name, 0.0)
                    parts.append(f"{name} {used:g}/{total:g}")
            else:
                parts.append(n.death_reason)
            out.append("  ".join(parts))
        out.append("")
        out.append("Resources (used/total):")
        for name in _shown_resources(dict(s.total)):
            total = s.total[name]
            used = total - s.available.get(name, 0.0)
            out.append(f"  {fmt_amount(name, used)}/{fmt_amount(name, total)} {name}")
        out.append("")
        out.append("Demands:")
        if not s.pending:
            out.append("  (no resource demands)")
        for d in s.pending:
            shape = json.dumps(dict(d.shape), sort_keys=True)
            note = "cannot be placed on any node" if d.infeasible else "waiting for resources"
            out.append(f"  {shape}: {d.count} pending ({note})")
    if s.processes:
        out.append("")
        out.append("Processes on this node:")
        out.append(f"  {'COMPONENT':<18}{'PID':>8}  {'STATE':<9}{'RESTARTS':>9}  "
                   f"{'UPTIME':>8}  LAST EXIT")
        for p in s.processes:
            restarts = str(p.restarts) if p.supervised_by == "agent" else "-"
            out.append(f"  {p.component:<18}{p.pid or '-':>8}  {p.state:<9}{restarts:>9}  "
                       f"{fmt_duration(p.uptime_s) or '-':>8}  {p.last_exit or '-'}")
            if p.failure_reason:
                out.append(f"      {brief_reason(p.failure_reason)}")
    return "\n".join(out)


# ---- commands ---------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> agent_pb2.NodeOptions:
    opts = agent_pb2.NodeOptions(node_ip=args.node_ip or "")
    if getattr(args, "port", None):
        opts.gcs_port = args.port
    if getattr(args, "dashboard_port", None) is not None:
        if not 0 <= args.dashboard_port <= 65535:
            raise CliError(f"--dashboard-port must be a TCP port (0-65535; 0 turns the jobs API "
                           f"off), got {args.dashboard_port}")
        opts.dashboard_port = args.dashboard_port
    if args.num_cpus is not None:
        opts.num_cpus = args.num_cpus
    if args.num_gpus is not None:
        opts.num_gpus = args.num_gpus
    if args.object_store_memory is not None:
        opts.object_store_memory = args.object_store_memory
    if args.resources:
        try:
            res = json.loads(args.resources)
        except ValueError as exc:
            raise CliError(f"--resources must be a JSON object such as '{{\"accel\": 2}}': {exc}")
        if not isinstance(res, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in res.values()):
            raise CliError("--resources must be a JSON object of numbers, e.g. '{\"accel\": 2}'")
        for key in ("CPU", "GPU"):
            if key in res:
                raise CliError(f"use --num-{key.lower()}s instead of {key!r} in --resources")
        opts.resources.update({str(k): float(v) for k, v in res.items()})
    return opts


#: Where the package puts the unit (and where an admin may override it).
SYSTEM_UNIT_PATHS = ("/etc/systemd/system/node-agent.service",
                     "/lib/systemd/system/node-agent.service",
                     "/usr/lib/systemd/system/node-agent.service")


def _systemd_owns_agent(args: argparse.Namespace) -> bool:
    """True when systemd runs this machine and the node-agent unit is installed: the
    machine's agent is then the service's, and agentctl must not start a second one
    of its own (as whoever runs agentctl, on per-user paths) when the service is
    down. An explicit --socket, --state-dir or --config still may."""
    if args.socket or args.state_dir or args.config or os.environ.get("NODE_AGENT_SOCKET"):
        return False
    return os.path.isdir("/run/systemd/system") and any(
        os.path.exists(p) for p in SYSTEM_UNIT_PATHS)


#: How long start/join wait for an agent that is exiting (after `agentctl stop`) to go.
EXITING_WAIT_S = 20.0


def _wait_if_exiting(path: str) -> bool:
    """True when the agent on path was exiting and is gone now (a new one is to be
    launched); False when it serves normally. An agent that `agentctl stop` told to exit
    takes no new role, so start/join wait for it rather than fail."""
    try:
        with agent_client.AgentClient(path) as c:
            if not c.status(local_only=True, timeout=5.0).exiting:
                return False
    except grpc.RpcError:
        return False  # the call that follows reports what is wrong
    deadline = time.monotonic() + EXITING_WAIT_S
    while time.monotonic() < deadline:
        if not agent_client.socket_alive(path):
            return True
        time.sleep(0.1)
    raise CliError(f"the node-agent on {path} is exiting but has not gone after "
                   f"{EXITING_WAIT_S:g}s; see its log, then run the command again")


def _client_or_launch(args: argparse.Namespace) -> agent_client.AgentClient:
    """The running agent, or (plain shell) a node-agent started in the background.

    Start and join send the cluster token to what this returns, so both ways only
    return an agent nobody else can have planted (see agent.client)."""
    why_not: List[str] = []
    path = agent_client.find_socket(args.socket, why_not)
    if path is not None and not _wait_if_exiting(path):
        return agent_client.AgentClient(path)
    if _systemd_owns_agent(args):
        if why_not:
            raise CliError("; ".join(why_not))
        raise CliError("node-agent.service is installed but its agent is not running: start it "
                       "with `systemctl start node-agent` (see `systemctl status node-agent` and "
                       "`journalctl -u node-agent` if it does not stay up)")
    try:
        target = agent_client.launch_socket(args.socket, args.state_dir, args.config)
        agent_client.check_launch_socket(target)  # refused before we announce a launch
        if not args.json:
            print(f"no node-agent running; starting one in the background (socket {target})",
                  file=sys.stderr)
        extra = []
        if getattr(args, "dashboard_port", None) is not None:
            extra = ["--dashboard-port", str(args.dashboard_port)]
        return agent_client.launch_agent(args.socket, args.state_dir, args.config,
                                         extra_args=extra)
    except ConfigError as exc:
        raise CliError(str(exc))


def _emit(args: argparse.Namespace, data: Dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif text:
        print(text)


def cmd_start(args: argparse.Namespace) -> int:
    token = _read_token(args, from_env=False) if args.head else ""
    with _client_or_launch(args) as c:
        if not args.head:
            r = c.stub.StartNode(agent_pb2.StartNodeRequest(), timeout=120)
            _emit(args, {"role": r.role, "message": r.message}, r.message)
            return 0
        r = c.stub.StartHead(agent_pb2.StartHeadRequest(options=_options(args), token=token),
                             timeout=120)
    text = (f"Head node started: GCS at {r.gcs_address} (node {r.node_id[:8]}, session "
            f"{r.session_dir}).\n\nTo add another machine to this cluster, run on it:\n\n"
            f"    {r.join_command}\n\n(or keep the token out of the command line: put it in a "
            f"file and pass --token-file FILE, or set {tokens.TOKEN_ENV}.)\n\nDrivers on this "
            f"machine connect with runtime.init(address=\"auto\").")
    _emit(args, {"gcs_address": r.gcs_address, "token": r.token, "join_command": r.join_command,
                 "node_id": r.node_id, "session_dir": r.session_dir}, text)
    return 0


def _read_token(args: argparse.Namespace, from_env: bool) -> str:
    """The token from --token, --token-file or (join only) $NODE_AGENT_TOKEN, checked
    here so a bad one is refused before any agent is contacted or launched. "" when
    none was given."""
    if args.token is not None and args.token_file:
        raise CliError("pass either --token or --token-file, not both")
    try:
        if args.token_file:
            try:
                return tokens.read_token_file(args.token_file)
            except OSError as exc:
                raise CliError(f"cannot read --token-file {args.token_file}: "
                               f"{exc.strerror or exc}")
        if args.token is not None:
            return tokens.check_token(args.token.strip(), "--token")
        env_token = os.environ.get(tokens.TOKEN_ENV, "") if from_env else ""
        if env_token.strip():
            return tokens.check_token(env_token.strip(), f"${tokens.TOKEN_ENV}")
    except tokens.InvalidToken as exc:
        raise CliError(str(exc))
    return ""


def cmd_join(args: argparse.Namespace) -> int:
    token = _read_token(args, from_env=True)
    if not token:
        raise CliError(f"a cluster token is required: pass --token-file FILE (or --token T, "
                       f"or set {tokens.TOKEN_ENV}); `agentctl start --head` printed it on the "
                       f"head, which also keeps it in <state dir>/token")
    with _client_or_launch(args) as c:
        r = c.stub.Join(agent_pb2.JoinRequest(head_address=args.address, token=token,
                                              options=_options(args), wait_s=args.wait),
                        timeout=args.wait + 120)
    _emit(args, {"gcs_address": r.gcs_address, "node_id": r.node_id,
                 "session_dir": r.session_dir},
          f"Joined the cluster at {r.gcs_address} as node {r.node_id[:8]}.")
    return 0


def cmd_leave(args: argparse.Namespace) -> int:
    with agent_client.connect(args.socket) as c:
        r = c.stub.Leave(agent_pb2.LeaveRequest(drain_timeout_s=args.drain_timeout or 0),
                         timeout=(args.drain_timeout or 60) + 120)
    _emit(args, {"role": r.role, "message": r.message}, f"Left the cluster: {r.message}.")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    with agent_client.connect(args.socket) as c:
        r = c.stub.StopNode(agent_pb2.StopNodeRequest(drain_timeout_s=args.drain_timeout or 0,
                                                      exit_agent=not args.keep_agent),
                            timeout=(args.drain_timeout or 60) + 120)
    text = f"Stopped: {r.message}." + (" The agent exits." if r.agent_exiting else "")
    _emit(args, {"role": r.role, "message": r.message, "agent_exiting": r.agent_exiting}, text)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with agent_client.connect(args.socket) as c:
        s = c.status()
    _emit(args, agent_client.status_dict(s), format_status(s))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """The cluster token, for scripts (`agentctl token > file`): whoever may use the
    socket may read it (see agent.daemon.socket_mode), so this shows nothing new."""
    with agent_client.connect(args.socket) as c:
        s = c.status(local_only=True)
    if not s.token:
        raise CliError(f"this node has no cluster token (role {s.role}): run `agentctl start "
                       f"--head` or `agentctl join` first")
    _emit(args, {"token": s.token, "gcs_address": s.gcs_address}, s.token)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from agent import up
    try:
        return up.cluster_up(args.cluster_file, deb=args.deb, ssh_options=args.ssh_option,
                             as_json=args.json)
    except up.ClusterConfigError as exc:
        raise CliError(str(exc))


def cmd_down(args: argparse.Namespace) -> int:
    from agent import up
    try:
        return up.cluster_down(args.cluster_file, ssh_options=args.ssh_option, as_json=args.json)
    except up.ClusterConfigError as exc:
        raise CliError(str(exc))


def cmd_logs(args: argparse.Namespace) -> int:
    with agent_client.connect(args.socket) as c:
        req = agent_pb2.TailLogsRequest(component=args.component or "", lines=args.lines,
                                        follow=args.follow)
        stream = c.stub.TailLogs(req, timeout=None if args.follow else 30)
        prefix = not args.component
        try:
            for item in stream:
                if args.json:
                    print(json.dumps({"component": item.component, "line": item.line}))
                else:
                    print(f"[{item.component}] {item.line}" if prefix else item.line)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.cancel()
    return 0


# ---- parsing ----------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, launches: bool = False) -> None:
    p.add_argument("--socket", default=None,
                   help="the agent's control socket (default: $NODE_AGENT_SOCKET, "
                        "/run/node-agent/agent.sock, then the per-user socket)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    if launches:
        p.add_argument("--state-dir", default=None,
                       help="state dir for an agent this command launches")
        p.add_argument("--config", default=None, help="agent.toml for an agent this command "
                                                      "launches")


def _resource_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node-ip", default=None, help="this machine's address in the cluster")
    p.add_argument("--num-cpus", type=float, default=None)
    p.add_argument("--num-gpus", type=float, default=None)
    p.add_argument("--resources", default=None, help='custom resources as JSON: \'{"accel": 2}\'')
    p.add_argument("--object-store-memory", type=int, default=None, metavar="BYTES")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentctl", description="Control this machine's node agent.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("start", help="start a head node (--head), or the saved role again")
    _common(s, launches=True)
    s.add_argument("--head", action="store_true", help="start the head of a new cluster")
    s.add_argument("--port", type=int, default=None, help="GCS port (default 6379)")
    s.add_argument("--dashboard-port", type=int, default=None, metavar="PORT",
                   help="where the head serves the jobs API (default 8265; 0: not at all); "
                        "for an agent this command launches, else set [ports] dashboard in "
                        "agent.toml")
    s.add_argument("--token", default=None, help="cluster token to use (default: a new one); "
                   f"at least {tokens.MIN_LENGTH} printable ASCII characters, no spaces")
    s.add_argument("--token-file", default=None, metavar="FILE",
                   help="read the cluster token from FILE instead (keeps it out of `ps`)")
    _resource_flags(s)
    s.set_defaults(func=cmd_start)

    j = sub.add_parser("join", help="join the cluster whose head is at HOST:PORT")
    _common(j, launches=True)
    j.add_argument("address", metavar="HOST:PORT")
    j.add_argument("--token", default=None,
                   help="the cluster token (visible to other users in `ps`: prefer "
                        f"--token-file or ${tokens.TOKEN_ENV})")
    j.add_argument("--token-file", default=None, metavar="FILE",
                   help="read the cluster token from FILE (- for standard input)")
    j.add_argument("--wait", type=float, default=JOIN_WAIT_S,
                   help="seconds to try the head before reporting it unreachable (default 10)")
    _resource_flags(j)
    j.set_defaults(func=cmd_join)

    lv = sub.add_parser("leave", help="drain, stop the node and forget the cluster")
    _common(lv)
    lv.add_argument("--drain-timeout", type=float, default=None, metavar="S")
    lv.set_defaults(func=cmd_leave)

    st = sub.add_parser("stop", help="drain and stop the node (`agentctl start` resumes it)")
    _common(st)
    st.add_argument("--drain-timeout", type=float, default=None, metavar="S")
    st.add_argument("--keep-agent", action="store_true",
                    help="keep a background agent running (one run by systemd always stays)")
    st.set_defaults(func=cmd_stop)

    ss = sub.add_parser("status", help="cluster nodes, resources, demand and this node's processes")
    _common(ss)
    ss.set_defaults(func=cmd_status)

    lg = sub.add_parser("logs", help="show (and with -f follow) component logs")
    _common(lg)
    lg.add_argument("component", nargs="?", default="",
                    help="gcs, object_store, raylet, node-agent or worker-<id> (default: all "
                         "components)")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.set_defaults(func=cmd_logs)

    job_cli.add_parser(sub, _common)

    tk = sub.add_parser("token", help="print the cluster token (for scripts; keep it secret)")
    _common(tk)
    tk.set_defaults(func=cmd_token)

    for name, func, text in (("up", cmd_up, "start the head and join every worker of a Ray "
                                             "cluster YAML file (local provider), over ssh"),
                             ("down", cmd_down, "drain and stop every node of a cluster YAML "
                                                "file, over ssh")):
        u = sub.add_parser(name, help=text)
        u.add_argument("cluster_file", metavar="CLUSTER.yaml")
        u.add_argument("-o", "--ssh-option", action="append", default=[], metavar="OPTION",
                       help="an ssh -o option for every connection, e.g. "
                            "UserKnownHostsFile=/path (repeatable)")
        u.add_argument("--json", action="store_true", help="print one JSON document")
        if name == "up":
            u.add_argument("--deb", default=None, metavar="PATH",
                           help="install this node-agent .deb on hosts that lack it (or have "
                                "another version)")
        u.set_defaults(func=func)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, agent_client.AgentNotRunning, ConfigError, job_cli.JobCliError) as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except grpc.RpcError as exc:
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if exc.code() == grpc.StatusCode.UNAVAILABLE and "unix:" in (details or ""):
            details = f"lost the connection to the node-agent: {details}"
        print(f"agentctl: {details}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `agentctl status | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
