"""An FP8 (E4M3) FFN, measured and not kept: bench/fp8_ffn.py's candidate against the FP16 FFN.

The encoder FFN (256 -> 2048 -> 256, ReLU, 73,656 tokens a 1152x768 image) and the Swin MLPs
are the engine's largest GEMMs; FP8 tensor cores run at twice the FP16 rate on half the bytes.
cuBLAS takes FP8 operands and gives FP8 outputs, but no ReLU/GELU epilogue with them, and its
input must already be FP8: quantizing the input and applying the activation would each be a pass
over the activations. So the first layer here is one Triton kernel (`linear_act_fp8_kernel`):
it reads the 16-bit input (or E4M3 already), rounds each tile to E4M3 as it loads it, multiplies
by the E4M3 weight with FP32 accumulation, rescales, adds the bias, applies the activation and
writes E4M3; the second layer is cuBLAS's `torch._scaled_mm`. On an H200 the pair was no faster
than FP16 (bench/RESULTS.md, "FP8 FFNs"): the second GEMM halves, the Triton first layer is
slower than cuBLAS's FP16 one. Not shipped: the engine does not use it.

Every scale is static, fixed from the weights, so no kernel measures a maximum at run time:
- the weights: per output row for the first layer, one scale for the second (cuBLAS's
  per-tensor scaling), each from the weight's own largest magnitude;
- the input x, a LayerNorm's output y = gamma * z + beta with z normalised (|z_i| <= sqrt(D),
  ||z|| <= sqrt(D) for D channels): |y_i| <= sqrt(D) |gamma_i| + |beta_i|;
- the hidden activations: |y . w_j + b_j| <= sqrt(D) ||gamma * w_j|| + |beta . w_j| + |b_j|
  (Cauchy-Schwarz), and |relu(u)|, |gelu(u)| <= |u|; a margin covers the rounding of x and w.
These are bounds, not estimates: nothing saturates on any input. E4M3 keeps 3 mantissa bits at
every magnitude down to 2^-6 of a scale's unit, so a bound some 16x above the typical value
costs range at the bottom, not precision.

The weight is (N, K) row-major: K-major, the layout Hopper's FP8 tensor-core instructions read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MARGIN = 1.25  # over the hidden bound: x and w rounded to E4M3 grow by at most 2^-4 each


@dataclass(frozen=True)
class Fp8Ffn:
    """One FFN's FP8 weights and static scales (all on one device)."""

    w1: Tensor        # (H, D) E4M3
    w1_scale: Tensor  # (H,) FP32
    b1: Tensor        # (H,) FP32
    x_scale: Tensor   # (1,) FP32
    h_scale: Tensor   # (1,) FP32
    w2: Tensor        # (N, H) E4M3
    w2_scale: Tensor  # (1,) FP32
    b2: Tensor        # (N,) in the output dtype

    def to(self, device: torch.device | str) -> Fp8Ffn:
        return Fp8Ffn(**{k: v.to(device) for k, v in vars(self).items()})


def _to_e4m3(x: Tensor) -> Tensor:
    """Round to E4M3 saturating at +-448, as the GPU's `cvt.rn.satfinite` does (torch's own
    cast gives NaN above 448)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_ffn(gamma: Tensor, beta: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                 out_dtype: torch.dtype) -> Fp8Ffn:
    """The FP8 weights and scales of `linear2(act(linear1(layer_norm(.) * gamma + beta)))`
    (module doc); `gamma`/`beta` are the LayerNorm's affine weights (ones/zeros if it has none)."""
    gamma, beta = gamma.double(), beta.double()
    w1, b1, w2 = w1.double(), b1.double(), w2.double()
    root_d = math.sqrt(w1.shape[1])
    x_bound = (root_d * gamma.abs() + beta.abs()).max()
    h_bound = (root_d * (w1 * gamma).norm(dim=1) + (w1 @ beta).abs() + b1.abs()).max() * MARGIN
    w1_scale = (w1.abs().amax(dim=1) / E4M3_MAX).clamp_min(1e-30)
    w2_scale = (w2.abs().amax() / E4M3_MAX).clamp_min(1e-30)
    one = torch.ones(1, dtype=torch.float32, device=w1.device)
    return Fp8Ffn(w1=_to_e4m3(w1 / w1_scale[:, None]), w1_scale=w1_scale.float(),
                  b1=b1.float(), x_scale=one * float(x_bound) / E4M3_MAX,
                  h_scale=one * float(h_bound) / E4M3_MAX, w2=_to_e4m3(w2 / w2_scale),
                  w2_scale=one * float(w2_scale), b2=b2.to(out_dtype))


def _act(y: Tensor, activation: str) -> Tensor:
    return torch.relu(y) if activation == "relu" else torch.nn.functional.gelu(y)


