"""`torch.ops.codetr.ms_deform_attn`: the one MSDA entry point the model calls.

Shapes (Deformable-DETR): value (B,S,H,D), spatial_shapes (L,2) int64 as (h,w), level_start_index
(L,) int64, sampling_locations (B,Q,H,L,P,2) as (x,y) in [0,1], attention_weights (B,Q,H,L,P)
-> output (B,Q,H*D) in value's dtype. Inference only: the op has no backward, and asking for one
raises (call it under `torch.no_grad()` / `torch.inference_mode()`).

Where Triton is installed the op is a `torch.library.triton_op`: on CUDA tensors it launches the
Triton kernel of plugin/kernel.py, and torch.export keeps it as one node (for the TensorRT
converter) while torch.compile traces into the kernel (fullgraph, CUDA graphs, AOTInductor). Every
other device runs the grid_sample reference, kept behind its own opaque op
`codetr::ms_deform_attn_reference` because it reads the level shapes on the host, which a traced
graph cannot. Without Triton (CPU-only torch) the op is a plain custom op over the reference.
"""

from __future__ import annotations

import torch
from codetr_stream.plugin.reference import ms_deform_attn_reference, sampling_from_offsets
from torch import Tensor

try:
    from codetr_stream.plugin import kernel as _kernel
except ImportError:  # no triton: CPU-only torch
    _kernel = None

OP_NAME = "codetr::ms_deform_attn"


def check_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> None:
    """Raise a ValueError naming the argument whose shape, dtype or device is wrong."""

    def fail(name: str, problem: str) -> None:
        raise ValueError(f"{OP_NAME}: {name} {problem} (see codetr_stream/plugin/op.py)")

    if value.dim() != 4 or not value.is_floating_point():
        fail("value", f"must be a float (B,S,H,D) tensor, got {value.dtype} {tuple(value.shape)}")
    batch, _, heads, _ = value.shape
    if sampling_locations.dim() != 6 or not sampling_locations.is_floating_point():
        fail("sampling_locations", "must be a float (B,Q,H,L,P,2) tensor")
    _, queries, _, levels, points, _ = sampling_locations.shape
    expected = {
        "spatial_shapes": (spatial_shapes, (levels, 2)),
        "level_start_index": (level_start_index, (levels,)),
        "sampling_locations": (sampling_locations, (batch, queries, heads, levels, points, 2)),
        "attention_weights": (attention_weights, (batch, queries, heads, levels, points)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            fail(name, f"has shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.device != value.device:
            fail(name, f"is on {tensor.device}, expected value's device {value.device}")
    for name in ("spatial_shapes", "level_start_index"):
        if expected[name][0].dtype not in (torch.int64, torch.int32):
            fail(name, f"must be int64 (or int32), got {expected[name][0].dtype}")
    if not attention_weights.is_floating_point():
        fail("attention_weights", f"must be floating point, got {attention_weights.dtype}")


def _output_like(value: Tensor, sampling_locations: Tensor) -> Tensor:
    batch, _, heads, dim = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], heads * dim)


@torch.library.custom_op("codetr::ms_deform_attn_reference", mutates_args=())
def _reference_op(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The grid_sample reference as an opaque op (any device)."""
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@_reference_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return _output_like(value, sampling_locations)


def _forward(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention, inference only (no backward; see the module doc)."""
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    check_inputs(*args)
    if _kernel is not None and value.is_cuda:
        return _kernel.ms_deform_attn_triton(*args)
    return torch.ops.codetr.ms_deform_attn_reference(*args)


if _kernel is not None:
    ms_deform_attn = torch.library.triton_op(OP_NAME, _forward, mutates_args=())
else:
    ms_deform_attn = torch.library.custom_op(OP_NAME, _forward, mutates_args=())

    @ms_deform_attn.register_fake
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return _output_like(value, sampling_locations)


def _no_backward(ctx, grad_output):
    raise RuntimeError(
        f"{OP_NAME} is inference only and has no backward: run the model under "
        "torch.no_grad() or torch.inference_mode()"
    )


def _setup_context(ctx, inputs, output) -> None:
    return None


for _op in (ms_deform_attn, _reference_op):
    _op.register_autograd(_no_backward, setup_context=_setup_context)


def ms_deform_attn_from_offsets(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    reference: Tensor,
    offsets: Tensor,
    logits: Tensor,
) -> Tensor:
    """MSDA from the layer's projections: reference (B,Q,L,2|4), offsets (B,Q,H*L*P*2), logits
    (B,Q,H*L*P); see `sampling_from_offsets`. On CUDA one kernel makes the locations and weights
    as it samples (never written to memory); elsewhere they are computed and the op runs.

    Not an op of its own: the Inductor engine's "msda-offsets" pass calls it in place of the
    op and the layer's location/softmax arithmetic (compile/engines/passes.py); exported
    programs, and with them TensorRT, keep `codetr::ms_deform_attn`.
    """
    offsets, logits = offsets.flatten(2), logits.flatten(2)
    if _kernel is not None and value.is_cuda:
        return _kernel.ms_deform_attn_offsets_triton(
            value, spatial_shapes, level_start_index, reference, offsets, logits)
    locations, weights = sampling_from_offsets(
        spatial_shapes, reference, offsets, logits, value.shape[2])
    return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
