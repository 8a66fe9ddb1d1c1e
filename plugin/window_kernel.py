"""Swin window attention as one Triton kernel that reads the qkv projection where it lies.

The reference (plugin/window_attention.py) pads the (B, H, W, 3C) qkv map to whole windows,
rolls it by the shift, copies every window out, runs attention with the relative-position bias
plus the shift mask as a dense (windows * heads, N, N) additive mask, copies the windows back and
rolls again. Each of those steps is a pass over the activations; here they are index arithmetic:
a program takes GROUP blocks of BLOCK_M queries of one (image, window, head), finds each token's
place in the unshifted, unpadded map, loads its q/k/v head slices straight from the qkv GEMM's
output (padding tokens take the qkv bias: the linear layer of a zero row), builds the shift mask
from the tokens' regions, runs a plain softmax over all N keys with FP32 accumulation, and writes
its rows to their own tokens of a (B, H*W, C) output that the projection GEMM reads as it is.

The window's keys and values are loaded once a program and stay in shared memory while a
software-pipelined loop walks its query blocks; the previous kernel (a program per query block,
online softmax over 32-key steps, kept in bench/window_baselines.py) reloaded them for every
block and waited on every block's loads: 2-3x slower on an H200 (bench/RESULTS.md).
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
def _window_keys(base, fill_ptr, window_row, window_col, start, height, width, padded_h,
                 padded_w, shift, column, channels, d, d_in, row, WINDOW: tl.constexpr,
                 KEYS: tl.constexpr, HAS_FILL: tl.constexpr):
    """Keys start..start+KEYS of the window: their k and v head slices, in-window indices
    (clamped to the window only where the tile runs past it: a clamp would cost the bias loads
    their vector width) and shift regions."""
    N: tl.constexpr = WINDOW * WINDOW
    n = start + tl.arange(0, KEYS)
    if start + KEYS > N:
        n = tl.minimum(n, N - 1)
    token, inside, rs, cs = _window_tokens(window_row, window_col, n, height, width, padded_h,
                                           padded_w, shift, WINDOW)
    k = _head_rows(base, token, inside, column, fill_ptr, d, d_in, row, HAS_FILL)
    v = _head_rows(base, token, inside, column + channels, fill_ptr, d, d_in, row, HAS_FILL)
    return k, v, n, _region(rs, cs, padded_h, padded_w, shift, WINDOW)


@triton.jit
def _scores(q, k, bias_rows, n, start, region_m, region_n, scale, N: tl.constexpr,
            KEYS: tl.constexpr, SHIFTED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(rows, KEYS) FP32 logits of keys start..start+KEYS: scaled q.k, the bias, -100 across
    shift regions, -inf for keys past the window."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = s * scale + tl.load(bias_rows + n[None, :]).to(tl.float32)
    if SHIFTED:
        s = tl.where(region_m[:, None] != region_n[None, :], s - 100.0, s)
    if start + KEYS > N:
        s = tl.where(start + tl.arange(0, KEYS)[None, :] < N, s, float("-inf"))
    return s


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
    GROUP: tl.constexpr,
    KEYS_MAIN: tl.constexpr,
    KEYS_TAIL: tl.constexpr,
    SHIFTED: tl.constexpr,
    HAS_FILL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (B * windows * heads, cdiv(cdiv(N, BLOCK_M), GROUP)), N = WINDOW**2: one program =
    GROUP blocks of BLOCK_M queries of one (image, window, head) against all N keys, which it
    loads once, as a power-of-two tile of KEYS_MAIN keys plus one of KEYS_TAIL (0: none; 144 =
    128 + 16 keys, no padding), so each query block is one plain softmax, no online rescaling;
    the loop over the blocks is software-pipelined (the launch's num_stages). DOT_PRECISION:
    "ieee" for FP32 inputs (TF32 would miss the FP32 reference by ~1e-3), the default
    otherwise."""
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
    k0, v0, n0, region0 = _window_keys(base, fill_ptr, window_row, window_col, 0, height, width,
                                       padded_h, padded_w, shift, channels + h * DIM, channels,
                                       d, d_in, row, WINDOW, KEYS_MAIN, HAS_FILL)
    if KEYS_TAIL > 0:
        k1, v1, n1, region1 = _window_keys(base, fill_ptr, window_row, window_col, KEYS_MAIN,
                                           height, width, padded_h, padded_w, shift,
                                           channels + h * DIM, channels, d, d_in, row, WINDOW,
                                           KEYS_TAIL, HAS_FILL)
    for j in tl.range(GROUP):
        m = (tl.program_id(1) * GROUP + j) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_in = m < N
        m = tl.minimum(m, N - 1)  # rows past the window redo the last one (store masked)
        tok_m, inside_m, rs_m, cs_m = _window_tokens(window_row, window_col, m, height, width,
                                                     padded_h, padded_w, shift, WINDOW)
        q = _head_rows(base, tok_m, inside_m, h * DIM, fill_ptr, d, d_in, row, HAS_FILL)
        region_m = _region(rs_m, cs_m, padded_h, padded_w, shift, WINDOW)
        bias_rows = bias_ptr + h * N * N + m[:, None] * N
        s0 = _scores(q, k0, bias_rows, n0, 0, region_m, region0, scale, N, KEYS_MAIN, SHIFTED,
                     DOT_PRECISION)
        best = tl.max(s0, 1)
        if KEYS_TAIL > 0:
            s1 = _scores(q, k1, bias_rows, n1, KEYS_MAIN, region_m, region1, scale, N,
                         KEYS_TAIL, SHIFTED, DOT_PRECISION)
            best = tl.maximum(best, tl.max(s1, 1))
        p = tl.exp(s0 - best[:, None])
        total = tl.sum(p, 1)
        acc = tl.dot(p.to(v0.dtype), v0, input_precision=DOT_PRECISION)
        if KEYS_TAIL > 0:
            p = tl.exp(s1 - best[:, None])
            total += tl.sum(p, 1)
            acc = tl.dot(p.to(v1.dtype), v1, acc, input_precision=DOT_PRECISION)
        out = acc / total[:, None]
        out_rows = (out_ptr + b * tokens * channels + tok_m[:, None] * channels + h * DIM
                    + d[None, :])
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty),
                 mask=(m_in & inside_m)[:, None] & d_in[None, :])


