"""A head agent serving the Jobs REST API on loopback, and ways to call it.

Ray's own client runs from a separate venv (``.venv-ray``, made by
scripts/setup.sh) so Ray never mixes with our packages; ``ray_client`` runs a
snippet there with Ray's token auth switched on, as a Ray user would.
"""
from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from agent_helpers import REPO, Agent, Farm, free_port, wait_for
from helpers.env import scrubbed_env

RAY_PY = REPO / ".venv-ray" / "bin" / "python"
RAY_CLI = REPO / ".venv-ray" / "bin" / "ray"


def ray_client_missing() -> Optional[str]:
    """Why Ray's client cannot be used here, or None."""
    if not RAY_PY.exists():
        return (f"Ray's client is not installed in {RAY_PY.parent.parent} (scripts/setup.sh "
                f"installs ray==2.60.* there; see .venv-ray/pip-install.log)")
    return None


def start_head(farm: Farm, name: str = "head", jobs_config: str = "",
               env: Optional[Dict[str, str]] = None, agentctl: str = "agentctl"
               ) -> Tuple[Agent, str, str]:
    """A head on 127.0.0.1 whose agent serves the jobs API: (agent, http address, token).
    ``agentctl`` and ``env`` choose the command that starts it and its environment,
    which the agent it launches inherits."""
    ports = farm.ports()
    dashboard = free_port(taken=farm.taken)
    agent = farm.agent(name, "127.0.0.1", ports)
    cfg = Path(agent.config)
    text = cfg.read_text().replace("[ports]\n", f"[ports]\ndashboard = {dashboard}\n", 1)
    cfg.write_text(text + "\n[jobs]\nstop_grace_s = 1.0\n" + jobs_config)
    out = subprocess.run([agentctl, "start", "--head", "--node-ip", "127.0.0.1", "--port",
                          str(ports["gcs"]), "--json", "--socket", agent.socket, "--state-dir",
                          agent.state_dir, "--config", agent.config], capture_output=True,
                         text=True, timeout=90, env=env or scrubbed_env(), cwd=str(agent.dir))
    assert out.returncode == 0, (out.stdout, out.stderr)
    token = json.loads(out.stdout)["token"]
    address = f"http://127.0.0.1:{dashboard}"
    wait_for(lambda: http(address, "GET", "/api/version", token)[0] == 200, 30,
             message=f"the jobs API at {address}")
    return agent, address, token


def join_worker(farm: Farm, head: Agent, token: str, node_ip: str = "127.0.0.2",
                name: str = "worker", resources: Optional[Dict[str, float]] = None) -> Agent:
    """A worker agent on node_ip joined to head's cluster (with custom resources),
    once the head sees it alive and it serves its TCP API."""
    agent = farm.agent(name, node_ip)
    args = ["join", head.status().gcs_address, "--token", token, "--node-ip", node_ip]
    if resources:
        args += ["--resources", json.dumps(resources)]
    out = agent.ctl(*args)
    assert out.returncode == 0, (out.stdout, out.stderr)
    wait_for(lambda: any(n.node_ip == node_ip and n.state == "ALIVE"
                         for n in head.status().nodes), 45,
             message=f"the worker on {node_ip} to be alive in the head's view")
    wait_for(lambda: agent.status(local_only=True).api_address, 30,
             message=f"the worker on {node_ip} to serve its TCP API")
    return agent


def http(address: str, method: str, path: str, token: Optional[str] = None,
         body: Any = None, headers: Optional[Dict[str, str]] = None,
         data: Optional[bytes] = None, timeout: float = 30) -> Tuple[int, Any]:
    """(status, JSON or text) of one request."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    req = urllib.request.Request(address + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raw, status, ctype = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    text = raw.decode()
    return status, json.loads(text) if "json" in ctype else text


def wait_status(address: str, token: str, sid: str, statuses: Tuple[str, ...],
                timeout: float = 30) -> Dict[str, Any]:
    def done():
        code, info = http(address, "GET", f"/api/jobs/{sid}", token)
        return info if code == 200 and info["status"] in statuses else None
    return wait_for(done, timeout, interval=0.05, message=f"job {sid} to be {statuses}")


def ray_env(address: str, token: Optional[str], **extra: str) -> Dict[str, str]:
    env = {"RAY_ADDRESS": address, **extra}
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return scrubbed_env(env)


def ray_client(code: str, address: str, token: Optional[str], cwd: str,
               timeout: float = 120, connect: bool = True) -> Any:
    """Run ``code`` with Ray's Python (JobSubmissionClient available as ``client``
    unless not ``connect``); it prints one JSON document last, which is returned."""
    prelude = ("import json, sys, time\n"
               "from ray.job_submission import JobSubmissionClient, JobStatus\n"
               + (f"client = JobSubmissionClient({address!r})\n" if connect else ""))
    proc = subprocess.run([str(RAY_PY), "-c", prelude + code], capture_output=True, text=True,
                          env=ray_env(address, token), cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, f"Ray client failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ray_cli(args: list, address: str, token: Optional[str], cwd: str,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """``ray ARGS`` (Ray's own CLI) against the head."""
    return subprocess.run([str(RAY_CLI), *args], capture_output=True, text=True,
                          env=ray_env(address, token), cwd=cwd, timeout=timeout)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


__all__ = ["RAY_PY", "start_head", "join_worker", "http", "wait_status", "ray_client", "ray_cli",
           "ray_client_missing", "rss_mb"]
