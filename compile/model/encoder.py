"""Deformable transformer encoder: post-norm layers of MSDA self-attention and FFN."""

from __future__ import annotations

import torch
from codetr_stream.compile.model.deformable import MultiScaleDeformableAttention
from codetr_stream.compile.model.ffn import FFN
from codetr_stream.compile.model_config import TransformerConfig
from torch import Tensor, nn


def level_centres(shapes: list[tuple[int, int]], like: Tensor) -> list[Tensor]:
    """Per level, the (h*w, 2) token centres (j + 0.5, i + 0.5) in level pixels, row-major."""
    centres = []
    for h, w in shapes:
        ys = torch.arange(h, dtype=like.dtype, device=like.device) + 0.5
        xs = torch.arange(w, dtype=like.dtype, device=like.device) + 0.5
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), -1))
    return centres


def encoder_reference_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """(B, N, L, 2): each token's centre normalised by its level's valid size, then rescaled
    to every level's valid ratio (Deformable-DETR `get_reference_points`)."""
    refs = []
    for lvl, ((h, w), centre) in enumerate(zip(shapes, level_centres(shapes, valid_ratios),
                                               strict=True)):
        size = valid_ratios[:, None, lvl] * torch.tensor([w, h], dtype=valid_ratios.dtype,
                                                         device=valid_ratios.device)
        refs.append(centre[None] / size)
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


class EncoderLayer(nn.Module):
    """self_attn -> norm -> ffn -> norm (mmcv operation order, keys attentions/ffns/norms)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.embed_dims
        self.attentions = nn.ModuleList([MultiScaleDeformableAttention(
            d, cfg.msda_heads, cfg.num_feature_levels, cfg.msda_points)])
        self.ffns = nn.ModuleList([FFN(d, cfg.ffn_channels, nn.ReLU)])
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(2))

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor, reference: Tensor,
                shapes: list[tuple[int, int]]) -> Tensor:
        x = self.norms[0](self.attentions[0](x, pos, x, mask, reference, shapes))
        return self.norms[1](self.ffns[0](x, identity=x))


class DeformableEncoder(nn.Module):
    """Stack of `EncoderLayer`s; no final norm (Co-DINO's encoder has none)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor, valid_ratios: Tensor,
                shapes: list[tuple[int, int]]) -> Tensor:
        reference = encoder_reference_points(shapes, valid_ratios)
        for layer in self.layers:
            x = layer(x, pos, mask, reference, shapes)
        return x
