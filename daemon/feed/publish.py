"""Detections out: a ZeroMQ PUB socket that never blocks the inference loop.

Messages are multipart `[topic, json]`. Topics end in `|` (TOPIC_END) because ZeroMQ filters by
prefix: a SUB for `det.cam1|` must not receive `det.cam10|`. Stream names cannot contain `|`.

- `det.<stream>|`: one FrameResult per processed frame.
- `status.<stream>|`: one StreamStatus per stream every `publish.status_interval_s`.
  Subscribe to `det.` for every stream's detections, `status.` for every heartbeat.

A slow or absent subscriber cannot slow the daemon: PUB queues at most SNDHWM messages per
subscriber and then drops *for that subscriber only*, inside ZeroMQ, without telling the sender;
every other subscriber keeps getting everything. Every message carries `seq`, a per-topic counter,
so a subscriber counts its own losses from the gaps (`subscribe()` does). Sends are non-blocking
as well, so even a socket option that makes ZeroMQ refuse (instead of drop) cannot stall a caller:
those refusals are counted in `refused`.

The socket is an XPUB, a PUB that also hands the subscriptions it receives to this process, so
a SubscriberGuard (subscribers.py) can bound what peers make it hold: their number, the bytes
they send and the number of distinct subscriptions. A thread of its own hands the guard the
subscriptions the socket reports at least every 50 ms, under the same lock as the senders. With
`curve_secret_key` the socket is a CURVE server (curve.py).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import zmq
from codetr_stream.daemon.feed import curve
from codetr_stream.daemon.feed.messages import FrameResult, StreamStatus
from codetr_stream.daemon.feed.subscribers import DEFAULT_LIMITS, PeerLimits, SubscriberGuard

if TYPE_CHECKING:
    from codetr_stream.daemon.config.schema import PublishConfig

TOPIC_END = "|"
WATCH_INTERVAL_S = 0.05
DRAIN_BATCH = 1000  # subscriptions handled per turn of the lock; more go round again at once


def detection_topic(stream: str) -> bytes:
    return f"det.{stream}{TOPIC_END}".encode()


def status_topic(stream: str) -> bytes:
    return f"status.{stream}{TOPIC_END}".encode()


class Publisher:
    """Bound XPUB socket; `publish` and `status` may be called from different threads."""

    def __init__(self, endpoint: str, hwm: int = 1000, *, context: zmq.Context | None = None,
                 limits: PeerLimits = DEFAULT_LIMITS, curve_secret_key: bytes | None = None):
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)  # shutdown must not wait for slow subscribers
        if curve_secret_key is not None:
            curve.serve(self._socket, curve_secret_key)
        self._guard = SubscriberGuard(self._socket, limits, name="publish")
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._guard.close()
            self._socket.close()
            raise OSError(
                f"cannot bind the ZeroMQ publisher to {endpoint}: {exc}; "
                "set publish.endpoint to a free address"
            ) from None
        # The resolved address, e.g. the port picked for tcp://127.0.0.1:0 or tcp://127.0.0.1:*.
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Lock()
        self._seq: defaultdict[bytes, int] = defaultdict(int)
        self._closing = threading.Event()
        self._guard.start()
        self._watcher = threading.Thread(target=self._watch, name="publish-subscriptions",
                                         daemon=True)
        self._watcher.start()

    @classmethod
    def from_config(cls, publish: PublishConfig) -> Publisher:
        """As configured by streams.yaml's `publish:` section."""
        secret = (curve.read_key(publish.curve_secret_key_file)
                  if publish.curve_secret_key_file is not None else None)
        limits = dataclasses.replace(DEFAULT_LIMITS, max_peers=publish.max_subscribers,
                                     max_subscriptions=publish.max_subscriptions)
        return cls(publish.endpoint, publish.sndhwm, limits=limits, curve_secret_key=secret)

    @property
    def subscribers(self) -> int:
        """Connected peers."""
        return self._guard.peers

    @property
    def subscriptions(self) -> int:
        """Distinct topics subscribed to, over all peers."""
        return self._guard.subscriptions

    @property
    def shut_down_peers(self) -> int:
        """Peers disconnected for passing a limit, since the start."""
        return self._guard.shut_down

    def _watch(self) -> None:
        """Hands the subscriptions the socket reports to the guard as they arrive."""
        more = False
        while not self._closing.wait(0 if more else WATCH_INTERVAL_S):
            with self._lock:
                if self._closing.is_set():
                    return
                more = self._drain()

    def _drain(self) -> bool:
        """Hand up to DRAIN_BATCH waiting subscriptions to the guard; True if more wait."""
        for _ in range(DRAIN_BATCH):
            try:
                message = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
            self._guard.subscription(message)
        return True

    def publish(self, result: FrameResult) -> bool:
        """Send one frame's detections; stamps `publish_ns` and `seq`. False if refused."""
        return self._send(detection_topic(result.stream), result)

    def status(self, status: StreamStatus) -> bool:
        """Send one stream's heartbeat; stamps `publish_ns` and `seq`. False if refused."""
        return self._send(status_topic(status.stream), status)

    def _send(self, topic: bytes, message: FrameResult | StreamStatus) -> bool:
        with self._lock:
            message.seq = self._seq[topic]
            self._seq[topic] += 1
            message.publish_ns = time.time_ns()
            try:
                self._socket.send_multipart([topic, message.to_json()], flags=zmq.NOBLOCK)
            except zmq.Again:
                return False
            return True

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._watcher.join()
        with self._lock:
            self._guard.close()
            self._socket.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
