"""Clusters of booted hosts: join, drivers, restarts, stop, reboot, upgrade, purge."""
from __future__ import annotations

import json
from typing import Optional

import pytest

from system.hosts import Host, wait_until
from system.system_helpers import (agentctl_json, install, run_driver, start_cluster,
                                   wait_alive)

#: The reason a raylet gives the GCS when its node is stopped on purpose; a node that
#: failed is declared dead for missing resource reports instead.
STOPPED = "raylet stopped"

#: Generous: the first test of a run also waits for the shared .deb build and,
#: on a fresh machine, the root filesystem (about 100 s); every wait inside a
#: test has its own, shorter deadline.
pytestmark = pytest.mark.timeout(600)


def node_of(host: Host) -> str:
    return agentctl_json(host, "status", timeout=60)["node_id"]


def cluster_node(head: Host, node_id: str) -> Optional[dict]:
    status = agentctl_json(head, "status", timeout=60)
    return next((n for n in status["nodes"] if n["id"] == node_id), None)


def wait_dead(head: Host, node_id: str, timeout: float = 30.0) -> dict:
    def dead():
        node = cluster_node(head, node_id)
        return node if node and node["state"] == "DEAD" else None
    return wait_until(dead, timeout, f"node {node_id[:8]} to be gone on {head.name}",
                      interval=0.3)


def reboot(host: Host) -> None:
    """`systemctl reboot` inside: the container halts (systemd-nspawn exits 133, "reboot
    requested") and boots again on the same root."""
    host.run("systemctl reboot", check=False, timeout=30)
    assert host.wait_halted(60) == 133
    host.boot()


def test_three_hosts_run_a_driver_and_survive_restart_and_stop(make_hosts):
    h1, h2, h3 = make_hosts(3)
    start_cluster(h1, [h2, h3])
    nodes = {h.name: node_of(h) for h in (h1, h2, h3)}

    # A driver on host 2 runs a task on each of the three hosts.
    result = run_driver(h2)
    assert result["ran_on"] == sorted(nodes.values()) == result["nodes"], (result, nodes)
    assert result["driver_node"] == nodes["h2"]

    # journald has the agent's and its components' lifecycle; agentctl logs reads the
    # component logs kept under the state dir.
    journal = h1.journal()
    for line in ("serving on /run/node-agent/agent.sock", "spawned gcs pid",
                 "spawned object_store pid", "spawned raylet pid", "phase running"):
        assert line in journal, f"{line!r} not in journalctl -u node-agent:\n{journal[-3000:]}"
    if h2.run("test -x /usr/bin/raytop", check=False).returncode == 0:
        snapshot = h2.sh("raytop --once")  # the packaged TUI, through the same socket
        assert all(h.ip in snapshot for h in (h1, h2, h3)), snapshot
    raylet_log = h2.sh("agentctl logs raylet -n 20")
    assert raylet_log and "Traceback" not in raylet_log, raylet_log
    assert "raylet.log" in h2.sh("ls /var/lib/node-agent/sessions/session_latest/logs")

    # systemctl restart on a worker: it drains, stops, and comes back as a new node.
    h3.sh("systemctl restart node-agent")
    wait_until(lambda: agentctl_json(h3, "status").get("phase") == "running", 60,
               "h3 to rejoin")
    new = node_of(h3)
    assert new != nodes["h3"]
    assert wait_dead(h1, nodes["h3"])["death_reason"] == STOPPED
    status = wait_alive(h1, 3)
    assert new in {n["id"] for n in status["nodes"] if n["state"] == "ALIVE"}

    # systemctl stop: drained and gone from the head's view, not failed.
    h3.sh("systemctl stop node-agent")
    assert h3.unit("ActiveState") == "inactive" and h3.unit("Result") == "success"
    gone = wait_dead(h1, new)
    assert gone["death_reason"] == STOPPED, gone
    assert "phase stopping: draining" in h3.journal()
    wait_alive(h1, 2)


def test_reboot_brings_each_host_back_in_its_role(make_hosts):
    h1, h2 = make_hosts(2)
    token = start_cluster(h1, [h2])
    old_worker = node_of(h2)

    reboot(h2)
    wait_until(lambda: agentctl_json(h2, "status").get("phase") == "running", 90,
               "the rebooted worker to run its node again")
    assert agentctl_json(h2, "status")["role"] == "worker"
    assert node_of(h2) != old_worker
    wait_alive(h1, 2)

    reboot(h1)
    wait_until(lambda: agentctl_json(h1, "status").get("phase") == "running", 90,
               "the rebooted head to run its node again")
    assert h1.sh("cat /var/lib/node-agent/token") == token
    wait_alive(h1, 2, timeout=90)  # the worker's raylet registers with the new GCS
    result = run_driver(h2)
    assert len(result["ran_on"]) == 2 and result["ran_on"] == result["nodes"]


def test_upgrade_in_place_keeps_role_token_and_admin_config(make_hosts, debs):
    h1, h2 = make_hosts(2)
    token = start_cluster(h1, [h2])
    h1.sh("echo '# kept across upgrades (admin)' >> /etc/node-agent/agent.toml")
    old_pid = h1.agent_pid()

    install(h1, debs["upgrade"])
    assert h1.sh("dpkg-query -W -f='${Version}' node-agent") == debs["version"] + "+upgrade1"
    assert h1.agent_pid() not in (0, old_pid)
    config = h1.sh("cat /etc/node-agent/agent.toml")
    assert "# kept across upgrades (admin)" in config and 'node_ip = "127.0.0.11"' in config
    assert not h1.sh("ls /etc/node-agent | grep dpkg || true")
    wait_until(lambda: agentctl_json(h1, "status").get("phase") == "running", 60,
               "the upgraded head to run again")
    assert agentctl_json(h1, "status")["role"] == "head"
    assert h1.sh("cat /var/lib/node-agent/token") == token
    wait_alive(h1, 2, timeout=90)
    # Drivers attach again (same address, same token), on either host.
    assert len(run_driver(h2)["ran_on"]) == 2
    assert len(run_driver(h1)["ran_on"]) == 2

    install(h2, debs["upgrade"])
    wait_alive(h1, 2, timeout=90)
    assert agentctl_json(h2, "status")["role"] == "worker"


def test_remove_drains_the_node_and_purge_deletes_its_state(make_hosts):
    h1, h2 = make_hosts(2)
    start_cluster(h1, [h2])
    node = node_of(h2)

    h2.sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y -q node-agent")
    assert h2.run("pgrep -u node-agent", check=False).returncode == 1
    assert wait_dead(h1, node)["death_reason"] == STOPPED
    assert "phase stopping: draining" in h2.journal()
    saved = json.loads(h2.sh("cat /var/lib/node-agent/state.json"))
    assert saved["role"] == "worker"  # remove keeps the state: reinstalling resumes it

    h2.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q node-agent")
    for path in ("/var/lib/node-agent", "/etc/node-agent", "/lib/systemd/system/node-agent.service",
                 "/etc/systemd/system/multi-user.target.wants/node-agent.service",
                 "/usr/lib/node-agent", "/usr/bin/agentctl"):
        assert h2.run(f"test -e {path}", check=False).returncode == 1, f"{path} left by purge"
    assert h2.sh("getent passwd node-agent | cut -d: -f1") == "node-agent"  # Debian keeps it
