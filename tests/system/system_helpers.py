"""What the system tests do on booted hosts: install the package, start a cluster
the way an admin does, run a driver. Figures measured along the way go to FIGURES
(printed at the end of the run by conftest.py)."""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List

from system import hosts as system_hosts
from system.hosts import Host

FIGURES: Dict[str, object] = {}


def deb_path_inside(path: str) -> str:
    """Where a package of the debs fixture is seen inside a host."""
    return "/mnt/deb/" + os.path.basename(path)


def install(host: Host, deb: str) -> float:
    """apt-get install the .deb in host; returns the seconds it took."""
    t0 = time.monotonic()
    host.run(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
             f"-o Dpkg::Options::=--force-confold {deb_path_inside(deb)}", timeout=300)
    return time.monotonic() - t0


def set_node_ip(host: Host) -> None:
    """The admin's edit of /etc/node-agent/agent.toml: this machine's cluster address
    (each host has its own loopback address), then a restart to read it."""
    host.run(f"sed -i 's/^# node_ip = .*/node_ip = \"{host.ip}\"/' /etc/node-agent/agent.toml"
             f" && grep -q '^node_ip = \"{host.ip}\"' /etc/node-agent/agent.toml"
             f" && systemctl restart node-agent")


def agentctl_json(host: Host, args: str, **kw) -> dict:
    return json.loads(host.sh(f"agentctl {args} --json", **kw))


def wait_alive(head: Host, count: int, timeout: float = 60.0) -> dict:
    """The head's status once it counts `count` live nodes."""
    def ready():
        r = head.run("agentctl status --json", check=False)
        if r.returncode != 0:
            return None
        status = json.loads(r.stdout)
        alive = [n for n in status["nodes"] if n["state"] == "ALIVE"]
        return status if len(alive) == count and status["phase"] == "running" else None
    return system_hosts.wait_until(ready, timeout, f"{count} live nodes on {head.name}",
                                   interval=0.3)


def start_cluster(head: Host, workers: List[Host]) -> str:
    """`agentctl start --head` on head, `agentctl join --token-file` on workers; the
    token file is the admin's copy (0600). Returns the token."""
    head.sh("agentctl start --head")
    token = head.sh("cat /var/lib/node-agent/token")
    for w in workers:
        w.write("/root/cluster-token", token + "\n", 0o600)
        w.sh(f"agentctl join {head.ip}:6379 --token-file /root/cluster-token")
    wait_alive(head, 1 + len(workers))
    return token


#: Runs on a host with the bundled interpreter: one task pinned to each live node, each
#: returning the node id it ran on (get_runtime_context()).
DRIVER = r'''
import json, sys
import runtime as ray
from runtime.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address="auto")

@ray.remote
def where():
    return ray.get_runtime_context().get_node_id()

nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
ran = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
               .remote() for n in nodes])
print(json.dumps({"nodes": nodes, "ran_on": sorted(ran),
                  "driver_node": ray.get_runtime_context().get_node_id()}))
ray.shutdown()
'''


def run_driver(host: Host, user: str = "") -> dict:
    host.write("/tmp/driver.py", DRIVER, 0o644)
    out = host.sh("cd /tmp && /usr/lib/node-agent/bin/python3 /tmp/driver.py", timeout=180,
                  user=user or None)
    return json.loads(out.splitlines()[-1])
