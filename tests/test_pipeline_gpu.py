"""The daemon on the GPU (device machine): NVDEC frames through the engine to ZeroMQ."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from codetr_stream.daemon.config import load_config
from daemon_helpers import DaemonThread, build_tiny_engine, write_config
from rtsp_server import free_port

REPLAY = Path(__file__).parent / "rtsp_replay.py"


@pytest.mark.gpu
def test_daemon_on_gpu_publishes_every_camera(tmp_path) -> None:
    import zmq

    engine = build_tiny_engine(tmp_path / "engine")
    proc = subprocess.Popen([sys.executable, str(REPLAY), "--port", "0", "--size", "640x360"],
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline().split()[1])
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    path = write_config(tmp_path / "streams.yaml", engine,
                        {f"cam{i}": f"rtsp://127.0.0.1:{port}/cam{i}" for i in range(3)},
                        endpoint=endpoint)
    path.write_text(path.read_text().replace("device: cpu", "device: cuda"))
    assert load_config(path).engine.device == "cuda"
    frames = []
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"det.")
    sub.connect(endpoint)
    seen: dict[str, list[int]] = {}
    try:
        with DaemonThread(path, on_result=lambda f, r: frames.append(f)):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (len(seen) < 3 or
                                                    min(map(len, seen.values())) < 5):
                if sub.poll(200):
                    msg = json.loads(sub.recv_multipart()[1])
                    seen.setdefault(msg["stream"], []).append(msg["frame_index"])
    finally:
        sub.close(linger=0)
        proc.kill()
    assert sorted(seen) == ["cam0", "cam1", "cam2"]
    for indexes in seen.values():
        assert len(indexes) >= 5 and indexes == sorted(set(indexes))
    assert frames and all(f.pixel_format == "nv12" and f.pixels.is_cuda for f in frames)
