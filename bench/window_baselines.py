"""The window-attention kernel that plugin/window_kernel.py shipped before its one-program-per-
window-head rewrite, kept as bench/swin_block.py's baseline (not shipped: the op does not use it).

One program = BLOCK_M queries of one (image, window, head) against all N keys, an online softmax
over BLOCK_N keys at a time: every query block of a window reloads the window's keys, values and
key indices. Same arguments as plugin/window_kernel.py's launcher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from codetr_stream.plugin.window_kernel import _head_rows, _region, _window_tokens
from torch import Tensor


@triton.jit
def online_window_kernel(
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
class OnlineLaunch:
    """Block shape of `online_window_kernel`: query rows a program, keys a step, warps; the
    default was its shipped launch."""

    block_m: int = 32
    block_n: int = 32
    num_warps: int = 2


def window_attention_baseline(qkv: Tensor, bias: Tensor, fill: Tensor | None, height: int,
                              width: int, window: int, shift: int, scale: float,
                              launch: OnlineLaunch | None = None) -> Tensor:
    """plugin/window_kernel.window_attention_triton's contract, run by the old kernel."""
    batch, _, row = qkv.shape
    heads = bias.shape[0]
    dim = row // 3 // heads
    launch = launch or OnlineLaunch()
    padded_h = -(-height // window) * window
    padded_w = -(-width // window) * window
    windows_per_row = padded_w // window
    windows = (padded_h // window) * windows_per_row
    qkv = qkv.contiguous()
    out = qkv.new_empty(batch, height * width, row // 3)
    has_fill = fill is not None
    grid = (batch * windows * heads, triton.cdiv(window * window, launch.block_m))
    online_window_kernel[grid](
        qkv, bias.contiguous(), fill.contiguous() if has_fill else qkv, out, height, width,
        padded_h, padded_w, windows_per_row, windows, heads, shift, scale,
        DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), WINDOW=window,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, SHIFTED=shift > 0, HAS_FILL=has_fill,
        DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
        num_warps=launch.num_warps,
    )
    return out
