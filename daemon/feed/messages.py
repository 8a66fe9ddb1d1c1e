"""What the daemon publishes: one FrameResult per processed frame, one StreamStatus per heartbeat.

Both are plain dataclasses that serialise to compact JSON with a `schema_version`, so subscribers
in any language can check they understand the message before reading it. Boxes are in pixels of
the original camera frame (not the engine's resized input), x1, y1, x2, y2 with the origin at the
top-left corner. Times are integers in nanoseconds since the Unix epoch (`time.time_ns()`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from codetr_stream.daemon.config.secrets import redact

SCHEMA_VERSION = 1


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def _check_version(payload: dict[str, Any], kind: str) -> None:
    if payload.get("type") != kind or payload.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"not a {kind} message of schema_version {SCHEMA_VERSION}: "
            f"type={payload.get('type')!r} schema_version={payload.get('schema_version')!r}"
        )


@dataclass(frozen=True)
class Detection:
    """One object: class, confidence, and its box in original frame pixels (x1, y1, x2, y2)."""

    class_id: int
    class_name: str
    score: float
    box: tuple[float, float, float, float]


@dataclass
class FrameResult:
    """Everything known about one frame once its detections are ready.

    `frame_index` counts decoded frames of the stream since the daemon started it (gaps are frames
    dropped by the latest-frame-wins policy); `pts` is the stream's presentation time in seconds
    (None when the camera sends none). `latencies_ms` maps stage name -> milliseconds, e.g.
    decode, queue, preprocess, infer, postprocess. `publish_ns` and `seq` are stamped by the
    Publisher at send time; `seq` counts messages per topic, so a subscriber sees its own losses.
    """

    stream: str
    frame_index: int
    pts: float | None
    capture_ns: int
    width: int
    height: int
    detections: list[Detection] = field(default_factory=list)
    latencies_ms: dict[str, float] = field(default_factory=dict)
    publish_ns: int = 0
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "type": "detections",
            "stream": self.stream,
            "seq": self.seq,
            "frame_index": self.frame_index,
            "pts": self.pts,
            "capture_ns": self.capture_ns,
            "publish_ns": self.publish_ns,
            "frame": {"width": self.width, "height": self.height},
            "latencies_ms": {k: round(v, 3) for k, v in self.latencies_ms.items()},
            "detections": [
                {"class_id": d.class_id, "class_name": d.class_name, "score": d.score,
                 "box": list(d.box)}
                for d in self.detections
            ],
        }  # fmt: skip

    def to_json(self) -> bytes:
        return _dumps(self.to_dict())

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> FrameResult:
        _check_version(payload, "detections")
        return cls(
            stream=payload["stream"],
            frame_index=payload["frame_index"],
            pts=payload["pts"],
            capture_ns=payload["capture_ns"],
            width=payload["frame"]["width"],
            height=payload["frame"]["height"],
            detections=[
                Detection(d["class_id"], d["class_name"], d["score"], tuple(d["box"]))
                for d in payload["detections"]
            ],
            latencies_ms=dict(payload["latencies_ms"]),
            publish_ns=payload["publish_ns"],
            seq=payload["seq"],
        )


@dataclass
class StreamStatus:
    """A stream's heartbeat, sent every `publish.status_interval_s` whether or not frames flow.

    `error` is a short reason when the stream is not connected, redacted again on the way out.
    `last_frame_age_s` is None before the first frame.
    """

    stream: str
    connected: bool
    fps_in: float
    fps_out: float
    frames_in: int
    frames_dropped: int
    frames_published: int
    reconnects: int
    last_frame_age_s: float | None
    error: str | None = None
    publish_ns: int = 0
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["fps_in"] = round(self.fps_in, 3)
        payload["fps_out"] = round(self.fps_out, 3)
        if self.last_frame_age_s is not None:
            payload["last_frame_age_s"] = round(self.last_frame_age_s, 3)
        if self.error is not None:  # sources redact already; a message leaves the host: again
            payload["error"] = redact(self.error)
        return {"schema_version": SCHEMA_VERSION, "type": "status", **payload}

    def to_json(self) -> bytes:
        return _dumps(self.to_dict())

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> StreamStatus:
        _check_version(payload, "status")
        fields = {k: v for k, v in payload.items() if k not in ("schema_version", "type")}
        return cls(**fields)
