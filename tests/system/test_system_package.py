"""The .deb itself: what it installs where, its size, and what lintian says of it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib

import pytest

from system.hosts import HOST_ENV
from system.system_helpers import FIGURES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_DEB_BYTES = 60 * 1024 * 1024

#: Generous: the first test of a run also waits for the shared .deb build and,
#: on a fresh machine, the root filesystem (about 100 s); every wait inside a
#: test has its own, shorter deadline.
pytestmark = pytest.mark.timeout(600)


def _contents(deb: str) -> dict:
    out = subprocess.run(["dpkg-deb", "-c", deb], env=HOST_ENV, capture_output=True, text=True,
                         check=True).stdout
    entries = {}
    for line in out.splitlines():
        parts = line.split()
        path = parts[5].lstrip(".")
        entries[path.rstrip("/") or "/"] = (parts[0], parts[1])
    return entries


def test_package_layout_and_control(debs):
    deb = debs["deb"]
    assert os.path.getsize(deb) < MAX_DEB_BYTES, os.path.getsize(deb)
    files = _contents(deb)
    for path in ("/usr/bin/node-agent", "/usr/bin/agentctl",
                 "/lib/systemd/system/node-agent.service", "/etc/node-agent/agent.toml",
                 "/usr/lib/node-agent/bin/python3", "/usr/share/doc/node-agent/copyright",
                 "/usr/share/man/man8/agentctl.8.gz"):
        assert path in files, f"{path} missing from the package"
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        scripts = tomllib.load(fh)["project"].get("scripts", {})
    if "raytop" in scripts:  # raytop ships once its entry point exists
        assert "/usr/bin/raytop" in files
    # Nothing under /opt (Debian policy), no bytecode shipped (postinst compiles it),
    # every file root's, and only the commands executable outside the interpreter links.
    assert not any(p.startswith("/opt") for p in files)
    assert not any(p.endswith(".pyc") or "__pycache__" in p for p in files)
    assert all(owner == "root/root" for _, owner in files.values())
    execs = sorted(p for p, (mode, _) in files.items() if mode.startswith("-") and "x" in mode)
    assert execs == sorted(p for p in files if p.startswith("/usr/bin/")), execs
    control = subprocess.run(["dpkg-deb", "-f", deb], env=HOST_ENV, capture_output=True, text=True,
                             check=True).stdout
    depends = re.search(r"^Depends: (.*)$", control, re.M).group(1)
    assert "python3 (>= 3.11~)" in depends and "python3 (<< 3.12)" in depends, depends
    assert "adduser" in depends and "libc6" in depends, depends
    conffiles = subprocess.run(["dpkg-deb", "-I", deb, "conffiles"], env=HOST_ENV, capture_output=True,
                               text=True, check=True).stdout.split()
    assert conffiles == ["/etc/node-agent/agent.toml"]
    FIGURES["deb_installed_size_kib"] = int(re.search(r"^Installed-Size: (\d+)", control,
                                                      re.M).group(1))


def _kept_warnings() -> set:
    """Warnings packaging/README.md lists as kept (a table row per tag)."""
    with open(os.path.join(REPO, "packaging", "README.md")) as fh:
        text = fh.read()
    section = text.split("## lintian", 1)[1]
    return set(re.findall(r"^\| `([a-z0-9-]+)` \|", section, re.M))


def test_lintian_reports_no_errors_and_only_listed_warnings(debs):
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (apt-get install lintian; .ci/run does)")
    r = subprocess.run(["lintian", "--no-cfg", debs["deb"]], env=HOST_ENV, capture_output=True, text=True,
                       timeout=240)
    tags = [line for line in r.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    errors = [t for t in tags if t.startswith("E:")]
    assert not errors, "\n".join(errors)
    kept = _kept_warnings()
    unlisted = [t for t in tags if t.split()[2] not in kept]
    assert not unlisted, ("warnings not listed with a reason in packaging/README.md:\n"
                          + "\n".join(unlisted))
