"""Co-DINO detector at inference: Swin backbone -> ChannelMapper -> CoDINOHead -> top-k."""

from __future__ import annotations

import torch
from codetr_stream.compile.model.head import CoDINOHead
from codetr_stream.compile.model.neck import ChannelMapper
from codetr_stream.compile.model.swin import SwinTransformer
from codetr_stream.compile.model_config import CoDinoConfig
from torch import Tensor, nn


class CoDino(nn.Module):
    """forward(images (B,3,H,W) normalised float, masks (B,H,W) bool, True = padding) ->
    boxes (B,K,4) xyxy input pixels, scores (B,K) descending, labels (B,K) int64."""

    def __init__(self, cfg: CoDinoConfig) -> None:
        super().__init__()
        self.config = cfg
        self.class_names: list[str] | None = None
        self.backbone = SwinTransformer(cfg.backbone)
        self.neck = ChannelMapper(cfg.neck)
        self.query_head = CoDINOHead(cfg.head, cfg.transformer)

    def forward(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _check_inputs(images, masks, self.backbone.patch_embed.projection.weight.dtype)
        return self.query_head(self.neck(self.backbone(images)), masks)


def _check_inputs(images: Tensor, masks: Tensor, dtype: torch.dtype) -> None:
    """Static checks (shapes and dtypes only) so that bad input fails here, clearly, and the
    checks stay free of data-dependent branches for torch.export."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) normalised RGB, got shape "
                         f"{tuple(images.shape)}")
    if images.dtype != dtype:
        raise ValueError(f"images must be {dtype} like the model weights (normalised), got "
                         f"{images.dtype}")
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool (True = padding), got {masks.dtype}")
    b, _, h, w = images.shape
    if masks.dim() != 3 or masks.shape[0] != b or masks.shape[1] != h or masks.shape[2] != w:
        raise ValueError(f"masks must be (B, H, W) = ({b}, {h}, {w}) to match images, got "
                         f"{tuple(masks.shape)}")
