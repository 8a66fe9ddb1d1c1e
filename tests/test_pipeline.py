"""Frame slots, batcher, preprocessing and runner on real frames and the tiny engine."""

from __future__ import annotations

import threading
import time

import av
import numpy as np
import pytest
import torch
from codetr_stream.compile.model_inputs import preprocess, preprocess_batch
from codetr_stream.daemon.pipeline.batcher import Batcher, pick_batch_size
from codetr_stream.daemon.pipeline.frames import FpsCap, Frame, FrameSlots
from codetr_stream.daemon.pipeline.preprocess import Preprocessor, frame_rgb, nv12_to_rgb
from codetr_stream.daemon.pipeline.runner import Runner
from daemon_helpers import INPUT_HW, build_tiny_engine

CPU = torch.device("cpu")


def make_frame(stream: str, index: int, h: int = 240, w: int = 320, seed: int = 0) -> Frame:
    pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    return Frame(stream, index, None, time.time_ns(), pixels, "rgb24", h, w)


def test_slot_keeps_the_latest_frame_and_counts_drops() -> None:
    slots = FrameSlots()
    slots.add("a")
    slots.add("b")
    for i in range(3):
        slots.put(make_frame("a", i))
    slots.put(make_frame("b", 0))
    frames = slots.take(8)
    assert [(f.stream, f.index) for f in frames] == [("a", 2), ("b", 0)]  # oldest first
    assert slots.stats("a").dropped == 2 and slots.stats("a").taken == 1
    slots.remove("b")
    slots.put(make_frame("b", 1))  # a frame of a removed stream is discarded
    assert slots.ready() == 0


def test_no_stream_starves_when_the_engine_takes_fewer_than_all() -> None:
    """16 cameras in lockstep, batches of 8: the cameras skipped once go first next time."""
    slots = FrameSlots()
    names = [f"cam{i:02d}" for i in range(16)]
    for name in names:
        slots.add(name)
    served = dict.fromkeys(names, 0)
    for round_ in range(8):
        for name in names:  # the same decode order every round
            slots.put(make_frame(name, round_))
        for frame in slots.take(8):
            served[frame.stream] += 1
    assert set(served.values()) == {4}, served


def test_batcher_waits_for_all_streams_or_the_deadline() -> None:
    slots = FrameSlots()
    for name in ("a", "b", "c"):
        slots.add(name)
    batcher = Batcher(slots, [1, 2, 4], max_batch=8, max_wait_ms=300)
    assert batcher.max_batch == 4  # no batch larger than the engine's largest
    stop = threading.Event()
    for name in ("a", "b", "c"):
        slots.put(make_frame(name, 0))
    assert batcher.ready()
    started = time.monotonic()
    assert len(batcher.next_batch(stop)) == 3  # every stream has a frame: no waiting
    assert time.monotonic() - started < 0.1

    slots.put(make_frame("a", 1))
    slots.put(make_frame("b", 1))
    assert not batcher.ready()
    started = time.monotonic()
    assert len(batcher.next_batch(stop)) == 2  # c is silent: the deadline closes the batch
    assert 0.2 < time.monotonic() - started < 0.6
    assert batcher.next_batch(stop, idle_timeout=0.1) == []


def test_batcher_never_exceeds_the_engines_largest_batch() -> None:
    slots = FrameSlots()
    names = [f"cam{i}" for i in range(6)]
    for name in names:
        slots.add(name)
        slots.put(make_frame(name, 0))
    batcher = Batcher(slots, [1, 2, 4], max_batch=8, max_wait_ms=300)
    stop = threading.Event()
    assert [len(batcher.next_batch(stop)) for _ in range(2)] == [4, 2]


def test_pick_batch_size() -> None:
    assert [pick_batch_size(n, [1, 2, 4, 8]) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="do not fit"):
        pick_batch_size(9, [1, 2, 4, 8])


def test_fps_cap_follows_an_even_schedule() -> None:
    cap = FpsCap(10.0)
    kept = [t for t in np.arange(0, 2, 1 / 30) if cap.allow(float(t))]
    assert 19 <= len(kept) <= 21
    assert FpsCap(None).allow(0.0) and FpsCap(None).allow(0.0)


