"""The health server over real HTTP on loopback: /healthz, /metrics, snapshots, isolation."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
from codetr_stream.daemon.feed.messages import Detection
from codetr_stream.daemon.monitoring.health import (
    HealthServer,
    Liveness,
    SnapshotStore,
    annotate,
    read_token,
)
from codetr_stream.daemon.monitoring.metrics import Metrics
from daemon_helpers import timed_get as get_url
from fault_helpers import wait_for
from hostile_peers import ATTACKER, half_sent_requests
from PIL import Image


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Service:
    """The state a running service shares with its health server."""

    clock: Clock
    liveness: Liveness
    metrics: Metrics
    snapshots: SnapshotStore
    server: HealthServer

    def get(self, path: str) -> tuple[int, str, bytes]:
        host, port = self.server.address
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers["Content-Type"], error.read()


@pytest.fixture
def service() -> Iterator[Service]:
    clock = Clock()
    liveness = Liveness(loop_timeout_s=10, clock=clock)
    metrics = Metrics(clock=clock)
    snapshots = SnapshotStore(interval_s=1.0, clock=clock, max_width=None)
    with HealthServer(liveness=liveness, metrics=metrics, snapshots=snapshots, port=0) as server:
        yield Service(clock, liveness, metrics, snapshots, server)


def gray(height: int = 120, width: int = 160) -> np.ndarray:
    return np.full((height, width, 3), 128, np.uint8)


PERSON = Detection(class_id=0, class_name="person", score=0.87, box=(40.0, 40.0, 120.0, 100.0))


def test_binds_loopback_by_default(service: Service) -> None:
    assert service.server.address[0] == "127.0.0.1"
    assert service.server.address[1] > 0


def test_healthz_is_503_until_the_engine_is_warm_and_the_loop_beats(service: Service) -> None:
    status, ctype, body = service.get("/healthz")
    assert status == 503 and ctype == "application/json"
    assert json.loads(body)["status"] == "starting"
    service.liveness.set_engine_warm()
    status, _, body = service.get("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    service.clock.now += 10.5  # warm, but the main loop never beat
    assert service.get("/healthz")[0] == 503


def test_healthz_turns_503_when_the_main_loop_stops(service: Service) -> None:
    service.liveness.set_engine_warm()
    service.liveness.beat()
    service.clock.now += 10.5
    status, _, body = service.get("/healthz")
    report = json.loads(body)
    assert status == 503 and report["status"] == "stalled" and report["loop_age_s"] == 10.5
    service.liveness.beat()
    assert service.get("/healthz")[0] == 200


def test_healthz_reports_each_stream_with_its_frame_age(service: Service) -> None:
    service.liveness.set_engine_warm()
    service.liveness.beat()
    service.liveness.set_stream("cam1", "streaming", width=1920, height=1080)
    service.liveness.set_stream("cam2", "reconnecting", attempt=3)
    service.metrics.stream("cam1").decoded()
    service.metrics.stream("cam2")
    service.clock.now += 2
    service.liveness.beat()
    status, _, body = service.get("/healthz")
    streams = json.loads(body)["streams"]
    assert status == 200  # a camera down is reported, not a reason to restart the service
    assert streams["cam1"] == {"state": "streaming", "width": 1920, "height": 1080,
                               "last_frame_age_s": 2.0}
    assert streams["cam2"]["state"] == "reconnecting" and streams["cam2"]["attempt"] == 3
    service.liveness.set_stream("cam2", "reconnecting", error="401 from rtsp://admin:hunter2@cam")
    assert b"hunter2" not in service.get("/healthz")[2]
    service.liveness.remove_stream("cam2")
    assert "cam2" not in json.loads(service.get("/healthz")[2])["streams"]


def test_metrics_endpoint_serves_the_exposition(service: Service) -> None:
    service.metrics.stream("cam1").published(3)
    status, ctype, body = service.get("/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert 'codetr_stream_frames_published_total{stream="cam1"} 3.0' in body.decode()


def test_snapshot_is_the_annotated_latest_frame(service: Service) -> None:
    service.snapshots.put("cam1", gray(), [PERSON])
    status, ctype, body = service.get("/snapshot/cam1.jpg")
    assert status == 200 and ctype == "image/jpeg"
    image = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)
    assert image.shape == (120, 160, 3)
    assert np.abs(image[70, 40] - 128).sum() > 60  # the box's left edge is drawn
    assert np.abs(image[70, 80] - 128).sum() < 20  # its inside is untouched
    assert np.abs(image[30, 50] - 128).sum() > 60  # the label sits above the box
    service.snapshots.put("cam1", gray(60, 80), [])
    newer = Image.open(io.BytesIO(service.get("/snapshot/cam1.jpg")[2]))
    assert newer.size == (80, 60)


def test_snapshot_404_for_unknown_and_503_before_the_first_frame(service: Service) -> None:
    assert service.get("/snapshot/nope.jpg")[0] == 404
    service.liveness.set_stream("cam3", "connecting")
    assert service.get("/snapshot/cam3.jpg")[0] == 503
    assert service.get("/snapshot/../etc/passwd.jpg")[0] == 404
    assert service.get("/nothing-here")[0] == 404


def test_snapshot_is_due_once_per_interval(service: Service) -> None:
    store = service.snapshots
    assert store.due("cam1")
    store.put("cam1", gray(), [])
    assert not store.due("cam1")
    service.clock.now += 1.0
    assert store.due("cam1")
    store.remove("cam1")
    assert store.jpeg("cam1") is None


def test_a_client_that_never_finishes_its_request_blocks_nobody(service: Service) -> None:
    service.liveness.set_engine_warm()
    service.liveness.beat()
    with socket.create_connection(service.server.address, timeout=5) as stuck:
        stuck.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the blank line
        assert service.get("/healthz")[0] == 200


def test_stop_closes_the_port_and_ends_the_thread() -> None:
    before = threading.active_count()
    server = HealthServer(liveness=Liveness(), metrics=Metrics(), snapshots=SnapshotStore(),
                          port=0).start()
    address = server.address
    server.stop()
    server.stop()
    assert threading.active_count() == before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5)


def test_a_taken_port_is_a_clear_error(service: Service) -> None:
    with pytest.raises(OSError, match=r"health\.port"):
        HealthServer(liveness=Liveness(), metrics=Metrics(), snapshots=SnapshotStore(),
                     port=service.server.address[1]).start()


def test_annotate_downscales_boxes_with_the_image() -> None:
    wide = np.zeros((400, 1000, 3), np.uint8)
    det = Detection(class_id=2, class_name="car", score=0.5, box=(500.0, 200.0, 900.0, 380.0))
    image = np.asarray(Image.open(io.BytesIO(annotate(wide, [det], max_width=500))))
    assert image.shape == (200, 500, 3)
    assert image[150, 250].sum() > 150  # box left edge at x = 500 * 0.5
    assert image[150, 200].sum() < 30


def test_annotate_draws_an_inverted_box_instead_of_failing() -> None:
    det = Detection(class_id=1, class_name="bicycle", score=0.4, box=(120.0, 100.0, 40.0, 40.0))
    image = np.asarray(Image.open(io.BytesIO(annotate(gray(), [det]))).convert("RGB")).astype(int)
    assert np.abs(image[70, 40] - 128).sum() > 60


def test_annotate_rejects_non_rgb_input() -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        annotate(np.zeros((4, 4), np.float32), [])


# ---- hostile clients: bounded connections, timeouts, quiet hang-ups, escaped logs, token ----


@contextmanager
def server(**options) -> Iterator[Service]:
    clock = Clock()
    liveness = Liveness(loop_timeout_s=10, clock=clock)
    liveness.set_engine_warm()
    metrics = Metrics(clock=clock)
    snapshots = SnapshotStore(interval_s=1.0, clock=clock, max_width=None)
    with HealthServer(liveness=liveness, metrics=metrics, snapshots=snapshots, port=0,
                      **options) as health:
        yield Service(clock, liveness, metrics, snapshots, health)


def timed_get(service: Service, path: str = "/healthz",
              headers: dict[str, str] | None = None) -> tuple[int, float]:
    host, port = service.server.address
    return get_url(f"http://{host}:{port}{path}", headers)


def held_connections(port: int, peer: str) -> int:
    """Server-side sockets of this process connected to `peer` on local `port`."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            with socket.socket(fileno=os.dup(int(name))) as sock:
                local, remote = sock.getsockname(), sock.getpeername()
        except OSError:
            continue
        if local[1] == port and remote[0] == peer:
            count += 1
    return count


