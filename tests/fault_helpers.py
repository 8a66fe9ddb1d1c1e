"""Shared by the fault tests: a camera that misbehaves on cue, the real daemon with tight fault
knobs, and a record of everything it says (ZeroMQ messages, /metrics, /healthz) so every fault
scenario can also be checked for leaked passwords.

Fault scenarios run with passwords in their URLs (`URL_PASSWORD`) and substituted from the
environment (`ENV_PASSWORD` via `${ENV_NAME}`); `assert_no_secrets` fails on any spelling of them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import torch
import yaml
import zmq
from codetr_stream.compile.model_inputs import preprocess
from codetr_stream.daemon.demo.rtsp_replay import Session, encode_clip
from codetr_stream.daemon.demo.rtsp_server import free_port
from codetr_stream.daemon.feed.messages import Detection
from codetr_stream.daemon.pipeline.postprocess import postprocess
from daemon_helpers import DaemonThread, build_tiny_engine

URL_PASSWORD = "S3cretPass"
ENV_NAME = "CODETR_FAULT_CAM_PASS"
ENV_PASSWORD = "En5ecret-From-Env"
# Tight knobs: every fault is noticed and retried within a second or two even on 2 loaded cores.
# The engine's input: small, so fault tests spend the shared cores on faults, not inference.
INPUT_HW = (128, 160)
RECONNECT = {"open_timeout_s": 2.0, "read_timeout_s": 1.5, "stall_timeout_s": 2.0,
             "backoff_initial_s": 0.1, "backoff_max_s": 0.5}


def build_small_engine(out: Path) -> Path:
    """The tiny reference model as an eager fp32 CPU engine at INPUT_HW."""
    return build_tiny_engine(out, input_hw=INPUT_HW)


def pause_bound(messages: list[Message]) -> float:
    """The longest gap between one camera's messages that is not a pause: three of the slowest
    engine calls seen (the CPU path shares two loaded cores with everything), at least 1.5 s."""
    slowest = max(m.payload["latencies_ms"]["infer"] for m in messages) / 1e3
    return max(1.5, 3 * slowest)


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` when `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# ---- a camera that breaks on cue ----


class _FaultySession(Session):
    """One client of a FaultyCamera: the RTP packets it sends pass through the camera's mode."""

    def __init__(self, conn: socket.socket, camera: FaultyCamera) -> None:
        super().__init__(conn, camera.clip, camera.fps)
        self.camera = camera
        self.cut = False

    def send(self, data: bytes) -> None:
        if data[:1] != b"$":  # RTSP replies always pass
            return super().send(data)
        if self.cut:  # half a packet, then the connection is gone: a truncated stream
            with self.lock:
                self.conn.sendall(data[: len(data) // 2])
                self.conn.shutdown(socket.SHUT_RDWR)
            raise OSError("cut by the test")
        mode = self.camera.mode
        if mode == "silent":
            return None
        if mode == "filler":  # valid RTP carrying H.264 filler data (NAL type 12): no picture
            data = data[:16] + b"\x0c" + b"\xff" * (len(data) - 17)
        elif mode == "garbage":  # RTP framing intact, payload random: the decoder chokes
            data = data[:16] + self.camera.rng.randbytes(len(data) - 16)
        elif mode == "noise":  # random bytes where an interleaved packet belongs
            data = self.camera.rng.randbytes(len(data))
        return super().send(data)


class FaultyCamera:
    """A generated H.264 clip served over RTSP/TCP in this process (daemon/demo/rtsp_replay.py's
    protocol), whose `mode` can change mid-stream: `ok`; `silent` (connection open, nothing
    sent); `filler` (RTP keeps flowing but holds no picture: only the decoded-frame watchdog can
    tell); `garbage` (random RTP payloads); `noise` (random bytes instead of RTP packets);
    `down` (every new connection is closed at once: a camera that is off, for a reconnect
    storm at a fraction of a millisecond an attempt). `cut()` closes every open connection
    halfway through a packet."""

    def __init__(self, size: tuple[int, int] = (320, 240), fps: int = 5) -> None:
        self.clip = encode_clip(size[0], size[1], fps, seconds=4)
        self.fps = fps
        self.mode = "ok"
        self.rng = random.Random(7)
        self.connections = 0
        self.sessions: list[_FaultySession] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="faulty-camera", daemon=True)

    def url(self, path: str = "cam", userinfo: str | None = None) -> str:
        """Every path serves the clip, each connection its own session."""
        return f"rtsp://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}/{path}"

    def cut(self) -> None:
        for session in self.sessions:
            session.cut = True

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            if self.mode == "down":
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = _FaultySession(conn, self)
            self.sessions = [s for s in self.sessions if not s.closed.is_set()] + [session]
            threading.Thread(target=session.serve, name="faulty-session", daemon=True).start()

    def __enter__(self) -> FaultyCamera:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        for session in self.sessions:
            session.closed.set()
            with contextlib.suppress(OSError):
                session.conn.shutdown(socket.SHUT_RDWR)



class TcpCamera:
    """A misbehaving camera: accepts TCP connections, then sends random bytes or stays silent."""

    def __init__(self, mode: str = "garbage"):
        if mode not in ("garbage", "silent"):
            raise ValueError(f"mode {mode!r}: garbage or silent")
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def url(self, path: str = "cam") -> str:
        return f"rtsp://127.0.0.1:{self.port}/{path}"

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        rng = random.Random(self.connections)
        with conn, contextlib.suppress(OSError):
            while not self._stop.is_set():
                if self.mode == "garbage":
                    conn.sendall(rng.randbytes(512))
                time.sleep(0.05)

    def __enter__(self) -> TcpCamera:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

# ---- everything the daemon says ----


@dataclass
class Message:
    topic: str
    payload: dict
    raw: bytes
    arrived: float  # time.monotonic() at receipt


class Recorder:
    """A SUB for every topic, on its own thread: each message as sent and when it arrived."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._messages: list[Message] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)

    def _run(self) -> None:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.endpoint)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if sub.poll(100):
                    topic, payload = sub.recv_multipart()
                    message = Message(topic.decode(), json.loads(payload), topic + payload,
                                      time.monotonic())
                    with self._lock:
                        self._messages.append(message)
        finally:
            sub.close()

    def messages(self, prefix: str = "") -> list[Message]:
        with self._lock:
            return [m for m in self._messages if m.topic.startswith(prefix)]

    def det(self, stream: str) -> list[Message]:
        return self.messages(f"det.{stream}|")

    def status(self, stream: str) -> list[Message]:
        return self.messages(f"status.{stream}|")

    def last_status(self, stream: str) -> dict | None:
        found = self.status(stream)
        return found[-1].payload if found else None

    def last_error(self, stream: str) -> str | None:
        """The error in the stream's latest heartbeat (None before the first or when healthy)."""
        status = self.last_status(stream)
        return status["error"] if status else None

    def det_after(self, stream: str, since: float) -> list[Message]:
        return [m for m in self.det(stream) if m.arrived > since]

    def start(self) -> Recorder:
        self._thread.start()
        self._ready.wait(5)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def write_streams_yaml(path: Path, engine: Path, /, streams: dict[str, str | dict], *,
                       endpoint: str, health_port: int, **sections: dict) -> Path:
    """A streams.yaml with the fault knobs (RECONNECT), fast heartbeats and every detection;
    `streams` maps name -> url or -> {url, other stream keys}; `sections` override single keys,
    e.g. publish={"sndhwm": 50} or engine={"gpus": [0, 1]} (hence `engine` is positional-only)."""
    config = {
        "engine": {"path": str(engine), "device": "cpu"},
        "batching": {"max_batch": 4, "max_wait_ms": 30},
        "publish": {"endpoint": endpoint, "status_interval_s": 0.25},
        "health": {"port": health_port},
        "reconnect": RECONNECT,
        "streams": [{"name": name, "min_score": 0.0,
                     **(entry if isinstance(entry, dict) else {"url": entry})}
                    for name, entry in streams.items()],
    }
    for name, section in sections.items():  # merged into the defaults above, key by key
        config[name] = {**config.get(name, {}), **section}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class FaultDaemon:
    """The daemon in a thread on its own config file, with a Recorder on its publisher and its
    HTTP port known, so a test reads back everything it published and served."""

    def __init__(self, tmp_path: Path, engine: Path, /, streams: dict[str, str | dict], *,
                 on_result=None, **sections: dict) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.health_port = free_port()
        self.engine = engine
        self.sections = sections
        self.path = self.write(tmp_path / "streams.yaml", streams)
        self.recorder = Recorder(self.endpoint)
        self.daemon = DaemonThread(self.path, on_result=on_result)
        self.served: dict[str, str] = {}  # every HTTP body fetched, for the secrets check

    def write(self, path: Path, streams: dict[str, str | dict]) -> Path:
        return write_streams_yaml(path, self.engine, streams, endpoint=self.endpoint,
                                  health_port=self.health_port, **self.sections)

    def http(self, path: str) -> str:
        """GET a path of the health port (any status code); the body is kept in `served`."""
        url = f"http://127.0.0.1:{self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode()
        self.served[f"{path}#{len(self.served)}"] = body
        return body

    def healthz(self) -> dict:
        return json.loads(self.http("/healthz"))

    def sample_http(self) -> None:
        """Fetch /metrics and /healthz now (call it while faults are live)."""
        self.http("/metrics")
        self.http("/healthz")

    def reload(self, streams: dict[str, str | dict] | None = None) -> None:
        """Rewrite the config file (if `streams` given) and ask the daemon to re-read it."""
        if streams is not None:
            self.write(self.path, streams)
        self.daemon.reload.set()

    def transcript(self, log_text: str = "") -> dict[str, str]:
        """Every text the daemon produced during the test, by where it came from."""
        texts = {"log": log_text, "zmq": "\n".join(m.raw.decode("utf-8", "replace")
                                                    for m in self.recorder.messages())}
        texts.update(self.served)
        return texts

    def __enter__(self) -> FaultDaemon:
        self.recorder.start()
        self.daemon.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.daemon.__exit__(*exc)
        finally:
            self.recorder.stop()
        assert self.daemon.error is None, f"the daemon crashed: {self.daemon.error!r}"


def secret_forms(secrets: tuple[str, ...]) -> set[str]:
    """Each secret as written and percent-encoded (how it appears inside a URL)."""
    return {form for s in secrets for form in (s, quote(s, safe=""))}


def assert_no_secrets(texts: dict[str, str], secrets: tuple[str, ...]) -> None:
    for where, text in texts.items():
        for secret in secret_forms(secrets):
            at = text.find(secret)
            assert at < 0, f"a password leaked into {where}: ...{text[max(0, at - 80):at]}<HERE>"


def indexes_increase(messages: list[Message]) -> bool:
    indexes = [m.payload["frame_index"] for m in messages]
    return indexes == sorted(set(indexes))


def max_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def model_detections(model: torch.nn.Module, frame, stream_cfg) -> list[Detection]:
    """What the model itself finds on a decoded frame, through the daemon's post-processing."""
    image, mask, plan = preprocess(frame.pixels, INPUT_HW, fit_portrait=True)
    with torch.inference_mode():
        boxes, scores, labels = model(image[None], mask[None])
    return postprocess(boxes[0], scores[0], labels[0], scale=plan.scale_xy,
                       frame_size=(frame.width, frame.height), stream_cfg=stream_cfg,
                       class_names=model.class_names)
