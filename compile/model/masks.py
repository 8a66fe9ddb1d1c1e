"""Padding masks (True = padding, bottom/right) at every feature level, and the valid size
they describe. The valid region is read from the top row / left column with tensor sums, never
with data-dependent python, so it stays one exported graph for any mix of image sizes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def level_masks(image_mask: Tensor, feats: list[Tensor]) -> list[Tensor]:
    """(B,H,W) -> one (B,h,w) mask per level by nearest resize, as mmdet does."""
    return [F.interpolate(image_mask[:, None].to(f.dtype), size=f.shape[-2:])[:, 0].bool()
            for f in feats]


def valid_size(mask: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(B,) valid height and width: unmasked entries of the left column and the top row."""
    return (~mask[:, :, 0]).sum(1).to(dtype), (~mask[:, 0, :]).sum(1).to(dtype)


def valid_ratios(mask: Tensor) -> Tensor:
    """(B, 2) unpadded fraction (x, y) of a level."""
    valid_h, valid_w = valid_size(mask)
    return torch.stack((valid_w / mask.shape[2], valid_h / mask.shape[1]), -1)
