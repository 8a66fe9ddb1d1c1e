"""`torch.ops.codetr.ms_deform_attn`: the one MSDA entry point the model calls.

Registered through `torch.library` so that torch.export keeps it as a single node (the fake
implementation gives its output shape) and every backend can bind its own kernel to it.
Inference only: the op has no backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from codetr_stream.plugin.reference import ms_deform_attn_reference


@torch.library.custom_op("codetr::ms_deform_attn", mutates_args=())
def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention (inference only; no backward)."""
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@ms_deform_attn.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    batch, _, heads, dim = value.shape
    queries = sampling_locations.shape[1]
    return value.new_empty(batch, queries, heads * dim)
