"""One booted Debian 12 host: install, the unit under a real systemd, who may use the
agent, the watchdog."""
from __future__ import annotations

import time

import pytest

from system.hosts import wait_until
from system.system_helpers import (FIGURES, agentctl_json, install, set_node_ip,
                                   wait_alive)

#: Generous: the first test of a run also waits for the shared .deb build and,
#: on a fresh machine, the root filesystem (about 100 s); every wait inside a
#: test has its own, shorter deadline.
pytestmark = pytest.mark.timeout(600)


def test_install_starts_an_idle_agent_as_its_own_user(make_hosts, debs):
    (host,) = make_hosts(1, install_package=False)
    seconds = install(host, debs["deb"])
    FIGURES["apt_install_s"] = round(seconds, 2)
    # Enabled, and started idle: Type=notify, so "active" means READY=1 arrived.
    assert host.sh("systemctl is-enabled node-agent") == "enabled"
    assert host.unit("ActiveState") == "active" and host.unit("SubState") == "running"
    assert host.unit("Type") == "notify"
    verify = host.run("systemd-analyze verify --man=no node-agent.service", check=False)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify
    assert host.unit("StatusText").startswith("idle · no node")
    status = host.run("systemctl status node-agent --no-pager", check=False).stdout
    assert 'Status: "idle · no node' in status, status
    # Not root: the system user postinst made, which owns the runtime and state dirs.
    pid = host.agent_pid()
    assert host.sh(f"ps -o user= -p {pid}") == "node-agent"
    assert host.sh("getent passwd node-agent | cut -d: -f7") == "/usr/sbin/nologin"
    assert host.sh("stat -c '%U:%G %a' /run/node-agent") == "node-agent:node-agent 750"
    assert host.sh("stat -c '%U:%G %a' /run/node-agent/agent.sock") == \
        "node-agent:node-agent 660"
    assert host.sh("stat -c '%U %a' /var/lib/node-agent") == "node-agent 700"
    # No role yet: a node starts only with agentctl.
    status = agentctl_json(host, "status")
    assert status["role"] == "idle" and not status["processes"], status

    # Time from apt-get install to a running head (the package is removed first).
    host.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q node-agent")
    t0 = time.monotonic()
    install(host, debs["deb"])
    set_node_ip(host)
    host.sh("agentctl start --head")
    wait_alive(host, 1)
    FIGURES["apt_install_to_running_head_s"] = round(time.monotonic() - t0, 2)


def test_group_members_may_use_the_agent_and_others_are_told_why_not(make_hosts):
    (host,) = make_hosts(1)
    host.sh("adduser --quiet --disabled-password --gecos '' alice && adduser --quiet alice "
            "node-agent && adduser --quiet --disabled-password --gecos '' bob")
    # alice (group node-agent) drives the system agent through its socket: trusted
    # because only root can have made /run/node-agent, and node-agent owns it.
    r = host.run("agentctl start --head --json", user="alice")
    assert '"gcs_address": "127.0.0.11:6379"' in r.stdout, r.stdout
    assert agentctl_json(host, "status", user="alice")["role"] == "head"
    token = host.sh("agentctl token", user="alice")
    assert token == host.sh("cat /var/lib/node-agent/token")
    # Her drivers use the object store too: its shared-memory files are 0660, group
    # node-agent (RUNTIME_STORE_FILE_MODE in the unit), so a 1 MB object goes through it.
    code = ("import runtime as ray; ray.init(address='auto'); "
            "print(len(ray.get(ray.put(b'x' * 1_000_000), timeout=60))); ray.shutdown()")
    out = host.sh(["/usr/lib/node-agent/bin/python3", "-c", code], user="alice")
    assert out.splitlines()[-1] == "1000000", out
    # bob is not in the group: one line saying why and what to do, status 1.
    r = host.run("agentctl status", user="bob", check=False)
    assert r.returncode == 1
    assert "permission denied on /run/node-agent/agent.sock" in r.stderr, r.stderr
    assert "members of group node-agent" in r.stderr and "adduser" in r.stderr, r.stderr
    # With the service stopped, agentctl does not start an agent of its own.
    host.sh("systemctl stop node-agent")
    r = host.run("agentctl start", check=False)
    assert r.returncode == 1 and "systemctl start node-agent" in r.stderr, r.stderr
    assert host.run("pgrep -f '[a]gent[.]daemon'", check=False).returncode == 1


def test_watchdog_restarts_a_hung_agent(make_hosts):
    (host,) = make_hosts(1)
    # A short watchdog for the test (the unit ships WatchdogSec=30), as a runtime drop-in.
    host.run("mkdir -p /run/systemd/system/node-agent.service.d && printf '[Service]\\n"
             "WatchdogSec=3\\n' > /run/systemd/system/node-agent.service.d/watchdog.conf && "
             "systemctl daemon-reload && systemctl restart node-agent")
    assert host.unit("WatchdogUSec") == "3s"
    before = host.agent_pid()
    restarts = int(host.unit("NRestarts"))
    host.sh(f"kill -STOP {before}")
    t0 = time.monotonic()

    def restarted():
        pid = host.agent_pid()
        return pid and pid != before and host.unit("ActiveState") == "active"

    # WatchdogSec, then RestartSec=2 and a start: well inside 3 s + 15 s.
    wait_until(restarted, 18.0, "systemd to restart the stopped agent")
    elapsed = time.monotonic() - t0
    assert int(host.unit("NRestarts")) == restarts + 1
    journal = host.journal()
    assert "Watchdog timeout" in journal, journal[-2000:]
    FIGURES["watchdog_restart_s"] = round(elapsed, 1)
