"""``agentctl up`` / ``agentctl down``: a whole cluster from Ray's cluster YAML, over SSH.

    agentctl up CLUSTER.yaml [--deb PATH] [-o SSH_OPTION]... [--json]
    agentctl down CLUSTER.yaml [-o SSH_OPTION]... [--json]

The file is the one ``ray up`` takes with the local provider, so a Ray user's file
works as it is::

    cluster_name: demo
    provider: {type: local, head_ip: 10.0.0.1, worker_ips: [10.0.0.2, 10.0.0.3]}
    auth: {ssh_user: admin, ssh_private_key: ~/.ssh/id_ed25519}

``provider`` may also carry ``gcs_port`` (6379) and ``ssh_port`` (22): Ray's schema
lets a provider have keys of its own. ``~`` in ``ssh_private_key`` is expanded, and a
relative path is taken from the cluster file's directory. Ray's other keys (setup_commands,
head_start_ray_commands, docker, ...) are accepted and listed as ignored: the
package replaces them. A key Ray does not know either is an error naming it.

``up`` goes host by host, head first, then every worker at once:

1. it reaches the host with the system ``ssh`` client (see below) and reads its
   ``agentctl status --json``; a host without the package gets it from ``--deb``
   (copied over the same connection, then ``apt-get install``), or a line saying
   how to install it;
2. the head runs ``agentctl start --head``, unless it already is the head at that
   address; a worker runs ``agentctl join``, unless it already is a worker of that
   head. A host in another role leaves first. So running ``up`` twice changes
   nothing the second time;
3. the cluster token goes from the head's ``agentctl start --head --json`` (or
   ``agentctl token``) straight to each worker's ``agentctl join --token-file -``
   on standard input: never printed, never in a command line, never in a file;
4. one line per host says what happened (or why not: unreachable, key refused, no
   package, ...); a failed host does not stop the others. At the end ``up`` prints
   the head's ``agentctl status``.

``down`` drains and stops every worker, then the head (``agentctl stop``: the node
stays down across reboots until ``up`` or ``agentctl start``).

Why the system ``ssh`` and not an SSH library: it is what admins already
configure and trust (``~/.ssh/config``, ``known_hosts``, agents, ProxyJump,
ControlMaster, hardware keys, host certificates), it is maintained and patched by
the distribution, and it adds no dependency to the package. Ray's launcher makes
the same choice. Host keys are checked with ``StrictHostKeyChecking=accept-new``
(a changed key is refused; a first contact is recorded), and ``BatchMode=yes``
means a refused key is an error, never a password prompt.
"""
from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["ClusterConfigError", "ClusterSpec", "HostResult", "parse_cluster_config",
           "load_cluster_file", "cluster_up", "cluster_down"]

DEFAULT_GCS_PORT = 6379
DEFAULT_SSH_PORT = 22
SSH_CONNECT_TIMEOUT_S = 5
#: Keys of Ray's cluster YAML (python/ray/autoscaler/ray-schema.json) that mean nothing
#: here: commands and files for installing Ray, docker, autoscaling.
RAY_IGNORED_KEYS = (
    "max_workers", "min_workers", "initial_workers", "upscaling_speed", "idle_timeout_minutes",
    "autoscaling_mode", "target_utilization_fraction", "docker", "head_node_type",
    "worker_default_node_type", "available_node_types", "head_node", "worker_nodes",
    "file_mounts", "cluster_synced_files", "file_mounts_sync_continuously", "rsync_exclude",
    "rsync_filter", "metadata", "initialization_commands", "setup_commands",
    "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
    "worker_start_ray_commands", "no_restart",
)
_PROVIDER_KEYS = ("type", "head_ip", "worker_ips", "gcs_port", "ssh_port", "use_internal_ips",
                  "external_head_ip", "coordinator_address")
_AUTH_KEYS = ("ssh_user", "ssh_private_key", "ssh_public_key", "ssh_proxy_command")
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,251}[A-Za-z0-9])?$")


class ClusterConfigError(ValueError):
    """The cluster file cannot be used; the message names the file, key and fix."""


@dataclass
class ClusterSpec:
    name: str
    head_ip: str
    worker_ips: List[str]
    ssh_user: str
    ssh_private_key: Optional[str] = None
    ssh_proxy_command: Optional[str] = None
    ssh_port: int = DEFAULT_SSH_PORT
    gcs_port: int = DEFAULT_GCS_PORT
    ignored: List[str] = field(default_factory=list)
    source: str = "cluster.yaml"

    @property
    def head_address(self) -> str:
        return f"{self.head_ip}:{self.gcs_port}"


