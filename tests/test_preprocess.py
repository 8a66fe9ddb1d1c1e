"""Preprocessing follows the reference pipeline (docs/model.md §1)."""

from __future__ import annotations

import pytest
import torch
from codetr_stream.compile.model_inputs import (
    MEAN_RGB,
    STD_RGB,
    boxes_to_frame,
    plan_resize,
    preprocess,
    preprocess_batch,
)

MEAN = torch.tensor(MEAN_RGB)[:, None, None]
STD = torch.tensor(STD_RGB)[:, None, None]


@pytest.mark.parametrize(("hw", "resized", "scale"), [
    ((1080, 1920), (648, 1152), 0.6),   # long edge binds
    ((480, 640), (768, 1024), 1.6),     # short edge binds
    ((777, 1001), (768, 989), 768 / 777),
    ((500, 500), (768, 768), 768 / 500),
])
def test_resize_follows_reference_rule(hw, resized, scale) -> None:
    plan = plan_resize(*hw)
    assert plan.resized_hw == resized
    assert plan.scale_xy == (resized[1] / hw[1], resized[0] / hw[0])
    assert plan.scale_xy[0] == pytest.approx(scale, rel=2e-3)


def test_portrait_frames_fail_clearly_or_letterbox_on_request() -> None:
    with pytest.raises(ValueError, match="landscape frames only"):
        plan_resize(1920, 1080)
    plan = plan_resize(1920, 1080, fit_portrait=True)
    assert plan.resized_hw == (768, 432)


def test_canvas_is_padded_with_raw_zero_and_normalised() -> None:
    frame = torch.full((480, 640, 3), 200, dtype=torch.uint8)
    image, mask, plan = preprocess(frame)
    assert image.shape == (3, 768, 1152) and image.dtype == torch.float32
    assert not mask.any()
    nh, nw = plan.resized_hw
    torch.testing.assert_close(image[:, :nh, :nw], ((200 - MEAN) / STD).expand(3, nh, nw))
    torch.testing.assert_close(image[:, :, nw:], (-MEAN / STD).expand(3, 768, 1152 - nw))
    _, padded, _ = preprocess(frame, pad_mask=True)
    assert padded[:, nw:].all() and not padded[:, :nw].any()


def test_bilinear_uses_half_pixel_centres_and_uint8_rounding() -> None:
    """A 1x2 ramp doubled: sample points -0.25, 0.25, 0.75, 1.25 (clamped) as cv2 does."""
    frame = torch.zeros(1, 2, 3, dtype=torch.uint8)
    frame[0, 1] = 101
    image, _, plan = preprocess(frame, (2, 4))
    assert plan.resized_hw == (2, 4)
    pixels = image * STD + MEAN
    torch.testing.assert_close(pixels[0, 0], torch.tensor([0.0, 25.0, 76.0, 101.0]))


def test_rgb_channel_order_is_kept() -> None:
    frame = torch.zeros(768, 1152, 3, dtype=torch.uint8)
    frame[..., 0] = 255
    image, _, _ = preprocess(frame)
    torch.testing.assert_close(image[:, 0, 0], ((torch.tensor([255.0, 0, 0]) - MEAN[:, 0, 0])
                                                / STD[:, 0, 0]))


def test_batch_of_mixed_sizes_and_boxes_back_to_frame_pixels() -> None:
    frames = [torch.zeros(1080, 1920, 3, dtype=torch.uint8), torch.zeros(480, 640, 3,
                                                                         dtype=torch.uint8)]
    images, masks, plans = preprocess_batch(frames)
    assert images.shape == (2, 3, 768, 1152) and masks.shape == (2, 768, 1152)
    box = torch.tensor([[0.0, 0.0, 1152.0, 648.0]])
    torch.testing.assert_close(boxes_to_frame(box, plans[0]), torch.tensor([[0, 0, 1920, 1080.0]]))
    torch.testing.assert_close(boxes_to_frame(torch.tensor([[16.0, 8, 1024, 768]]), plans[1]),
                               torch.tensor([[10.0, 5, 640, 480]]))


@pytest.mark.parametrize(("frame", "message"), [
    (torch.zeros(3, 480, 640, dtype=torch.uint8), r"\(H, W, 3\)"),
    (torch.zeros(480, 640, 3), "uint8"),
])
def test_bad_frames_fail_clearly(frame, message) -> None:
    with pytest.raises(ValueError, match=message):
        preprocess(frame)


