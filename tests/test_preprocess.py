"""Preprocessing follows the reference pipeline (model_facts.md section 1)."""

from __future__ import annotations

import pytest
import torch
from codetr_stream.compile.preprocess import (
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
