"""`agentctl up` / `agentctl down` against booted hosts, each running sshd on its own
loopback address. The admin's machine is host 1 (the package is installed there, as
on any machine an admin runs agentctl on); it reaches every host, itself included,
with the system ssh client."""
from __future__ import annotations

import json
import time
from typing import List, Tuple

import pytest

from system.hosts import Host
from system.system_helpers import (FIGURES, agentctl_json, deb_path_inside, run_driver,
                                   wait_alive)

SSH_PORT = 2222
UNREACHABLE = "127.0.0.14"  # nothing listens there

#: Generous: the first test of a run also waits for the shared .deb build and,
#: on a fresh machine, the root filesystem (about 100 s); every wait inside a
#: test has its own, shorter deadline.
pytestmark = pytest.mark.timeout(600)


def cluster_yaml(head: Host, workers: List[str], name: str = "system-test") -> str:
    """A Ray cluster file (local provider), with a key Ray users have that means
    nothing here."""
    return (f"cluster_name: {name}\n"
            f"provider:\n  type: local\n  head_ip: {head.ip}\n"
            f"  worker_ips: [{', '.join(workers)}]\n  ssh_port: {SSH_PORT}\n"
            "auth:\n  ssh_user: root\n  ssh_private_key: ~/.ssh/id_ed25519\n"
            "setup_commands:\n  - pip install -U ray\n")


def serve_ssh(hosts: List[Host], admin: Host) -> str:
    """sshd on each host's own address (key login only), trusting the admin's key."""
    admin.run("mkdir -p -m 700 /root/.ssh && ssh-keygen -q -t ed25519 -N '' "
              "-f /root/.ssh/id_ed25519")
    pubkey = admin.sh("cat /root/.ssh/id_ed25519.pub")
    for h in hosts:
        h.write("/etc/ssh/sshd_config.d/system-test.conf",
                f"ListenAddress {h.ip}:{SSH_PORT}\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n")
        h.run("mkdir -p -m 700 /root/.ssh")
        h.write("/root/.ssh/authorized_keys", pubkey + "\n", 0o600)
        h.run("systemctl start ssh")
        assert h.unit("ActiveState", "ssh.service") == "active"
    return pubkey


def up(admin: Host, args: str) -> Tuple[int, str, str]:
    r = admin.run(f"agentctl {args}", check=False, timeout=300)
    return r.returncode, r.stdout, r.stderr


def line_of(out: str, host: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith(f"[{host}]")]
    assert len(lines) == 1, f"expected one line for {host}:\n{out}"
    return lines[0]


def test_up_reports_each_host_and_is_idempotent(make_hosts, debs):
    h1, h2 = make_hosts(2)
    (h3,) = make_hosts(1, install_package=False, first=3)
    serve_ssh([h1, h2, h3], admin=h1)
    h1.write("/root/cluster.yaml", cluster_yaml(h1, [h2.ip, h3.ip, UNREACHABLE]))
    h1.write("/root/cluster2.yaml", cluster_yaml(h1, [h2.ip, h3.ip]))

    # A host without the package and an unreachable one: one line each, the others
    # still come up, exit status 1.
    rc, out, err = up(h1, "up /root/cluster.yaml")
    assert rc == 1, out + err
    assert "ignored (the package replaces them): setup_commands" in out
    assert line_of(out, h1.ip).endswith("started; GCS at 127.0.0.11:6379 (node "
                                        + agentctl_json(h1, "status")["node_id"][:8] + ")")
    assert "joined 127.0.0.11:6379" in line_of(out, h2.ip)
    assert "FAILED: node-agent is not installed" in line_of(out, h3.ip)
    assert "--deb" in line_of(out, h3.ip)
    assert "FAILED: unreachable" in line_of(out, UNREACHABLE)
    assert "connection refused" in line_of(out, UNREACHABLE)
    assert "Nodes (2 alive, 0 dead)" in out  # the head's agentctl status, at the end
    token = h1.sh("cat /var/lib/node-agent/token")
    assert token not in out + err

    # Again with --deb and the right hosts: the missing package is installed and the
    # host joins; hosts already in their role are left alone.
    before = {h.name: (h.agent_pid(), agentctl_json(h, "status")["node_id"]) for h in (h1, h2)}
    rc, out, err = up(h1, f"up /root/cluster2.yaml --deb {deb_path_inside(debs['deb'])}")
    assert rc == 0, out + err
    assert "already the head at 127.0.0.11:6379 (running); unchanged" in line_of(out, h1.ip)
    assert "already a worker of 127.0.0.11:6379 (running); unchanged" in line_of(out, h2.ip)
    assert "installed the package; joined 127.0.0.11:6379" in line_of(out, h3.ip)
    assert token not in out + err
    after = {h.name: (h.agent_pid(), agentctl_json(h, "status")["node_id"]) for h in (h1, h2)}
    assert after == before
    wait_alive(h1, 3)

    # Once more: nothing changes anywhere.
    rc, out, err = up(h1, "up /root/cluster2.yaml --json")
    assert rc == 0, err
    report = json.loads(out)
    assert [(r["host"], r["ok"], r["changed"]) for r in report["hosts"]] == \
        [(h.ip, True, False) for h in (h1, h2, h3)]
    assert token not in out

    # A key the host refuses: that host's line says so; the others are untouched.
    h3.write("/root/.ssh/authorized_keys", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPlaceholder"
             "KeyNobodyHas0000000000000000000000 other@admin\n", 0o600)
    rc, out, err = up(h1, "up /root/cluster2.yaml")
    assert rc == 1
    assert "FAILED: ssh refused the key for root@127.0.0.13" in line_of(out, h3.ip)
    assert "unchanged" in line_of(out, h1.ip) and "unchanged" in line_of(out, h2.ip)


def test_up_brings_three_hosts_up_and_down_stops_them(make_hosts):
    hosts = make_hosts(3)
    h1, h2, h3 = hosts
    serve_ssh(hosts, admin=h1)
    h1.write("/root/cluster.yaml", cluster_yaml(h1, [h2.ip, h3.ip]))

    t0 = time.monotonic()
    rc, out, err = up(h1, "up /root/cluster.yaml --json")
    wall = time.monotonic() - t0
    assert rc == 0, out + err
    report = json.loads(out)
    assert [(r["host"], r["role"], r["ok"], r["changed"]) for r in report["hosts"]] == \
        [(h1.ip, "head", True, True), (h2.ip, "worker", True, True), (h3.ip, "worker", True, True)]
    assert sum(n["state"] == "ALIVE" for n in report["status"]["nodes"]) == 3
    FIGURES["agentctl_up_3_hosts_s"] = report["elapsed_s"]
    FIGURES["agentctl_up_3_hosts_wall_s"] = round(wall, 2)
    assert report["elapsed_s"] < 30.0
    result = run_driver(h2)
    assert len(result["ran_on"]) == 3 and result["ran_on"] == result["nodes"]

    # down: every node drained and stopped, workers first; the agents stay (idle).
    rc, out, err = up(h1, "down /root/cluster.yaml")
    assert rc == 0, out + err
    for h in hosts:
        assert line_of(out, h.ip).split(": ", 1)[1].startswith("stopped: node ")
        status = agentctl_json(h, "status")
        assert status["role"] == "idle" and not status["processes"], status
        assert h.unit("ActiveState") == "active"

    # And up again after down: the same file brings the cluster back.
    rc, out, err = up(h1, "up /root/cluster.yaml")
    assert rc == 0, out + err
    wait_alive(h1, 3)
