"""MSDA on the CPU: the grid_sample reference and the op against an independent float64 formula.

`msda_float64` (explicit bilinear corners, no grid_sample) and `make_inputs` are shared with the
kernel tests (test_msda_interpret.py, test_msda_gpu.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from codetr_stream.plugin import ms_deform_attn
from codetr_stream.plugin.reference import ms_deform_attn_reference


def msda_float64(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Straightforward float64 MSDA: for each level, point and corner, gather and weigh."""
    value = value.double()
    locs = sampling_locations.double()
    weights = attention_weights.double()
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locs.shape
    out = torch.zeros(batch, queries, heads, dim, dtype=torch.float64, device=value.device)
    b_idx = torch.arange(batch, device=value.device)[:, None, None]
    h_idx = torch.arange(heads, device=value.device)[None, None, :]
    for level in range(levels):
        h_l, w_l = (int(s) for s in spatial_shapes[level])
        start = int(level_start_index[level])
        for point in range(points):
            # pixel coordinates of align_corners=False: pixel i covers [i, i+1) * size / W
            x = locs[:, :, :, level, point, 0] * w_l - 0.5
            y = locs[:, :, :, level, point, 1] * h_l - 0.5
            x0, y0 = torch.floor(x), torch.floor(y)
            a = weights[:, :, :, level, point]
            for xi, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
                for yi, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
                    inside = (xi >= 0) & (xi < w_l) & (yi >= 0) & (yi < h_l)
                    token = start + (yi.clamp(0, h_l - 1) * w_l + xi.clamp(0, w_l - 1)).long()
                    sample = value[b_idx, token, h_idx]  # (B,Q,H,D)
                    out += (torch.where(inside, a * wx * wy, 0.0))[..., None] * sample
    return out.reshape(batch, queries, heads * dim)


