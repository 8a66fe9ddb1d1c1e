"""`codetr::window_attention` (plugin/window_attention.py): the torch-ops reference and the Triton
kernel (under Triton's interpreter on the CPU) against a float64 formula written token by token
from mmdet's definition; the op under torch.export; the TensorRT build's decomposition."""

from __future__ import annotations

import pytest
import torch
from codetr_stream.plugin.window_attention import (
    decompositions,
    shift_mask,
    window_attention,
    window_attention_reference,
    window_partition,
)
from interpret import run_interpreted
from torch import nn
from window_cases import CASES, make_inputs, window_attention_float64

OP = torch.ops.codetr.window_attention.default
# name: (block_m, group, num_warps, num_stages); the first is the op's default launch
LAUNCHES = {"m32g5": (32, 5, 2, 2), "m64g3": (64, 3, 4, 3), "m16g9": (16, 9, 1, 3),
            "m16g3": (16, 3, 2, 2), "m16g1": (16, 1, 4, 1), "m128g2": (128, 2, 8, 2)}


def _args(case: str, dtype: torch.dtype) -> tuple:
    batch, height, width, heads, dim, window, shift, with_fill = CASES[case]
    qkv, bias, fill = make_inputs(batch, height, width, heads, dim, window, with_fill, dtype,
                                  seed=len(case))
    return qkv, bias, fill, height, width, window, shift, dim ** -0.5


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_float64_formula(case: str) -> None:
    args = _args(case, torch.float64)
    got = window_attention_reference(*args)
    torch.testing.assert_close(got, window_attention_float64(*args), rtol=0, atol=1e-12)


def test_shift_mask_labels_regions_as_mmdet_does() -> None:
    """mmdet's slice-assignment labelling, written out, against the comparison-based one."""
    for h, w, window, shift in ((14, 14, 7, 3), (192, 288, 12, 6), (156, 156, 12, 6),
                                (12, 24, 12, 6), (28, 21, 7, 3)):
        region = torch.zeros(h, w)
        count = 0
        for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                region[hs, ws] = count
                count += 1
        ids = window_partition(region[None, :, :, None], window).squeeze(-1)
        want = torch.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0)
        assert torch.equal(shift_mask(h, w, window, shift, torch.device("cpu")), want)


def test_bad_arguments_name_the_argument() -> None:
    qkv, bias, fill, h, w, window, shift, scale = _args("padded", torch.float32)
    with pytest.raises(ValueError, match="qkv must be"):
        window_attention(qkv[:, 1:], bias, fill, h, w, window, shift, scale)
    with pytest.raises(ValueError, match="bias must be"):
        window_attention(qkv, bias[:, 1:], fill, h, w, window, shift, scale)
    with pytest.raises(ValueError, match="shift must be"):
        window_attention(qkv, bias, fill, h, w, window, window, scale)


class _Block(nn.Module):
    """A qkv projection into the op, as the Swin block calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.bias = nn.Parameter(torch.randn(2, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(self.qkv(x), self.bias, self.qkv.bias, 7, 10, 4, 2, 0.25)


def test_export_keeps_one_node_and_the_tensorrt_decomposition_removes_it() -> None:
    block, x = _Block().eval(), torch.randn(2, 70, 32)
    with torch.no_grad():
        want = block(x)
        program = torch.export.export(block, (x,), strict=False)
        assert sum(n.target is OP for n in program.graph.nodes) == 1
        plain = program.run_decompositions(decompositions())
        assert not any(n.target is OP for n in plain.graph.nodes)
        torch.testing.assert_close(plain.module()(x), want, rtol=0, atol=1e-6)


def _interpret_all(dtype_name: str) -> dict[str, float]:
    """Child process (TRITON_INTERPRET=1): every case and launch in one dtype -> max abs error."""
    from codetr_stream.plugin.window_kernel import WindowLaunch, window_attention_triton

    errors = {}
    dtype = getattr(torch, dtype_name)
    for case in CASES:
        args = _args(case, dtype)
        want = window_attention_float64(*args)
        for name, launch in LAUNCHES.items():
            got = window_attention_triton(*args, launch=WindowLaunch(*launch))
            assert got.dtype == dtype, got.dtype
            errors[f"{case}/{dtype}/{name}"] = (got.double() - want).abs().max().item()
    return errors


@pytest.fixture(scope="module")
def interpreted_errors() -> dict[str, float]:
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernel]')")
    return run_interpreted("test_window_attention", "_interpret_all",
                           parts=["float32", "float16"])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.float16"])
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_float64_formula(interpreted_errors, case, dtype, launch) -> None:
    """FP32 within 1e-5 (IEEE dots); FP16 inputs (FP32 accumulation, FP16 probabilities and
    output) within 1e-2 of values of size ~1."""
    tolerance = 1e-5 if dtype == "torch.float32" else 1e-2
    assert interpreted_errors[f"{case}/{dtype}/{launch}"] <= tolerance


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("stage", "shift"), [(1, 0), (1, 6), (3, 6), (4, 6)])
def test_kernel_matches_reference_at_swin_l_shapes(stage: int, shift: int,
                                                   dtype: torch.dtype) -> None:
    """The op (its default launch) and the kernel at every launch of LAUNCHES against the
    float64 formula at Swin-L's 1152x768 stages (and the torch-ops reference on the same GPU,
    which must agree as closely)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from codetr_stream.plugin.window_kernel import WindowLaunch, window_attention_triton

    height, width, heads = {1: (192, 288, 6), 3: (48, 72, 24), 4: (24, 36, 48)}[stage]
    qkv, bias, fill = make_inputs(2, height, width, heads, 32, 12, True, dtype, "cuda")
    args = (qkv, bias, fill, height, width, 12, shift, 32 ** -0.5)
    got = window_attention(*args)
    want = window_attention_float64(*args)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert (got.double().cpu() - want).abs().max().item() <= tolerance
    for launch in LAUNCHES.values():
        got = window_attention_triton(*args, launch=WindowLaunch(*launch))
        assert (got.double().cpu() - want).abs().max().item() <= tolerance, launch
    reference = window_attention_reference(*args).double().cpu()
    assert (reference - want).abs().max().item() <= tolerance


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exported_op_compiles_fullgraph_and_replays_in_a_cuda_graph(dtype: torch.dtype) -> None:
    """As the Inductor engine runs it: exported, compiled with fullgraph, captured, replayed on
    new inputs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    block = _Block().cuda().to(dtype).eval()
    static = torch.randn(2, 70, 32, device="cuda", dtype=dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2,
                                                                              "atol": 1e-2}
    with torch.no_grad():
        program = torch.export.export(block, (static,), strict=False)
        torch._dynamo.reset()
        compiled = torch.compile(program.module(), fullgraph=True)
        torch.testing.assert_close(compiled(static), block(static), **tolerance)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(static)
        fresh = torch.randn_like(static)
        static.copy_(fresh)
        graph.replay()
        torch.testing.assert_close(out, block(fresh), **tolerance)
