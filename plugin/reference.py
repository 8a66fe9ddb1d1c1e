"""The reference multi-scale deformable attention: bilinear sampling through `grid_sample`.

This is the definition the fast kernel is checked against (and the CPU implementation of the op).
Conventions follow Deformable-DETR: locations in [0, 1] of each level's map, `align_corners=False`,
zero outside the map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """value (B,S,H,D), shapes (L,2) as (h,w), locations (B,Q,H,L,P,2) as (x,y),
    weights (B,Q,H,L,P) -> output (B,Q,H*D)."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    # grid_sample needs one dtype: compute in the widest input dtype, answer in value's.
    out_dtype = value.dtype
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    dtype = torch.promote_types(dtype, attention_weights.dtype)
    value = value.to(dtype)
    sampling_locations = sampling_locations.to(dtype)
    attention_weights = attention_weights.to(dtype)
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, ((h, w), start) in enumerate(zip(shapes, starts, strict=True)):
        # (B,h*w,H,D) -> (B*H, D, h, w)
        value_l = value[:, start : start + h * w].flatten(2).transpose(1, 2)
        value_l = value_l.reshape(batch * heads, dim, h, w)
        # (B,Q,H,P,2) -> (B*H, Q, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    # (B*H, D, Q, L*P) weighted by (B*H, 1, Q, L*P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (stacked * weights).sum(-1).view(batch, heads * dim, queries)
    return output.transpose(1, 2).to(out_dtype).contiguous()


def sampling_from_offsets(
    spatial_shapes: Tensor, reference: Tensor, offsets: Tensor, logits: Tensor, heads: int
) -> tuple[Tensor, Tensor]:
    """The MSDA layer's sampling locations (B,Q,H,L,P,2) and attention weights (B,Q,H,L,P)
    from its projections, in its operations and order: reference (B,Q,L,2|4) normalised points
    or boxes, offsets (B,Q,H*L*P*2) in pixels of each level (points) or box-relative, logits
    (B,Q,H*L*P) softmaxed over each (query, head)'s L*P."""
    batch, queries, levels, ref_dims = reference.shape
    points = logits.shape[-1] // (heads * levels)
    offsets = offsets.view(batch, queries, heads, levels, points, 2)
    weights = logits.view(batch, queries, heads, levels * points).softmax(-1)
    weights = weights.view(batch, queries, heads, levels, points)
    if ref_dims == 2:
        wh = spatial_shapes.flip(-1).to(torch.float32)
        locations = reference[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    else:
        ref = reference[:, :, None, :, None]
        locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
    return locations, weights
