"""Frames -> the engine's input buffer, on the engine's device.

The resize/pad/normalise is the model's reference preprocessing (`codetr_stream.compile.
preprocess`), run as tensor ops on the device that holds the engine; this module only brings each
frame there as uint8 RGB. An NVDEC frame is NV12 in GPU memory and is converted in place on the
GPU (no host copy of pixels); a CPU-decoded frame is already RGB in host memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from codetr_stream.compile.preprocess import preprocess
from codetr_stream.daemon.frames import Frame


def nv12_to_rgb(nv12: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H*3/2, W) uint8 NV12 -> (H, W, 3) uint8 RGB, BT.601 limited range (FFmpeg's default
    for SD and unflagged streams, so GPU and CPU decodes give the same picture)."""
    y = nv12[:height].float()
    uv = nv12[height:height + height // 2].view(height // 2, width // 2, 2).float()
    uv = uv.repeat_interleave(2, dim=0).repeat_interleave(2, dim=1)
    c, d, e = y - 16.0, uv[..., 0] - 128.0, uv[..., 1] - 128.0
    r = 1.164383 * c + 1.596027 * e
    g = 1.164383 * c - 0.391762 * d - 0.812968 * e
    b = 1.164383 * c + 2.017232 * d
    return torch.stack((r, g, b), dim=-1).round_().clamp_(0, 255).to(torch.uint8)


def frame_rgb(frame: Frame, device: torch.device) -> torch.Tensor:
    """The frame as (H, W, 3) uint8 RGB on `device`."""
    if frame.pixel_format == "nv12":
        return nv12_to_rgb(frame.pixels.to(device), frame.height, frame.width)
    return frame.pixels.to(device, non_blocking=True)


class Preprocessor:
    """Writes frames into rows of an (N, 3, H, W) float32 image buffer and its (N, H, W) mask."""

    def __init__(self, input_hw: tuple[int, int], device: torch.device) -> None:
        self.input_hw = input_hw
        self.device = device

    def __call__(self, frames: Sequence[Frame], images: torch.Tensor,
                 masks: torch.Tensor) -> list[tuple[float, float]]:
        """Fill rows 0..len(frames)-1; returns each frame's (sx, sy): input px = frame px * s.

        Portrait frames are letterboxed into the (landscape) engine size rather than refused:
        a camera mounted sideways still gets detections.
        """
        scales = []
        for i, frame in enumerate(frames):
            image, mask, plan = preprocess(frame_rgb(frame, self.device), self.input_hw,
                                           fit_portrait=True)
            images[i].copy_(image)
            masks[i].copy_(mask)
            scales.append(plan.scale_xy)
        return scales
