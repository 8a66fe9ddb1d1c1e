"""The client side of publish.py: receive detections and heartbeats as parsed JSON.

    from codetr_stream.daemon.subscribe import subscribe
    for message in subscribe("tcp://127.0.0.1:5555", ["cam1"]):
        print(message["frame_index"], message["detections"])

Counts the messages this subscriber lost (ZeroMQ drops for a subscriber that falls SNDHWM
messages behind) from gaps in each topic's `seq`; a publisher restart (seq going back) is not a
loss. Subscriptions travel to the publisher asynchronously, so the first messages after
connecting may be missed: that is ZeroMQ's PUB/SUB, not a fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import zmq
from codetr_stream.daemon.detections import SCHEMA_VERSION
from codetr_stream.daemon.publish import detection_topic, status_topic


def topics(streams: Iterable[str] | None, *, status: bool) -> list[bytes]:
    """Subscription prefixes: every stream (`det.` / `status.`) or exactly the named ones."""
    if streams is None:
        return [b"status." if status else b"det."]
    if isinstance(streams, str):  # one name, not its characters
        streams = [streams]
    make = status_topic if status else detection_topic
    return [make(name) for name in streams]


class Subscription:
    """A connected SUB socket; `receive` returns one message dict, or None on timeout."""

    def __init__(
        self,
        endpoint: str,
        streams: Iterable[str] | None = None,
        *,
        status: bool = False,
        rcvhwm: int = 1000,
        context: zmq.Context | None = None,
    ) -> None:
        self._socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        # Messages queued here before ZeroMQ drops newer ones: low = only fresh messages.
        self._socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self._socket.connect(endpoint)
        for topic in topics(streams, status=status):
            self._socket.setsockopt(zmq.SUBSCRIBE, topic)
        self._next_seq: dict[str, int] = {}
        self.missed: dict[str, int] = {}  # topic -> messages lost by this subscriber

    def receive(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        timeout_ms = None if timeout_s is None else int(timeout_s * 1000)
        if not self._socket.poll(timeout_ms):
            return None
        frames = self._socket.recv_multipart()
        if len(frames) != 2:
            raise ValueError(f"expected [topic, payload], got {len(frames)} frames")
        topic, payload = frames[0].decode(), json.loads(frames[1])
        if payload.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"{topic}: schema_version {payload.get('schema_version')!r}, this client reads "
                f"{SCHEMA_VERSION}; use the codetr-stream version of the daemon"
            )
        self._count_losses(topic, payload["seq"])
        return payload

    def _count_losses(self, topic: str, seq: int) -> None:
        expected = self._next_seq.get(topic)
        if expected is not None and seq > expected:
            self.missed[topic] = self.missed.get(topic, 0) + seq - expected
        self._next_seq[topic] = seq + 1

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def subscribe(
    endpoint: str,
    streams: Iterable[str] | None = None,
    *,
    status: bool = False,
    idle_timeout_s: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield messages forever (all streams when `streams` is None; heartbeats when `status`).

    Raises TimeoutError when nothing arrives for `idle_timeout_s` seconds.
    """
    with Subscription(endpoint, streams, status=status) as subscription:
        while True:
            message = subscription.receive(idle_timeout_s)
            if message is None:
                raise TimeoutError(f"no message from {endpoint} for {idle_timeout_s} s")
            yield message
