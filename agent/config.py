"""The agent's configuration: ``/etc/node-agent/agent.toml`` plus defaults and paths.

Every key is optional; an agent without a config file runs idle until
``agentctl start --head`` or ``agentctl join`` gives it a role. The layout
(see ``systemd/agent.toml.example``)::

    [node]        role, head_address, token_file, node_ip, api_host
    [ports]       gcs (6379), agent (6380), raylet (6381), object_store (6382),
                  object_transfer (6383),
                  dashboard (8265: the head's Jobs REST API; 0 turns it off)
    [resources]   num_cpus, num_gpus, memory, object_store_memory, custom = {name = amount}
    [paths]       state_dir, runtime_dir, socket, log_dir, session_root
    [supervision] backoff_initial_s, backoff_max_s, stable_after_s, crash_loop_failures,
                  crash_loop_window_s, stop_grace_s, drain_timeout_s
    [jobs]        stop_grace_s, max_package_bytes, max_packages_bytes,
                  max_unpacked_bytes, max_log_response_bytes
    [component_env.<gcs|object_store|raylet|all>]  NAME = "value"

Paths default to the system locations (``/var/lib/node-agent``,
``/run/node-agent``) when they are ours to use (writable by us, owned by us or root
and writable by nobody else), and to per-user locations otherwise, so the same
command works as root, under systemd and as a plain user.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from runtime.private_fs import UnsafePathError, check_private_dir
from runtime.session import SYSTEM_AGENT_SOCKET, user_agent_socket
from runtime.supervisor import RestartPolicy

log = logging.getLogger("agent.config")

DEFAULT_CONFIG_PATH = "/etc/node-agent/agent.toml"
SYSTEM_STATE_DIR = "/var/lib/node-agent"
SYSTEM_RUNTIME_DIR = os.path.dirname(SYSTEM_AGENT_SOCKET)
ROLES = ("idle", "head", "worker")
COMPONENT_NAMES = ("all", "gcs", "object_store", "raylet")


class ConfigError(ValueError):
    """agent.toml (or a flag) holds something the agent cannot use."""


@dataclass
class Ports:
    gcs: int = 6379
    agent: int = 6380           # the TCP API; 0 disables it
    raylet: int = 6381
    object_store: int = 6382
    object_transfer: int = 6383  # stores pull objects from each other here
    dashboard: int = 8265       # the head's Jobs REST API (agent/jobs/); 0 disables it


@dataclass
class Resources:
    num_cpus: Optional[float] = None          # default: all cores
    num_gpus: Optional[float] = None          # default: detected GPUs
    memory: Optional[float] = None            # bytes; default 70% of available RAM
    object_store_memory: Optional[int] = None  # bytes; default 30% of RAM, capped by /dev/shm
    custom: Dict[str, float] = field(default_factory=dict)


@dataclass
class Paths:
    state_dir: str = ""
    runtime_dir: str = ""
    socket: str = ""
    log_dir: str = ""
    session_root: str = ""


@dataclass
class Supervision:
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    stable_after_s: float = 600.0
    crash_loop_failures: int = 5
    crash_loop_window_s: float = 300.0
    stop_grace_s: float = 10.0
    drain_timeout_s: float = 30.0

    def restart_policy(self) -> RestartPolicy:
        return RestartPolicy(restart=True, backoff_initial_s=self.backoff_initial_s,
                             backoff_max_s=self.backoff_max_s, stable_after_s=self.stable_after_s,
                             crash_loop_failures=self.crash_loop_failures,
                             crash_loop_window_s=self.crash_loop_window_s)


@dataclass
class Jobs:
    """The head's job server (agent/jobs/): limits and the stop grace period."""

    stop_grace_s: float = 3.0                         # SIGTERM, then SIGKILL (Ray: 3 s)
    max_package_bytes: int = 100 * 1024 * 1024        # one uploaded package (Ray's limit)
    max_packages_bytes: int = 2 * 1024 * 1024 * 1024  # all uploaded packages together
    max_unpacked_bytes: int = 1024 * 1024 * 1024      # one package once unpacked
    max_log_response_bytes: int = 32 * 1024 * 1024   # GET .../logs returns the log's end


