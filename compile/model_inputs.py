"""Frames in, network input out, and boxes back to frame pixels: the reference test pipeline.

Follows the reference (docs/model.md §1): keep-ratio resize with mmcv's rule (long edge to
1152, short edge to 768, whichever is tighter), bilinear, rounded back to uint8 as cv2 does; pad
bottom/right with pixel 0 in raw space (so padding becomes -mean/std); normalise RGB; all-zero
mask. Plain tensor ops on the frame's device, so the daemon runs the same code on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CANVAS_HW = (768, 1152)
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Resize:
    """Where a frame landed on the canvas; `scale_xy` maps canvas pixels back to the frame."""

    resized_hw: tuple[int, int]
    scale_xy: tuple[float, float]


def plan_resize(h: int, w: int, canvas_hw: tuple[int, int] = CANVAS_HW, *,
                fit_portrait: bool = False) -> Resize:
    """The reference's resize of an h x w frame onto a landscape canvas.

    The reference rule `s = min(long/max(h,w), short/min(h,w))` assumes landscape frames; a
    portrait frame would come out taller than the canvas and the reference pipeline fails. We
    raise a clear error for it, unless `fit_portrait=True`, which scales it to fit inside the
    canvas instead (`s = min(W/w, H/h)`, a deviation from the reference).
    """
    ch, cw = canvas_hw
    if h <= 0 or w <= 0:
        raise ValueError(f"frame size must be positive, got {h}x{w}")
    s = min(max(canvas_hw) / max(h, w), min(canvas_hw) / min(h, w))
    new_h, new_w = int(h * s + 0.5), int(w * s + 0.5)
    if new_h > ch or new_w > cw:
        if not fit_portrait:
            raise ValueError(
                f"a {w}x{h} (WxH) frame resizes to {new_w}x{new_h}, which does not fit the "
                f"{cw}x{ch} canvas: the reference pipeline takes landscape frames only. Rotate "
                f"the frame, or pass fit_portrait=True to letterbox it (not reference behaviour)")
        s = min(cw / w, ch / h)
        new_h, new_w = min(int(h * s + 0.5), ch), min(int(w * s + 0.5), cw)
    return Resize((new_h, new_w), (new_w / w, new_h / h))


def preprocess(frame: Tensor, canvas_hw: tuple[int, int] = CANVAS_HW, *,
               fit_portrait: bool = False, pad_mask: bool = False) -> tuple[Tensor, Tensor, Resize]:
    """uint8 RGB frame (H, W, 3) -> normalised image (3, Hc, Wc) float32, mask (Hc, Wc) bool and
    its `Resize`. The mask is all False as in the reference pipeline, or marks the padding with
    `pad_mask=True` (the network supports it; the reference accuracy was measured without)."""
    if frame.dim() != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be (H, W, 3) RGB, got shape {tuple(frame.shape)}")
    if frame.dtype != torch.uint8:
        raise ValueError(f"frame must be uint8 (0..255), got {frame.dtype}")
    plan = plan_resize(frame.shape[0], frame.shape[1], canvas_hw, fit_portrait=fit_portrait)
    nh, nw = plan.resized_hw
    pixels = frame.permute(2, 0, 1)[None].float()
    if (nh, nw) != tuple(frame.shape[:2]):
        pixels = F.interpolate(pixels, size=(nh, nw), mode="bilinear", align_corners=False)
        pixels = pixels.round().clamp(0, 255)  # cv2 returns uint8
    canvas = pixels.new_zeros(3, *canvas_hw)
    canvas[:, :nh, :nw] = pixels[0]
    mean = torch.tensor(MEAN_RGB, device=frame.device)[:, None, None]
    std = torch.tensor(STD_RGB, device=frame.device)[:, None, None]
    mask = torch.zeros(canvas_hw, dtype=torch.bool, device=frame.device)
    if pad_mask:
        mask[nh:, :] = True
        mask[:, nw:] = True
    return (canvas - mean) / std, mask, plan


def preprocess_batch(frames: list[Tensor], canvas_hw: tuple[int, int] = CANVAS_HW, *,
                     fit_portrait: bool = False, pad_mask: bool = False
                     ) -> tuple[Tensor, Tensor, list[Resize]]:
    """Frames of any sizes -> images (B, 3, Hc, Wc), masks (B, Hc, Wc) and one `Resize` each."""
    out = [preprocess(f, canvas_hw, fit_portrait=fit_portrait, pad_mask=pad_mask) for f in frames]
    return (torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out]),
            [o[2] for o in out])


def boxes_to_frame(boxes: Tensor, resize: Resize) -> Tensor:
    """(..., 4) xyxy canvas pixels -> frame pixels (divided by the scale; no clipping, as in
    the reference)."""
    sx, sy = resize.scale_xy
    return boxes / boxes.new_tensor([sx, sy, sx, sy])
