"""The MSDA kernel that makes its own sampling locations and attention weights
(`msda_offsets_fwd_kernel`), on the CPU through Triton's interpreter: against the float64
formula, and against the op's kernel fed the locations and weights the layer would compute.

Inputs are shaped as the Inductor engine's "msda-offsets" pass gives them: offsets and logits
are column slices of one wider projection output (merge-linears), references are points (the
encoder) or boxes (the decoder).
"""

from __future__ import annotations

import pytest
from interpret import run_interpreted

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernel]')")
pytestmark = pytest.mark.slow

CASES = {
    # name: (batch, queries, heads, dim, level shapes (h, w), points, reference dims, dtype)
    "points-3-levels": (2, 21, 3, 24, [(5, 7), (3, 4), (1, 2)], 2, 2, "float32"),
    "boxes-2-levels": (2, 19, 2, 32, [(6, 5), (3, 3)], 4, 4, "float32"),
    "points-half": (2, 17, 2, 32, [(9, 5), (3, 3)], 4, 2, "float16"),
    "boxes-half": (1, 70, 2, 32, [(8, 6), (4, 3), (2, 2)], 3, 4, "float16"),
}


def make_projections(batch, queries, heads, dim, shapes, points, ref_dims, dtype, seed):
    """value, level shapes and starts, references (some beyond the map edges), and offsets and
    logits as column slices of one (B, Q, H*L*P*3 + 5) tensor in `dtype`."""
    import torch
    from test_msda_reference import level_tensors

    gen = torch.Generator().manual_seed(seed)
    levels = len(shapes)
    spatial_shapes, level_start_index = level_tensors(shapes)
    tokens = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    value = torch.randn(batch, tokens, heads, dim, generator=gen).to(dtype)
    reference = torch.rand(batch, queries, levels, ref_dims, generator=gen) * 1.2 - 0.1
    n = heads * levels * points
    merged = torch.randn(batch, queries, 3 * n + 5, generator=gen)
    merged[..., : 2 * n] *= 3.0  # offsets of a few pixels / box fractions
    merged = merged.to(dtype)
    return value, spatial_shapes, level_start_index, reference, merged[..., :2 * n], \
        merged[..., 2 * n + 5:]


def _interpret_all() -> dict[str, list[float]]:
    """Child process: per case, [max error against float64, max difference to the op's
    kernel given the layer's locations and weights, max difference when the value is stored
    head-major]."""
    import torch
    from codetr_stream.plugin.kernel import (
        head_major_copy,
        ms_deform_attn_offsets_triton,
        ms_deform_attn_triton,
    )
    from codetr_stream.plugin.reference import sampling_from_offsets
    from test_msda_reference import msda_float64

    results = {}
    for name, case in CASES.items():
        dtype = torch.float16 if case[-1] == "float16" else torch.float32
        value, shapes, starts, reference, offsets, logits = make_projections(
            *case[:-1], dtype=dtype, seed=len(name))
        heads = value.shape[2]
        got = ms_deform_attn_offsets_triton(value, shapes, starts, reference, offsets, logits)
        assert got.dtype == value.dtype, got.dtype
        exact = sampling_from_offsets(shapes, reference.double(), offsets.double(),
                                      logits.double(), heads)
        expected = msda_float64(value, shapes, starts, *exact)
        layer = sampling_from_offsets(shapes, reference, offsets.float(), logits.float(), heads)
        op = ms_deform_attn_triton(value, shapes, starts, *layer)
        stored = ms_deform_attn_offsets_triton(head_major_copy(value), shapes, starts,
                                               reference, offsets, logits)
        results[name] = [(got.double() - expected).abs().max().item(),
                         (got.double() - op.double()).abs().max().item(),
                         (stored - got).abs().max().item()]
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, list[float]]:
    return run_interpreted("test_msda_offsets", "_interpret_all")


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_float64_formula(interpreted, case):
    """FP32 within 1e-5 of float64; FP16 values (FP32 accumulation) within 2e-3."""
    assert interpreted[case][0] <= (1e-5 if CASES[case][-1] == "float32" else 2e-3)


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_op_given_the_layers_locations(interpreted, case):
    """The layer's locations (within an ulp: the kernel multiplies by the level size's reciprocal)
    and the same gather: only those roundings and the softmax's differ (FP16 outputs: at most one
    FP16 step apart)."""
    assert interpreted[case][1] <= (1e-6 if CASES[case][-1] == "float32" else 4e-3)


@pytest.mark.parametrize("case", CASES)
def test_kernel_reads_a_head_major_value_to_the_same_outputs(interpreted, case):
    """The layout the "msda-head-major" engine pass stores changes addresses only."""
    assert interpreted[case][2] == 0


CO_DINO_LEVELS = [(192, 288), (96, 144), (48, 72), (24, 36), (12, 18)]  # at 1152x768


@pytest.mark.gpu
@pytest.mark.parametrize(("queries", "ref_dims"), [(73_656, 2), (900, 4)],
                         ids=["encoder", "decoder"])
def test_on_cuda_compiled_and_replayed_matches_the_op(queries: int, ref_dims: int) -> None:
    """The FP16 engine's call at Co-DINO's shapes (batch 2): the fused path, compiled fullgraph
    and replayed in a CUDA graph, against the op given the layer's locations and weights."""
    import torch
    from codetr_stream.plugin import ms_deform_attn
    from codetr_stream.plugin.op import ms_deform_attn_from_offsets
    from codetr_stream.plugin.reference import sampling_from_offsets

    def fresh(seed: int) -> tuple:
        args = make_projections(2, queries, 8, 32, CO_DINO_LEVELS, 4, ref_dims, torch.float16,
                                seed)
        return tuple(t.cuda() for t in args)

    static = fresh(0)
    compiled = torch.compile(ms_deform_attn_from_offsets, fullgraph=True)
    with torch.no_grad():
        compiled(*static)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(*static)
        for buffer, new in zip(static, fresh(1), strict=True):
            buffer.copy_(new)
        graph.replay()
        value, shapes, starts, reference, offsets, logits = static
        layer = sampling_from_offsets(shapes, reference, offsets.float(), logits.float(), 8)
        want = ms_deform_attn(value, shapes, starts, *layer)
    torch.testing.assert_close(out, want, rtol=0, atol=4e-3)
