"""node-agent, the per-machine daemon, and agentctl, its command line.

The agent runs this machine's node (GCS on the head, object store, raylet and,
through the raylet, workers) with the same ``runtime.node.Node`` code that
``runtime.init()`` uses, restarts what crashes, remembers its role across
restarts, and serves a gRPC API (``protos/runtime/protocol/agent.proto``) on a
unix socket and, with the cluster token, on TCP. See docs/agent.md.

Modules: ``config`` (agent.toml and paths), ``state`` (the persisted role),
``core`` (roles, supervision, status), ``service`` (the gRPC servicer),
``daemon`` (the process: servers, signals, systemd notify), ``sdnotify``,
``client`` (finding and launching an agent), ``cli`` (agentctl).
"""
import os as _os

# Before any gRPC import (node-agent and agentctl import this package first): the
# agent never uses gRPC in a forked child. Defence in depth only: its children are
# spawned with vfork+exec (runtime/supervisor.py), which runs no fork handlers.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# Servers close idle connections (runtime/rpc.py); gRPC would print an INFO line for each
# GOAWAY it receives. Also read once, at import; again only a default.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
