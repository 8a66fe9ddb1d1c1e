"""The FP8 FFN measured against FP16 (bench/fp8_baseline.py, not shipped): its static scales are
bounds, its torch-ops path is an FP8 computation close to FP32, its Triton kernel (in Triton's
interpreter on the CPU) gives the reference's E4M3 values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from interpret import run_interpreted

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernel]')")
from fp8_baseline import (  # bench/, on the tests' path (needs triton)
    E4M3,
    E4M3_MAX,
    ffn_fp8_reference,
    hidden_reference,
    quantize_ffn,
)

DIMS, HIDDEN = 64, 192


def ffn_weights(seed: int, dims: int = DIMS, hidden: int = HIDDEN) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return dict(gamma=1 + 0.3 * torch.randn(dims, generator=gen),
                beta=0.2 * torch.randn(dims, generator=gen),
                w1=torch.randn(hidden, dims, generator=gen) / math.sqrt(dims),
                b1=0.1 * torch.randn(hidden, generator=gen),
                w2=torch.randn(dims, hidden, generator=gen) / math.sqrt(hidden),
                b2=0.1 * torch.randn(dims, generator=gen))


def layer_norm(pre: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.layer_norm(pre, (pre.shape[-1],), w["gamma"], w["beta"])


def test_scales_bound_every_input_even_the_worst():
    """Each hidden unit's worst input (the normalised row along gamma * w_j) stays inside the
    E4M3 range; so do rows of one huge channel, LayerNorm's largest single outputs."""
    w = ffn_weights(0)
    q = quantize_ffn(w["gamma"], w["beta"], w["w1"], w["b1"], w["w2"], w["b2"], torch.float32)
    worst = w["w1"] * w["gamma"]  # z along gamma * w_j maximises y . w_j
    spikes = torch.eye(DIMS) * 1e4 - 1  # one channel far above the others, per row
    for pre in (worst, -worst, spikes, -spikes, torch.randn(500, DIMS) * 5):
        x = layer_norm(pre.double(), {k: v.double() for k, v in w.items()})
        assert x.abs().max() <= float(q.x_scale) * E4M3_MAX
        hidden = torch.relu(x @ w["w1"].double().t() + w["b1"].double())
        assert hidden.max() <= float(q.h_scale) * E4M3_MAX
    # The bound is reached: the worst inputs' largest unit is within the margin of it.
    x = layer_norm(worst.double(), {k: v.double() for k, v in w.items()})
    top = (x @ w["w1"].double().t() + w["b1"].double()).abs().max()
    assert top >= 0.5 * float(q.h_scale) * E4M3_MAX


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_reference_is_fp8_and_close_to_fp32(activation):
    w = ffn_weights(1)
    x = layer_norm(torch.randn(3, 50, DIMS) * 2 + 0.5, w)
    act = F.relu if activation == "relu" else F.gelu
    fp32 = F.linear(act(F.linear(x, w["w1"], w["b1"])), w["w2"], w["b2"])
    q = quantize_ffn(w["gamma"], w["beta"], w["w1"], w["b1"], w["w2"], w["b2"], torch.float32)
    assert q.w1.dtype == q.w2.dtype == E4M3
    out = ffn_fp8_reference(x, q, activation)
    assert out.shape == fp32.shape and out.dtype == torch.float32
    err = (out - fp32).abs().max() / fp32.abs().max()
    cos = F.cosine_similarity(out.flatten(), fp32.flatten(), dim=0)
    assert 1e-4 < err < 0.1  # E4M3 rounding shows (not an FP32 path), and stays small
    assert cos > 0.995


def test_fp16_output_dtype_follows_the_second_bias():
    w = ffn_weights(2)
    q = quantize_ffn(w["gamma"], w["beta"], w["w1"], w["b1"], w["w2"], w["b2"], torch.float16)
    x = layer_norm(torch.randn(7, DIMS), w)
    assert ffn_fp8_reference(x, q, "relu").dtype == torch.float16


def grid_case(activation: str) -> tuple:
    """Inputs whose products and sums are exact in FP32 (E4M3 grid values, power-of-two
    scales): the kernel and the reference then differ only where the rounding to E4M3 does."""
    gen = torch.Generator().manual_seed(3)
    m, k, n = 70, 256, 96  # neither M nor N a multiple of the test's tiles
    x = torch.randint(-6, 7, (m, k), generator=gen).float() * 0.25
    w1 = torch.randint(-4, 5, (n, k), generator=gen).float().to(E4M3)
    w1_scale = 2.0 ** -torch.randint(4, 7, (n,), generator=gen).float()
    b1 = torch.randint(-8, 9, (n,), generator=gen).float() / 8
    x_scale, out_scale = torch.tensor([0.25]), torch.tensor([0.5 if activation == "relu" else 0.3])
    return x.half(), w1, w1_scale, b1, x_scale, out_scale


def _interpret_grid() -> dict[str, list[float]]:
    """Child process: per activation, [elements compared, elements differing, elements left out
    (see `comparable`)]."""
    from fp8_baseline import Tiles, linear_act_fp8

    result = {}
    for activation in ("relu", "gelu"):
        x, w1, w1_scale, b1, x_scale, out_scale = grid_case(activation)
        got = linear_act_fp8(x, w1, w1_scale, b1, x_scale, out_scale, activation,
                             Tiles(32, 64, 128, 2, 4, 1))
        want = hidden_reference(x, w1, w1_scale, b1, x_scale, out_scale, activation)
        keep = comparable(x, w1, w1_scale, b1, x_scale, out_scale, activation)
        differ = (got.float() != want.float()) & keep
        result[activation] = [int(keep.sum()), int(differ.sum()), int((~keep).sum())]
    return result


def comparable(x, w1, w1_scale, b1, x_scale, out_scale, activation) -> torch.Tensor:
    """Elements whose rounding to E4M3 Triton 3.6's interpreter gets right: not within 1e-5 of
    a rounding midpoint (it rounds ties up, the GPU to even), not rounding up to a power of two
    (it drops that carry: 7.76 -> 4 instead of 8), not subnormal (under 2^-6: it truncates
    them)."""
    y = (x.float() / x_scale) @ w1.float().t() * (x_scale * w1_scale) + b1
    pre = (torch.relu(y) if activation == "relu" else F.gelu(y)) / out_scale
    rounded = pre.to(E4M3)
    near_tie = (pre * (1 + 1e-5)).to(E4M3).float() != (pre * (1 - 1e-5)).to(E4M3).float()
    carry = (rounded.float().abs() > pre.abs()) & (rounded.view(torch.uint8) & 0x7 == 0)
    subnormal = (pre.abs() < 2 ** -6) & (pre != 0)
    return ~near_tie & ~(carry & (rounded.float() != 0)) & ~subnormal


@pytest.mark.slow
def test_kernel_in_the_interpreter_gives_the_reference_values():
    for activation, (kept, differ, left_out) in run_interpreted(
            "test_fp8_ffn", "_interpret_grid").items():
        assert differ == 0, (activation, differ, kept)
        assert kept >= 0.8 * (kept + left_out), (activation, kept, left_out)