def level_tensors(shapes, device="cpu"):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def make_inputs(batch, queries, heads, dim, shapes, points, dtype=torch.float32, device="cpu",
                seed=0):
    """Random MSDA inputs with locations inside, exactly on and beyond the map edges."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_tensors(shapes)
    tokens = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    levels = len(shapes)
    value = torch.randn(batch, tokens, heads, dim, generator=gen)
    locs = torch.rand(batch, queries, heads, levels, points, 2, generator=gen) * 1.3 - 0.15
    # Exact edges (0, 1), pixel centres, pixel borders and far outside, per level's size.
    flat = locs.view(-1, levels, points, 2)
    pick = torch.randint(0, 6, flat.shape, generator=gen)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)[None, :, None, :]
    k = torch.randint(0, 1 << 20, flat.shape, generator=gen) % size.long()
    special = torch.stack(
        [
            torch.zeros(flat.shape),
            torch.ones(flat.shape),
            (k + 0.5) / size,
            k / size,
            torch.full(flat.shape, -0.7),
            torch.full(flat.shape, 1.9),
        ]
    )
    use = torch.rand(flat.shape, generator=gen) < 0.3
    chosen = special.gather(0, pick[None]).squeeze(0)
    flat.copy_(torch.where(use, chosen, flat))
    logits = torch.randn(batch, queries, heads, levels * points, generator=gen)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    cast = dict(dtype=dtype, device=device)
    return (
        value.to(**cast),
        spatial_shapes.to(device),
        level_start_index.to(device),
        locs.to(**cast),
        weights.to(**cast),
    )


CASES = [
    # batch, queries, heads, dim, level shapes (h, w), points
    (1, 1, 1, 4, [(1, 1)], 1),
    (2, 17, 3, 8, [(5, 7), (3, 4), (1, 2)], 2),
    (1, 40, 2, 6, [(8, 6), (4, 3), (2, 2), (1, 1), (3, 9)], 4),
    (3, 9, 4, 5, [(2, 11)], 3),
]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_float64_formula(case):
    batch, queries, heads, dim, shapes, points = case
    args = make_inputs(batch, queries, heads, dim, shapes, points, dtype=torch.float64)
    expected = msda_float64(*args)
    got = ms_deform_attn_reference(*args)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    got32 = ms_deform_attn_reference(*(a.float() if a.is_floating_point() else a for a in args))
    torch.testing.assert_close(got32.double(), expected, rtol=0, atol=2e-5)


def test_known_values_on_a_2x2_map():
    """Hand-computed: pixel centres, the shared corner, the outer edge and outside."""
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1)
    spatial_shapes, level_start_index = level_tensors([(2, 2)])
    xy = torch.tensor(
        [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.0, 0.0], [1.0, 1.0],
         [0.5, 1.0], [1.25, 0.5], [-0.5, 0.5]],
        dtype=torch.float64,
    )
    expected = torch.tensor([1.0, 2.0, 3.0, 2.5, 0.25, 1.0, 0.5 * (3 + 4) / 2, 0.0, 0.0])
    locs = xy.view(1, -1, 1, 1, 1, 2)
    weights = torch.ones(1, len(xy), 1, 1, 1, dtype=torch.float64)
    for fn in (msda_float64, ms_deform_attn_reference, ms_deform_attn):
        got = fn(value, spatial_shapes, level_start_index, locs, weights).view(-1)
        torch.testing.assert_close(got, expected.double(), rtol=0, atol=1e-12)


def test_op_on_cpu_is_the_reference_and_promotes_dtypes():
    args = make_inputs(2, 11, 2, 8, [(4, 5), (2, 3)], 2)
    torch.testing.assert_close(ms_deform_attn(*args), ms_deform_attn_reference(*args),
                               rtol=0, atol=0)
    value, shapes, starts, locs, weights = args
    mixed = ms_deform_attn(value.bfloat16(), shapes, starts, locs, weights)
    assert mixed.dtype == torch.bfloat16 and mixed.shape == (2, 11, 16)
    torch.testing.assert_close(mixed.float(), msda_float64(value.bfloat16(), shapes, starts, locs,
                                                           weights).float(), rtol=0, atol=1e-2)


@pytest.mark.parametrize(
    ("index", "bad", "message"),
    [
        (0, torch.zeros(2, 23, 2), "value must be a float (B,S,H,D)"),
        (1, torch.zeros(3, 2, dtype=torch.int64), "spatial_shapes has shape (3, 2)"),
        (2, torch.zeros(2), "level_start_index must be int64"),
        (4, torch.zeros(2, 11, 2, 2, 3), "attention_weights has shape"),
    ],
)
def test_bad_inputs_name_the_argument(index, bad, message):
    args = list(make_inputs(2, 11, 2, 8, [(4, 5), (1, 3)], 2))
    args[index] = bad
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ms_deform_attn(*args)


def test_backward_raises_a_clear_error():
    value, *rest = make_inputs(1, 5, 2, 4, [(3, 3)], 2)
    out = ms_deform_attn(value.requires_grad_(), *rest)
    with pytest.raises(RuntimeError, match="inference only and has no backward"):
        out.sum().backward()


class _Block(torch.nn.Module):
    """A small module around the op: projection in, MSDA, projection out."""

    def __init__(self, heads: int, dim: int):
        super().__init__()
        self.value_proj = torch.nn.Linear(heads * dim, heads * dim)
        self.out_proj = torch.nn.Linear(heads * dim, 7)
        self.heads = heads

    def forward(self, value, spatial_shapes, level_start_index, locs, weights):
        batch, tokens, _ = value.shape
        value = self.value_proj(value).view(batch, tokens, self.heads, -1)
        sampled = ms_deform_attn(value, spatial_shapes, level_start_index, locs, weights)
        return self.out_proj(sampled)


def block_inputs(device="cpu", dtype=torch.float32):
    value, *rest = make_inputs(2, 13, 2, 8, [(6, 4), (3, 2)], 3, dtype=dtype, device=device)
    return (value.flatten(2), *rest)


def test_export_keeps_one_op_node_and_compile_fullgraph_matches_eager():
    model = _Block(2, 8).eval()
    inputs = block_inputs()
    with torch.no_grad():
        exported = torch.export.export(model, inputs)
        targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
        assert targets.count(torch.ops.codetr.ms_deform_attn.default) == 1
        eager = model(*inputs)
        torch.testing.assert_close(exported.module()(*inputs), eager, rtol=0, atol=0)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(*inputs), eager, rtol=1e-5, atol=1e-6)


def test_op_imports_and_runs_without_triton():
    """CPU-only torch has no triton: the op must still import and run the reference."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from codetr_stream.plugin import ms_deform_attn, op\n"
        "assert op._kernel is None\n"
        "v = torch.randn(1, 6, 2, 4); s = torch.tensor([[2, 3]]); i = torch.tensor([0])\n"
        "loc = torch.rand(1, 5, 2, 1, 2, 2); w = torch.rand(1, 5, 2, 1, 2)\n"
        "out = torch.ops.codetr.ms_deform_attn(v, s, i, loc, w)\n"
        "from codetr_stream.plugin.reference import ms_deform_attn_reference as ref\n"
        "assert torch.equal(out, ref(v, s, i, loc, w)), 'op differs from reference'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "Triton not available" not in result.stderr