@dataclass
class AgentConfig:
    role: str = "idle"          # the role to take when the state dir holds none yet
    head_address: str = ""      # worker role: the head's GCS (host:port)
    token_file: str = ""        # worker role: file holding the cluster token
    node_ip: str = ""           # "" = detect
    api_host: str = ""          # where the TCP API listens; "" = the node IP
    ports: Ports = field(default_factory=Ports)
    resources: Resources = field(default_factory=Resources)
    paths: Paths = field(default_factory=Paths)
    supervision: Supervision = field(default_factory=Supervision)
    jobs: Jobs = field(default_factory=Jobs)
    component_env: Dict[str, Dict[str, str]] = field(default_factory=dict)
    source: str = ""            # the file it was read from, for messages


_SECTIONS = {"ports": Ports, "resources": Resources, "paths": Paths, "supervision": Supervision,
             "jobs": Jobs}
_NODE_KEYS = ("role", "head_address", "token_file", "node_ip", "api_host")


def _coerce(where: str, value: Any, default: Any, type_hint: str) -> Any:
    """Check one value against its field's type (from the dataclass annotation)."""
    if "Dict" in type_hint:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        out = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{where}.{k} must be a non-negative number, got {v!r}")
            out[str(k)] = float(v)
        return out
    if "float" in type_hint:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if "int" in type_hint:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _section(name: str, cls: type, table: Any, source: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    obj = cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {key!r} in [{name}] "
                              f"(known: {', '.join(fields)})")
        f = fields[key]
        setattr(obj, key, _coerce(f"{source}: [{name}] {key}", value, f.default, str(f.type)))
    return obj


def parse(data: Dict[str, Any], source: str = "agent.toml") -> AgentConfig:
    """Build an AgentConfig from parsed TOML; ConfigError names the bad key."""
    cfg = AgentConfig(source=source)
    for top, value in data.items():
        if top == "node":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [node] must be a table")
            for key, v in value.items():
                if key not in _NODE_KEYS:
                    raise ConfigError(f"{source}: unknown key {key!r} in [node] "
                                      f"(known: {', '.join(_NODE_KEYS)})")
                if not isinstance(v, str):
                    raise ConfigError(f"{source}: [node] {key} must be a string, got {v!r}")
                setattr(cfg, key, v)
        elif top in _SECTIONS:
            setattr(cfg, top, _section(top, _SECTIONS[top], value, source))
        elif top == "component_env":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [component_env] must be a table")
            for comp, env in value.items():
                if comp not in COMPONENT_NAMES or not isinstance(env, dict):
                    raise ConfigError(f"{source}: [component_env.{comp}] must be a table named "
                                      f"one of {', '.join(COMPONENT_NAMES)}")
                cfg.component_env[comp] = {str(k): str(v) for k, v in env.items()}
        else:
            raise ConfigError(f"{source}: unknown section [{top}] (known: node, "
                              f"{', '.join(_SECTIONS)}, component_env)")
    for name in ("gcs", "agent", "raylet", "object_store", "object_transfer", "dashboard"):
        port = getattr(cfg.ports, name)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{source}: [ports] {name} must be a TCP port (0-65535), got {port}")
    for f in dataclasses.fields(Jobs):
        if getattr(cfg.jobs, f.name) <= 0:
            raise ConfigError(f"{source}: [jobs] {f.name} must be > 0, got "
                              f"{getattr(cfg.jobs, f.name)}")
    if cfg.role not in ROLES:
        raise ConfigError(f"{source}: [node] role must be one of {', '.join(ROLES)}, "
                          f"got {cfg.role!r}")
    if cfg.role == "worker" and not cfg.head_address:
        raise ConfigError(f"{source}: [node] role = \"worker\" needs head_address = \"HOST:PORT\"")
    return cfg