def test_nv12_to_rgb_matches_ffmpeg() -> None:
    """GPU frames (NVDEC NV12, converted by us) and CPU frames (FFmpeg RGB) must agree."""
    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], -1).astype(np.uint8)
    nv12 = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="nv12")
    ffmpeg = torch.from_numpy(nv12.reformat(format="rgb24").to_ndarray()).int()
    ours = nv12_to_rgb(torch.from_numpy(nv12.to_ndarray()), 240, 320).int()
    assert ours.shape == ffmpeg.shape == (240, 320, 3)
    diff = (ours - ffmpeg).abs()
    # FFmpeg's fixed-point path truncates where we round: about 1.5 levels apart on average.
    assert diff.float().mean() < 2.5 and diff.max() <= 4


def make_nv12_frame(stream: str, h: int, w: int, seed: int) -> Frame:
    """What NVDEC hands over (NV12 planes), here made by FFmpeg from random RGB."""
    rgb = make_frame(stream, 0, h, w, seed).pixels.numpy()
    nv12 = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="nv12").to_ndarray()
    return Frame(stream, 0, None, time.time_ns(), torch.from_numpy(nv12.copy()), "nv12", h, w)


def mixed_batch() -> list[Frame]:
    """Two sizes and both pixel formats interleaved (rows of one group are not contiguous),
    one portrait frame, one frame already at the engine size."""
    return [make_nv12_frame("a", 240, 320, 1), make_frame("b", 0, 480, 270, 2),
            make_nv12_frame("c", 180, 320, 3), make_nv12_frame("d", 240, 320, 4),
            make_frame("e", 0, 240, 320, 5), make_frame("f", 0, *INPUT_HW, 6)]


def test_preprocessor_writes_the_reference_preprocessing_into_the_buffer() -> None:
    """Batched by size, and bit for bit the per-frame reference (`compile.model_inputs`)."""
    frames = mixed_batch()
    images = torch.full((8, 3, *INPUT_HW), 7.0)
    masks = torch.ones((8, *INPUT_HW), dtype=torch.bool)
    scales = Preprocessor(INPUT_HW, CPU)(frames, images, masks)
    for i, frame in enumerate(frames):
        image, mask, plan = preprocess(frame_rgb(frame, CPU), INPUT_HW, fit_portrait=True)
        assert torch.equal(images[i], image) and torch.equal(masks[i], mask)
        assert scales[i] == plan.scale_xy
    assert (images[len(frames):] == 7.0).all() and masks[len(frames):].all()  # rows untouched
    assert torch.equal(frame_rgb(frames[1], CPU), frames[1].pixels)


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    runner = Runner(build_tiny_engine(tmp_path_factory.mktemp("engine") / "tiny"), CPU)
    runner.warm_up()
    return runner


@pytest.mark.slow
def test_runner_pads_partial_batches_and_matches_the_engine(runner) -> None:
    frames = [make_frame(f"s{i}", 0, 240 + 16 * i, 320, seed=i) for i in range(3)]
    out = runner.run(frames)
    assert out.batch_size == 4 and out.boxes.shape[0] == 3
    assert out.boxes.device.type == "cpu" and out.labels.dtype == torch.int64
    images, masks, plans = preprocess_batch([f.pixels for f in frames], INPUT_HW)
    boxes, scores, labels = runner.engine.infer(images, masks)
    assert torch.allclose(out.scores, scores, atol=1e-5)
    assert torch.allclose(out.boxes, boxes, atol=1e-3)
    assert torch.equal(out.labels, labels)
    assert out.scales == [p.scale_xy for p in plans]
    assert out.preprocess_ms > 0 and out.infer_ms > 0
    assert not runner.asynchronous  # the CPU path runs the batch inside submit
    again = runner.submit(frames).result()
    assert torch.equal(again.scores, out.scores) and torch.equal(again.labels, out.labels)
