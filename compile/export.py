"""torch.export of the model at a fixed input size: the one graph every engine backend compiles.

The size is fixed (the daemon letterboxes every frame into it); the batch dimension is exported
dynamic when it traces cleanly, so one program (one copy of the weights) serves every compiled
batch size, and falls back to a static batch otherwise. The input size must be a multiple of
`size_multiple(config)`, see there.
"""

from __future__ import annotations

import logging
import math

import torch
from codetr_stream.compile.model_config import CoDinoConfig
from torch import Tensor, nn

log = logging.getLogger(__name__)

INPUT_NAMES = ("images", "masks")
OUTPUT_NAMES = ("boxes", "scores", "labels")


class SizeError(ValueError):
    """An input size the model cannot be compiled for; the message gives the nearest valid one."""


def size_multiple(cfg: CoDinoConfig) -> int:
    """H and W must divide by patch_size * 2^(merges): 32 for Swin (4 * 2 * 2 * 2).

    The backbone would otherwise zero-pad inside patch embedding / patch merging, in places the
    padding mask cannot describe, so detections near the border would depend on the canvas size.
    Window padding (window 12) needs no constraint: the model pads windows itself.
    """
    return cfg.backbone.patch_size * math.prod(cfg.backbone.strides[1:])


def level_tokens(cfg: CoDinoConfig, hw: tuple[int, int]) -> int:
    """Encoder tokens at this size: backbone levels plus the stride-2 extra levels of the neck."""
    h, w = hw
    stride = cfg.backbone.patch_size
    total = 0
    for level in range(cfg.neck.num_outs):
        if level < len(cfg.backbone.strides):
            stride = cfg.backbone.patch_size * math.prod(cfg.backbone.strides[1:level + 1])
            h_l, w_l = math.ceil(h / stride), math.ceil(w / stride)
        else:  # 3x3 stride-2 conv, padding 1
            h_l, w_l = (h_l + 1) // 2, (w_l + 1) // 2
        total += h_l * w_l
    return total


def check_input_size(cfg: CoDinoConfig, hw: tuple[int, int]) -> None:
    """Raise `SizeError` (naming the nearest valid size) unless (H, W) can be compiled."""
    h, w = hw
    step = size_multiple(cfg)
    if h <= 0 or w <= 0 or h % step or w % step:
        near = f"{max(step, round(w / step) * step)}x{max(step, round(h / step) * step)}"
        raise SizeError(f"size {w}x{h} (WxH): width and height must be multiples of {step} "
                        f"(patch {cfg.backbone.patch_size} x 2^{len(cfg.backbone.strides) - 1} "
                        f"patch merges); nearest: {near}")
    tokens = level_tokens(cfg, hw)
    if tokens < cfg.head.num_query:
        raise SizeError(f"size {w}x{h} (WxH) gives {tokens} encoder tokens, fewer than the "
                        f"{cfg.head.num_query} queries the two-stage selection takes; use a "
                        "larger size")


def example_inputs(batch: int, hw: tuple[int, int], device: torch.device | str,
                   seed: int = 0) -> tuple[Tensor, Tensor]:
    """Normalised-looking random images and an all-valid mask (the daemon's canvas)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn((batch, 3, *hw), generator=generator).to(device)
    masks = torch.zeros((batch, *hw), dtype=torch.bool, device=device)
    return images, masks


def export_model(model: nn.Module, hw: tuple[int, int], batch: int,
                 device: torch.device | str, *,
                 max_batch: int | None = None) -> torch.export.ExportedProgram:
    """Export `model` (in its current dtype, on `device`) at batch `batch`; with `max_batch`
    the batch dimension is dynamic in [1, max_batch]."""
    inputs = example_inputs(batch, hw, device)
    dynamic = None
    if max_batch is not None:
        dim = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic = ({0: dim}, {0: dim})
    with torch.no_grad():
        return torch.export.export(model, inputs, dynamic_shapes=dynamic, strict=False)


def export_for_batches(model: nn.Module, hw: tuple[int, int], batch_sizes: list[int],
                       device: torch.device | str) -> dict[int, torch.export.ExportedProgram]:
    """One program per batch size: the same dynamic-batch program for all where that exports,
    else one static program each (the model has a batch-specialising branch)."""
    if len(batch_sizes) > 1:
        try:
            program = export_model(model, hw, max(batch_sizes), device,
                                   max_batch=max(batch_sizes))
            return dict.fromkeys(batch_sizes, program)
        except Exception as exc:  # torch raises many types here; static export still works
            first = str(exc).splitlines()[0] if str(exc) else ""
            log.warning("dynamic-batch export failed (%s: %s); exporting each batch size",
                        type(exc).__name__, first)
    return {b: export_model(model, hw, b, device) for b in batch_sizes}


def max_abs_diff(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> list[float]:
    """Per-output max |a - b| (labels: number of differing entries)."""
    diffs = []
    for x, y in zip(a, b, strict=True):
        if x.is_floating_point():
            diffs.append(float((x.float() - y.float()).abs().max()) if x.numel() else 0.0)
        else:
            diffs.append(float((x != y).sum()))
    return diffs
