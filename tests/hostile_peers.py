"""Peers that misbehave on purpose, written against the wire protocols so that no client library
keeps state of its own (a pyzmq SUB would hold every subscription it sends in its own trie).

- `ZmtpPeer`: a ZeroMQ SUB as raw ZMTP 3.0 over TCP (NULL mechanism): greeting, READY, then any
  frames the test wants, subscriptions of any size and number included.
- `half_sent_requests`: HTTP connections that send the start of a request and never finish it.

Both connect from a loopback address of their own choice (127.0.0.2 by default), so a test can
tell them apart from well-behaved clients on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterable, Iterator

ATTACKER = "127.0.0.2"


def zmtp_frame(body: bytes, *, command: bool = False) -> bytes:
    flags = 0x04 if command else 0x00
    if len(body) > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def zmtp_greeting() -> bytes:
    """ZMTP 3.0, NULL mechanism, as client: 64 bytes."""
    return b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + bytes(32)


def zmtp_ready(socket_type: bytes = b"SUB") -> bytes:
    name = b"Socket-Type"
    body = b"\x05READY" + bytes([len(name)]) + name + struct.pack(">I", len(socket_type))
    return zmtp_frame(body + socket_type, command=True)


def subscriptions(topics: Iterable[bytes]) -> bytes:
    """The frames that subscribe to each topic, concatenated (ZMTP 3.0 style: \\x01 + topic)."""
    return b"".join(zmtp_frame(b"\x01" + topic) for topic in topics)


class ZmtpPeer:
    """A raw ZMTP SUB connected to 127.0.0.1:`port`, handshake done (`handshaken` is False if
    the server hung up during it); `send` returns False once the server dropped it."""

    def __init__(self, port: int, *, source: str = ATTACKER) -> None:
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(zmtp_greeting() + zmtp_ready())
        self.handshaken = self._await_ready()

    def _await_ready(self) -> bool:
        """Read the server's greeting and READY (libzmq takes anything that arrives before it
        has sent its own READY for a handshake command, and drops the connection); False if
        the server hung up first."""
        received = b""
        while len(received) < 66 or len(received) < 66 + received[65]:
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                return False
            if not chunk:
                return False
            received += chunk
        return True

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
        except OSError:  # reset or broken pipe: disconnected by the server
            return False
        return True

    def dropped(self, timeout: float = 10.0) -> bool:
        """True once the server closes the connection (within `timeout` s); reads and discards
        what it sends meanwhile."""
        if not self.handshaken:
            return True
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except (TimeoutError, BlockingIOError):  # still connected (timeout 0: non-blocking)
            return False
        except OSError:
            return True
        return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ZmtpPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def half_sent_requests(port: int, count: int, *, source: str = ATTACKER,
                       start: bytes = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                       ) -> Iterator[list[socket.socket]]:
    """`count` connections to 127.0.0.1:`port`, each having sent `start` and nothing more (no
    blank line: the request never ends), held open for the block. Connections the server
    refuses or drops are kept too (closed), so the list always has `count` entries."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.settimeout(5)
            try:
                sock.connect(("127.0.0.1", port))
                sock.sendall(start)
            except OSError:
                pass
            held.append(sock)
        yield held
    finally:
        for sock in held:
            sock.close()
