"""MSDA kernels kept as the benchmark's baselines (bench/msda.py), not shipped: the op does not
use them.

`msda_fwd_kernel_v3` is the op's previous kernel (v3 in bench/msda_notes.md): one program = a
block of queries of one (batch, head) as a [queries, head dim] tile, so 4 lanes share a query's
row and each repeats the per-point coordinate work. `msda_fwd_kernel_per_output` is the classic
im2col design (one lane per output element). Same sampling convention and argument order as
plugin/kernel.py (the kernel signatures are alike for that reason).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton


@triton.jit
def _accumulate_point(
    acc, v_ptr, row_stride, cols, col_mask, lx, ly, a, h_l, w_l, start, EXPAND: tl.constexpr
):
    """acc += a * bilinear(value, (lx, ly)) for one sampling point of one level.

    EXPAND: rows are queries and columns the head dim (2-D tile); else one lane per output.
    """
    # Pixel coordinates in float64: loc * W is exact there (24 + 16 bits), so the fraction
    # keeps full float32 precision even at x ~ 300, where float32 would lose ~1e-5.
    x = lx.to(tl.float64) * w_l - 0.5
    y = ly.to(tl.float64) * h_l - 0.5
    # Clamp far-away points: every corner of a clamped point is outside the map anyway.
    x0f = tl.floor(tl.minimum(tl.maximum(x, -2.0), w_l + 1.0))
    y0f = tl.floor(tl.minimum(tl.maximum(y, -2.0), h_l + 1.0))
    fx = (x - x0f).to(tl.float32)
    fy = (y - y0f).to(tl.float32)
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    for dy in tl.static_range(2):
        yi = y0 + dy
        wy = fy * dy + (1.0 - fy) * (1 - dy)
        y_ok = (yi >= 0) & (yi < h_l)
        for dx in tl.static_range(2):
            xi = x0 + dx
            wx = fx * dx + (1.0 - fx) * (1 - dx)
            ok = y_ok & (xi >= 0) & (xi < w_l)
            w = tl.where(ok, a * wx * wy, 0.0)
            row = (start + yi * w_l + xi) * row_stride
            if EXPAND:
                v = tl.load(
                    v_ptr + row[:, None] + cols[None, :],
                    mask=ok[:, None] & col_mask[None, :],
                    other=0.0,
                )
                acc += w[:, None] * v.to(tl.float32)
            else:
                v = tl.load(v_ptr + row + cols, mask=ok & col_mask, other=0.0)
                acc += w * v.to(tl.float32)
    return acc


@triton.jit
def _accumulate_level(
    acc, v_ptr, row_stride, cols, col_mask, shapes_ptr, starts_ptr, loc_ptr, attw_ptr, lp_base,
    mask, lvl, POINTS: tl.constexpr, EXPAND: tl.constexpr
):
    """All points of level `lvl`; lp_base indexes the (b, q, h) row of locations / weights."""
    h_l = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
    w_l = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
    start = tl.load(starts_ptr + lvl).to(tl.int32)
    for p in tl.static_range(POINTS):
        i = lp_base + lvl * POINTS + p
        a = tl.load(attw_ptr + i, mask=mask, other=0.0).to(tl.float32)
        lx = tl.load(loc_ptr + 2 * i, mask=mask, other=0.0)
        ly = tl.load(loc_ptr + 2 * i + 1, mask=mask, other=0.0)
        acc = _accumulate_point(
            acc, v_ptr, row_stride, cols, col_mask, lx, ly, a, h_l, w_l, start, EXPAND=EXPAND
        )
    return acc


@triton.jit
def msda_fwd_kernel_v3(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attw_ptr,
    num_tokens,
    num_queries,
    num_heads,
    out_ptr,
    DIM: tl.constexpr,
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(Q, BLOCK_Q), B * H): one program = BLOCK_Q queries x the head dim."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    d_mask = d < DIM
    row_stride = num_heads * DIM
    v_ptr = value_ptr + b.to(tl.int64) * num_tokens * row_stride + h * DIM
    # (b, q, h) row of the locations / weights / output, in int64 (B*Q*H*L*P*2 can pass 2^31).
    bqh = (b.to(tl.int64) * num_queries + q) * num_heads + h
    lp_base = bqh * (LEVELS * POINTS)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for lvl in range(LEVELS):  # rolled: unrolling measured slower (bench/msda_notes.md)
        acc = _accumulate_level(acc, v_ptr, row_stride, d, d_mask, shapes_ptr, starts_ptr,
                                loc_ptr, attw_ptr, lp_base, q_mask, lvl, POINTS, True)
    out = out_ptr + bqh[:, None] * DIM + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def msda_fwd_kernel_per_output(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attw_ptr,
    num_tokens,
    num_queries,
    num_heads,
    out_ptr,
    DIM: tl.constexpr,
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid (cdiv(Q*H*D, BLOCK), B): the classic design, one lane per output element."""
    b = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < num_queries * num_heads * DIM
    d = idx % DIM
    h = (idx // DIM) % num_heads
    bqh = b * num_queries * num_heads + idx // DIM
    row_stride = num_heads * DIM
    lp_base = bqh * (LEVELS * POINTS)
    v_ptr = value_ptr + b * num_tokens * row_stride
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for lvl in range(LEVELS):
        acc = _accumulate_level(acc, v_ptr, row_stride, h * DIM + d, mask, shapes_ptr,
                                starts_ptr, loc_ptr, attw_ptr, lp_base, mask, lvl, POINTS, False)
    tl.store(out_ptr + bqh * DIM + d, acc.to(out_ptr.dtype.element_ty), mask=mask)


def ms_deform_attn_baseline(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    design: str = "v3",
) -> Tensor:
    """Run a baseline kernel: design "v3" (32 queries x head dim, 4 warps) or "per_output"."""
    batch, tokens, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    args = (value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
            sampling_locations.contiguous(), attention_weights.contiguous())
    out = value.new_empty(batch, queries, heads * dim)
    sizes = (tokens, queries, heads, out)
    if design == "per_output":
        block = 256
        grid = (triton.cdiv(queries * heads * dim, block), batch)
        wrap_triton(msda_fwd_kernel_per_output)[grid](
            *args, *sizes, DIM=dim, LEVELS=levels, POINTS=points, BLOCK=block, num_warps=4
        )
    elif design == "v3":
        block_d = triton.next_power_of_2(dim)
        block_q = max(1024 // block_d, 4)
        grid = (triton.cdiv(queries, block_q), batch * heads)
        wrap_triton(msda_fwd_kernel_v3)[grid](
            *args, *sizes, DIM=dim, LEVELS=levels, POINTS=points, BLOCK_Q=block_q,
            BLOCK_D=block_d, num_warps=4,
        )
    else:
        raise ValueError(f"unknown baseline design {design!r}: use 'v3' or 'per_output'")
    return out
