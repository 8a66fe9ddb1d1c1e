"""The operator's HTTP port: /healthz, /metrics and /snapshot/<stream>.jpg.

A ThreadingHTTPServer on a daemon thread, bound to loopback unless configured otherwise. It only
reads state that the service pushes (Liveness, Metrics, SnapshotStore), so a slow or hostile
client can never stall the pipeline; each request gets its own thread.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socketserver
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .detections import Detection
from .metrics import CONTENT_TYPE, Metrics
from .secrets import redact

__all__ = ["HealthServer", "Liveness", "SnapshotStore", "annotate"]

log = logging.getLogger(__name__)

_SNAPSHOT_PATH = re.compile(r"/snapshot/([A-Za-z0-9][A-Za-z0-9_-]{0,63})\.jpg")


def _color(class_id: int) -> tuple[int, int, int]:
    # Evenly spread hues from the golden ratio: neighbouring ids get distinct colors.
    hue = (class_id * 0.618033988749895) % 1.0
    r, g, b = (int(255 * max(0.0, min(1.0, abs((hue * 6 + k) % 6 - 3) - 1))) for k in (0, 4, 2))
    return r, g, b


def annotate(
    image_rgb: np.ndarray,
    detections: Sequence[Detection],
    *,
    quality: int = 80,
    max_width: int | None = None,
) -> bytes:
    """JPEG of `image_rgb` (HxWx3 uint8) with each detection's box, class name and score.

    Boxes are in the image's pixels; when `max_width` downscales the image they scale with it.
    """
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"annotate needs an HxWx3 uint8 RGB image, got "
                         f"{image_rgb.dtype} {image_rgb.shape}")
    image = Image.fromarray(image_rgb, "RGB")
    scale = 1.0
    if max_width is not None and image.width > max_width:
        scale = max_width / image.width
        image = image.resize((max_width, max(1, round(image.height * scale))), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    line = max(2, round(image.width / 400))
    font = ImageFont.load_default(size=max(12, image.width // 60))
    for det in detections:
        # Sorted: Pillow refuses an inverted rectangle, and one odd box must not cost the image.
        x1, x2 = sorted((det.box[0] * scale, det.box[2] * scale))
        y1, y2 = sorted((det.box[1] * scale, det.box[3] * scale))
        color = _color(det.class_id)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
        text = f"{det.class_name} {det.score:.2f}"
        left, top, right, bottom = font.getbbox(text)
        width, height = right - left + 2 * line, bottom - top + 2 * line
        label_y = y1 - height if y1 >= height else y1  # above the box, else inside its top
        draw.rectangle((x1, label_y, x1 + width, label_y + height), fill=color)
        draw.text((x1 + line - left, label_y + line - top), text, fill=(0, 0, 0), font=font)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


@dataclass
class _Snapshot:
    image: np.ndarray
    detections: tuple[Detection, ...]
    jpeg: bytes | None = None  # encoded on first request, kept until the next frame


class SnapshotStore:
    """The latest annotated-frame material per stream, encoded only when someone asks.

    The service calls `due(stream)` per processed frame and, only when True, copies that frame
    to host memory and calls `put()`: at most one host copy per stream every `interval_s`.
    """

    def __init__(
        self,
        *,
        interval_s: float = 1.0,
        jpeg_quality: int = 80,
        max_width: int | None = 1280,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.jpeg_quality = jpeg_quality
        self.max_width = max_width
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[str, _Snapshot] = {}
        self._taken: dict[str, float] = {}

    def due(self, stream: str) -> bool:
        """True when `stream`'s snapshot is older than `interval_s` (or missing)."""
        with self._lock:
            taken = self._taken.get(stream)
        return taken is None or self._clock() - taken >= self.interval_s

    def put(self, stream: str, image_rgb: np.ndarray, detections: Sequence[Detection]) -> None:
        """Keep this frame (HxWx3 uint8 RGB, host memory, not reused by the caller)."""
        with self._lock:
            self._latest[stream] = _Snapshot(image_rgb, tuple(detections))
            self._taken[stream] = self._clock()

    def jpeg(self, stream: str) -> bytes | None:
        """The annotated JPEG of the latest frame, or None before the first one."""
        with self._lock:
            snapshot = self._latest.get(stream)
        if snapshot is None:
            return None
        if snapshot.jpeg is None:  # a race encodes twice at worst; both results are equal
            snapshot.jpeg = annotate(snapshot.image, snapshot.detections,
                                     quality=self.jpeg_quality, max_width=self.max_width)
        return snapshot.jpeg

    def remove(self, stream: str) -> None:
        with self._lock:
            self._latest.pop(stream, None)
            self._taken.pop(stream, None)


