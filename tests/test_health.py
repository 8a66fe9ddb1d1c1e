"""The health server over real HTTP on loopback: /healthz, /metrics, snapshots, isolation."""

from __future__ import annotations

import io
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from codetr_stream.daemon.detections import Detection
from codetr_stream.daemon.health import HealthServer, Liveness, SnapshotStore, annotate
from codetr_stream.daemon.metrics import Metrics
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
