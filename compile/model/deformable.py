"""Multi-scale deformable attention layer: the projections around the MSDA op.

The sampling itself is `codetr_stream.plugin.ms_deform_attn` (one graph node, backend kernels
bind to it). Level shapes arrive as python ints so the op's shape tensors are constants of the
exported graph, never data-dependent.
"""

from __future__ import annotations

import torch
from codetr_stream.plugin import ms_deform_attn
from torch import Tensor, nn


def level_shape_tensors(shapes: list[tuple[int, int]],
                        device: torch.device) -> tuple[Tensor, Tensor]:
    """(L,2) int64 (h, w) and (L,) int64 start offsets of each level in the flattened tokens."""
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    return (torch.tensor(shapes, dtype=torch.int64, device=device),
            torch.tensor(starts, dtype=torch.int64, device=device))


class MultiScaleDeformableAttention(nn.Module):
    """mmcv MSDA: `x + output_proj(sample(value_proj(value), ref + offsets(q)))`, q = x + pos.

    2-d references move by `offset / (w_l, h_l)` (pixels of level l); 4-d references (boxes) by
    `offset / points * wh * 0.5`.
    """

    def __init__(self, dims: int, heads: int, levels: int, points: int) -> None:
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dims, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dims, heads * levels * points)
        self.value_proj = nn.Linear(dims, dims)
        self.output_proj = nn.Linear(dims, dims)

    def forward(self, x: Tensor, pos: Tensor, value: Tensor, value_mask: Tensor,
                reference: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """x, pos (B,Q,C); value (B,S,C); value_mask (B,S) True = padding;
        reference (B,Q,L,2|4) normalised; shapes: (h, w) of each level."""
        b, q, _ = x.shape
        heads, levels, points = self.heads, self.levels, self.points
        query = x + pos
        v = self.value_proj(value).masked_fill(value_mask[..., None], 0.0)
        v = v.view(b, value.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).view(b, q, heads, levels, points, 2)
        weights = self.attention_weights(query).view(b, q, heads, levels * points).softmax(-1)
        weights = weights.view(b, q, heads, levels, points)
        if reference.shape[-1] == 2:
            wh = torch.tensor([[w, h] for h, w in shapes], dtype=x.dtype, device=x.device)
            loc = reference[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
        else:
            ref = reference[:, :, None, :, None]
            loc = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
        spatial_shapes, level_start = level_shape_tensors(shapes, x.device)
        out = ms_deform_attn(v, spatial_shapes, level_start, loc, weights)
        return x + self.output_proj(out)
