"""The engine interface the daemon sees: fixed-shape `infer(images, masks)` on device tensors.

Every backend compiles one graph per batch size at one input size (static shapes build and run
fastest, and a CUDA graph is per shape anyway). This base class does what they share: check the
inputs against the manifest, pad a partial batch up to the next compiled batch size (padding
images are zeros with an all-valid mask, so they cannot produce NaNs) and cut the outputs back.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import torch
from codetr_stream.compile.engines.manifest import Manifest
from torch import Tensor

Outputs = tuple[Tensor, Tensor, Tensor]


class Engine:
    """Base of the backends; subclasses implement `_run` for exactly one compiled batch size."""

    def __init__(self, path: Path, manifest: Manifest, device: torch.device) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.device = device

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.manifest.input_hw

    def infer(self, images: Tensor, masks: Tensor) -> Outputs:
        """images (N,3,H,W) float, masks (N,H,W) bool (True = padding) -> boxes, scores, labels."""
        self._check_inputs(images, masks)
        n = images.shape[0]
        largest = self.manifest.batch_sizes[-1]
        if n > largest:
            parts = [self.infer(images[i:i + largest], masks[i:i + largest])
                     for i in range(0, n, largest)]
            return tuple(torch.cat(p, 0) for p in zip(*parts, strict=True))  # type: ignore[return-value]
        batch = self.manifest.batch_sizes[bisect.bisect_left(self.manifest.batch_sizes, n)]
        if batch != n:
            images = torch.cat((images, images.new_zeros((batch - n, *images.shape[1:]))))
            masks = torch.cat((masks, masks.new_zeros((batch - n, *masks.shape[1:]))))
        boxes, scores, labels = self._run(images, masks)
        return boxes[:n], scores[:n], labels[:n]

    def _run(self, images: Tensor, masks: Tensor) -> Outputs:
        raise NotImplementedError

    def _check_inputs(self, images: Tensor, masks: Tensor) -> None:
        h, w = self.input_hw
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, h, w):
            raise ValueError(f"engine {self.path} takes images (N,3,{h},{w}), got "
                             f"{tuple(images.shape)}; resize/pad frames to the engine size")
        if images.dtype != torch.float32:
            raise ValueError(f"engine {self.path} takes float32 images, got {images.dtype}")
        if tuple(masks.shape) != (images.shape[0], h, w) or masks.dtype != torch.bool:
            raise ValueError(f"engine {self.path} takes bool masks ({images.shape[0]},{h},{w}), "
                             f"got {masks.dtype} {tuple(masks.shape)}")
        if images.device != self.device or masks.device != self.device:
            raise ValueError(f"engine {self.path} runs on {self.device}, inputs are on "
                             f"{images.device}/{masks.device}")
