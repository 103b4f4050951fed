"""Booted Debian 12 hosts for the system tests: systemd-nspawn containers with systemd
as PID 1, entered with nsenter.

Each host boots from the cached root filesystem (make_rootfs.sh) through an overlay
of its own, so what a test installs survives a reboot of that host and nothing
touches the cache. The containers share the machine's network namespace; each host
has its own loopback address (127.0.0.11, .12, ...), and everything a test starts
binds to that address only.

The recipe and its pitfalls are those of ../shared/PLATFORM.md section 1:
``--register=no --keep-unit`` (no systemd on the machine itself), the container's
PID 1 is the child of systemd-nspawn whose comm is ``systemd``, and stopping
escalates (SIGTERM, SIGTERM, SIGKILL) because a SIGTERM that arrives before the
container's systemd has set up its handlers is ignored.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from helpers.env import scrubbed_env

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
#: What a command run inside a host sees (never the test's own environment).
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: What the host's own tools (dpkg-deb, lintian, nspawn) get: a root shell's environment.
HOST_ENV = scrubbed_env(PATH=HOST_PATH)
BOOT_TIMEOUT_S = 60.0


def missing_requirements() -> Optional[str]:
    """Why the system tests cannot run on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "the system tests boot containers and need root"
    for tool in ("systemd-nspawn", "nsenter", "debootstrap", "mount"):
        if shutil.which(tool) is None:
            return (f"{tool} is not installed (apt-get install systemd-container debootstrap; "
                    f".ci/run does)")
    if sys.platform != "linux":
        return "the system tests need Linux"
    return None


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.1) -> object:
    """Poll predicate() until it is truthy; AssertionError naming `what` after timeout s."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


def _children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


class CommandFailed(AssertionError):
    """A command inside a host exited non-zero; the message has its output."""


class Host:
    """One booted container. Create with :meth:`create`, always :meth:`destroy`."""

    def __init__(self, name: str, ip: str, rootfs: str, workdir: str, binds: Dict[str, str]):
        self.name = name
        self.ip = ip
        self.rootfs = rootfs
        self.dir = Path(workdir) / name
        self.upper = self.dir / "upper"
        self.work = self.dir / "work"
        self.merged = self.dir / "root"
        self.binds = binds              # host path -> path inside, read-only
        self.nspawn: Optional[subprocess.Popen] = None
        self.leader = 0                 # the container's PID 1, as seen from here
        self.mounted = False
        self.boots = 0

    # ---- life cycle ---------------------------------------------------------------------

    def create(self) -> "Host":
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.rootfs},upperdir={self.upper},workdir={self.work}",
                        str(self.merged)], check=True, capture_output=True, timeout=30)
        self.mounted = True
        (self.merged / "etc" / "hostname").write_text(self.name + "\n")
        return self

    def boot(self) -> None:
        """Boot the container and wait until its systemd says running (or degraded)."""
        args = ["systemd-nspawn", "-D", str(self.merged), "-b", "--register=no", "--keep-unit",
                "-M", self.name, "--console=pipe", "--quiet"]
        for src, dst in self.binds.items():
            args.append(f"--bind-ro={src}:{dst}")
        self.boots += 1
        log = open(self.dir / f"nspawn-{self.boots}.log", "wb")
        self.nspawn = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, env=HOST_ENV)
        log.close()

        def leader() -> int:
            if self.nspawn.poll() is not None:
                raise AssertionError(f"{self.name}: systemd-nspawn exited with status "
                                     f"{self.nspawn.returncode}: {self.nspawn_log()}")
            for child in _children(self.nspawn.pid):
                if _comm(child) == "systemd":
                    return child
            return 0

        self.leader = int(wait_until(leader, BOOT_TIMEOUT_S, f"{self.name}'s systemd",
                                     interval=0.05))

        def booted() -> bool:
            r = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
            return r.stdout.strip() in ("running", "degraded")

        wait_until(booted, BOOT_TIMEOUT_S, f"{self.name} to finish booting")

    def nspawn_log(self) -> str:
        try:
            return (self.dir / f"nspawn-{self.boots}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def power_off(self, timeout: float = 30.0) -> Optional[int]:
        """Stop the container (a clean halt first), by the PID of its systemd-nspawn:
        SIGTERM, then SIGTERM again (immediate), then SIGKILL. Returns nspawn's status."""
        proc, self.nspawn = self.nspawn, None
        self.leader = 0
        if proc is None:
            return None
        for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGTERM, 5.0),
                            (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        return proc.poll()

    def wait_halted(self, timeout: float) -> int:
        """Wait for the container to end by itself (after `systemctl reboot` inside);
        returns systemd-nspawn's exit status (133 means "reboot requested")."""
        assert self.nspawn is not None
        try:
            rc = self.nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not halt within {timeout:g}s") from None
        self.nspawn = None
        self.leader = 0
        return rc

    def destroy(self) -> None:
        """Power off, unmount, delete: safe to call on a half-made host and twice."""
        try:
            self.power_off(timeout=15.0)
        finally:
            if self.mounted:
                r = subprocess.run(["umount", str(self.merged)], capture_output=True, timeout=30)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", str(self.merged)], capture_output=True,
                                   timeout=30)
                self.mounted = False
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- commands -----------------------------------------------------------------------

    def run(self, cmd: Union[str, Sequence[str]], *, input: Optional[str] = None,
            timeout: float = 120.0, check: bool = True, user: Optional[str] = None,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """Run cmd inside the host (a string goes to sh -c), as root or `user`."""
        if not self.leader:
            raise AssertionError(f"{self.name} is not running")
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if user:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                    "--reset-env"] + argv
        home = "/root" if not user else f"/home/{user}"
        full = ["nsenter", "-t", str(self.leader), "-a", "--wdns=/", "env", "-i",
                f"PATH={HOST_PATH}", f"HOME={home}", "LANG=C.UTF-8"]
        full += [f"{k}={v}" for k, v in (env or {}).items()] + argv
        try:
            r = subprocess.run(full, input=input, capture_output=True, text=True,
                               timeout=timeout, env=HOST_ENV)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{self.name}: {cmd!r} did not finish within {timeout:g}s; "
                                 f"output so far: {exc.stdout!r} {exc.stderr!r}") from None
        if check and r.returncode != 0:
            raise CommandFailed(f"{self.name}: {cmd!r} exited {r.returncode}\n--- stdout\n"
                                f"{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")
        return r

    def sh(self, cmd: str, **kw) -> str:
        """stdout of a shell command inside the host (which must succeed), stripped."""
        return self.run(cmd, **kw).stdout.strip()

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        self.run(f"umask 077; cat > {path} && chmod {mode:o} {path}", input=text)

    def unit(self, prop: str, unit: str = "node-agent.service") -> str:
        return self.sh(f"systemctl show -P {prop} {unit}")

    def agent_pid(self) -> int:
        return int(self.unit("MainPID") or 0)

    def journal(self, unit: str = "node-agent.service", since_boot: bool = True) -> str:
        args = "-b" if since_boot else ""
        return self.run(f"journalctl {args} -u {unit} --no-pager -o cat", check=False).stdout