def _host(value: Any, where: str) -> str:
    """A host name or IP address, refused when ssh could mistake it for an option."""
    if not isinstance(value, str) or not value.strip():
        raise ClusterConfigError(f"{where} must be a host name or IP address, got {value!r}")
    value = value.strip()
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOSTNAME.match(value):
        raise ClusterConfigError(f"{where} is not a host name or IP address: {value!r}")
    return value


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ClusterConfigError(f"{where} must be a port number (1-65535), got {value!r}")
    return value


def parse_cluster_config(data: Any, source: str = "cluster.yaml") -> ClusterSpec:
    """A ClusterSpec from the parsed YAML of a Ray cluster file (local provider);
    ClusterConfigError naming the key otherwise."""
    if not isinstance(data, dict):
        raise ClusterConfigError(f"{source}: a cluster file is a YAML mapping (cluster_name, "
                                 f"provider, auth), got {type(data).__name__}")
    known = {"cluster_name", "provider", "auth"} | set(RAY_IGNORED_KEYS)
    for key in data:
        if key not in known:
            raise ClusterConfigError(f"{source}: unknown key {key!r} (Ray's cluster YAML keys "
                                     f"are used: cluster_name, provider, auth, ...)")
    name = data.get("cluster_name", "default")
    if not isinstance(name, str) or not name:
        raise ClusterConfigError(f"{source}: cluster_name must be a non-empty string")
    provider = data.get("provider")
    if not isinstance(provider, dict):
        raise ClusterConfigError(f"{source}: provider is required: {{type: local, head_ip: IP, "
                                 f"worker_ips: [IP, ...]}}")
    if provider.get("type") != "local":
        raise ClusterConfigError(f"{source}: provider.type must be \"local\" (machines you "
                                 f"already have, reached over SSH), got {provider.get('type')!r}")
    for key in provider:
        if key not in _PROVIDER_KEYS:
            raise ClusterConfigError(f"{source}: unknown key provider.{key} (known: "
                                     f"{', '.join(_PROVIDER_KEYS)})")
    if "coordinator_address" in provider:
        raise ClusterConfigError(f"{source}: provider.coordinator_address (Ray's autoscaling "
                                 f"coordinator) is not supported; list the machines in "
                                 f"head_ip and worker_ips")
    head = _host(provider.get("head_ip"), f"{source}: provider.head_ip")
    workers_raw = provider.get("worker_ips", [])
    if workers_raw is None:
        workers_raw = []
    if not isinstance(workers_raw, list):
        raise ClusterConfigError(f"{source}: provider.worker_ips must be a list of addresses")
    workers = [_host(w, f"{source}: provider.worker_ips[{i}]") for i, w in enumerate(workers_raw)]
    seen = {head}
    for w in workers:
        if w in seen:
            raise ClusterConfigError(f"{source}: {w} is listed twice (head_ip and worker_ips "
                                     f"name each machine once)")
        seen.add(w)
    auth = data.get("auth") or {}
    if not isinstance(auth, dict):
        raise ClusterConfigError(f"{source}: auth must be a mapping (ssh_user, ssh_private_key)")
    for key in auth:
        if key not in _AUTH_KEYS:
            raise ClusterConfigError(f"{source}: unknown key auth.{key} (known: "
                                     f"{', '.join(_AUTH_KEYS)})")
    user = auth.get("ssh_user")
    if not isinstance(user, str) or not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$", user):
        raise ClusterConfigError(f"{source}: auth.ssh_user must be a user name, got {user!r}")
    key_path = auth.get("ssh_private_key")
    if key_path is not None:
        if not isinstance(key_path, str) or not key_path:
            raise ClusterConfigError(f"{source}: auth.ssh_private_key must be a file path")
        key_path = os.path.expanduser(key_path)
        if not os.path.isabs(key_path):
            key_path = os.path.join(os.path.dirname(os.path.abspath(source)), key_path)
        if not os.path.isfile(key_path):
            raise ClusterConfigError(f"{source}: auth.ssh_private_key {key_path} does not exist")
    proxy = auth.get("ssh_proxy_command")
    if proxy is not None and not isinstance(proxy, str):
        raise ClusterConfigError(f"{source}: auth.ssh_proxy_command must be a string")
    ignored = [k for k in data if k in RAY_IGNORED_KEYS and data[k] not in (None, [], {}, "")]
    ignored += [f"provider.{k}" for k in ("use_internal_ips", "external_head_ip")
                if k in provider]
    if "ssh_public_key" in auth:
        ignored.append("auth.ssh_public_key")
    return ClusterSpec(
        name=name, head_ip=head, worker_ips=workers, ssh_user=user, ssh_private_key=key_path,
        ssh_proxy_command=proxy,
        ssh_port=_port(provider.get("ssh_port", DEFAULT_SSH_PORT), f"{source}: provider.ssh_port"),
        gcs_port=_port(provider.get("gcs_port", DEFAULT_GCS_PORT), f"{source}: provider.gcs_port"),
        ignored=ignored, source=source)


