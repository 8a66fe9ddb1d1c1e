"""The daemon on the GPU (device machine): NVDEC frames through the engine to ZeroMQ."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import torch
from codetr_stream.compile.model_inputs import preprocess
from codetr_stream.daemon.config.load import load_config
from codetr_stream.daemon.demo.rtsp_server import free_port
from codetr_stream.daemon.pipeline import postprocess
from codetr_stream.daemon.pipeline.frames import Frame
from codetr_stream.daemon.pipeline.postprocess import DROP_ALL, FrameFilter, select
from codetr_stream.daemon.pipeline.preprocess import Preprocessor, frame_rgb
from codetr_stream.daemon.pipeline.runner import Runner
from daemon_helpers import DaemonThread, build_tiny_engine, write_config

REPLAY = "codetr_stream.daemon.demo.rtsp_replay"


@pytest.mark.gpu
def test_daemon_on_gpu_publishes_every_camera(tmp_path) -> None:
    import zmq

    engine = build_tiny_engine(tmp_path / "engine")
    proc = subprocess.Popen([sys.executable, "-m", REPLAY, "--port", "0", "--size", "640x360"],
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


@pytest.mark.gpu
def test_runner_postprocesses_the_batch_on_the_gpu_as_the_reference(tmp_path) -> None:
    """With filters, the runner's one read-back holds what `select` makes of the raw outputs
    of the same batch, frame by frame (padding row, class filter and a dropped frame included).
    `select` with the pure-torch NMS: the kernel's arithmetic (tests/test_postprocess.py)."""
    device = torch.device("cuda")
    runner = Runner(build_tiny_engine(tmp_path / "engine"), device)
    runner.warm_up()
    gen = torch.Generator(device).manual_seed(1)
    frames = [Frame(f"cam{i}", 0, None, 0, torch.randint(0, 256, (h * 3 // 2, w),
                    dtype=torch.uint8, device=device, generator=gen), "nv12", h, w)
              for i, (h, w) in enumerate([(360, 640), (240, 428), (360, 640)])]
    filters = [FrameFilter(0.0), FrameFilter(0.05, frozenset({0, 1, 2})), DROP_ALL]
    out = runner.run(frames, filters)
    raw = runner.run(frames)
    assert out.batch_size == 4 and out.scales == raw.scales and len(out.rows) == 3
    assert out.preprocess_ms > 0 and out.infer_ms > 0 and out.postprocess_ms > 0
    for i, frame in enumerate(frames):
        with mock.patch.object(postprocess, "_torchvision_batched_nms", lambda: None):
            want = select(raw.boxes[i], raw.scores[i], raw.labels[i], filters[i],
                          scale=raw.scales[i], frame_size=(frame.width, frame.height)).numpy()
        got = out.rows[i]
        assert got.shape == want.shape, i
        assert (got[:, 5] == want[:, 5]).all()
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want),
                                   atol=1e-3, rtol=1e-5)
    assert len(out.rows[0]) > 0 and len(out.rows[2]) == 0


@pytest.mark.gpu
def test_two_batches_in_flight_give_what_each_gives_alone(tmp_path) -> None:
    """The daemon queues a batch while the engine runs the one before (service.IN_FLIGHT): the
    runner's shared input buffers, the engine's outputs and the postprocessing of the two batches
    stay apart, so both read back exactly what each gives when run alone."""
    device = torch.device("cuda")
    runner = Runner(build_tiny_engine(tmp_path / "engine"), device)
    runner.warm_up()
    gen = torch.Generator(device).manual_seed(2)

    def frames(sizes: list[tuple[int, int]]) -> list[Frame]:
        return [Frame(f"cam{i}", 0, None, 0, torch.randint(0, 256, (h * 3 // 2, w),
                      dtype=torch.uint8, device=device, generator=gen), "nv12", h, w)
                for i, (h, w) in enumerate(sizes)]

    first, second = frames([(360, 640), (240, 428), (360, 640)]), frames([(480, 640)] * 2)
    filters = [FrameFilter(0.0)] * 3
    alone = [runner.run(first, filters).rows, runner.run(second, filters[:2]).rows]
    queued = [runner.submit(first, filters), runner.submit(second, filters[:2])]
    together = [pending.result().rows for pending in queued]
    for want, got in zip(alone, together, strict=True):
        assert len(got) == len(want)
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            assert len(w) > 0, i
            np.testing.assert_array_equal(g, w)