def test_half_sent_requests_cannot_lock_out_a_probe() -> None:
    """300 connections that never finish their request (slowloris) against 16 slots: each new
    probe evicts the oldest of them, answers at once, and the server never holds more than 16."""
    with server(max_connections=16, request_timeout_s=30) as service, \
            half_sent_requests(service.server.address[1], 300):
        answers = [timed_get(service) for _ in range(5)]
        held = held_connections(service.server.address[1], ATTACKER)
    assert all(status == 200 for status, _ in answers), answers
    assert max(took for _, took in answers) < 1.0, answers
    assert held <= 16, held


def test_a_request_trickled_in_slower_than_the_timeout_is_cut() -> None:
    with server(request_timeout_s=1.0) as service, \
            socket.create_connection(service.server.address, timeout=5) as slow:
        started = time.monotonic()
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
            try:
                slow.sendall(bytes([byte]))
                time.sleep(0.2)
            except OSError:
                closed = True
                break
        if not closed:  # everything sent: the server must have hung up by now
            closed = slow.recv(1024) == b""
        took = time.monotonic() - started
    assert closed and took < 3.0, took


def test_200_clients_at_once_are_all_answered_promptly() -> None:
    """Socketserver's backlog of 5 made some of 200 simultaneous clients wait for SYN retries
    (1 s, 3 s, 7 s, ...); with a backlog of 128 and 64 slots none waits."""
    with server() as service:
        results: list[tuple[int, float]] = []
        threads = [threading.Thread(target=lambda: results.append(timed_get(service)))
                   for _ in range(200)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(results) == 200 and {status for status, _ in results} == {200}
    assert max(took for _, took in results) < 1.0, max(took for _, took in results)


def test_control_characters_in_a_request_line_are_escaped_in_the_log(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="codetr_stream.daemon.monitoring.health")
    with server() as service, socket.create_connection(service.server.address, timeout=5) as raw:
        raw.sendall(b"GET /\x1b[2J\x1b]0;owned\x07\r HTTP/1.0\r\n\r\n")
        assert raw.recv(1024).startswith(b"HTTP/1.0 ")
        wait_for(lambda: any("\\x1b" in r.getMessage() for r in caplog.records), 5,
                 "the request logged")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "\x1b" not in logged and "\x07" not in logged and "\r" not in logged
    assert "\\x1b[2J\\x1b]0;owned\\x07\\x0d" in logged


def test_clients_that_hang_up_mid_response_leave_no_traceback(capfd, caplog) -> None:
    """50 clients ask for a large snapshot and reset the connection after its first bytes:
    nothing on stderr, each one a debug line through logging."""
    caplog.set_level(logging.DEBUG, logger="codetr_stream.daemon.monitoring.health")
    noise = np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8)
    with server() as service:
        service.snapshots.put("cam1", noise, [PERSON])
        for _ in range(50):
            with socket.create_connection(service.server.address, timeout=5) as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.sendall(b"GET /snapshot/cam1.jpg HTTP/1.0\r\n\r\n")
                assert client.recv(16).startswith(b"HTTP/1.0 200")
        wait_for(lambda: sum("went away" in r.getMessage() for r in caplog.records) >= 10, 10,
                 "the hang-ups logged")
        assert timed_get(service)[0] == 200
    stderr = capfd.readouterr().err
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Reset" not in stderr
    assert {r.levelno for r in caplog.records if "went away" in r.getMessage()} == {logging.DEBUG}


