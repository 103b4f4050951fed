"""A gRPC call written by hand on a plain socket: for headers no gRPC client will send.

grpc's own clients refuse to send a non-ASCII header value, so a test of how our
servers treat one (tests/test_security_net.py) needs HTTP/2 spoken by hand. This
is the least of it: the connection preface, one HEADERS frame whose fields are
HPACK literals (never Huffman-coded, never indexed), an optional DATA frame,
then frames are read until the stream ends. The reply's header block is decoded
with HPACK's static table and a dynamic table; grpc core writes plain (not
Huffman-coded) strings for the fields read here (grpc-status, grpc-message).

`idle_connections` opens connections that complete the HTTP/2 handshake and then
carry nothing: what a flood of idle connections costs a server.
"""
from __future__ import annotations

import selectors
import socket
import struct
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["GrpcReply", "call", "idle_connections", "closed_by_peer"]

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = (
    0, 1, 3, 4, 6, 7, 8, 9)
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 7541 appendix A (names are all a test needs; values only where a status is read).
_STATIC: List[Tuple[bytes, bytes]] = [(b"", b"")] + [
    (name.encode(), value.encode()) for name, value in (
        (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"),
        (":path", "/index.html"), (":scheme", "http"), (":scheme", "https"), (":status", "200"),
        (":status", "204"), (":status", "206"), (":status", "304"), (":status", "400"),
        (":status", "404"), (":status", "500"), ("accept-charset", ""),
        ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""),
        ("accept", ""), ("access-control-allow-origin", ""), ("age", ""), ("allow", ""),
        ("authorization", ""), ("cache-control", ""), ("content-disposition", ""),
        ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
        ("content-location", ""), ("content-range", ""), ("content-type", ""), ("cookie", ""),
        ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
        ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
        ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""),
        ("max-forwards", ""), ("proxy-authenticate", ""), ("proxy-authorization", ""),
        ("range", ""), ("referer", ""), ("refresh", ""), ("retry-after", ""), ("server", ""),
        ("set-cookie", ""), ("strict-transport-security", ""), ("transfer-encoding", ""),
        ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""))]


class GrpcReply:
    """What came back on the stream: header fields (response headers and trailers
    together), the DATA bytes, and how the stream or connection ended."""

    def __init__(self) -> None:
        self.headers: Dict[bytes, bytes] = {}
        self.data = b""
        self.reset_code: Optional[int] = None
        self.goaway = False
        self.closed = False

    @property
    def status(self) -> Optional[int]:
        raw = self.headers.get(b"grpc-status")
        return int(raw) if raw is not None else None

    @property
    def message(self) -> str:
        from urllib.parse import unquote_to_bytes

        return unquote_to_bytes(self.headers.get(b"grpc-message", b"")).decode("utf-8", "replace")

    def __repr__(self) -> str:
        return (f"GrpcReply(status={self.status}, message={self.message!r}, "
                f"reset={self.reset_code}, goaway={self.goaway}, closed={self.closed})")


def _int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """'Literal Header Field without Indexing - New Name', no Huffman coding."""
    return b"\x00" + _int(len(name), 7) + name + _int(len(value), 7) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


