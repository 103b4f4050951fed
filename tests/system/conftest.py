"""Fixtures of the system tests: the .deb built from this checkout, the cached Debian 12
root filesystem, and booted hosts with the package installed.

The tests that use these fixtures need root, systemd-nspawn and debootstrap; without
them each one is skipped and the reason is printed in pytest's summary (-ra). .ci/run
installs them. Tests that boot nothing (test_local_trust_and_cli.py) run everywhere.
Figures measured along the way (package size, install to running head, `agentctl up`
of three hosts) are printed at the end of the run for docs/benchmarks.md.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import json
import os
import shutil
import subprocess
import time
from typing import Callable, Dict, List

import pytest

from system import hosts as system_hosts
from system.hosts import HOST_ENV, Host, missing_requirements
from system.system_helpers import FIGURES, install, set_node_ip

HERE = os.path.dirname(os.path.abspath(__file__))
_SKIP = missing_requirements()
#: Loopback address of host i (1-based): 127.0.0.11, .12, ...
HOST_IP = "127.0.0.{}".format
#: Every host any test created, so a crash of the run still powers them off.
_LIVE: List[Host] = []


#: Fixtures that need the machine (root, nspawn, debootstrap); tests without them
#: (parsing a cluster file, say) run everywhere.
_MACHINE_FIXTURES = {"make_hosts", "debs", "rootfs"}


def pytest_collection_modifyitems(config, items):
    if _SKIP is None:
        return
    marker = pytest.mark.skip(reason=f"system tests skipped: {_SKIP}")
    for item in items:
        if (str(item.fspath).startswith(HERE)
                and _MACHINE_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(marker)


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.write_sep("-", "system test figures")
        terminalreporter.write_line(json.dumps(FIGURES, indent=2, sort_keys=True))


@atexit.register
def _power_off_leftovers() -> None:
    for host in list(_LIVE):
        host.destroy()


@pytest.fixture(scope="session")
def workdir():
    path = system_hosts.workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def rootfs() -> str:
    return system_hosts.make_rootfs()


@pytest.fixture(scope="session")
def debs(workdir) -> Dict[str, str]:
    """{"deb": the package built from this checkout, "upgrade": the same contents as a
    newer version (for upgrade in place), "dir": the directory holding both}."""
    out = os.path.join(workdir, "dist")
    os.makedirs(out)
    t0 = time.monotonic()
    deb = system_hosts.build_deb(out)
    FIGURES["deb_build_s"] = round(time.monotonic() - t0, 1)
    FIGURES["deb_size_bytes"] = os.path.getsize(deb)
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], env=HOST_ENV, capture_output=True, text=True,
                             check=True).stdout.strip()
    upgrade = _repack(deb, f"{version}+upgrade1", workdir)
    return {"deb": deb, "upgrade": upgrade, "dir": out, "version": version}


def _repack(deb: str, version: str, workdir: str) -> str:
    """deb with its version raised: what an admin installs as the next build."""
    tree = os.path.join(workdir, "repack")
    subprocess.run(["dpkg-deb", "-R", deb, tree], env=HOST_ENV, check=True, capture_output=True)
    control = os.path.join(tree, "DEBIAN", "control")
    with open(control) as fh:
        lines = fh.read().splitlines()
    with open(control, "w") as fh:
        fh.write("\n".join(f"Version: {version}" if ln.startswith("Version:") else ln
                           for ln in lines) + "\n")
    out = os.path.join(os.path.dirname(deb), f"node-agent_{version}_upgrade.deb")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "-b", tree, out], env=HOST_ENV,
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    return out


@pytest.fixture
def make_hosts(rootfs, debs, workdir) -> Callable[..., List[Host]]:
    """make_hosts(n, install=True): n booted hosts (127.0.0.11 ...), the package
    installed and node_ip set in agent.toml unless install=False. Powered off and
    deleted after the test, whatever happens."""
    made: List[Host] = []

    def make(n: int, install_package: bool = True, first: int = 1) -> List[Host]:
        new = []
        for i in range(first, first + n):
            host = Host(f"h{i}", HOST_IP(10 + i), rootfs, workdir, {debs["dir"]: "/mnt/deb"})
            made.append(host)
            _LIVE.append(host)
            new.append(host.create())
        for host in new:
            host.boot()
        if install_package:
            with concurrent.futures.ThreadPoolExecutor(len(new)) as ex:
                list(ex.map(lambda h: install(h, debs["deb"]), new))
            for host in new:
                set_node_ip(host)
        return new

    yield make
    for host in made:
        try:
            host.destroy()
        finally:
            if host in _LIVE:
                _LIVE.remove(host)
