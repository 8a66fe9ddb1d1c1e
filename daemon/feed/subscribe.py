"""The client side of publish.py: receive detections and heartbeats as parsed JSON.

    from codetr_stream.daemon.feed.subscribe import subscribe
    for message in subscribe("tcp://127.0.0.1:5555", ["cam1"]):
        print(message["frame_index"], message["detections"])

Counts the messages this subscriber lost (ZeroMQ drops for a subscriber that falls SNDHWM
messages behind) from gaps in each topic's `seq`; a publisher restart (seq going back) is not a
loss. Subscriptions travel to the publisher asynchronously, so the first messages after
connecting may be missed: that is ZeroMQ's PUB/SUB, not a fault.

A message that is not `[topic, JSON object with an integer seq]` (another number of frames,
bytes that are not JSON, JSON nested too deep) is counted in `skipped` and passed over: one bad
message must not end a subscriber. Messages over MAX_MESSAGE_BYTES make ZeroMQ drop the
connection. A message of another schema_version is an error (ValueError): every message after
it would be misread. With `curve_server_key` the connection is CURVE-encrypted (curve.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

import zmq
from codetr_stream.daemon.feed import curve
from codetr_stream.daemon.feed.messages import SCHEMA_VERSION
from codetr_stream.daemon.feed.publish import detection_topic, status_topic

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a detection message is a few KB


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
        curve_server_key: bytes | None = None,
    ) -> None:
        self._socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        # Messages queued here before ZeroMQ drops newer ones: low = only fresh messages.
        self._socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        if curve_server_key is not None:
            curve.connect_to(self._socket, curve_server_key)
        self._socket.connect(endpoint)
        for topic in topics(streams, status=status):
            self._socket.setsockopt(zmq.SUBSCRIBE, topic)
        self._next_seq: dict[str, int] = {}
        self.missed: dict[str, int] = {}  # topic -> messages lost by this subscriber
        self.skipped = 0  # malformed messages passed over
        self.last_skipped: str | None = None  # why the latest one was

    def receive(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The next well-formed message, or None when `timeout_s` passes without one."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._socket.poll(None if left is None else int(left * 1000)):
                return None
            frames = self._socket.recv_multipart()
            try:
                topic, payload = _parse(frames)
            except _Malformed as exc:
                self.skipped += 1
                self.last_skipped = str(exc)
                continue
            if payload.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(
                    f"{topic}: schema_version {payload.get('schema_version')!r}, this client "
                    f"reads {SCHEMA_VERSION}; use the codetr-stream version of the daemon"
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


class _Malformed(ValueError):
    """Why a message is not [topic, JSON object with an integer seq]."""


def _parse(frames: list[bytes]) -> tuple[str, dict[str, Any]]:
    if len(frames) != 2:
        raise _Malformed(f"{len(frames)} frame(s), not [topic, payload]")
    try:
        topic = frames[0].decode()
        payload = json.loads(frames[1])
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError too
        raise _Malformed(f"not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(payload, dict):
        raise _Malformed(f"JSON {type(payload).__name__}, not an object")
    seq = payload.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise _Malformed("no integer seq")
    return topic, payload


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
