"""Limits on what the peers of a bound PUB/XPUB socket can make this process hold.

A ZeroMQ publisher keeps, for every connected peer, a file descriptor and a session, and for
every distinct subscription a chain of trie nodes (about 46 bytes per topic byte in libzmq 4.3).
libzmq bounds neither, so one SUB that subscribes to 100,000 random topics grows the process by
hundreds of MB, and the socket's thread stalls for seconds freeing them when that peer leaves
(docs/zeromq-limits.md has the measurements and the libzmq behaviour relied on here).
SubscriberGuard adds the bounds:

- size: ZMQ_MAXMSGSIZE disconnects a peer that sends a frame longer than SUBSCRIPTION_MAX_BYTES;
  subscriptions are topics (`status.<64 characters>|` is 72 bytes) and the largest handshake
  command (CURVE's INITIATE) stays under 300 bytes.
- peers: a socket monitor reports each accepted connection with its fd; past `max_peers` the new
  one is shut down at once.
- bytes: a subscriber sends its subscriptions (and heartbeats), nothing else, so the bytes it
  sends bound what it can make the socket hold. Each peer has a budget (a burst, then a
  trickle: PeerLimits), and all peers together share one. This guard's own thread wakes on
  every arrival (epoll on libzmq's fd, which it never reads) and shuts down a peer that
  overdraws its budget, or, when the shared one is overdrawn, the peer that spent the most of
  its own. That is the bound that holds against fast senders: libzmq applies subscriptions in a
  loop that runs as long as the sender keeps up, long before the application sees them.
- distinct subscriptions: the owner passes on what its XPUB reports, a topic when its first
  subscriber arrives and again when its last leaves, so the set kept here is the one in libzmq's
  trie; past `max_subscriptions` the peer that has sent the most bytes is shut down. This is the
  bound for many slow senders.

Shutting a peer down is shutdown(2) on a duplicate of its fd, checked first to be the same socket
that was accepted (inode), so a reused fd number is never touched; libzmq sees the hang-up and
frees the peer's state as usual. A shut-down SUB reconnects and resubscribes by itself; one that
behaves stays under every limit. What one socket can be made to hold is about
max_subscriptions + (total_burst_bytes + max_peers x 40 KiB) / 74 subscriptions of 72 bytes
(3.3 KB each): ~200 MB with the defaults if every peer bursts at once, ~25 MB by one peer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

SUBSCRIPTION_MAX_BYTES = 512
RECEIVE_BUFFER_BYTES = 16 * 1024  # kernel buffer per peer (Linux doubles it): what libzmq may
# still read after a cut, so a fast sender gets its budget + ~40 KiB in
SUBSCRIPTION_QUEUE = 100  # subscriptions queued per peer towards the socket's thread
BLAME_PAUSE_S = 5.0  # after a disconnect, while libzmq withdraws that peer's subscriptions
HANDSHAKE_TIMEOUT_MS = 5_000  # a connection that never completes the ZMTP handshake (libzmq: 30 s)
_TCP_INFO_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received in struct tcp_info (Linux >= 4.1)
_WARN_EVERY_S = 10.0


@dataclass(frozen=True)
class PeerLimits:
    """The bounds for one publishing socket (see the module docstring). The byte budgets'
    defaults let a proxy resubscribe 5,000 topics (~370 KiB) at once; a plain subscriber sends
    a few hundred bytes, then ZMTP heartbeats (~2 B/s) if it enables them."""

    max_peers: int = 64
    max_subscriptions: int = 10_000
    peer_burst_bytes: int = 512 * 1024
    total_burst_bytes: int = 1024 * 1024


DEFAULT_LIMITS = PeerLimits()
PEER_REFILL_BYTES_PER_S = 1024
TOTAL_REFILL_BYTES_PER_S = 16 * 1024


@dataclass
class Budget:
    """A token bucket of bytes: `burst` at once, refilled at `per_s`."""

    burst: float
    per_s: float
    tokens: float = -1.0  # -1: full
    seen: float = 0.0

    def spend(self, amount: float, now: float) -> float:
        """Take `amount`; returns what is left (negative: overdrawn)."""
        if self.tokens == -1.0:
            self.tokens, self.seen = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.seen) * self.per_s) - amount
        self.seen = now
        return self.tokens


@dataclass
class _Peer:
    inode: int  # of the socket libzmq accepted: tells it from a later one with the same fd
    remote: object  # getpeername(), for log lines
    order: int  # accept order
    received: int  # bytes received when last looked at
    budget: Budget


@dataclass
class _Warnings:
    """At most one log line per reason every _WARN_EVERY_S, with the count since the last."""

    last: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def warn(self, reason: str, message: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self.last.get(reason, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            log.warning("%s (%d time(s) in the last %.0f s)", message, self.counts[reason],
                        _WARN_EVERY_S)
            self.last[reason] = now
            self.counts[reason] = 0


_MONITOR_NUMBERS = itertools.count()  # inproc monitor endpoints, unique per process


class SubscriberGuard:
    """Bounds the peers, their bytes and the distinct subscriptions of one bound PUB/XPUB.

    Create it before the socket binds and `start()` it after; feed `subscription(message)` with
    what the XPUB (or a capture of it) delivers, from one thread at a time; `close()` before the
    socket closes. Its own thread watches connections and bytes and never touches the socket.
    """

    def __init__(self, sock: zmq.Socket, limits: PeerLimits, *, name: str) -> None:
        self.limits = limits
        self.name = name  # for log lines: "publish", "proxy frontend"
        self._socket = sock
        sock.setsockopt(zmq.MAXMSGSIZE, SUBSCRIPTION_MAX_BYTES)
        sock.setsockopt(zmq.RCVHWM, SUBSCRIPTION_QUEUE)
        sock.setsockopt(zmq.RCVBUF, RECEIVE_BUFFER_BYTES)
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_TIMEOUT_MS)
        # Not get_monitor_socket(): its queue holds 2,000 events and libzmq drops the rest, so a
        # burst of connections would go unseen (and unrefused). This one has no limit.
        # A name never used before in this process: an id() is reused once its object is
        # gone, possibly before libzmq has let go of the earlier monitor's inproc endpoint
        # ("Address already in use", seen in a fresh-clone test run).
        address = f"inproc://subscriber-guard-{next(_MONITOR_NUMBERS)}"
        sock.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._monitor = sock.context.socket(zmq.PAIR)
        self._monitor.setsockopt(zmq.RCVHWM, 0)
        self._monitor.connect(address)
        self._epoll = select.epoll()
        # Wakes the guard the moment an event is queued (ZMQ_FD signals edges; drained below).
        self._epoll.register(self._monitor.getsockopt(zmq.FD), select.EPOLLIN | select.EPOLLET)
        self._lock = threading.Lock()
        self._peers: dict[int, _Peer] = {}
        self._accepted = itertools.count()
        self._topics: set[bytes] = set()
        self._total = Budget(limits.total_burst_bytes, TOTAL_REFILL_BYTES_PER_S)
        self._blame_pending_until = 0.0
        self._warnings = _Warnings()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name=f"{name.replace(' ', '-')}-peers")
        self.shut_down = 0  # peers this guard has disconnected

    @property
    def peers(self) -> int:
        return len(self._peers)

    @property
    def subscriptions(self) -> int:
        """Distinct topics the socket holds subscriptions for."""
        return len(self._topics)

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        swept = time.monotonic()
        while not self._stop.is_set():
            ready = self._epoll.poll(0.1)
            self._monitor_events()
            now = time.monotonic()
            with self._lock:
                for fd, _ in ready:
                    self._charge(fd, now)
                if now - swept >= 1.0:
                    self._sweep()
                    swept = now

    def _sweep(self) -> None:
        """Forget peers whose socket libzmq has closed unnoticed (a lost DISCONNECTED event),
        so that they no longer count against max_peers."""
        for fd, peer in list(self._peers.items()):
            try:
                alive = os.fstat(fd).st_ino == peer.inode
            except OSError:
                alive = False
            if not alive:
                del self._peers[fd]

    def _monitor_events(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            fd = int(event["value"])
            with self._lock:
                if event["event"] == zmq.EVENT_ACCEPTED:
                    self._admit(fd)
                elif self._peers.pop(fd, None) is not None:
                    _forget(self._epoll, fd)

    def _admit(self, fd: int) -> None:
        try:
            with _duplicate(fd) as sock:
                inode = os.fstat(sock.fileno()).st_ino
                remote = sock.getpeername()
                received = _bytes_received(sock)
        except OSError:  # gone already
            return
        peer = _Peer(inode, remote, next(self._accepted), received,
                     Budget(self.limits.peer_burst_bytes, PEER_REFILL_BYTES_PER_S))
        if len(self._peers) >= self.limits.max_peers:
            self._warnings.warn("peers", f"{self.name}: {self.limits.max_peers} subscribers "
                                "connected (the limit): refusing more")
            self._shut_down(fd, peer, admitted=False)
            return
        self._peers[fd] = peer
        try:  # libzmq's own fd, edge-triggered: no reference held, gone when libzmq closes it
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        except OSError:
            self._peers.pop(fd)

    def _charge(self, fd: int, now: float) -> None:
        """Bill the peer on `fd` for what it sent since last time; shut it down when it (or,
        for the shared budget, the peer that spent the most of its own) is overdrawn."""
        peer = self._peers.get(fd)
        if peer is None:
            return
        try:
            with _duplicate(fd) as sock:
                if os.fstat(sock.fileno()).st_ino != peer.inode:
                    raise OSError("not the accepted socket any more")
                received = _bytes_received(sock)
        except OSError:
            self._peers.pop(fd)
            return
        sent, peer.received = received - peer.received, received
        if peer.budget.spend(sent, now) < 0:
            self._warnings.warn("bytes", f"{self.name}: {_address(peer)} sent more than "
                                f"{peer.budget.burst / 1024:.0f} KiB of subscriptions at once: "
                                "disconnected")
            self._shut_down(fd, self._peers.pop(fd))
        if self._total.spend(sent, now) < 0 and self._peers:
            fd = min(self._peers, key=lambda f: self._peers[f].budget.spend(0, now))
            self._warnings.warn("total", f"{self.name}: subscribers sent more than "
                                f"{self._total.burst / 1024:.0f} KiB of subscriptions at once: "
                                f"disconnecting {_address(self._peers[fd])}, which sent the most")
            self._shut_down(fd, self._peers.pop(fd))

    def subscription(self, message: bytes) -> None:
        """One message an XPUB delivered: b"\\x01topic" (first subscriber of topic), b"\\x00topic"
        (its last subscriber left); anything else a peer sent is ignored."""
        if message[:1] == b"\x00":
            self._topics.discard(message[1:])
        elif message[:1] == b"\x01":
            self._topics.add(message[1:])
        if (len(self._topics) > self.limits.max_subscriptions
                and time.monotonic() >= self._blame_pending_until):
            self._shut_down_heaviest()

    def _shut_down_heaviest(self) -> None:
        """Disconnect the peer that sent the most bytes: it holds most of the subscriptions."""
        with self._lock:
            weights = {}
            for fd, peer in self._peers.items():
                try:
                    with _duplicate(fd) as sock:
                        weights[fd] = (_bytes_received(sock), peer.order)
                except OSError:
                    continue
            if not weights:
                return
            fd = max(weights, key=weights.__getitem__)
            self._warnings.warn("subscriptions", f"{self.name}: more than "
                                f"{self.limits.max_subscriptions} distinct subscriptions: "
                                f"disconnecting {_address(self._peers[fd])}, which sent the most")
            self._shut_down(fd, self._peers.pop(fd))

    def _shut_down(self, fd: int, peer: _Peer, *, admitted: bool = True) -> None:
        """Caller holds the lock. An admitted peer's subscriptions are withdrawn a little later,
        when libzmq has seen it go: until then (5 s at most) nobody else is blamed for them."""
        if admitted:
            now = time.monotonic()
            self._blame_pending_until = now + BLAME_PAUSE_S
            # What it spent lately leaves with it: the shared budget only counts peers present.
            spent = peer.budget.burst - peer.budget.spend(0, now)
            self._total.tokens = min(self._total.burst, self._total.spend(0, now) + spent)
        _forget(self._epoll, fd)
        try:
            with _duplicate(fd) as sock:
                if os.fstat(sock.fileno()).st_ino == peer.inode:
                    sock.shutdown(socket.SHUT_RDWR)
                    self.shut_down += 1
        except OSError:  # closed meanwhile: nothing to do
            pass

    def close(self) -> None:
        """Stop watching (the socket itself is the owner's to close)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._epoll.close()


def _duplicate(fd: int) -> socket.socket:
    """A socket object on a duplicate of `fd`: ours to close, the connection stays libzmq's."""
    return socket.socket(fileno=os.dup(fd))


def _forget(epoll: select.epoll, fd: int) -> None:
    with contextlib.suppress(OSError, ValueError):  # closed, or another socket's fd by now
        epoll.unregister(fd)


def _bytes_received(sock: socket.socket) -> int:
    """What the peer sent over TCP so far (0 where unknown: ipc://, or a kernel before 4.1)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return 0
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < _TCP_INFO_BYTES_RECEIVED + 8:
        return 0
    return struct.unpack_from("=Q", info, _TCP_INFO_BYTES_RECEIVED)[0]


def _address(peer: _Peer) -> str:
    remote = peer.remote
    return f"{remote[0]}:{remote[1]}" if isinstance(remote, tuple) else "a local peer"
