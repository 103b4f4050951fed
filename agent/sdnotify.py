"""systemd's notify protocol and journald logging, without libsystemd.

systemd-python has no wheels (it compiles against libsystemd-dev), and
``sd_notify`` is one datagram on an AF_UNIX socket, so it is implemented here.
The journal handler is used only when ``systemd.journal`` happens to be
importable; otherwise stderr lines carry ``<N>`` priority prefixes, which
journald parses for a service's stdout/stderr stream.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Optional

#: Variables systemd gives us that children must not inherit (they would talk to
#: systemd as if they were the service, or write to our journal stream).
SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")


class Notifier:
    """Sends sd_notify messages to the socket systemd named at start-up.

    The environment is read once and then removed from os.environ, so processes
    the agent starts never see NOTIFY_SOCKET (as sd_notify(unset_environment=1)).
    """

    def __init__(self, environ: Optional[dict] = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET", "")
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self.journal_stream = env.get("JOURNAL_STREAM", "")
        if environ is None:
            for name in SYSTEMD_ENV:
                os.environ.pop(name, None)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def watchdog_interval(self) -> Optional[float]:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec), None when off."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *lines: str) -> bool:
        """Send "KEY=value" lines in one datagram; False when not under systemd.

        Errors are swallowed (and False returned): a missing notify socket must
        never take the agent down."""
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(addr)
                sock.sendall("\n".join(lines).encode())
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *( [f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


class WatchdogGate:
    """Decides whether the agent may tell systemd it is alive.

    A ping proves more than "the process exists" only if it depends on the work
    being done: the agent pings from its event loop (a hung loop sends nothing)
    and only while the supervisor's monitor thread has run recently (a hung
    monitor means nothing is being supervised, so systemd should restart us).
    """

    def __init__(self, heartbeat: Callable[[], float], max_age_s: float) -> None:
        self._heartbeat = heartbeat
        self.max_age_s = max_age_s

    def check(self, now: Optional[float] = None) -> Optional[str]:
        """None when healthy, else why no ping may be sent."""
        now = time.monotonic() if now is None else now
        age = now - self._heartbeat()
        if age > self.max_age_s:
            return (f"the supervisor's monitor loop has not run for {age:.1f}s "
                    f"(limit {self.max_age_s:g}s)")
        return None


def journal_handler(journal_stream: str) -> Optional[logging.Handler]:
    """systemd.journal.JournalHandler when we log to journald and it is importable."""
    if not journal_stream:
        return None
    try:
        from systemd import journal  # type: ignore[import-not-found]
    except ImportError:
        return None
    return journal.JournalHandler(SYSLOG_IDENTIFIER="node-agent")


class PriorityPrefixFormatter(logging.Formatter):
    """"<3>message": journald reads the syslog priority from the prefix, and adds
    the timestamp and pid itself."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                 logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prio = self._PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])