def make_rootfs() -> str:
    """The cached root filesystem (built on first use: about 100 s)."""
    r = subprocess.run(["bash", str(HERE / "make_rootfs.sh")], capture_output=True, text=True,
                       timeout=900, env=HOST_ENV)
    if r.returncode != 0:
        raise RuntimeError(f"making the root filesystem failed: {r.stderr[-3000:]}")
    return r.stdout.strip().splitlines()[-1]


def build_deb(out_dir: str, version: Optional[str] = None) -> str:
    """Build the .deb from this checkout (packaging/build-deb.sh) into out_dir."""
    cmd = ["bash", str(REPO / "packaging" / "build-deb.sh"), "--out", out_dir]
    if version:
        cmd += ["--version", version]
    env = scrubbed_env(PATH=HOST_PATH)
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT",
                "PIP_DEFAULT_TIMEOUT", "PIP_CONFIG_FILE"):
        if key in os.environ:  # how this machine reaches its package index
            env[key] = os.environ[key]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=str(REPO))
    if r.returncode != 0:
        raise RuntimeError(f"packaging/build-deb.sh failed:\n{r.stderr[-4000:]}")
    return r.stdout.strip().splitlines()[-1].split(" ")[0]


def workdir() -> str:
    return tempfile.mkdtemp(prefix="na-system-", dir="/var/tmp")
