"""The Triton MSDA kernels on the GPU: numerics over many shapes, compile, CUDA graphs, the model.

Run on the device machine: `pytest -m gpu tests/test_msda_gpu.py`.
"""

from __future__ import annotations

import functools

import pytest
import torch
from codetr_stream.plugin import ms_deform_attn, op
from test_msda_reference import _Block, block_inputs, make_inputs, msda_float64

pytestmark = pytest.mark.gpu

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16
TOLERANCE = {F32: 1e-5, F16: 2e-3, BF16: 2e-2}
FULL = [(192, 288), (96, 144), (48, 72), (24, 36), (12, 18)]  # Co-DINO at 1152x768

CASES = [
    # batch, queries, heads, dim, level shapes (h, w), points, dtype
    (1, 1, 1, 16, [(1, 1)], 1, F32),
    (2, 300, 8, 32, [(24, 36), (12, 18), (6, 9), (3, 5), (2, 3)], 4, F16),
    (3, 77, 5, 24, [(7, 13), (4, 7), (2, 4)], 8, F32),
    (4, 1000, 2, 48, [(30, 40), (15, 20)], 3, F16),
    (2, 513, 6, 64, [(17, 25), (9, 13), (5, 7), (3, 4)], 5, F32),
    (5, 64, 3, 40, [(10, 10)], 6, F16),
    (6, 10, 7, 16, [(3, 3), (2, 2)], 7, F16),
    (1, 2000, 4, 32, [(50, 60), (25, 30), (13, 15)], 2, BF16),
    (8, 900, 8, 32, FULL, 4, F16),
    (1, 80_000, 8, 32, FULL, 4, F32),
    (1, 80_000, 8, 32, FULL, 4, F16),
]


def _id(case):
    batch, queries, heads, dim, shapes, points, dtype = case
    return f"b{batch}-q{queries}-h{heads}-d{dim}-l{len(shapes)}-p{points}-{str(dtype)[6:]}"


# The op's default launch and its big-call shape on every case; the other launch shapes and the
# benchmark's baselines on a subset (the 80,000-query cases included).
SUBSET = [CASES[i] for i in (2, 8, 9, 10)]
VARIANTS = {
    "op": (None, CASES),
    "lanes2": ((64, 2, 4), CASES),
    "lanes1": ((128, 1, 4), SUBSET),
    "lanes4": ((32, 4, 4), SUBSET),
    "half_bilinear": ((64, 2, 4, True), [c for c in SUBSET if c[-1] == F16]),
    "head_major": ((64, 4, 8), SUBSET),  # lanes4 given a view of a head-major copy
    "v3": ("v3", SUBSET),
    "per_output": ("per_output", SUBSET),
}


@functools.cache
def _inputs_and_expected(case_id):
    """Inputs and float64 result of a case, computed once for all variants."""
    batch, queries, heads, dim, shapes, points, dtype = next(c for c in CASES if _id(c) == case_id)
    args = make_inputs(batch, queries, heads, dim, shapes, points, dtype=dtype, device="cuda",
                       seed=queries)
    return args, msda_float64(*args)


def _run(variant, args):
    option = VARIANTS[variant][0]
    if option is None:
        return op._kernel.ms_deform_attn_triton(*args)
    if isinstance(option, str):
        from msda_baselines import ms_deform_attn_baseline  # bench/msda_baselines.py

        return ms_deform_attn_baseline(*args, design=option)
    if variant == "head_major":
        args = (op._kernel.head_major_copy(args[0]), *args[1:])
    return op._kernel.ms_deform_attn_triton(*args, config=op._kernel.LaunchConfig(*option))


@pytest.mark.parametrize(
    ("case", "variant"),
    [pytest.param(case, variant, id=f"{_id(case)}-{variant}")
     for variant, (_, cases) in VARIANTS.items() for case in cases],
)
def test_kernel_matches_float64(case, variant):
    args, expected = _inputs_and_expected(_id(case))
    dtype = case[-1]
    got = _run(variant, args)
    assert got.dtype == dtype and got.shape == expected.shape
    error = (got.double() - expected).abs().max().item()
    assert error <= TOLERANCE[dtype], f"max abs error {error:.3g}"


def test_op_on_cuda_runs_the_kernel_and_captures_in_a_cuda_graph():
    args = make_inputs(2, 333, 4, 32, [(20, 30), (10, 15)], 4, device="cuda")
    eager = ms_deform_attn(*args)
    assert torch.equal(eager, op._kernel.ms_deform_attn_triton(*args))
    static = [a.clone() for a in args]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ms_deform_attn(*static)
    fresh = make_inputs(2, 333, 4, 32, [(20, 30), (10, 15)], 4, device="cuda", seed=7)
    for buffer, new in zip(static, fresh, strict=True):
        buffer.copy_(new)
    graph.replay()
    torch.testing.assert_close(captured, ms_deform_attn(*fresh), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_compile_fullgraph_and_cuda_graph_replay_match_eager(dtype):
    model = _Block(2, 8).cuda().to(dtype).eval()
    inputs = block_inputs("cuda", dtype)
    with torch.no_grad():
        eager = model(*inputs)
        exported = torch.export.export(model, inputs)
        nodes = [n.target for n in exported.graph.nodes if n.op == "call_function"]
        assert torch.ops.codetr.ms_deform_attn.default in nodes
        torch._dynamo.reset()
        compiled = torch.compile(exported.module(), fullgraph=True)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(compiled(*inputs), eager, **tol)
        static = [a.clone() for a in inputs]
        compiled(*static)  # warm up on the static buffers
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(*static)
        fresh = block_inputs("cuda", dtype)
        fresh = (torch.randn_like(fresh[0]), *fresh[1:])
        for buffer, new in zip(static, fresh, strict=True):
            buffer.copy_(new)
        graph.replay()
        torch.testing.assert_close(out, model(*fresh), **tol)


def test_tiny_model_same_outputs_with_kernel_as_with_reference(data_dir):
    """The tiny Co-DINO on the GPU (kernel) vs on the CPU (grid_sample reference), FP32."""
    from codetr_stream.compile import build_model

    vectors = torch.load(data_dir / "tiny_vectors.pt", map_location="cpu", weights_only=True)
    model = build_model(data_dir / "tiny_config.json", data_dir / "tiny_codino.pth")
    images, masks = vectors["A_images"], vectors["A_masks"]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        boxes, scores, labels = model(images, masks)
        model.cuda()
        gpu = model(images.cuda(), masks.cuda())
    torch.testing.assert_close(gpu[1].cpu(), scores, rtol=0, atol=1e-4)
    torch.testing.assert_close(gpu[0].cpu(), boxes, rtol=0, atol=1e-2)
    assert torch.equal(gpu[2].cpu(), labels)