def load_cluster_file(path: str) -> ClusterSpec:
    try:
        import yaml
    except ImportError:
        raise ClusterConfigError("agentctl up needs PyYAML to read cluster files (the .deb "
                                 "bundles it; elsewhere: pip install pyyaml)") from None
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ClusterConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ClusterConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    return parse_cluster_config(data, path)


# ---- ssh ------------------------------------------------------------------------------------


class HostError(Exception):
    """This host cannot be brought to its role; the message is its one line."""


def describe_ssh_failure(host: str, user: str, port: int, stderr: str) -> str:
    """One line for an ssh that could not run the command (ssh's exit status 255)."""
    text = " ".join(line.strip() for line in stderr.splitlines()
                    if line.strip() and not line.startswith("Warning: Permanently added"))
    low = text.lower()
    if "permission denied" in low:
        return (f"ssh refused the key for {user}@{host} ({text}); check auth.ssh_private_key "
                f"and the host's ~{user}/.ssh/authorized_keys")
    if "connection refused" in low:
        return f"unreachable: nothing accepts ssh on {host} port {port} (connection refused)"
    if "timed out" in low or "no route to host" in low or "network is unreachable" in low:
        return f"unreachable: {host} port {port}: {text}"
    if "could not resolve" in low or "name or service not known" in low:
        return f"unreachable: cannot resolve {host}: {text}"
    if "host key verification failed" in low or "remote host identification" in low:
        return (f"host key of {host} does not match known_hosts ({text}); if the machine was "
                f"reinstalled, remove its old key with ssh-keygen -R {host}")
    return f"ssh to {user}@{host} failed: {text or 'no message'}"


class Remote:
    """Runs shell commands on one host with the system ssh client."""

    def __init__(self, host: str, spec: ClusterSpec, ssh_options: Sequence[str]) -> None:
        self.host = host
        self.spec = spec
        self.user = spec.ssh_user
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}",
                "-o", "StrictHostKeyChecking=accept-new", "-o", "ServerAliveInterval=10",
                "-o", "LogLevel=ERROR", "-p", str(spec.ssh_port), "-l", spec.ssh_user]
        if spec.ssh_private_key:
            argv += ["-i", spec.ssh_private_key, "-o", "IdentitiesOnly=yes"]
        if spec.ssh_proxy_command:
            argv += ["-o", f"ProxyCommand={spec.ssh_proxy_command}"]
        for opt in ssh_options:
            argv += ["-o", opt]
        self.argv = argv + [host]

    def run(self, command: str, *, stdin: Optional[bytes] = None, timeout: float = 120.0,
            root: bool = False) -> Tuple[int, str, str]:
        """(exit status, stdout, stderr) of command run by the remote shell; HostError
        when ssh itself fails (unreachable, key refused, ...) or it takes too long."""
        if root and self.user != "root":
            command = f"sudo -n sh -c {shlex.quote(command)}"
        try:
            r = subprocess.run(self.argv + [command], input=stdin if stdin is not None else b"",
                               capture_output=True, timeout=timeout)
        except FileNotFoundError:
            raise HostError("the ssh client is not installed here (apt-get install "
                            "openssh-client)") from None
        except subprocess.TimeoutExpired:
            raise HostError(f"no answer from {self.host} within {timeout:g}s "
                            f"({command.split()[0]} ...)") from None
        out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        if r.returncode == 255:
            raise HostError(describe_ssh_failure(self.host, self.user, self.spec.ssh_port, err))
        return r.returncode, out, err


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _agentctl_error(what: str, rc: int, err: str) -> str:
    msg = _last_line(err)
    if msg.startswith("agentctl: "):
        msg = msg[len("agentctl: "):]
    return f"{what} failed: {msg or f'exit status {rc}'}"


# ---- up / down ------------------------------------------------------------------------------


