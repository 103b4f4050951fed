"""Small network helpers: which address to use, who holds a port."""
from __future__ import annotations

import socket


def describe_port_holder(port: int) -> str:
    """'held by pid 123 (python3 ...)' for a listening TCP port, or '' when unknown."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid:
                    try:
                        proc = psutil.Process(conn.pid)
                        cmd = " ".join(proc.cmdline())[:120]
                        return f"port {port} is held by pid {conn.pid} ({cmd})"
                    except psutil.Error:
                        return f"port {port} is held by pid {conn.pid}"
                return f"port {port} is held by another process"
    except Exception:
        pass
    return ""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def split_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port) with a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"malformed address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:6379")
    return host, int(port)