def load(path: Optional[str]) -> AgentConfig:
    """Read the config file. An explicit path must exist; the default path may not."""
    explicit = path is not None
    path = path or DEFAULT_CONFIG_PATH
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        return AgentConfig(source="(defaults)")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    return parse(data, path)


# ---- paths ------------------------------------------------------------------------------


def _system_dir_problem(path: str) -> Optional[str]:
    """Why the system location path is not ours to use, or None when it is: an
    existing directory must belong to us or root, be writable by nobody else (else
    whoever made it could plant our socket or state) and be writable by us; a missing
    one must be creatable, i.e. its nearest existing ancestor writable by us."""
    if os.path.lexists(path):
        try:
            check_private_dir(path, allow_root=True)
        except UnsafePathError as exc:
            return str(exc)
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable"
        return None
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return f"{path} cannot be created"
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        return f"{path} does not exist and {probe} is not a directory we can write"
    return None


def user_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return os.path.join(base, "node-agent")


def _default_state_dir() -> Tuple[str, Optional[str]]:
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0], None
    problem = _system_dir_problem(SYSTEM_STATE_DIR)
    if problem is None:
        return SYSTEM_STATE_DIR, None
    sd = user_state_dir()
    return sd, f"{problem}; using per-user state dir {sd}"


def default_state_dir() -> str:
    """$STATE_DIRECTORY (systemd), /var/lib/node-agent if it is ours to use, else
    per-user."""
    return _default_state_dir()[0]


def _default_socket_path() -> Tuple[str, Optional[str]]:
    if os.environ.get("RUNTIME_DIRECTORY"):
        return os.path.join(os.environ["RUNTIME_DIRECTORY"].split(":")[0], "agent.sock"), None
    problem = _system_dir_problem(SYSTEM_RUNTIME_DIR)
    if problem is None:
        return os.path.join(SYSTEM_RUNTIME_DIR, "agent.sock"), None
    sock = user_agent_socket()
    return sock, f"{problem}; using per-user socket {sock}"


def default_socket_path() -> str:
    """$RUNTIME_DIRECTORY (systemd), /run/node-agent if it is ours to use, else
    per-user ($XDG_RUNTIME_DIR/node-agent when that is private to us, else
    /tmp/node-agent-<uid>, whose directory the daemon checks before binding)."""
    return _default_socket_path()[0]


@dataclass
class ResolvedPaths:
    state_dir: str
    socket: str
    log_dir: str
    session_root: str
    notes: List[str]            # which default was chosen and why, for the start-up log


def resolve_paths(cfg: AgentConfig, state_dir: Optional[str] = None,
                  socket: Optional[str] = None) -> ResolvedPaths:
    """Flags beat $NODE_AGENT_SOCKET, which beats the config, which beats defaults."""
    notes = []
    if state_dir:
        sd = state_dir
    elif cfg.paths.state_dir:
        sd = cfg.paths.state_dir
    else:
        sd, note = _default_state_dir()
        if note:
            notes.append(note)
    if socket:
        sock = socket
    elif os.environ.get("NODE_AGENT_SOCKET"):
        sock = os.environ["NODE_AGENT_SOCKET"]
    elif cfg.paths.socket:
        sock = cfg.paths.socket
    elif cfg.paths.runtime_dir:
        sock = os.path.join(cfg.paths.runtime_dir, "agent.sock")
    else:
        sock, note = _default_socket_path()
        if note:
            notes.append(note)
    log_dir = (cfg.paths.log_dir or os.environ.get("LOGS_DIRECTORY", "").split(":")[0]
               or os.path.join(sd, "logs"))
    session_root = cfg.paths.session_root or os.path.join(sd, "sessions")
    return ResolvedPaths(os.path.abspath(sd), os.path.abspath(sock), os.path.abspath(log_dir),
                         os.path.abspath(session_root), notes)
