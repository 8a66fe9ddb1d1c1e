"""Two-stage query selection: score every encoder token as a box proposal, keep the top Q.

Validity follows official mmdet (docs/model.md §6): a proposal counts only if all four
sigmoid-space values lie strictly in (0.01, 0.99) and its token is not padding. Proposals are
formed in float32 whatever the feature dtype, because the 0.01 boundary is hit exactly at some
sizes (0.5 / 50) and fp16 rounding would flip it.
"""

from __future__ import annotations

import torch
from codetr_stream.compile.model.encoder import level_centres
from codetr_stream.compile.model.masks import valid_size
from torch import Tensor


def encoder_proposals(memory: Tensor, mask: Tensor, level_masks: list[Tensor],
                      shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Memory with invalid rows zeroed and (B, N, 4) proposal logits (+inf where invalid)."""
    proposals = []
    for lvl, (level_mask, centre) in enumerate(zip(level_masks, level_centres(
            shapes, memory.new_empty((), dtype=torch.float32)), strict=True)):
        valid_h, valid_w = valid_size(level_mask)
        xy = centre[None] / torch.stack((valid_w, valid_h), -1)[:, None]
        proposals.append(torch.cat((xy, torch.full_like(xy, 0.05 * 2.0**lvl)), -1))
    boxes = torch.cat(proposals, 1)
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1) & ~mask
    logits = torch.log(boxes / (1 - boxes)).masked_fill(~valid[..., None], float("inf"))
    return memory.masked_fill(~valid[..., None], 0.0), logits.to(memory.dtype)


def select_queries(scores: Tensor, coord_logits: Tensor, num_query: int) -> Tensor:
    """Reference boxes (B, Q, 4) in sigmoid space of the Q tokens with the best class score."""
    if scores.shape[1] < num_query:
        raise ValueError(f"the input is too small: {scores.shape[1]} encoder tokens for "
                         f"{num_query} queries; use larger images")
    index = scores.max(-1).values.topk(num_query, dim=1).indices
    return coord_logits.gather(1, index[..., None].expand(-1, -1, 4)).sigmoid()