def test_metrics_and_snapshots_need_the_token_and_healthz_does_not(tmp_path) -> None:
    token = "s3cret-" + "t" * 20
    (tmp_path / "token").write_text(token + "\n")
    with server(token=read_token(tmp_path / "token")) as service:
        service.snapshots.put("cam1", gray(), [PERSON])
        right = {"Authorization": f"Bearer {token}"}
        wrong = {"Authorization": f"Bearer {token[:-1]}x"}
        for path in ("/metrics", "/snapshot/cam1.jpg", "/snapshot/nope.jpg"):
            assert timed_get(service, path)[0] == 401, path
            assert timed_get(service, path, wrong)[0] == 401, path
            assert timed_get(service, path, {"Authorization": token})[0] == 401, path
        assert timed_get(service, "/metrics", right)[0] == 200
        assert timed_get(service, "/snapshot/cam1.jpg", right)[0] == 200
        assert timed_get(service, "/snapshot/nope.jpg", right)[0] == 404
        assert timed_get(service, "/healthz")[0] == 200


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read the token file"), (b"short\n", "at least 16"),
    (b"has a space in it somewhere\n", "without spaces"), (b"\xff" * 20, "printable")])
def test_a_bad_token_file_is_one_clear_error(tmp_path, content, message) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        read_token(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