# ---- the daemon's fused preprocessing kernel against its torch ops (the reference's own) ----

# Where float rounding order differs from PyTorch's bilinear kernel (FMA contraction on the GPU,
# none in Triton's CPU interpreter), a resized value can land on the other side of .5 and round
# one grey level away. Measured: about 1e-5 of the values of random-noise frames (the worst case).
MAX_GREY_DIFF = 1.0
MAX_SHARE_DIFF = 1e-4


def random_frames(device: torch.device, input_hw: tuple[int, int]) -> list:
    """Both pixel formats, upscales and downscales with awkward ratios, a pitched NV12 picture,
    a portrait frame and (4th) one frame already at the canvas size."""
    from codetr_stream.daemon.pipeline.frames import Frame

    gen = torch.Generator().manual_seed(0)

    def frame(fmt: str, h: int, w: int, pitch: int = 0) -> Frame:
        shape = (h * 3 // 2, w + pitch) if fmt == "nv12" else (h, w, 3)
        pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)
        return Frame(f"cam-{fmt}-{h}x{w}", 0, None, 0, pixels[:, :w], fmt, h, w)

    return [frame("nv12", 240, 428), frame("rgb24", 480, 270), frame("nv12", 720, 1280, 64),
            frame("rgb24", *input_hw), frame("nv12", 150, 202), frame("rgb24", 97, 131)]


def fused_against_torch_ops(device: torch.device, input_hw: tuple[int, int] = (256, 320),
                            rows: int = 8) -> dict:
    """Both `Preprocessor` paths on `random_frames` (+ padding rows, + one row left alone):
    per frame row whether it is bit-equal, the largest grey-level difference and the share of
    values that differ; whether masks, padding, scales and the untouched row agree."""
    from codetr_stream.daemon.pipeline.preprocess import Preprocessor

    frames = random_frames(device, input_hw)
    results = []
    for fused in (False, True):
        images = torch.full((rows + 1, 3, *input_hw), 7.0, device=device)
        masks = torch.ones((rows + 1, *input_hw), dtype=torch.bool, device=device)
        scales = Preprocessor(input_hw, device, fused=fused)(frames, images, masks, rows=rows)
        results.append((images, masks, scales))
    (ref, ref_masks, ref_scales), (got, got_masks, got_scales) = results
    mean = torch.tensor(MEAN_RGB, device=device)[:, None, None]
    std = torch.tensor(STD_RGB, device=device)[:, None, None]
    stats = []
    for i in range(len(frames)):
        grey = ((got[i] * std + mean).round() - (ref[i] * std + mean).round()).abs()
        stats.append({"exact": torch.equal(got[i], ref[i]), "max_grey": grey.max().item(),
                      "share": (grey > 0).float().mean().item()})
    return {
        "rows": stats,
        "scales_equal": got_scales == ref_scales,
        "masks_equal": torch.equal(got_masks, ref_masks) and not got_masks[:rows].any(),
        "padding_zero": torch.equal(got[len(frames):], ref[len(frames):])
        and not got[len(frames):rows].any(),
        "untouched": bool((got[rows] == 7.0).all()) and bool(got_masks[rows].all()),
    }


def _interpret_fused() -> dict:
    """Child process (TRITON_INTERPRET=1): the kernel on CPU tensors."""
    return fused_against_torch_ops(torch.device("cpu"))


def check_fused(result: dict) -> None:
    assert result["scales_equal"] and result["masks_equal"]
    assert result["padding_zero"] and result["untouched"]
    for i, row in enumerate(result["rows"]):
        assert row["max_grey"] <= MAX_GREY_DIFF, (i, row)
        assert row["share"] <= MAX_SHARE_DIFF, (i, row)
    assert result["rows"][3]["exact"]  # no resize: conversion, padding, normalisation bit-equal


@pytest.mark.slow
def test_fused_kernel_matches_the_torch_ops_in_the_interpreter() -> None:
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernel]')")
    from interpret import run_interpreted

    result = run_interpreted("test_preprocess", "_interpret_fused")
    print(result)
    check_fused(result)


@pytest.mark.gpu
def test_fused_kernel_matches_the_torch_ops_on_the_gpu() -> None:
    result = fused_against_torch_ops(torch.device("cuda"), input_hw=(768, 1152))
    print(result)
    check_fused(result)