@dataclass(frozen=True)
class WindowLaunch:
    """Launch shape of `window_attention_kernel`: query rows a block, query blocks a program
    (the program loads the window's keys once for all of them), warps, and the software
    pipeline's stages over the query blocks (the next blocks' queries and bias rows load while
    this one computes).

    The default was the fastest of the shapes swept on an H200 at Swin-L's four stages, batch 1
    and 8 (bench/swin_block.py; bench/RESULTS.md, "Swin window-attention kernel"): 5 blocks of
    32 rows take a 144-token window in one program (16 padding rows) and 2 warps keep enough
    programs on each SM."""

    block_m: int = 32
    group: int = 5
    num_warps: int = 2
    num_stages: int = 2


def key_tiles(n: int) -> tuple[int, int]:
    """N keys as a power-of-two tile (at least 16, tl.dot's minimum) plus a tail tile (0: none)
    that covers the rest: 144 -> (128, 16), 49 -> (32, 32), 16 -> (16, 0)."""
    main = max(16, 1 << (n.bit_length() - 1))
    return main, 0 if n <= main else max(16, triton.next_power_of_2(n - main))


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
    keys_main, keys_tail = key_tiles(window * window)
    grid = (batch * windows * heads,
            triton.cdiv(triton.cdiv(window * window, launch.block_m), launch.group))
    window_attention_kernel[grid](
        qkv, bias.contiguous(), fill.contiguous() if has_fill else qkv, out, height, width,
        padded_h, padded_w, windows_per_row, windows, heads, shift, scale,
        DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), WINDOW=window,
        BLOCK_M=launch.block_m, GROUP=launch.group, KEYS_MAIN=keys_main, KEYS_TAIL=keys_tail,
        SHIFTED=shift > 0, HAS_FILL=has_fill,
        DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return out
