"""Frames -> the engine's input buffer, on the engine's device, one batch at a time.

The resize/pad/normalise is the model's reference preprocessing (`codetr_stream.compile.
preprocess`). An NVDEC frame is NV12 in GPU memory and is converted on the GPU (no host copy of
pixels); a CPU-decoded frame is already RGB in host memory.

Two implementations behind one `Preprocessor`:
- on CUDA, one Triton kernel for the whole batch (`preprocess_kernel`), with one small upload of
  the rows' geometry. Launches matter more than GPU time here: every one hands the GIL to the
  camera threads, and getting it back can take a whole switch interval. (A CUDA graph per batch
  layout was tried first: capturing one while the camera threads run NVDEC was invalidated.)
- elsewhere (the CPU daemon), and as the reference the kernel is tested against, the reference's
  own tensor ops, bit-for-bit: frames of one size are processed together, one set of ops per size.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from codetr_stream.compile.model_inputs import MEAN_RGB, STD_RGB, plan_resize
from codetr_stream.daemon.pipeline.frames import Frame

try:
    from codetr_stream.daemon.pipeline import preprocess_kernel
except ImportError:  # no triton: the torch ops everywhere
    preprocess_kernel = None


def _nv12_to_rgb_float(nv12: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., H*3/2, W) uint8 NV12 -> (..., H, W, 3) float32 of whole numbers 0..255."""
    y = nv12[..., :height, :].float()
    uv = nv12[..., height:height + height // 2, :].unflatten(-1, (width // 2, 2)).float()
    uv = uv.repeat_interleave(2, dim=-3).repeat_interleave(2, dim=-2)
    c, d, e = y - 16.0, uv[..., 0] - 128.0, uv[..., 1] - 128.0
    r = 1.164383 * c + 1.596027 * e
    g = 1.164383 * c - 0.391762 * d - 0.812968 * e
    b = 1.164383 * c + 2.017232 * d
    return torch.stack((r, g, b), dim=-1).round_().clamp_(0, 255)


def nv12_to_rgb(nv12: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., H*3/2, W) uint8 NV12 -> (..., H, W, 3) uint8 RGB, BT.601 limited range (FFmpeg's
    default for SD and unflagged streams, so GPU and CPU decodes give the same picture)."""
    return _nv12_to_rgb_float(nv12, height, width).to(torch.uint8)


def frame_rgb(frame: Frame, device: torch.device) -> torch.Tensor:
    """The frame as (H, W, 3) uint8 RGB on `device`."""
    if frame.pixel_format == "nv12":
        return nv12_to_rgb(frame.pixels.to(device), frame.height, frame.width)
    return frame.pixels.to(device, non_blocking=True)


Rows = slice | torch.Tensor


class _SizeGroup:
    """The kernels for frames of one size and format written into rows `rows` of the buffer.

    The same ops as `compile.model_inputs.preprocess`, in the same memory layout (channels last,
    as a permuted HWC frame), so the same kernels run and the numbers are the reference's.
    """

    def __init__(self, pixel_format: str, height: int, width: int,
                 input_hw: tuple[int, int], mean: torch.Tensor, std: torch.Tensor) -> None:
        self.pixel_format, self.height, self.width = pixel_format, height, width
        self.plan = plan_resize(height, width, input_hw, fit_portrait=True)
        self.input_hw = input_hw
        self.mean, self.std = mean, std

    def __call__(self, pixels: torch.Tensor, images: torch.Tensor, rows: Rows) -> None:
        """pixels: the group's frames stacked, uint8 (G, H*3/2, W) NV12 or (G, H, W, 3) RGB."""
        if self.pixel_format == "nv12":
            rgb = _nv12_to_rgb_float(pixels, self.height, self.width)
        else:
            rgb = pixels.float()
        rgb = rgb.permute(0, 3, 1, 2)
        nh, nw = self.plan.resized_hw
        if (nh, nw) != (self.height, self.width):
            rgb = F.interpolate(rgb, size=(nh, nw), mode="bilinear", align_corners=False)
            rgb = rgb.round().clamp(0, 255)  # cv2 returns uint8
        canvas = rgb.new_zeros(rgb.shape[0], 3, *self.input_hw)
        canvas[:, :, :nh, :nw] = rgb
        images[rows] = (canvas - self.mean) / self.std


class Preprocessor:
    """Writes frames into rows of an (N, 3, H, W) float32 image buffer and its (N, H, W) mask.

    `fused`: the Triton kernel (default: on CUDA when triton imports) or the torch ops.
    """

    def __init__(self, input_hw: tuple[int, int], device: torch.device,
                 fused: bool | None = None) -> None:
        self.input_hw = input_hw
        self.device = device
        if fused is None:
            fused = device.type == "cuda" and preprocess_kernel is not None
        if fused and preprocess_kernel is None:
            raise RuntimeError("the fused preprocessing needs triton (pip install triton)")
        self.fused = fused
        self.mean = torch.tensor(MEAN_RGB, device=device)[:, None, None]
        self.std = torch.tensor(STD_RGB, device=device)[:, None, None]
        self._lut = preprocess_kernel.conversion_table(device) if fused else None
        self._groups: dict[tuple[str, int, int], _SizeGroup] = {}

    def __call__(self, frames: Sequence[Frame], images: torch.Tensor, masks: torch.Tensor,
                 rows: int | None = None) -> list[tuple[float, float]]:
        """Fill rows 0..len(frames)-1, and zero rows len(frames)..rows-1 (padding: zero images,
        all-valid masks); returns each frame's (sx, sy): input px = frame px * s.

        Portrait frames are letterboxed into the (landscape) engine size rather than refused:
        a camera mounted sideways still gets detections. The masks stay all valid, as in the
        reference pipeline.
        """
        rows = len(frames) if rows is None else rows
        if rows < len(frames):
            raise ValueError(f"{len(frames)} frames do not fit in {rows} rows")
        plans = [self._group(frame).plan for frame in frames]
        if self.fused:
            self._fused(frames, plans, images, masks, rows)
        else:
            self._torch_ops(frames, images, masks, rows)
        return [plan.scale_xy for plan in plans]

    def _group(self, frame: Frame) -> _SizeGroup:
        key = (frame.pixel_format, frame.height, frame.width)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _SizeGroup(*key, self.input_hw, self.mean, self.std)
        return group

    def _fused(self, frames: Sequence[Frame], plans: list, images: torch.Tensor,
               masks: torch.Tensor, rows: int) -> None:
        # Frames decoded elsewhere are copied over on this stream, which orders any reuse of
        # the copy's memory after the kernel. (Every torch call hands the GIL over, even a
        # no-op `.to`: the batch makes two, the table's upload and the launch.)
        pixels = [frame.pixels if frame.pixels.device == self.device
                  else frame.pixels.to(self.device) for frame in frames]
        table = torch.from_numpy(preprocess_kernel.row_table(frames, pixels, plans, rows))
        # From pageable memory: staged before the call returns, ordered on the current stream,
        # no wait for the GPU.
        table = table.to(self.device, non_blocking=True)
        preprocess_kernel.launch(table, self._lut, images, masks, MEAN_RGB, STD_RGB)

    def _torch_ops(self, frames: Sequence[Frame], images: torch.Tensor, masks: torch.Tensor,
                   rows: int) -> None:
        by_size: dict[tuple[str, int, int], list[int]] = defaultdict(list)
        for i, frame in enumerate(frames):
            by_size[frame.pixel_format, frame.height, frame.width].append(i)
        for key, indexes in by_size.items():
            pixels = torch.stack([frames[i].pixels.to(self.device) for i in indexes])
            self._groups[key](pixels, images, _rows(indexes, images.device))
        masks[:rows].zero_()
        if rows > len(frames):
            images[len(frames):rows].zero_()


def _rows(rows: list[int], device: torch.device) -> Rows:
    """Consecutive rows as a slice (a plain view), others as an index tensor."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, device=device)
