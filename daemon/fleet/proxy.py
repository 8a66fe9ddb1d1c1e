"""Fan-in of many workers' detection feeds into one endpoint: a ZeroMQ XSUB -> XPUB forwarder.

Subscribers connect to one place and see every worker's `det.<stream>` and `status` messages
unchanged (same topics, same payloads as a single daemon), and their subscriptions travel upstream
to the workers, so each worker's PUB still filters at the source.

Which side binds: a worker binds its PUB (`publish.endpoint`, exactly as a lone daemon does) and
the proxy connects to every worker (`>tcp://host:port`, CZMQ's prefix; plain endpoints bind). On
Kubernetes the workers are a StatefulSet behind a headless Service, so worker i is the stable name
codetr-stream-i.codetr-stream, which libzmq re-resolves on every reconnect when a pod moves. Because
each proxy connects to all workers, every proxy replica carries the whole feed: two behind one
ClusterIP Service give subscribers redundancy, which workers connecting to one proxy Service (one
pod each) could not. The forwarding loop runs inside libzmq (`zmq.proxy_steerable`); a control
socket stops it cleanly. Its capture socket (a PUB) feeds two readers: the subscriptions that
subscribers send go to a SubscriberGuard (subscribers.py) that bounds what they make the proxy
(and, upstream, the workers) hold; data messages go, only when asked for, to a thread that
reports the rate. The frontend may be a CURVE server and the backend a CURVE client of the
workers (curve.py).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import zmq
from codetr_stream.daemon.feed import curve
from codetr_stream.daemon.feed.subscribers import PeerLimits, SubscriberGuard

log = logging.getLogger(__name__)

DEFAULT_FRONTEND = "tcp://127.0.0.1:5560"  # subscribers connect here (XPUB)
# Below a worker's limits (10,000 distinct subscriptions, 512 KiB at once from one peer), so
# what the proxy forwards for all its subscribers never gets the proxy itself cut off.
PROXY_LIMITS = PeerLimits(max_peers=128, max_subscriptions=5_000,
                          peer_burst_bytes=64 * 1024, total_burst_bytes=256 * 1024)


def expand_endpoints(specs: Sequence[str], replicas: int) -> list[str]:
    """Each spec containing `{index}` once per worker 0..replicas-1, e.g. the StatefulSet pods
    `>tcp://codetr-stream-{index}.codetr-stream:5556`; other specs unchanged."""
    out: list[str] = []
    for spec in specs:
        out += [spec.format(index=i) for i in range(replicas)] if "{index}" in spec else [spec]
    return out


def attach(sock: zmq.Socket, spec: str) -> str:
    """Bind `spec`, or connect when it starts with '>'; returns the resolved endpoint."""
    if spec.startswith(">"):
        sock.connect(spec[1:])
        return spec[1:]
    endpoint = spec.removeprefix("@")
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ValueError(f"cannot bind {endpoint}: {exc}; pick a free port or address") from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


@dataclass
class Rate:
    """Worker -> subscriber traffic seen in one reporting window."""

    messages: int
    bytes: int
    seconds: float

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def megabytes_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


class Proxy:
    """XSUB (workers) -> XPUB (subscribers), forwarding in a background thread until stop()."""

    def __init__(
        self,
        frontend: Sequence[str],
        backend: Sequence[str],
        *,
        hwm: int = 10_000,
        stats_interval: float = 0.0,
        on_stats: Callable[[Rate], None] | None = None,
        limits: PeerLimits = PROXY_LIMITS,
        curve_secret_key: bytes | None = None,
        backend_server_key: bytes | None = None,
    ) -> None:
        self._context = zmq.Context()
        self._tag = uuid.uuid4().hex
        self._stats_interval = stats_interval
        self._on_stats = on_stats or _log_rate
        self._stopping = threading.Event()
        self._xpub = self._socket(zmq.XPUB, hwm)
        if curve_secret_key is not None:
            curve.serve(self._xpub, curve_secret_key)
        self.guard = SubscriberGuard(self._xpub, limits, name="proxy frontend")
        self._xsub = self._socket(zmq.XSUB, hwm)
        if backend_server_key is not None:
            curve.connect_to(self._xsub, backend_server_key)
        try:
            self.frontend = [attach(self._xpub, spec) for spec in frontend]
            self.backend = [attach(self._xsub, spec) for spec in backend]
        except ValueError:
            self.guard.close()
            self._context.destroy(linger=0)
            raise
        self._control = self._context.socket(zmq.PAIR)
        self._control.bind(f"inproc://control-{self._tag}")
        # PUB: a reader that falls behind drops its copies instead of stalling the feed.
        self._capture = self._context.socket(zmq.PUB)
        self._capture.setsockopt(zmq.SNDHWM, 100_000)
        self._capture.bind(f"inproc://capture-{self._tag}")
        self._threads = [threading.Thread(target=self._forward, name="proxy", daemon=True),
                         threading.Thread(target=self._watch_subscriptions,
                                          name="proxy-subscriptions", daemon=True)]
        if stats_interval > 0:
            self._threads.append(threading.Thread(target=self._count, name="proxy-stats",
                                                  daemon=True))

    def _socket(self, kind: int, hwm: int) -> zmq.Socket:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        # ZMTP heartbeats: a worker whose node vanished (no FIN, no RST) is noticed within
        # seconds and reconnected, re-resolving its DNS name to the rescheduled pod's address.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 5_000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15_000)
        return sock

    def start(self) -> Proxy:
        self.guard.start()
        for thread in self._threads:
            thread.start()
        return self

    def _forward(self) -> None:
        steer = self._context.socket(zmq.PAIR)
        steer.connect(f"inproc://control-{self._tag}")
        try:
            zmq.proxy_steerable(self._xsub, self._xpub, self._capture, steer)
        except zmq.ContextTerminated:
            pass
        finally:
            steer.close(0)

    def _capture_reader(self, *prefixes: bytes, hwm: int) -> zmq.Socket:
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, hwm)
        for prefix in prefixes:
            sub.setsockopt(zmq.SUBSCRIBE, prefix)
        sub.connect(f"inproc://capture-{self._tag}")
        return sub

    def _watch_subscriptions(self) -> None:
        """Every (un)subscription the frontend passes upstream, to the guard. Single frames
        starting 0/1 are subscriptions; the capture PUB filters everything else out. No limit
        on this queue (RCVHWM 0): the guard must see every one, and the guard's byte budget
        bounds how many a peer can send."""
        sub = self._capture_reader(b"\x00", b"\x01", hwm=0)
        try:
            while not self._stopping.is_set():
                if sub.poll(100):
                    while sub.poll(0):
                        self.guard.subscription(sub.recv())
        finally:
            sub.close(0)

    def _count(self) -> None:
        sub = self._capture_reader(b"", hwm=100_000)
        messages = nbytes = 0
        started = time.monotonic()
        try:
            while not self._stopping.is_set():
                if sub.poll(100):
                    frames = sub.recv_multipart(copy=False)
                    # Single frames starting 0/1 are subscriptions flowing upstream, not data.
                    if len(frames) > 1 or frames[0].bytes[:1] not in (b"\x00", b"\x01"):
                        messages += 1
                        nbytes += sum(len(frame) for frame in frames)
                now = time.monotonic()
                if now - started >= self._stats_interval:
                    self._on_stats(Rate(messages, nbytes, now - started))
                    messages = nbytes = 0
                    started = now
        finally:
            sub.close(0)

    def stop(self) -> None:
        """Stop forwarding and close every socket; messages in flight are dropped."""
        self._stopping.set()
        if self._threads[0].is_alive():
            self._control.send(b"TERMINATE")
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)
        self.guard.close()
        self._control.close(0)
        self._capture.close(0)
        self._xpub.close(0)
        self._xsub.close(0)
        self._context.term()


def _log_rate(rate: Rate) -> None:
    log.info("proxy: %.0f msg/s, %.2f MB/s", rate.messages_per_s, rate.megabytes_per_s)
