"""The FP16 policy shared by every PyTorch-run backend (eager and Inductor).

Matrix weights (every parameter with 2+ dims: linear/conv kernels, embeddings, the Swin bias
tables) are stored in FP16 once, so no per-call weight cast is needed; the forward then runs under
CUDA autocast. Autocast keeps the numerically sensitive ops in FP32: softmax (MSDA weights and
decoder self-attention), layer_norm, group_norm, cumsum (mask positional encoding), exp/log/pow
(proposal logits, inverse sigmoid). Type promotion keeps the box chain in FP32 too: reference
points start as FP32 proposals and every refinement adds an FP16 delta to an FP32 inverse sigmoid,
so sampling locations and final boxes are FP32. Engine outputs are cast to FP32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def half_matrices_(module: nn.Module) -> nn.Module:
    """Give parameters of 2+ dims FP16 copies (1-D biases and norm weights stay FP32).

    The parameter objects are replaced, not modified: an exported program's module shares them
    with the model it was exported from, which must stay FP32 (it is the reference).
    """
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.dim() >= 2 and param.is_floating_point():
                setattr(owner, name, nn.Parameter(param.detach().half(), requires_grad=False))
    return module


def drop_dtype_asserts(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove the dtype checks torch.export records for `.to(dtype)`/`.float()` calls.

    The Inductor engine runs a program exported in FP32 under FP16 autocast, so a check such as
    "the logits are float32" no longer holds although the cast it guards is still right.
    """
    check = torch.ops.aten._assert_tensor_metadata.default
    for node in list(module.graph.nodes):
        if node.target is check:
            module.graph.erase_node(node)
    module.recompile()
    return module


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """FP16 autocast for "fp16" (CUDA only), a disabled autocast for "fp32".

    A plain `torch.autocast` object (not a generator context) so that torch.compile traces it.
    """
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 engines run on a CUDA GPU only; use --precision fp32 on CPU")
    return torch.autocast(device.type, dtype=torch.float16, enabled=precision == "fp16")


def compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast computes matrix ops in under `precision` (None: the tensors' own)."""
    return torch.float16 if precision == "fp16" else None


class PrecisionWrapper(nn.Module):
    """`module` under the engine precision (FP16 matrices + autocast for "fp16"), floating
    outputs as FP32 (boxes, scores; labels stay int64): what the Inductor and TensorRT backends
    compile."""

    def __init__(self, module: nn.Module, device: torch.device, precision: str) -> None:
        super().__init__()
        self.module = half_matrices_(module) if precision == "fp16" else module
        self.device, self.precision = device, precision

    def forward(self, images: Tensor, masks: Tensor) -> tuple[Tensor, ...]:
        if self.precision == "fp16":
            images = images.half()  # the model checks images against its (FP16) conv weights
        with autocast(self.device, self.precision):
            outputs = self.module(images, masks)
        return tuple(o.float() if o.is_floating_point() else o for o in outputs)
