"""The ``raytop`` command: options, the data source, then the app (or ``--once``).

``--once`` and ``--print-readonly-token`` need no Textual, so scripts can use them
on a machine where only the base package is installed.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from tui.source import Source, SourceError
from tui.views import ORDER

__all__ = ["build_parser", "make_source", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raytop", description="The cluster's terminal UI: nodes, actors, tasks, jobs, "
        "placement groups, objects, processes, events and logs, live, from any node agent.",
        epilog="Keys: press ? in raytop, or see docs/raytop.md.")
    where = p.add_argument_group("which agent (default: this machine's, found as agentctl "
                                 "finds it)")
    where.add_argument("--socket", metavar="PATH",
                       help="the agent's control socket (default: $NODE_AGENT_SOCKET, "
                            "/run/node-agent/agent.sock, then the per-user socket)")
    where.add_argument("--address", metavar="HOST:PORT",
                       help="an agent's TCP API (port 6380 by default), e.g. the head's, from "
                            "another machine")
    where.add_argument("--token-file", metavar="FILE",
                       help="the cluster token (or the read-only token) for --address; "
                            "default $NODE_AGENT_TOKEN or $NODE_AGENT_TOKEN_FILE")
    p.add_argument("--readonly", action="store_true",
                   help="view only: no actions (the agent refuses them too)")
    p.add_argument("--refresh", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes (default 1)")
    p.add_argument("--view", default="nodes", choices=ORDER, help="the view to open on")
    p.add_argument("--filter", default="", help="the view's filter to start with")
    p.add_argument("--limit", type=int, default=1000,
                   help="rows fetched per refresh (the rest is counted; default 1000)")
    p.add_argument("--theme", default="", help="a Textual theme (nord, dracula, gruvbox, ...)")
    p.add_argument("--once", action="store_true",
                   help="print a plain-text snapshot (nodes, actors, tasks summary) and exit")
    p.add_argument("--json", action="store_true", help="with --once: one JSON document")
    p.add_argument("--print-readonly-token", action="store_true",
                   help="print the cluster's read-only token (from the local agent) and exit: "
                        "give it to operators who may look but not act")
    p.add_argument("--demo", action="store_true", help="a made-up cluster, to look around")
    return p


def make_source(args: argparse.Namespace) -> Source:
    from tui.source import AgentSource, read_token

    if args.demo:
        from tui.fake import FakeSource

        return FakeSource(nodes=6, actors=40, tasks=400, readonly=args.readonly)
    if args.address:
        return AgentSource(address=args.address, token=read_token(args.token_file),
                           readonly=args.readonly)
    return AgentSource(socket=args.socket, readonly=args.readonly)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json and not args.once:
        print("raytop: --json goes with --once", file=sys.stderr)
        return 2
    if args.refresh <= 0 or args.limit <= 0:
        print("raytop: --refresh and --limit must be positive", file=sys.stderr)
        return 2
    try:
        if args.print_readonly_token:
            from tui.once import print_readonly_token

            return print_readonly_token(args.socket)
        source = make_source(args)
        if args.once:
            from tui.once import run_once

            return run_once(source, as_json=args.json, limit=args.limit)
    except SourceError as exc:
        print(f"raytop: {exc}", file=sys.stderr)
        return 1
    try:
        from textual.theme import BUILTIN_THEMES

        from tui.app import RaytopApp
    except ImportError as exc:
        print(f"raytop: the terminal UI needs Textual ({exc}); install it with `pip install "
              f"'runtime-cluster[tui]'` (raytop --once works without it)", file=sys.stderr)
        return 1
    if args.theme and args.theme not in BUILTIN_THEMES:
        print(f"raytop: no theme {args.theme!r}; themes: {', '.join(sorted(BUILTIN_THEMES))}",
              file=sys.stderr)
        return 2
    app = RaytopApp(source, refresh=args.refresh, view=args.view, filter=args.filter,
                    limit=args.limit, readonly=args.readonly, theme=args.theme)
    return app.run() or 0


if __name__ == "__main__":
    sys.exit(main())
