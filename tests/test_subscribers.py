"""What subscribers can make the publisher hold, attacked over real loopback TCP with raw ZMTP
peers (tests/hostile_peers.py) from 127.0.0.2 while a well-behaved subscriber on 127.0.0.1
keeps reading: size, number of connections and number of distinct subscriptions are bounded,
and the attacker's departure never stalls the publishing thread."""

from __future__ import annotations

import os
import random
import socket
import stat
import time
from collections.abc import Callable

import pytest
from codetr_stream.daemon.feed.messages import FrameResult
from codetr_stream.daemon.feed.publish import Publisher
from codetr_stream.daemon.feed.subscribe import Subscription
from codetr_stream.daemon.feed.subscribers import SUBSCRIPTION_MAX_BYTES, PeerLimits
from codetr_stream.daemon.monitoring.procstat import sample_process
from daemon_helpers import publishing
from fault_helpers import Recorder, wait_for
from hostile_peers import ZmtpPeer, subscriptions


def frame(index: int) -> FrameResult:
    return FrameResult("cam1", index, None, time.time_ns(), 640, 480)


def publish(pub: Publisher) -> Callable[[int], bool]:
    return lambda i: pub.publish(frame(i))


def port_of(pub: Publisher) -> int:
    return int(pub.endpoint.rsplit(":", 1)[1])


def receive_one(sub: Subscription, timeout: float = 5.0) -> dict:
    message = sub.receive(timeout)
    assert message is not None, "the well-behaved subscriber stopped receiving"
    return message


def test_a_subscription_longer_than_any_topic_disconnects_its_sender() -> None:
    with Publisher("tcp://127.0.0.1:0") as pub, ZmtpPeer(port_of(pub)) as peer:
        assert peer.send(subscriptions([b"det." + b"x" * SUBSCRIPTION_MAX_BYTES]))
        assert peer.dropped(), "a 517-byte subscription was accepted"
        assert pub.subscriptions == 0


@pytest.mark.parametrize("size", [8, 72])
def test_a_subscription_flood_is_cut_off_at_the_limit(size: int) -> None:
    """200,000 distinct topics (~740 MB of trie at 72 bytes): the sender is disconnected once it
    passes a limit, RSS stays within 64 MB, publishing never stalls, the subscriber on
    127.0.0.1 never misses a message, and the attacker's subscriptions go with it."""
    rng = random.Random(size)
    flood = subscriptions(rng.randbytes(size) for _ in range(200_000))
    with Publisher("tcp://127.0.0.1:0", limits=PeerLimits(max_subscriptions=1000)) as pub, \
            publishing(publish(pub), 0.01) as took:
        good = Recorder(pub.endpoint).start()
        try:
            wait_for(lambda: good.det("cam1"), 10, "the good subscriber receiving")
            rss_before = sample_process().rss_bytes
            with ZmtpPeer(port_of(pub)) as peer:
                peer.send(flood)
                assert peer.dropped(), "the flooding peer was never disconnected"
            wait_for(lambda: pub.subscriptions == 1, 10, "the attacker's subscriptions withdrawn")
            grown = (sample_process().rss_bytes - rss_before) / 2**20
            after = time.monotonic()
            wait_for(lambda: len(good.det_after("cam1", after)) >= 3, 10, "more messages")
        finally:
            good.stop()
    assert grown < 64, f"RSS grew {grown:.0f} MB"
    # A stall is what this guards against (~29 s when the flooding peer left, before the limits);
    # under a CPU-heavy neighbour on 2 cores, GIL hand-offs alone delayed one call by 0.7 s.
    assert max(took) < 2.0, f"a publish call took {max(took):.2f} s"
    seqs = [m.payload["seq"] for m in good.det("cam1")]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the good subscriber lost messages"


def test_connections_past_the_limit_are_shut_down() -> None:
    with Publisher("tcp://127.0.0.1:0", limits=PeerLimits(max_peers=5)) as pub:
        port = port_of(pub)
        peers = [ZmtpPeer(port) for _ in range(20)]
        try:
            dropped = sum(peer.dropped(timeout=2) for peer in peers[5:])
            assert dropped == 15
            assert not any(peer.dropped(timeout=0.2) for peer in peers[:5])
            assert pub.subscribers == 5
            held = [fd for fd in own_sockets() if local_port(fd) == port]
            assert len(held) <= 5 + 1  # the five peers and the listening socket
        finally:
            for peer in peers:
                peer.close()
        wait_for(lambda: pub.subscribers == 0, 10, "the peers' connections closed")
        with Subscription(pub.endpoint, ["cam1"]) as good, \
                publishing(publish(pub), 0.01):
            receive_one(good)


def own_sockets() -> list[int]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                fds.append(int(name))
        except OSError:
            continue
    return fds


def local_port(fd: int) -> int | None:
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            address = sock.getsockname()
    except OSError:
        return None
    return address[1] if isinstance(address, tuple) else None