class _Decoder:
    def __init__(self) -> None:
        self.dynamic: List[Tuple[bytes, bytes]] = []

    def _read_int(self, data: bytes, pos: int, prefix_bits: int) -> Tuple[int, int]:
        limit = (1 << prefix_bits) - 1
        value = data[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            b = data[pos]
            pos += 1
            value += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value, pos

    def _read_str(self, data: bytes, pos: int) -> Tuple[bytes, int]:
        huffman = data[pos] & 0x80
        n, pos = self._read_int(data, pos, 7)
        raw = data[pos:pos + n]
        return (b"<huffman>" if huffman else raw), pos + n

    def _entry(self, index: int) -> Tuple[bytes, bytes]:
        if index < len(_STATIC):
            return _STATIC[index]
        return self.dynamic[index - len(_STATIC)]

    def decode(self, block: bytes) -> List[Tuple[bytes, bytes]]:
        out = []
        pos = 0
        while pos < len(block):
            b = block[pos]
            if b & 0x80:  # indexed field
                index, pos = self._read_int(block, pos, 7)
                out.append(self._entry(index))
                continue
            if b & 0xE0 == 0x20:  # dynamic table size update
                _, pos = self._read_int(block, pos, 5)
                continue
            indexing = b & 0xC0 == 0x40
            index, pos = self._read_int(block, pos, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, pos = self._read_str(block, pos)
            value, pos = self._read_str(block, pos)
            if indexing:
                self.dynamic.insert(0, (name, value))
            out.append((name, value))
        return out


def _recv_exact(sock: socket.socket, n: int) -> Optional[bytes]:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def call(address: Tuple[str, int], path: str, headers: Sequence[Tuple[Union[str, bytes], Union[str, bytes]]],
         message: bytes = b"", timeout: float = 10.0) -> GrpcReply:
    """One gRPC call on stream 1 of a fresh connection to `address` (loopback only); `headers`
    go out byte for byte after the pseudo-headers, so any value can be sent."""
    assert address[0].startswith("127."), "tests talk to loopback only"

    def b(x: Union[str, bytes]) -> bytes:
        return x if isinstance(x, bytes) else x.encode("latin-1")

    block = b"".join(_literal(b(k), b(v)) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", path),
        (":authority", f"{address[0]}:{address[1]}"), ("content-type", "application/grpc"),
        ("te", "trailers"), *headers))
    reply = GrpcReply()
    decoder = _Decoder()
    deadline = time.monotonic() + timeout
    with socket.create_connection(address, timeout=timeout) as sock:
        body = b"\x00" + struct.pack(">I", len(message)) + message
        sock.sendall(_PREFACE + _frame(_SETTINGS, 0, 0)
                     + _frame(_HEADERS, _END_HEADERS, 1, block)
                     + _frame(_DATA, _END_STREAM, 1, body))
        pending = b""
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                head = _recv_exact(sock, 9)
            except (ConnectionResetError, socket.timeout):
                head = None
            if head is None:
                reply.closed = True
                break
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = _recv_exact(sock, length) or b""
            if kind == _SETTINGS and not flags & _ACK:
                sock.sendall(_frame(_SETTINGS, _ACK, 0))
            elif kind == _PING and not flags & _ACK:
                sock.sendall(_frame(_PING, _ACK, 0, payload))
            elif kind == _GOAWAY:
                reply.goaway = True
                break
            elif stream != 1:
                continue
            elif kind in (_HEADERS, _CONTINUATION):
                if kind == _HEADERS:
                    pad = 0
                    if flags & _PADDED:
                        pad = payload[0]
                        payload = payload[1:]
                    if flags & _PRIORITY:
                        payload = payload[5:]
                    if pad:
                        payload = payload[:-pad]
                pending += payload
                if flags & _END_HEADERS:
                    reply.headers.update(decoder.decode(pending))
                    pending = b""
                if flags & _END_STREAM:
                    break
            elif kind == _DATA:
                reply.data += payload
                if flags & _END_STREAM:
                    break
            elif kind == _RST_STREAM:
                reply.reset_code = int.from_bytes(payload[:4], "big")
                break
    return reply


def idle_connections(address: Tuple[str, int], n: int,
                     timeout: float = 60.0) -> Tuple[List[socket.socket], int]:
    """`n` connections to a gRPC server at `address` (loopback only) that open no stream.

    Each sends the preface and an empty SETTINGS frame, then acknowledges the server's
    SETTINGS, so that no settings timeout of the server's closes it: only an idle timeout
    can. Returns the sockets (non-blocking; the caller closes them) and how many got the
    server's SETTINGS within `timeout`; the rest were never accepted (a server out of fds
    leaves them in its listen backlog).
    """
    assert address[0].startswith("127."), "tests talk to loopback only"
    hello = _PREFACE + _frame(_SETTINGS, 0, 0)
    socks: List[socket.socket] = []
    waiting = selectors.DefaultSelector()
    try:
        for _ in range(n):
            s = socket.create_connection(address, timeout=10)
            socks.append(s)
            s.sendall(hello)
            s.setblocking(False)
            waiting.register(s, selectors.EVENT_READ)
        answered = 0
        deadline = time.monotonic() + timeout
        while waiting.get_map() and time.monotonic() < deadline:
            for key, _mask in waiting.select(max(0.0, min(1.0, deadline - time.monotonic()))):
                s = key.fileobj
                waiting.unregister(s)
                try:
                    first = s.recv(4096)
                except OSError:
                    continue
                if len(first) >= 9 and first[3] == _SETTINGS and not first[4] & _ACK:
                    s.sendall(_frame(_SETTINGS, _ACK, 0))
                    answered += 1
    except BaseException:
        for s in socks:
            s.close()
        raise
    finally:
        waiting.close()
    return socks, answered


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the peer has closed a non-blocking socket (what it sent before, such as a
    GOAWAY, is read and dropped)."""
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError:  # reset
            return True
        if not data:
            return True
