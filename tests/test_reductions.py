"""compile/engines/reductions.py on the GPU: under `KernelHintChoices` no reduction kernel that
Inductor emits with the INNER hint over <= 1024 elements is looped, and the values are stock
Inductor's."""

from __future__ import annotations

import ast
import contextlib
import re

import pytest
import torch
import torch.nn.functional as F
from codetr_stream.compile.engines import reductions
from torch._inductor.utils import run_and_get_code

pytestmark = pytest.mark.gpu

# The decorator Inductor writes above every reduction kernel it generates.
HEURISTIC = re.compile(r"@triton_heuristics\.(\w+)\(\s*size_hints=(\{[^}]*\}),\s*"
                       r"reduction_hint=ReductionHint\.(\w+)")


def _patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Swin's patch embedding as the FP16 engine runs it: an FP16 conv, then LayerNorm over its
    192 channels read through `flatten(2).transpose(1, 2)` (the engine's kernel
    `..._add_convolution_native_layer_norm_permute_view`, looped by stock Inductor at batch 8),
    stored in FP16 (round-norms)."""
    with torch.autocast("cuda", torch.float16):
        x = F.conv2d(images, weight, bias, stride=4)
        return F.layer_norm(x.flatten(2).transpose(1, 2), (192,)).half()


def _reduction_kernels(inputs: tuple[torch.Tensor, ...], choices: bool,
                       ) -> tuple[torch.Tensor, list[tuple[str, int, str]]]:
    """The compiled output and each reduction kernel's (heuristic, reduction size, hint)."""
    torch._dynamo.reset()
    options = {"fx_graph_cache": False, **(reductions.compile_options() if choices else {})}
    fn = torch.compile(_patch_embed, fullgraph=True, options=options)
    with reductions.installed() if choices else contextlib.nullcontext():
        out, sources = run_and_get_code(fn, *inputs)
    torch.testing.assert_close(out, _patch_embed(*inputs), atol=4e-3, rtol=4e-3)
    kernels = [(heuristic, ast.literal_eval(sizes)["r0_"], hint)
               for code in sources for heuristic, sizes, hint in HEURISTIC.findall(code)]
    return out, kernels


def test_no_inner_reduction_up_to_1024_is_looped() -> None:
    inputs = (torch.randn(8, 3, 768, 1152, device="cuda"),
              torch.randn(192, 3, 4, 4, device="cuda") / 7, torch.randn(192, device="cuda"))
    stock_out, stock = _reduction_kernels(inputs, choices=False)
    ours_out, ours = _reduction_kernels(inputs, choices=True)
    print("stock:", stock, "\nkernel hint:", ours)  # shown with -rA: what the handler changed
    assert any(heuristic == "persistent_reduction" for heuristic, _, _ in ours), ours
    looped = [k for k in ours if k[0] == "reduction" and k[2] == "INNER" and k[1] <= 1024]
    assert not looped, looped
    torch.testing.assert_close(ours_out, stock_out, atol=4e-3, rtol=4e-3)
