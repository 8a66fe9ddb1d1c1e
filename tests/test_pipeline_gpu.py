"""The daemon on the GPU (device machine): NVDEC frames through the engine to ZeroMQ."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from codetr_stream.compile.preprocess import preprocess
from codetr_stream.daemon.config import load_config
from codetr_stream.daemon.frames import Frame
from codetr_stream.daemon.preprocess import Preprocessor, frame_rgb
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


@pytest.mark.gpu
def test_batched_preprocessing_equals_the_reference_on_nv12_frames() -> None:
    """On the GPU too, the torch-op path (a batch processed by size) writes exactly what the
    per-frame reference writes, with rows of one size in any order. (The fused kernel is held to
    this path in tests/test_preprocess.py.)"""
    device = torch.device("cuda")
    hw = (768, 1152)
    gen = torch.Generator(device).manual_seed(0)

    def nv12(name: str, h: int, w: int) -> Frame:
        pixels = torch.randint(0, 256, (h * 3 // 2, w), dtype=torch.uint8, device=device,
                               generator=gen)
        return Frame(name, 0, None, 0, pixels, "nv12", h, w)

    preprocessor = Preprocessor(hw, device, fused=False)
    images = torch.empty((8, 3, *hw), device=device)
    masks = torch.ones((8, *hw), dtype=torch.bool, device=device)
    for layout in [(720, 720, 480, 720), (480, 720), (720,) * 8]:
        frames = [nv12(f"cam{i}", h, {720: 1280, 480: 640}[h]) for i, h in enumerate(layout)]
        scales = preprocessor(frames, images, masks)
        for i, frame in enumerate(frames):
            image, _, plan = preprocess(frame_rgb(frame, device), hw, fit_portrait=True)
            diff = (images[i] - image).abs().max().item()
            assert diff == 0, f"{layout} row {i}: max diff {diff}"
            assert scales[i] == plan.scale_xy
        assert not masks[:len(frames)].any()
