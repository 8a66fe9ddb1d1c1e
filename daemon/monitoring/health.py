"""The operator's HTTP port: /healthz, /metrics and /snapshot/<stream>.jpg.

A ThreadingHTTPServer on a daemon thread, bound to loopback unless configured otherwise. It only
reads state that the service pushes (Liveness, Metrics, SnapshotStore), so a slow or hostile
client can never stall the pipeline. What clients can make it hold is bounded:

- at most `max_connections` connections (one thread each); when full, the oldest connection
  still sending its request is cut to let the new one in, so a crowd of half-sent requests
  (slowloris) cannot lock out a health probe;
- every connection ends `request_timeout_s` after it was accepted, however slowly it trickles;
- a listen backlog of LISTEN_BACKLOG (socketserver's 5 made 200 concurrent clients wait for
  SYN retries, up to 31 s).

Clients that hang up are logged at debug level, through logging; request lines are logged with
control characters escaped. With a token (`health.token_file`), /metrics and /snapshot answer
401 without `Authorization: Bearer <token>` (compared in constant time); /healthz stays open for
probes.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import logging
import re
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from codetr_stream.daemon.config.secrets import redact
from codetr_stream.daemon.feed.messages import Detection
from codetr_stream.daemon.monitoring.metrics import CONTENT_TYPE, Metrics
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from codetr_stream.daemon.config.schema import HealthConfig

__all__ = ["HealthServer", "Liveness", "SnapshotStore", "annotate", "read_token"]

log = logging.getLogger(__name__)

_SNAPSHOT_PATH = re.compile(r"/snapshot/([A-Za-z0-9][A-Za-z0-9_-]{0,63})\.jpg")
LISTEN_BACKLOG = 128
MIN_TOKEN_CHARS = 16
# Control characters (C0, DEL, C1) and the backslash, as \xNN: a request line with ESC or CR
# must not reach a terminal or a log parser raw.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {0x5C: "\\\\"}


def printable(text: str) -> str:
    """`text` with control characters escaped, safe for one log line."""
    return text.translate(_ESCAPES)


def read_token(path: Path) -> bytes:
    """The bearer token in `path` (one trailing newline ignored); ValueError names the file and
    the fix, never the contents."""
    try:
        token = Path(path).read_bytes().removesuffix(b"\n")
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path}: {exc.strerror}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c <= 0x20 or c >= 0x7F for c in token):
        raise ValueError(f"the token in {path} must be at least {MIN_TOKEN_CHARS} printable "
                         "characters without spaces (e.g. `openssl rand -hex 32 > FILE`)")
    return token


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

    def setup(self) -> None:
        self.timeout = self.server.request_timeout_s  # per read and write; see _Server too
        super().setup()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.responding(self.connection)
        return ok

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            ok, body = self.server.liveness.report(self.server.metrics.last_frame_ages())
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            # Stream details come from camera errors too: mask any credential that slipped in.
            self._send(status, "application/json", redact(json.dumps(body)).encode())
        elif not self._authorized():
            self._send(HTTPStatus.UNAUTHORIZED, "text/plain", b"a bearer token is required\n",
                       headers={"WWW-Authenticate": 'Bearer realm="codetr-stream"'})
        elif path == "/metrics":
            self._send(HTTPStatus.OK, CONTENT_TYPE, self.server.metrics.render())
        elif match := _SNAPSHOT_PATH.fullmatch(path):
            self._snapshot(match[1])
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found: try /healthz, /metrics, "
                       b"/snapshot/<stream>.jpg\n")

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), token)

    def _snapshot(self, stream: str) -> None:
        jpeg = self.server.snapshots.jpeg(stream)
        if jpeg is not None:
            self._send(HTTPStatus.OK, "image/jpeg", jpeg, headers={"Cache-Control": "no-store"})
        elif stream in self.server.liveness.streams():
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "text/plain", b"no frame yet\n")
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"unknown stream\n")

    def _send(self, status: HTTPStatus, ctype: str, body: bytes,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), printable(format % args))


@dataclass
class _Connection:
    sock: socket.socket
    accepted: float  # time.monotonic()
    responding: bool = False  # its request has arrived


class _Server(ThreadingHTTPServer):
    """Bounded connections (see the module docstring); each accepted one is tracked until its
    handler closes it, and cut (shutdown, so its thread's read or write returns at once) when
    it is too old or its slot is needed."""

    daemon_threads = True  # a stuck client never blocks shutdown
    request_queue_size = LISTEN_BACKLOG
    liveness: Liveness
    metrics: Metrics
    snapshots: SnapshotStore
    token: bytes | None = None
    max_connections: int = 64
    request_timeout_s: float = 10.0

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler, bind_and_activate=False)
        self._lock = threading.Lock()
        self._open: dict[socket.socket, _Connection] = {}

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves our own FQDN, which can hang without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            if len(self._open) >= self.max_connections:
                waiting = [c for c in self._open.values() if not c.responding]
                if not waiting:  # every slot is sending a response: no room
                    log.debug("%s: %d connections busy, refused", client_address[0],
                              len(self._open))
                    self.shutdown_request(request)
                    return
                self._cut(min(waiting, key=lambda c: c.accepted))
            self._open[request] = _Connection(request, now)
        super().process_request(request, client_address)

    def responding(self, sock: socket.socket) -> None:
        with self._lock:
            if (connection := self._open.get(sock)) is not None:
                connection.responding = True

    def service_actions(self) -> None:  # serve_forever calls it every poll interval
        with self._lock:
            self._expire(time.monotonic())

    def _expire(self, now: float) -> None:
        for connection in list(self._open.values()):
            if now - connection.accepted > self.request_timeout_s:
                self._cut(connection)

    def _cut(self, connection: _Connection) -> None:
        del self._open[connection.sock]
        with contextlib.suppress(OSError):  # already gone
            connection.sock.shutdown(socket.SHUT_RDWR)

    def close_request(self, request: Any) -> None:
        with self._lock:
            self._open.pop(request, None)
        super().close_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up or stalls is routine: debug, one line. Anything else is a
        bug here: a warning with its traceback, through logging, never bare on stderr."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("%s: client went away: %s", client_address[0], error)
        else:
            log.warning("request from %s failed", client_address[0], exc_info=True)


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
        token: bytes | None = None,
        max_connections: int = 64,
        request_timeout_s: float = 10.0,
    ) -> None:
        self._server = _Server((host, port))
        self._server.liveness = liveness
        self._server.metrics = metrics
        self._server.snapshots = snapshots
        self._server.token = token
        self._server.max_connections = max_connections
        self._server.request_timeout_s = request_timeout_s
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, health: HealthConfig, *, liveness: Liveness, metrics: Metrics,
                    snapshots: SnapshotStore) -> HealthServer:
        """As configured by streams.yaml's `health:` section (a HealthConfig)."""
        token = read_token(health.token_file) if health.token_file is not None else None
        return cls(liveness=liveness, metrics=metrics, snapshots=snapshots, host=health.host,
                   port=health.port, token=token, max_connections=health.max_connections,
                   request_timeout_s=health.request_timeout_s)

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