@dataclass
class HostResult:
    host: str
    role: str                   # head or worker: the role the file gives it
    ok: bool
    changed: bool
    message: str
    node_id: str = ""

    def line(self) -> str:
        if self.ok:
            return f"[{self.host}] {self.role}: {self.message}"
        return f"[{self.host}] {self.role}: FAILED: {self.message}"


_PROBE = ("if ! command -v agentctl >/dev/null 2>&1; then echo NO-PACKAGE; exit 0; fi; "
          "dpkg-query -W -f='VERSION ${Version}\\n' node-agent 2>/dev/null || true; "
          "agentctl status --json")


class Launcher:
    """One `up` or `down` run: the hosts of a ClusterSpec, reached over ssh."""

    def __init__(self, spec: ClusterSpec, *, ssh_options: Sequence[str] = (),
                 deb: Optional[str] = None, echo: Callable[[str], None] = print,
                 remote_factory: Optional[Callable[[str], Remote]] = None) -> None:
        self.spec = spec
        self.deb = os.path.abspath(deb) if deb else None
        self.deb_version = _deb_version(self.deb) if self.deb else None
        self.echo = echo
        self._lock = threading.Lock()
        self._remote = remote_factory or (lambda host: Remote(host, spec, ssh_options))

    def say(self, result: HostResult) -> HostResult:
        with self._lock:
            self.echo(result.line())
        return result

    # -- per host ---------------------------------------------------------------------------

    def _probe(self, remote: Remote) -> Dict[str, Any]:
        """The host's agent status, installing the package first when needed; a
        dict with role, phase, gcs_address, node_id (and installed: bool)."""
        rc, out, err = remote.run(_PROBE, timeout=60)
        installed = False
        if "NO-PACKAGE" in out.split() or (self.deb_version and f"VERSION {self.deb_version}"
                                             not in out):
            if "NO-PACKAGE" in out.split() and not self.deb:
                raise HostError("node-agent is not installed (no agentctl on the PATH): install "
                                "it there (apt-get install ./node-agent_*.deb), or pass --deb "
                                "PATH to have up install it")
            if self.deb:
                self._install(remote)
                installed = True
                rc, out, err = remote.run(_PROBE, timeout=60)
        body = out[out.find("{"):] if "{" in out else ""
        if rc != 0 or not body:
            raise HostError(_agentctl_error("agentctl status", rc, err))
        try:
            status = json.loads(body)
        except ValueError:
            raise HostError(f"agentctl status printed no JSON: {_last_line(out)}") from None
        status["installed"] = installed
        return status

    def _install(self, remote: Remote) -> None:
        with open(self.deb, "rb") as fh:
            data = fh.read()
        script = ("set -e; f=$(mktemp /tmp/node-agent-XXXXXX.deb); trap 'rm -f \"$f\"' EXIT; "
                  "cat > \"$f\"; chmod 0644 \"$f\"; "
                  "DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                  "-o Dpkg::Options::=--force-confold \"$f\"")
        rc, out, err = remote.run(script, stdin=data, timeout=600, root=True)
        if rc != 0:
            raise HostError(f"installing {os.path.basename(self.deb)} failed (exit status {rc}): "
                            f"{_last_line(err) or _last_line(out)}")

    def _leave(self, remote: Remote, status: Dict[str, Any]) -> str:
        rc, out, err = remote.run("agentctl leave --json", timeout=180)
        if rc != 0:
            raise HostError(_agentctl_error("agentctl leave", rc, err))
        where = f" of {status.get('gcs_address')}" if status.get("gcs_address") else ""
        return f"left its old role ({status.get('role')}{where}); "

    def up_head(self) -> Tuple[HostResult, Optional[str]]:
        """Bring the head up; returns its result and the cluster token (None on failure)."""
        spec = self.spec
        remote = self._remote(spec.head_ip)
        try:
            status = self._probe(remote)
            note = "installed the package; " if status["installed"] else ""
            phase = status.get("phase", "")
            if (status.get("role") == "head" and status.get("gcs_address") == spec.head_address
                    and phase in ("running", "degraded", "starting")):
                token = self._token(remote)
                return self.say(HostResult(spec.head_ip, "head", True, bool(note),
                                           f"{note}already the head at {spec.head_address} "
                                           f"({phase}); unchanged",
                                           status.get("node_id", ""))), token
            if status.get("role") != "idle":
                note += self._leave(remote, status)
            cmd = (f"agentctl start --head --json --node-ip {shlex.quote(spec.head_ip)} "
                   f"--port {spec.gcs_port}")
            rc, out, err = remote.run(cmd, timeout=180)
            if rc != 0:
                raise HostError(_agentctl_error("agentctl start --head", rc, err))
            reply = json.loads(out[out.find("{"):])
            token = reply["token"]
            return self.say(HostResult(spec.head_ip, "head", True, True,
                                       f"{note}started; GCS at {reply['gcs_address']} (node "
                                       f"{reply['node_id'][:8]})", reply["node_id"])), token
        except HostError as exc:
            return self.say(HostResult(spec.head_ip, "head", False, False, str(exc))), None
        except (ValueError, KeyError) as exc:
            why = f"unexpected answer from agentctl start --head: {exc}"
            return self.say(HostResult(spec.head_ip, "head", False, False, why)), None

    def _token(self, remote: Remote) -> str:
        rc, out, err = remote.run("agentctl token", timeout=60)
        token = out.strip()
        if rc != 0 or not token:
            raise HostError(_agentctl_error("agentctl token", rc, err))
        return token

    def up_worker(self, host: str, token: str) -> HostResult:
        spec = self.spec
        remote = self._remote(host)
        try:
            status = self._probe(remote)
            note = "installed the package; " if status["installed"] else ""
            phase = status.get("phase", "")
            if (status.get("role") == "worker" and status.get("gcs_address") == spec.head_address
                    and phase in ("running", "degraded", "starting")):
                return self.say(HostResult(host, "worker", True, bool(note),
                                           f"{note}already a worker of {spec.head_address} "
                                           f"({phase}); unchanged", status.get("node_id", "")))
            if status.get("role") != "idle":
                note += self._leave(remote, status)
            cmd = (f"agentctl join {shlex.quote(spec.head_address)} --token-file - --json "
                   f"--node-ip {shlex.quote(host)}")
            rc, out, err = remote.run(cmd, stdin=token.encode() + b"\n", timeout=240)
            if rc != 0:
                raise HostError(_agentctl_error("agentctl join", rc, err))
            reply = json.loads(out[out.find("{"):])
            return self.say(HostResult(host, "worker", True, True,
                                       f"{note}joined {spec.head_address} (node "
                                       f"{reply['node_id'][:8]})", reply["node_id"]))
        except HostError as exc:
            return self.say(HostResult(host, "worker", False, False, str(exc)))
        except (ValueError, KeyError) as exc:
            return self.say(HostResult(host, "worker", False, False,
                                       f"unexpected answer from agentctl join: {exc}"))

    def stop(self, host: str, role: str) -> HostResult:
        remote = self._remote(host)
        try:
            rc, out, err = remote.run("command -v agentctl >/dev/null 2>&1 || echo NO-PACKAGE; "
                                      "command -v agentctl >/dev/null 2>&1 && "
                                      "agentctl stop --json", timeout=240)
            if "NO-PACKAGE" in out:
                return self.say(HostResult(host, role, True, False,
                                           "node-agent is not installed; nothing to stop"))
            if rc != 0 and "no node-agent is running" in err:
                return self.say(HostResult(host, role, True, False,
                                           "the agent is not running; nothing to stop"))
            if rc != 0:
                raise HostError(_agentctl_error("agentctl stop", rc, err))
            reply = json.loads(out[out.find("{"):])
            return self.say(HostResult(host, role, True, True, f"stopped: {reply['message']}"))
        except HostError as exc:
            return self.say(HostResult(host, role, False, False, str(exc)))
        except (ValueError, KeyError) as exc:
            return self.say(HostResult(host, role, False, False,
                                       f"unexpected answer from agentctl stop: {exc}"))

    # -- whole cluster ----------------------------------------------------------------------

    def up(self) -> Tuple[List[HostResult], Optional[Dict[str, Any]], str]:
        """(per-host results, the head's status as JSON, as text)."""
        head, token = self.up_head()
        results = [head]
        workers = self.spec.worker_ips
        if token is None:
            for host in workers:
                results.append(self.say(HostResult(host, "worker", False, False,
                                                   f"not joined: the head {self.spec.head_ip} "
                                                   f"did not come up")))
        elif workers:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(workers))) as ex:
                results += list(ex.map(lambda h: self.up_worker(h, token), workers))
        status_json, status_text = None, ""
        if head.ok:
            status_json, status_text = self.head_status(expect=sum(r.ok for r in results))
        return results, status_json, status_text

    def head_status(self, expect: int,
                    wait_s: float = 15.0) -> Tuple[Optional[Dict[str, Any]], str]:
        """The head's `agentctl status`, once it counts `expect` live nodes (or after
        wait_s: workers that joined register with the GCS a moment later)."""
        remote = self._remote(self.spec.head_ip)
        deadline = time.monotonic() + wait_s
        status: Optional[Dict[str, Any]] = None
        while True:
            try:
                rc, out, _ = remote.run("agentctl status --json", timeout=60)
                if rc == 0:
                    status = json.loads(out[out.find("{"):])
            except (HostError, ValueError):
                status = None
            alive = sum(1 for n in (status or {}).get("nodes", []) if n.get("state") == "ALIVE")
            if alive >= expect or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        try:
            rc, text, err = remote.run("agentctl status", timeout=60)
        except HostError as exc:
            text = f"(agentctl status on the head failed: {exc})"
        return status, text.rstrip()

    def down(self) -> List[HostResult]:
        results: List[HostResult] = []
        workers = self.spec.worker_ips
        if workers:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(workers))) as ex:
                results += list(ex.map(lambda h: self.stop(h, "worker"), workers))
        results.insert(0, self.stop(self.spec.head_ip, "head"))
        return results


