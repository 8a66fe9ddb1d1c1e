"""Swin window attention as one Triton kernel that reads the qkv projection where it lies.

The reference (plugin/window_attention.py) pads the (B, H, W, 3C) qkv map to whole windows,
rolls it by the shift, copies every window out, runs attention with the relative-position bias
plus the shift mask as a dense (windows * heads, N, N) additive mask, copies the windows back and
rolls again. Each of those steps is a pass over the activations; here they are index arithmetic:
a program takes BLOCK_M queries of one (image, window, head), finds each token's place in the
unshifted, unpadded map, loads its q/k/v head slices straight from the qkv GEMM's output (padding
tokens take the qkv bias: the linear layer of a zero row), builds the shift mask from the tokens'
regions, runs an online softmax over BLOCK_N keys at a time with FP32 accumulation, and writes
its rows to their own tokens of a (B, H*W, C) output that the projection GEMM reads as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _window_tokens(window_row, window_col, t, height, width, padded_h, padded_w, shift,
                   WINDOW: tl.constexpr):
    """In-window indices t -> (token index in the H*W map, inside the unpadded map, shifted-grid
    row, shifted-grid column). The shifted grid is the one torch.roll(-shift) makes."""
    rs = window_row * WINDOW + t // WINDOW
    cs = window_col * WINDOW + t % WINDOW
    r = (rs + shift) % padded_h
    c = (cs + shift) % padded_w
    inside = (r < height) & (c < width)
    return tl.where(inside, r * width + c, 0), inside, rs, cs


@triton.jit
def _region(rs, cs, padded_h, padded_w, shift, WINDOW: tl.constexpr):
    """mmdet's 3 x 3 shift regions: bands split at -window and -shift of each padded axis."""
    band_r = (rs >= padded_h - WINDOW).to(tl.int32) + (rs >= padded_h - shift).to(tl.int32)
    band_c = (cs >= padded_w - WINDOW).to(tl.int32) + (cs >= padded_w - shift).to(tl.int32)
    return band_r * 3 + band_c


@triton.jit
def _head_rows(base, token, inside, column, fill_ptr, d, d_in, row, HAS_FILL: tl.constexpr):
    """(rows, BLOCK_D) head slices at `column` of the qkv rows; padding tokens take the fill."""
    x = tl.load(base + token[:, None] * row + column + d[None, :],
                mask=inside[:, None] & d_in[None, :], other=0.0)
    if HAS_FILL:
        fill = tl.load(fill_ptr + column + d, mask=d_in, other=0.0).to(x.dtype)
        x = tl.where(inside[:, None], x, fill[None, :])
    return x


@triton.jit
def window_attention_kernel(
    qkv_ptr,
    bias_ptr,
    fill_ptr,
    out_ptr,
    height,
    width,
    padded_h,
    padded_w,
    windows_per_row,
    windows,
    heads,
    shift,
    scale,
    DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SHIFTED: tl.constexpr,
    HAS_FILL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (B * windows * heads, cdiv(N, BLOCK_M)), N = WINDOW**2: one program = BLOCK_M
    queries of one (image, window, head) against all N keys of the window. DOT_PRECISION:
    "ieee" for FP32 inputs (TF32 would miss the FP32 reference by ~1e-3), the default otherwise."""
    N: tl.constexpr = WINDOW * WINDOW
    scale = tl.cast(scale, tl.float32)  # an fp64 scale would take the scores' math to fp64
    pid = tl.program_id(0)
    h = pid % heads
    image_window = pid // heads
    w = image_window % windows
    b = (image_window // windows).to(tl.int64)
    window_row = w // windows_per_row
    window_col = w % windows_per_row
    channels = heads * DIM
    row = 3 * channels
    tokens = height * width
    base = qkv_ptr + b * tokens * row
    d = tl.arange(0, BLOCK_D)
    d_in = d < DIM

    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = m < N
    m = tl.minimum(m, N - 1)  # rows past the window redo the last one (store masked)
    tok_m, inside_m, rs_m, cs_m = _window_tokens(window_row, window_col, m, height, width,
                                                 padded_h, padded_w, shift, WINDOW)
    q = _head_rows(base, tok_m, inside_m, h * DIM, fill_ptr, d, d_in, row, HAS_FILL)
    if SHIFTED:
        region_m = _region(rs_m, cs_m, padded_h, padded_w, shift, WINDOW)
    bias_rows = bias_ptr + h * N * N + m[:, None] * N

    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in tl.static_range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_in = n < N
        n = tl.minimum(n, N - 1)
        tok_n, inside_n, rs_n, cs_n = _window_tokens(window_row, window_col, n, height, width,
                                                     padded_h, padded_w, shift, WINDOW)
        k = _head_rows(base, tok_n, inside_n, channels + h * DIM, fill_ptr, d, d_in, row,
                       HAS_FILL)
        v = _head_rows(base, tok_n, inside_n, 2 * channels + h * DIM, fill_ptr, d, d_in, row,
                       HAS_FILL)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = s * scale + tl.load(bias_rows + n[None, :]).to(tl.float32)
        if SHIFTED:
            region_n = _region(rs_n, cs_n, padded_h, padded_w, shift, WINDOW)
            s = tl.where(region_m[:, None] != region_n[None, :], s - 100.0, s)
        s = tl.where(n_in[None, :], s, float("-inf"))
        new_best = tl.maximum(best, tl.max(s, 1))
        p = tl.exp(s - new_best[:, None])
        rescale = tl.exp(best - new_best)
        total = total * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        best = new_best
    out = acc / total[:, None]
    out_rows = out_ptr + b * tokens * channels + tok_m[:, None] * channels + h * DIM + d[None, :]
    tl.store(out_rows, out.to(out_ptr.dtype.element_ty),
             mask=(m_in & inside_m)[:, None] & d_in[None, :])


@dataclass(frozen=True)
class WindowLaunch:
    """Block shape of `window_attention_kernel`: query rows a program, keys a step, warps.

    The default was the fastest of the shapes swept on an H200 at Swin-L's stages 1 and 3
    (measured: bench/RESULTS.md, "Swin block pieces"); 32 rows waste less of a 144-token window
    in padding than 64 (16 rows of 160 against 48 of 192)."""

    block_m: int = 32
    block_n: int = 32
    num_warps: int = 2


def window_attention_triton(qkv: Tensor, bias: Tensor, fill: Tensor | None, height: int,
                            width: int, window: int, shift: int, scale: float,
                            launch: WindowLaunch | None = None) -> Tensor:
    """qkv (B, H*W, 3C), bias (heads, N, N), fill (3C,) or None -> (B, H*W, C) in qkv's dtype
    (a plain Triton launch: the op around it is opaque to torch.compile)."""
    batch, _, row = qkv.shape
    heads = bias.shape[0]
    dim = row // 3 // heads
    launch = launch or WindowLaunch()
    padded_h = -(-height // window) * window
    padded_w = -(-width // window) * window
    windows_per_row = padded_w // window
    windows = (padded_h // window) * windows_per_row
    qkv = qkv.contiguous()
    out = qkv.new_empty(batch, height * width, row // 3)
    has_fill = fill is not None
    grid = (batch * windows * heads, triton.cdiv(window * window, launch.block_m))
    window_attention_kernel[grid](
        qkv, bias.contiguous(), fill.contiguous() if has_fill else qkv, out, height, width,
        padded_h, padded_w, windows_per_row, windows, heads, shift, scale,
        DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), WINDOW=window,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, SHIFTED=shift > 0, HAS_FILL=has_fill,
        DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
        num_warps=launch.num_warps,
    )
    return out
