"""The published messages against their JSON Schemas (docs/schema/): real daemon, real camera,
real ZeroMQ, as a subscriber in another language would check them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest
from codetr_stream.daemon.demo.rtsp_server import RtspServer, free_port
from codetr_stream.daemon.feed.messages import SCHEMA_VERSION
from daemon_helpers import DaemonThread, build_tiny_engine, write_config
from fault_helpers import TcpCamera
from test_daemon_e2e import subscriber

SCHEMAS = Path(__file__).resolve().parents[1] / "docs" / "schema"


def validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{kind}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_schemas_are_valid_and_versioned_like_the_code() -> None:
    for kind in ("detections", "status"):
        schema = validator(kind).schema
        assert schema["properties"]["schema_version"] == {"const": SCHEMA_VERSION}
        assert schema["properties"]["type"] == {"const": kind}


def test_schema_rejects_what_a_subscriber_could_not_read() -> None:
    good = {"schema_version": 1, "type": "detections", "stream": "cam1", "seq": 0,
            "frame_index": 3, "pts": None, "capture_ns": 1, "publish_ns": 2,
            "frame": {"width": 320, "height": 240}, "latencies_ms": {"infer": 1.5},
            "detections": [{"class_id": 0, "class_name": "person", "score": 0.5,
                            "box": [1.0, 2.0, 3.0, 4.0]}]}
    detections = validator("detections")
    detections.validate(good)
    for bad in ({**good, "schema_version": 2}, {k: v for k, v in good.items() if k != "seq"},
                {**good, "detections": [{**good["detections"][0], "box": [1.0, 2.0, 3.0]}]},
                {**good, "stream": "cam.1"}, {**good, "surprise": 1}):
        assert not detections.is_valid(bad), bad


@pytest.mark.slow
def test_published_messages_match_the_schemas(tmp_path: Path) -> None:
    """Detections and heartbeats of a working camera, and the heartbeat of a broken one (with
    its error), from the daemon on the CPU path."""
    engine = build_tiny_engine(tmp_path / "engine", batch_sizes=(1,))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with RtspServer(["cam1=h264:320x240@5/ball"]) as srv, TcpCamera("garbage") as broken:
        path = write_config(tmp_path / "streams.yaml", engine,
                            {"cam1": srv.url("cam1"), "broken": broken.url()}, endpoint=endpoint)
        sub = subscriber(endpoint, b"det.", b"status.")
        seen: dict[str, list[dict]] = {"det": [], "status": [], "error": []}
        with DaemonThread(path):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not all(len(v) >= 2 for v in seen.values()):
                if not sub.poll(200):
                    continue
                topic, payload = sub.recv_multipart()
                message = json.loads(payload)
                kind = topic.decode().split(".")[0]
                seen["error" if kind == "status" and message["error"] else kind].append(message)
        sub.close()
    assert all(len(v) >= 2 for v in seen.values()), {k: len(v) for k, v in seen.items()}
    detections, status = validator("detections"), validator("status")
    for message in seen["det"]:
        detections.validate(message)
    for message in seen["status"] + seen["error"]:
        status.validate(message)
    assert any(m["detections"] for m in seen["det"])  # the box items were checked too
