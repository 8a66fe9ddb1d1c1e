"""Sine positional encodings: of padding masks (per feature level) and of box coordinates.

Both interleave sin/cos per frequency ([sin, cos, sin, cos, ...]) as DETR/DINO do; the mask
encoding puts y before x, the box encoding orders (y, x, w, h). Computed in the feature dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _interleave(pos: Tensor) -> Tensor:
    """(..., F) angles -> (..., F) as sin of even and cos of odd entries, interleaved."""
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def _frequencies(num_feats: int, temperature: float, like: Tensor) -> Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=like.device)
    return (temperature ** (2 * (dim_t // 2) / num_feats)).to(like.dtype)


class SinePositionalEncoding(nn.Module):
    """mmdet `SinePositionalEncoding(normalize=True)`: (B,h,w) mask -> (B, 2F, h, w)."""

    def __init__(self, num_feats: int, temperature: float, scale: float, offset: float,
                 eps: float) -> None:
        super().__init__()
        self.num_feats, self.temperature = num_feats, temperature
        self.scale, self.offset, self.eps = scale, offset, eps

    def forward(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        not_mask = (~mask).to(dtype)
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
        x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        dim_t = _frequencies(self.num_feats, self.temperature, not_mask)
        pos = torch.cat((_interleave(y[..., None] / dim_t), _interleave(x[..., None] / dim_t)), -1)
        return pos.permute(0, 3, 1, 2)


def box_sine_embedding(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """DINO's `gen_sineembed_for_position`: (..., 4) cxcywh in [0,1] -> (..., 4F), (y,x,w,h)."""
    dim_t = _frequencies(num_feats, temperature, boxes)
    x, y, w, h = (_interleave(boxes[..., i, None] * (2 * math.pi) / dim_t) for i in range(4))
    return torch.cat((y, x, w, h), dim=-1)