def hidden_reference(x: Tensor, w1: Tensor, w1_scale: Tensor, b1: Tensor, x_scale: Tensor,
                     h_scale: Tensor, activation: str) -> Tensor:
    """The first layer's E4M3 output with torch ops: what `linear_act_fp8` computes."""
    x8 = _to_e4m3(x.float() / x_scale).float()
    y = (x8 @ w1.float().t()) * (x_scale * w1_scale) + b1
    return _to_e4m3(_act(y, activation) / h_scale)


def second_layer(h8: Tensor, q: Fp8Ffn, fast_accum: bool = False) -> Tensor:
    """(M, H) E4M3 hidden activations -> (M, N) in q.b2's dtype: cuBLAS's FP8 GEMM (FP32
    accumulation, or its faster partial one with `fast_accum`)."""
    return torch._scaled_mm(h8, q.w2.t(), scale_a=q.h_scale, scale_b=q.w2_scale, bias=q.b2,
                            out_dtype=q.b2.dtype, use_fast_accum=fast_accum)


def ffn_fp8_reference(x: Tensor, q: Fp8Ffn, activation: str) -> Tensor:
    """The FFN in FP8 with torch ops for the first layer (any device)."""
    rows = x.reshape(-1, x.shape[-1])
    h8 = hidden_reference(rows, q.w1, q.w1_scale, q.b1, q.x_scale, q.h_scale, activation)
    return second_layer(h8, q).view(*x.shape[:-1], q.w2.shape[0])


ACTIVATIONS = ("relu", "gelu")


@triton.jit
def linear_act_fp8_kernel(x_ptr, w_ptr, w_scale_ptr, bias_ptr, x_scale_ptr, out_scale_ptr,
                          out_ptr, M, N, stride_xm, K: tl.constexpr, ACTIVATION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """out[m, n] = e4m3(act(sum_k e4m3(x[m, k] / xs) w[n, k] * xs * ws[n] + b[n]) / os).

    K is a multiple of BLOCK_K (the launcher checks) and a compile-time constant (a model's
    width: one compiled kernel per layer shape); rows and columns past M, N are masked.
    Programs walk GROUP_M row blocks per column block so that a group's weight tiles stay in L2.
    """
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_scale = tl.load(x_scale_ptr)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :]
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * K + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        x = tl.load(x_rows + k, mask=row_ok[:, None], other=0.0)
        if x.dtype == tl.float8e4nv:  # noqa: SIM108  (quantized already: x / x_scale)
            x8 = x
        else:
            x8 = (x.to(tl.float32) / x_scale).to(tl.float8e4nv)
        w = tl.load(w_cols + k, mask=col_ok[None, :], other=0.0)
        acc = tl.dot(x8, w, acc)

    scale = x_scale * tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    y = acc * scale[None, :] + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if ACTIVATION == "relu":
        y = tl.maximum(y, 0.0)
    else:  # GELU, erf form (torch's default)
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    out = (y / tl.load(out_scale_ptr)).to(tl.float8e4nv)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], out,
             mask=row_ok[:, None] & col_ok[None, :])


@dataclass(frozen=True)
class Tiles:
    """One launch shape of `linear_act_fp8_kernel`."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 128
    group_m: int = 8
    warps: int = 8
    stages: int = 3

    def __str__(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} "
                f"w{self.warps} s{self.stages}")


def linear_act_fp8(x: Tensor, weight: Tensor, w_scale: Tensor, bias: Tensor, x_scale: Tensor,
                   out_scale: Tensor, activation: str, tiles: Tiles | None = None) -> Tensor:
    """(M, K) 16- or 32-bit rows -> (M, N) E4M3 (see the module doc); scales are FP32 tensors
    (x_scale and out_scale of one element, w_scale one per output column), bias FP32 (N,)."""
    tiles = tiles or Tiles()
    m, k = x.shape
    n = weight.shape[0]
    if k % tiles.block_k or weight.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"linear_act_fp8: x (M, {k}) with unit column stride and a weight "
                         f"(N, {k}), K a multiple of {tiles.block_k}; got x {tuple(x.shape)} "
                         f"strides {x.stride()}, weight {tuple(weight.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear_act_fp8: activation must be one of {ACTIVATIONS}, "
                         f"got {activation!r}")
    out = torch.empty(m, n, dtype=torch.float8_e4m3fn, device=x.device)
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n),)
    linear_act_fp8_kernel[grid](x, weight, w_scale, bias, x_scale, out_scale, out, m, n,
                                x.stride(0), K=k, ACTIVATION=activation, BLOCK_M=tiles.block_m,
                                BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                                GROUP_M=tiles.group_m, num_warps=tiles.warps,
                                num_stages=tiles.stages)
    return out
