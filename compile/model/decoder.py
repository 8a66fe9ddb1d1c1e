"""Co-DINO (DINO) decoder: post-norm layers with iterative box refinement.

Each layer's positional query is recomputed from its current reference box; after each layer
(the last included) `reg_branches[k]` refines the reference in sigmoid space. The head needs the
reference from BEFORE the last refinement (docs/model.md §8), so it is returned too.
"""

from __future__ import annotations

import torch
from codetr_stream.compile.model.deformable import MultiScaleDeformableAttention
from codetr_stream.compile.model.ffn import FFN
from codetr_stream.compile.model.position import box_sine_embedding
from codetr_stream.compile.model_config import TransformerConfig
from torch import Tensor, nn


def inverse_sigmoid(p: Tensor, eps: float = 1e-3) -> Tensor:
    """`log(p / (1 - p))` with both clamped to >= eps (mmdet's definition, eps 1e-3 here)."""
    p = p.clamp(0, 1)
    return torch.log(p.clamp(min=eps) / (1 - p).clamp(min=eps))


class SelfAttention(nn.Module):
    """`x + MHA(q = k = x + pos, v = x)`; `attn` keeps nn.MultiheadAttention's packed keys."""

    def __init__(self, dims: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dims, heads, batch_first=True)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        q = x + pos
        return x + self.attn(q, q, x, need_weights=False)[0]


class DecoderLayer(nn.Module):
    """self_attn -> norm -> cross_attn (MSDA on memory) -> norm -> ffn -> norm."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.embed_dims
        self.attentions = nn.ModuleList([
            SelfAttention(d, cfg.decoder_self_attn_heads),
            MultiScaleDeformableAttention(d, cfg.msda_heads, cfg.num_feature_levels,
                                          cfg.msda_points),
        ])
        self.ffns = nn.ModuleList([FFN(d, cfg.ffn_channels, nn.ReLU)])
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))

    def forward(self, x: Tensor, pos: Tensor, memory: Tensor, mask: Tensor, reference: Tensor,
                shapes: list[tuple[int, int]]) -> Tensor:
        x = self.norms[0](self.attentions[0](x, pos))
        x = self.norms[1](self.attentions[1](x, pos, memory, mask, reference, shapes))
        return self.norms[2](self.ffns[0](x, identity=x))


class CoDinoDecoder(nn.Module):
    """Layers, `ref_point_head` (box sine embedding -> query_pos) and the final `norm`."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.embed_dims
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.ref_point_head = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, query: Tensor, memory: Tensor, mask: Tensor, reference: Tensor,
                valid_ratios: Tensor, shapes: list[tuple[int, int]],
                reg_branches: nn.ModuleList) -> tuple[Tensor, Tensor, Tensor]:
        """reference (B,Q,4) cxcywh in sigmoid space. Returns the normed last output, the
        reference the last layer received and the reference after every refinement."""
        scale = torch.cat((valid_ratios, valid_ratios), -1)[:, None]
        x, last_in = query, reference
        num_feats = query.shape[-1] // 2
        for layer, reg in zip(self.layers, reg_branches, strict=False):
            ref_in = reference[:, :, None] * scale
            pos = self.ref_point_head(box_sine_embedding(ref_in[:, :, 0], num_feats))
            x = layer(x, pos, memory, mask, ref_in, shapes)
            last_in = reference
            reference = (reg(x) + inverse_sigmoid(reference)).sigmoid()
        return self.norm(x), last_in, reference
