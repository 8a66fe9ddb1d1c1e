"""The MSDA forward kernel in Triton: one source for the PyTorch op, Inductor and TensorRT.

MSDA is a gather: per (query, head) it reads levels x points x 4 corner rows of the head dim and
sums them with attention x bilinear weights. Each gathered element costs a float16 -> float32
conversion and an FMA (the compute floor, bench/msda_notes.md); on top comes the per-point work
(pixel coordinates, corner indices, bounds, weights), repeated by every lane that holds part of a
query's row. `msda_fwd_kernel` gives a row to a few lanes (`LaunchConfig.lanes_per_row`), each
loading 16-byte pieces and keeping the rest of its share of the row in registers, so the per-point
work is repeated by those few lanes only, not by every lane of a [queries, head dim] tile (v3,
bench/msda_baselines.py).

Sampling follows `grid_sample(align_corners=False, padding_mode="zeros")`: pixel x = loc * W - 0.5,
corners outside the map contribute zero. Pixel coordinates are exact: float32 for 16-bit
locations (loc * W fits float32's 24 bits), float64 for float32 locations (a float32 product would
lose ~1e-5 of the fraction at x ~ 300).

Kernel arguments follow TensorRT's AOT plugin convention: input pointers, then int32 scalars,
then the output pointer (plugin/tensorrt_plugin.py launches the same compiled kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton


@triton.jit
def _pixel(loc, size):
    """(first corner index, fraction) of normalised locations on a map `size` pixels wide.

    Out-of-range float -> int conversions saturate on the GPU, so far-away points give corners
    that the bounds checks reject (x0 + 1 wraps to INT_MIN at INT_MAX: rejected as well).
    """
    if loc.dtype == tl.float32:
        x = loc.to(tl.float64) * size - 0.5
    else:
        x = loc.to(tl.float32) * size - 0.5
    x0 = tl.floor(x)
    return x0.to(tl.int32), (x - x0).to(tl.float32)


@triton.jit
def _corner(acc, rows, offset, w, d_mask, HALF_BILINEAR: tl.constexpr):
    """acc += w * value row at `rows + offset` (one corner of one point, all rows)."""
    if d_mask is None:
        v = tl.load(rows + offset[:, None, None])
    else:
        v = tl.load(rows + offset[:, None, None], mask=d_mask, other=0.0)
    if HALF_BILINEAR:
        acc = tl.fma(v, w.to(v.dtype)[:, None, None], acc)
    else:
        acc = tl.fma(v.to(tl.float32), w[:, None, None], acc)
    return acc


@triton.jit
def _sample(acc, rows, lx, ly, a, w_l, h_l, start, row_stride, d_mask,
            HALF_BILINEAR: tl.constexpr):
    """acc += a x the bilinear sample at normalised (lx, ly) of the level starting at row
    `start` (w_l x h_l pixels), for every query of the tile."""
    x0, fx = _pixel(lx, w_l)
    y0, fy = _pixel(ly, h_l)
    # One unsigned compare per corner coordinate: negative indices wrap to >= size.
    okx0 = x0.to(tl.uint32, bitcast=True) < w_l
    okx1 = (x0 + 1).to(tl.uint32, bitcast=True) < w_l
    oky0 = y0.to(tl.uint32, bitcast=True) < h_l
    oky1 = (y0 + 1).to(tl.uint32, bitcast=True) < h_l
    wx0 = tl.where(okx0, 1.0 - fx, 0.0)
    wx1 = tl.where(okx1, fx, 0.0)
    wy0 = tl.where(oky0, a * (1.0 - fy), 0.0)
    wy1 = tl.where(oky1, a * fy, 0.0)
    # A corner outside the map reads an in-map row with weight 0: no masked loads.
    ox0 = tl.where(okx0, x0, 0)
    ox1 = tl.where(okx1, x0 + 1, 0)
    oy0 = start + tl.where(oky0, y0, 0) * w_l
    oy1 = start + tl.where(oky1, y0 + 1, 0) * w_l
    s = tl.zeros_like(acc).to(rows.dtype.element_ty) if HALF_BILINEAR else acc
    s = _corner(s, rows, (oy0 + ox0) * row_stride, wy0 * wx0, d_mask, HALF_BILINEAR)
    s = _corner(s, rows, (oy0 + ox1) * row_stride, wy0 * wx1, d_mask, HALF_BILINEAR)
    s = _corner(s, rows, (oy1 + ox0) * row_stride, wy1 * wx0, d_mask, HALF_BILINEAR)
    s = _corner(s, rows, (oy1 + ox1) * row_stride, wy1 * wx1, d_mask, HALF_BILINEAR)
    if HALF_BILINEAR:
        acc += s.to(tl.float32)
    else:
        acc = s
    return acc


@triton.jit
def _program_tile(value_ptr, num_tokens, num_queries, num_heads, DIM: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                  HEAD_MAJOR: tl.constexpr):
    """This program's (batch, head), its queries (clamped; q_mask says which are real), the
    [1, BLOCK_D // CHUNK, CHUNK] channel tile, and the pointers to its head's value rows (the
    channel mask, None when DIM fills the tile, is the caller's: a jit function returns no None).
    HEAD_MAJOR: value stored (B, H, tokens, DIM), a head's rows contiguous (else (B, tokens, H,
    DIM))."""
    b = tl.program_id(1) // num_heads
    h = tl.program_id(1) % num_heads
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    q = tl.minimum(q, num_queries - 1)  # queries past the end redo the last one (store masked)
    d = (tl.arange(0, BLOCK_D // CHUNK)[None, :, None] * CHUNK
         + tl.arange(0, CHUNK)[None, None, :])
    if HEAD_MAJOR:
        row_stride = DIM
        rows = value_ptr + (b.to(tl.int64) * num_heads + h) * num_tokens * DIM + d
    else:
        row_stride = num_heads * DIM
        rows = value_ptr + b.to(tl.int64) * num_tokens * row_stride + h * DIM + d
    return b, h, q, q_mask, d, row_stride, rows


@triton.jit
def msda_fwd_kernel(
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
    CHUNK: tl.constexpr,
    HALF_BILINEAR: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
):
    """Grid (cdiv(Q, BLOCK_Q), B * H): one program = BLOCK_Q queries of one (batch, head).

    The tile is [BLOCK_Q, BLOCK_D // CHUNK, CHUNK]: Triton's coalescing gives the lanes of a warp
    to the CHUNK axis (16 bytes a lane) and then to the queries, and keeps the middle axis in each
    lane's registers; so a query's row is spread over CHUNK * itemsize / 16 lanes.
    HALF_BILINEAR: the 4 corners of a point are combined in the value dtype (packed float16
    math), then added to the float32 accumulator (benchmark variant; less exact).
    HEAD_MAJOR: value stored head-major (`stored_head_major`).
    """
    b, h, q, q_mask, d, row_stride, rows = _program_tile(
        value_ptr, num_tokens, num_queries, num_heads, DIM, BLOCK_Q, BLOCK_D, CHUNK, HEAD_MAJOR)
    d_mask = None if DIM == BLOCK_D else d < DIM
    # (b, q, h) row of the locations / weights / output, in int64 (B*Q*H*L*P*2 can pass 2^31).
    bqh = (b.to(tl.int64) * num_queries + q) * num_heads + h
    lp_base = bqh * (LEVELS * POINTS)
    acc = tl.zeros([BLOCK_Q, BLOCK_D // CHUNK, CHUNK], dtype=tl.float32)
    for lvl in range(LEVELS):  # rolled: unrolling measured slower (bench/msda_notes.md)
        h_l = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        w_l = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        start = tl.load(starts_ptr + lvl).to(tl.int32)
        for p in tl.static_range(POINTS):
            i = lp_base + lvl * POINTS + p
            a = tl.load(attw_ptr + i).to(tl.float32)
            lx, ly = tl.split(tl.load(loc_ptr + 2 * i[:, None] + tl.arange(0, 2)[None, :]))
            acc = _sample(acc, rows, lx, ly, a, w_l, h_l, start, row_stride, d_mask,
                          HALF_BILINEAR)
    out = out_ptr + bqh[:, None, None] * DIM + d
    mask = q_mask[:, None, None] if d_mask is None else q_mask[:, None, None] & d_mask
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def msda_offsets_fwd_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    ref_ptr,
    offsets_ptr,
    logits_ptr,
    num_tokens,
    num_queries,
    num_heads,
    offsets_row_stride,
    logits_row_stride,
    out_ptr,
    DIM: tl.constexpr,
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    REF_DIMS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
):
    """`msda_fwd_kernel` with the sampling locations and attention weights made here, from
    what the layer's projections give, instead of read as FP32 tensors written by other kernels.

    ref (B,Q,L,REF_DIMS) float32: points (x, y) or boxes (x, y, w, h), normalised; offsets
    (B*Q rows, row stride `offsets_row_stride`, H*L*P*2 used) and logits (B*Q rows, stride
    `logits_row_stride`, H*L*P used) in any float dtype. As the MSDA layer computes them:
    weights = softmax over the L*P logits of a (query, head); locations = ref + offset / (w, h)
    of the level (points) or ref_xy + offset / P * ref_wh / 2 (boxes), in float32.
    """
    b, h, q, q_mask, d, row_stride, rows = _program_tile(
        value_ptr, num_tokens, num_queries, num_heads, DIM, BLOCK_Q, BLOCK_D, CHUNK, HEAD_MAJOR)
    d_mask = None if DIM == BLOCK_D else d < DIM
    bq = b.to(tl.int64) * num_queries + q
    logit_row = logits_ptr + bq * logits_row_stride + h * (LEVELS * POINTS)
    offset_row = offsets_ptr + bq * offsets_row_stride + h * (LEVELS * POINTS * 2)
    ref_row = ref_ptr + bq * (LEVELS * REF_DIMS)
    # The softmax's max and sum over the L*P logits first, one logit of every query at a time
    # (vectors in the queries' layout: a [queries, L*P] tile's reductions would be converted to
    # it through shared memory at every use); each weight is made in the loop.
    peak = tl.load(logit_row).to(tl.float32)
    for k in tl.static_range(1, LEVELS * POINTS):
        peak = tl.maximum(peak, tl.load(logit_row + k).to(tl.float32))
    total = tl.zeros_like(peak)
    for k in tl.static_range(LEVELS * POINTS):
        total += tl.exp(tl.load(logit_row + k).to(tl.float32) - peak)
    scale = 1.0 / total
    acc = tl.zeros([BLOCK_Q, BLOCK_D // CHUNK, CHUNK], dtype=tl.float32)
    for lvl in range(LEVELS):  # rolled, as in msda_fwd_kernel
        h_l = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        w_l = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        start = tl.load(starts_ptr + lvl).to(tl.int32)
        rx = tl.load(ref_row + lvl * REF_DIMS)
        ry = tl.load(ref_row + lvl * REF_DIMS + 1)
        inv_w = 1.0 / w_l.to(tl.float32)
        inv_h = 1.0 / h_l.to(tl.float32)
        if REF_DIMS == 4:
            rw = tl.load(ref_row + lvl * REF_DIMS + 2)
            rh = tl.load(ref_row + lvl * REF_DIMS + 3)
        for p in tl.static_range(POINTS):
            j = lvl * POINTS + p
            a = tl.exp(tl.load(logit_row + j).to(tl.float32) - peak) * scale
            ox, oy = tl.split(tl.load(offset_row[:, None] + 2 * j + tl.arange(0, 2)[None, :]))
            # The layer's float32 formula in its order, its divisions by the level size as
            # multiplications by the reciprocal (within an ulp of the division: 2e-5 px at the
            # largest level; IEEE divisions cost 22 more registers and fewer programs per SM).
            if REF_DIMS == 2:
                lx = rx + ox.to(tl.float32) * inv_w
                ly = ry + oy.to(tl.float32) * inv_h
            else:
                lx = rx + ox.to(tl.float32) * (1.0 / POINTS) * rw * 0.5
                ly = ry + oy.to(tl.float32) * (1.0 / POINTS) * rh * 0.5
            acc = _sample(acc, rows, lx, ly, a, w_l, h_l, start, row_stride, d_mask, False)
    out = out_ptr + (bq * num_heads + h)[:, None, None] * DIM + d
    mask = q_mask[:, None, None] if d_mask is None else q_mask[:, None, None] & d_mask
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Block shape of `msda_fwd_kernel`: queries a program, lanes per query row, warps."""

    block_q: int
    lanes_per_row: int
    num_warps: int
    half_bilinear: bool = False

    def constexprs(self, dim: int, itemsize: int, head_major: bool = False
                   ) -> dict[str, int | bool]:
        """BLOCK_Q, BLOCK_D, CHUNK, HALF_BILINEAR, HEAD_MAJOR for a head dim, value element size
        and value layout (`stored_head_major`)."""
        block_d = triton.next_power_of_2(dim)
        chunk = min(block_d, max(1, 16 * self.lanes_per_row // itemsize))
        return {"BLOCK_Q": self.block_q, "BLOCK_D": block_d, "CHUNK": chunk,
                "HALF_BILINEAR": self.half_bilinear, "HEAD_MAJOR": head_major}


def stored_head_major(value: Tensor) -> bool:
    """`value` (B, tokens, H, DIM) is a view of a contiguous (B, H, tokens, DIM) tensor: each
    head's rows are contiguous, so a point's horizontal corners are neighbours in memory (the
    kernel reads either layout; on an H200 this one is 6-8% faster at Co-DINO's calls,
    bench/RESULTS.md)."""
    return not value.is_contiguous() and value.transpose(1, 2).is_contiguous()


def value_as_read(value: Tensor) -> tuple[Tensor, bool]:
    """`value` as a kernel reads it, and whether head-major: either layout as it is stored,
    any other copied to (B, tokens, H, DIM) contiguous."""
    head_major = stored_head_major(value)
    return (value if head_major else value.contiguous()), head_major


def head_major_copy(value: Tensor) -> Tensor:
    """`value` (B, tokens, H, DIM) as a view of a head-major copy (`stored_head_major`)."""
    return value.transpose(1, 2).contiguous().transpose(1, 2)


def launch_config() -> LaunchConfig:
    """The op's block shape, one for every call: 64 queries a program, 4 lanes a row, 8 warps,
    the fastest of the launch shapes swept on an H200 at both the encoder's and the decoder's
    call (measured: bench/RESULTS.md, "MSDA kernel"). Fewer lanes a row cut the instructions per
    element but not the time: the gathers of the model's real locations are cache-bound there
    (bench/msda_notes.md).
    """
    return LaunchConfig(block_q=64, lanes_per_row=4, num_warps=8)


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    config: LaunchConfig | None = None,
) -> Tensor:
    """Launch `msda_fwd_kernel` (through `wrap_triton`, so torch.compile/export can trace it).

    Shapes as the op; spatial_shapes and level_start_index must live on value's device (the
    kernel reads them there, so no host sync is needed and CUDA-graph capture works).
    config: block shape (default `launch_config()`; the benchmark's sweep passes others).
    """
    batch, tokens, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    config = config or launch_config()
    value, head_major = value_as_read(value)
    if config.half_bilinear and value.dtype != torch.float16:
        raise ValueError(f"half_bilinear needs float16 values, got {value.dtype}")
    out = value.new_empty(batch, queries, heads * dim)
    grid = (triton.cdiv(queries, config.block_q), batch * heads)
    wrap_triton(msda_fwd_kernel)[grid](
        value, spatial_shapes.contiguous(), level_start_index.contiguous(),
        sampling_locations.contiguous(), attention_weights.contiguous(), tokens, queries, heads,
        out, DIM=dim, LEVELS=levels, POINTS=points, num_warps=config.num_warps,
        **config.constexprs(dim, value.element_size(), head_major),
    )
    return out


def ms_deform_attn_offsets_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    reference: Tensor,
    offsets: Tensor,
    logits: Tensor,
    config: LaunchConfig | None = None,
) -> Tensor:
    """Launch `msda_offsets_fwd_kernel`. offsets (B,Q,H*L*P*2) and logits (B,Q,H*L*P) may be
    column slices of one wider tensor (their rows are read with their own stride); reference
    (B,Q,L,2|4) float32."""
    batch, tokens, heads, dim = value.shape
    _, queries, levels, ref_dims = reference.shape
    points = logits.shape[-1] // (heads * levels)
    value, head_major = value_as_read(value)
    config = config or launch_config()
    offsets, logits = (t if t.stride(-1) == 1 and t.stride(0) == t.shape[1] * t.stride(1)
                       else t.contiguous() for t in (offsets, logits))
    out = value.new_empty(batch, queries, heads * dim)
    grid = (triton.cdiv(queries, config.block_q), batch * heads)
    wrap_triton(msda_offsets_fwd_kernel)[grid](
        value, spatial_shapes.contiguous(), level_start_index.contiguous(),
        reference.contiguous(), offsets, logits, tokens, queries, heads, offsets.stride(1),
        logits.stride(1), out, DIM=dim, LEVELS=levels, POINTS=points, REF_DIMS=ref_dims,
        num_warps=config.num_warps,
        **{k: v for k, v in config.constexprs(dim, value.element_size(), head_major).items()
           if k != "HALF_BILINEAR"},
    )
    return out
