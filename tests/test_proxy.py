"""The proxy over real sockets: two workers reach one subscriber exactly once, filters too."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
from rtsp_server import free_port

zmq = pytest.importorskip("zmq")
from codetr_stream.daemon.publish import detection_topic, status_topic  # noqa: E402

PER_WORKER = 2000


@pytest.fixture()
def ports() -> dict[str, int]:
    return {"frontend": free_port(), "backend": free_port(), "worker_b": free_port()}


@pytest.fixture()
def proxy(ports: dict[str, int]):
    """`codetr-stream proxy` as its own process: worker A connects to it, it connects to B."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "codetr_stream.daemon.cli", "proxy",
         "--frontend", f"tcp://127.0.0.1:{ports['frontend']}",
         "--backend", f"tcp://127.0.0.1:{ports['backend']}",
         "--backend", f">tcp://127.0.0.1:{ports['worker_b']}",
         "--stats-interval", "0.5"],
        stderr=subprocess.PIPE, text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture()
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def make_workers(context, ports: dict[str, int]) -> list:
    a = context.socket(zmq.PUB)
    a.connect(f"tcp://127.0.0.1:{ports['backend']}")
    b = context.socket(zmq.PUB)
    b.bind(f"tcp://127.0.0.1:{ports['worker_b']}")
    for pub in (a, b):
        pub.setsockopt(zmq.SNDHWM, 100_000)
    return [a, b]


def make_subscriber(context, ports: dict[str, int], *topics: bytes):
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    for topic in topics:
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(f"tcp://127.0.0.1:{ports['frontend']}")
    return sub


def wait_until_joined(workers: list, sub, topic: bytes) -> None:
    """Publish hellos until the subscriber hears every worker: subscriptions took the long way."""
    heard: set[int] = set()
    deadline = time.monotonic() + 15
    while heard != set(range(len(workers))):
        assert time.monotonic() < deadline, f"heard only workers {heard} through the proxy"
        for i, pub in enumerate(workers):
            pub.send_multipart([topic, json.dumps({"hello": i}).encode()])
        while sub.poll(50):
            topic_in, payload = sub.recv_multipart()
            if topic_in == topic:
                heard.add(json.loads(payload)["hello"])
    while sub.poll(200):  # drain the remaining hellos
        sub.recv_multipart()


def collect(sub, expected: int, quiet_s: float = 1.0) -> list[tuple[bytes, dict]]:
    got = []
    while sub.poll(int(quiet_s * 1000)):
        topic, payload = sub.recv_multipart()
        got.append((topic, json.loads(payload)))
        if len(got) > expected:  # keep reading briefly: duplicates must show up too
            quiet_s = 0.2
    return got


def test_two_workers_reach_one_subscriber_exactly_once(proxy, ports, context) -> None:
    workers = make_workers(context, ports)
    sub = make_subscriber(context, ports, b"det.", b"status.")
    wait_until_joined(workers, sub, status_topic("hello"))
    payload_pad = "x" * 1500  # about one busy frame's detections
    for seq in range(PER_WORKER):
        for w, pub in enumerate(workers):
            stream = f"w{w}cam{seq % 4}"
            pub.send_multipart([detection_topic(stream),
                                json.dumps({"stream": stream, "frame": seq, "pad": payload_pad})
                                .encode()])
    got = collect(sub, 2 * PER_WORKER)
    keys = Counter((msg["stream"], msg["frame"]) for _, msg in got)
    assert len(keys) == 2 * PER_WORKER, f"{2 * PER_WORKER - len(keys)} messages lost"
    assert max(keys.values()) == 1, "a message arrived twice"
    assert all(topic == detection_topic(msg["stream"]) for topic, msg in got)
    # Per stream the order a worker published in is the order the subscriber sees.
    for stream in {msg["stream"] for _, msg in got}:
        frames = [msg["frame"] for _, msg in got if msg["stream"] == stream]
        assert frames == sorted(frames)

    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=10) == 0
    log = proxy.stderr.read()
    assert "msg/s" in log, log  # the capture counter reported a rate


def test_subscriptions_filter_through_the_proxy(proxy, ports, context) -> None:
    """XSUB forwards nothing it has no subscription for: anything at all arriving means the
    subscription travelled upstream to both workers; the terminator keeps cam10 out of cam1."""
    workers = make_workers(context, ports)
    sub = make_subscriber(context, ports, detection_topic("cam1"), b"status.")
    wait_until_joined(workers, sub, status_topic("hello"))
    for i in range(50):
        for w, pub in enumerate(workers):
            for stream in ("cam1", "cam10", "cam2"):
                pub.send_multipart([detection_topic(stream),
                                    json.dumps({"stream": stream, "frame": i, "w": w}).encode()])
    got = collect(sub, 100)
    assert {msg["stream"] for _, msg in got} == {"cam1"}
    assert len(got) == 100  # 50 from each worker

    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=10) == 0


def test_busy_port_fails_with_a_clear_error(ports) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["frontend"]))
        taken.listen()
        out = subprocess.run(
            [sys.executable, "-m", "codetr_stream.daemon.cli", "proxy",
             "--frontend", f"tcp://127.0.0.1:{ports['frontend']}",
             "--backend", f"tcp://127.0.0.1:{ports['backend']}"],
            capture_output=True, text=True, timeout=30,
        )
    assert out.returncode == 2
    assert f"cannot bind tcp://127.0.0.1:{ports['frontend']}" in out.stderr


def test_worker_template_expands_to_every_pod() -> None:
    from codetr_stream.daemon.proxy import expand_endpoints

    got = expand_endpoints([">tcp://codetr-stream-{index}.codetr-stream:5555",
                            "tcp://0.0.0.0:5559"], 3)
    assert got == [">tcp://codetr-stream-0.codetr-stream:5555",
                   ">tcp://codetr-stream-1.codetr-stream:5555",
                   ">tcp://codetr-stream-2.codetr-stream:5555", "tcp://0.0.0.0:5559"]