def _deb_version(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        raise ClusterConfigError(f"--deb {path}: no such file")
    try:
        r = subprocess.run(["dpkg-deb", "-f", path, "Version"], capture_output=True, text=True,
                           timeout=60)
    except FileNotFoundError:
        return None  # no dpkg here: install only where the package is missing
    if r.returncode != 0:
        raise ClusterConfigError(f"--deb {path} is not a Debian package: {_last_line(r.stderr)}")
    return r.stdout.strip() or None


def _header(spec: ClusterSpec, what: str) -> List[str]:
    lines = [f"agentctl {what}: cluster {spec.name!r}: head {spec.head_ip}, "
             f"{len(spec.worker_ips)} worker(s); ssh as {spec.ssh_user}, port {spec.ssh_port}"]
    if spec.ignored:
        lines.append(f"  ignored (the package replaces them): {', '.join(spec.ignored)}")
    return lines


def cluster_up(path: str, *, deb: Optional[str] = None, ssh_options: Sequence[str] = (),
               as_json: bool = False, out: Any = None) -> int:
    """`agentctl up`: exit status 0 when every host is in its role, 1 otherwise."""
    out = out or sys.stdout
    spec = load_cluster_file(path)
    t0 = time.monotonic()
    echo = (lambda line: None) if as_json else (lambda line: print(line, file=out, flush=True))
    for line in _header(spec, "up"):
        echo(line)
    launcher = Launcher(spec, ssh_options=ssh_options, deb=deb, echo=echo)
    results, status_json, status_text = launcher.up()
    failed = [r for r in results if not r.ok]
    elapsed = time.monotonic() - t0
    if as_json:
        print(json.dumps({"cluster_name": spec.name, "head_address": spec.head_address,
                          "elapsed_s": round(elapsed, 2), "ignored": spec.ignored,
                          "hosts": [r.__dict__ for r in results], "status": status_json},
                         indent=2, sort_keys=True), file=out)
    else:
        if status_text:
            echo("")
            echo(status_text)
            echo("")
        summary = (f"agentctl up: {len(results) - len(failed)} of {len(results)} hosts in their "
                   f"role in {elapsed:.1f}s")
        if failed:
            summary += f"; failed: {', '.join(r.host for r in failed)}"
        echo(summary)
    return 1 if failed else 0


def cluster_down(path: str, *, ssh_options: Sequence[str] = (), as_json: bool = False,
                 out: Any = None) -> int:
    """`agentctl down`: drain and stop every worker, then the head."""
    out = out or sys.stdout
    spec = load_cluster_file(path)
    echo = (lambda line: None) if as_json else (lambda line: print(line, file=out, flush=True))
    for line in _header(spec, "down"):
        echo(line)
    results = Launcher(spec, ssh_options=ssh_options, echo=echo).down()
    failed = [r for r in results if not r.ok]
    if as_json:
        print(json.dumps({"cluster_name": spec.name, "hosts": [r.__dict__ for r in results]},
                         indent=2, sort_keys=True), file=out)
    else:
        echo(f"agentctl down: {len(results) - len(failed)} of {len(results)} hosts stopped"
             + (f"; failed: {', '.join(r.host for r in failed)}" if failed else ""))
    return 1 if failed else 0