class Liveness:
    """What /healthz judges: engine warm, main loop beating, and each stream's state.

    The service calls `set_engine_warm()` once warm-up is done, `beat()` every main-loop
    iteration (idle batcher wake-ups included) and `set_stream()` on state changes. Healthy
    means warm and a beat within `loop_timeout_s`; camera states are reported, not judged
    (one dead camera must not get the whole service restarted by an orchestrator).
    """

    def __init__(
        self, *, loop_timeout_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.loop_timeout_s = loop_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._warm = False
        self._beat: float | None = None
        self._streams: dict[str, dict[str, Any]] = {}

    def set_engine_warm(self, warm: bool = True) -> None:
        """Warm-up done; counts as a beat, since the thread that warmed up runs the loop next
        (so /healthz agrees with READY=1 from the first moment)."""
        with self._lock:
            self._warm = warm
            self._beat = self._clock()

    def beat(self) -> None:
        with self._lock:
            self._beat = self._clock()

    def set_stream(self, name: str, state: str, **details: Any) -> None:
        """e.g. set_stream("cam1", "streaming", width=1920, height=1080); no URLs in details."""
        with self._lock:
            self._streams[name] = {"state": state, **details}

    def remove_stream(self, name: str) -> None:
        with self._lock:
            self._streams.pop(name, None)

    def streams(self) -> set[str]:
        with self._lock:
            return set(self._streams)

    def report(self, ages: dict[str, float] | None = None) -> tuple[bool, dict[str, Any]]:
        """(healthy, JSON body); `ages` adds each stream's last-frame age in seconds."""
        now = self._clock()
        with self._lock:
            loop_age = None if self._beat is None else now - self._beat
            alive = loop_age is not None and loop_age <= self.loop_timeout_s
            streams = {name: dict(state) for name, state in self._streams.items()}
            warm = self._warm
        for name, state in streams.items():
            if ages and name in ages:
                state["last_frame_age_s"] = round(ages[name], 3)
        healthy = warm and alive
        return healthy, {
            "status": "ok" if healthy else ("starting" if not warm else "stalled"),
            "engine_warm": warm,
            "loop_age_s": None if loop_age is None else round(loop_age, 3),
            "streams": streams,
        }


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "codetr-stream"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            ok, body = self.server.liveness.report(self.server.metrics.last_frame_ages())
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            # Stream details come from camera errors too: mask any credential that slipped in.
            self._send(status, "application/json", redact(json.dumps(body)).encode())
        elif path == "/metrics":
            self._send(HTTPStatus.OK, CONTENT_TYPE, self.server.metrics.render())
        elif match := _SNAPSHOT_PATH.fullmatch(path):
            self._snapshot(match[1])
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found: try /healthz, /metrics, "
                       b"/snapshot/<stream>.jpg\n")

    def _snapshot(self, stream: str) -> None:
        jpeg = self.server.snapshots.jpeg(stream)
        if jpeg is not None:
            self._send(HTTPStatus.OK, "image/jpeg", jpeg, cache=False)
        elif stream in self.server.liveness.streams():
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "text/plain", b"no frame yet\n")
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"unknown stream\n")

    def _send(self, status: HTTPStatus, ctype: str, body: bytes, cache: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if not cache:
            self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never blocks shutdown
    liveness: Liveness
    metrics: Metrics
    snapshots: SnapshotStore

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves our own FQDN, which can hang without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class HealthServer:
    """Serves /healthz, /metrics and /snapshot/<stream>.jpg until `stop()`.

    `port=0` picks a free port (see `address`). Use as a context manager or start()/stop().
    """

    def __init__(
        self,
        *,
        liveness: Liveness,
        metrics: Metrics,
        snapshots: SnapshotStore,
        host: str = "127.0.0.1",
        port: int = 8090,
    ) -> None:
        self._server = _Server((host, port), _Handler, bind_and_activate=False)
        self._server.liveness = liveness
        self._server.metrics = metrics
        self._server.snapshots = snapshots
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> HealthServer:
        """Bind and serve; raises OSError naming the address if it is taken."""
        try:
            self._server.server_bind()
            self._server.server_activate()
        except OSError as exc:
            self._server.server_close()
            host, port = self._server.server_address[:2]
            message = (f"health server cannot listen on {host}:{port}: {exc.strerror}; "
                       "change `health.port` in streams.yaml")
            raise OSError(exc.errno, message) from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        log.info("health endpoints on http://%s:%d/healthz", *self.address)
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
