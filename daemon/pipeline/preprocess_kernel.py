"""The batch's preprocessing as one Triton kernel: frames -> the engine's input rows and masks.

Per output pixel it does what the reference torch ops do one whole-image pass at a time (NV12 ->
RGB rounded to uint8 values, keep-ratio bilinear resize with half-pixel centres rounded back to
uint8 values, zero padding, normalisation), so the batch costs one launch instead of about 30:
every launch hands the GIL to the camera threads, and on a busy host getting it back can take a
whole switch interval.

Bit-exactness with the reference, op by op:
- NV12 -> RGB: the products `k * (y - 16)` etc. come from a table built by the same torch ops
  (`conversion_table`), so the compiler cannot fuse them into FMAs the reference does not use.
- Resize: the expression of PyTorch's CUDA bilinear kernel, in its order. The compiler contracts
  it into FMAs the way nvcc does the original, as far as either is predictable; the tests hold
  the kernel to at most one grey level off the reference on a tiny share of pixels.
- Rounding is half-to-even, as `torch.round`; normalisation divides with IEEE rounding (`div_rn`,
  not the approximate `/` Triton emits for float32).

Frames are read where they lie (no stack, no copy): each row's source address and geometry come
from a small int64 table uploaded with the batch (`row_table`). Rows without a frame (padding up to
the compiled batch size) are written as zero images with all-valid masks, the engine's convention.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from codetr_stream.compile.model_inputs import Resize
from codetr_stream.daemon.pipeline.frames import Frame

BLOCK = 1024  # output pixels per program
INTERPRETER_BLOCK = 16384  # on CPU tensors (Triton's interpreter): fewer, larger programs
# One int64 row per batch row (the kernel reads them by position); format 0 is a padding row.
COLUMNS = ("address", "row_stride", "height", "width", "resized_h", "resized_w", "format")
_FORMATS = {"rgb24": 1, "nv12": 2}


def conversion_table(device: torch.device) -> torch.Tensor:
    """(5, 256) float32: the five products of BT.601 limited-range NV12 -> RGB per byte value,
    computed by the same torch ops as `preprocess._nv12_to_rgb_float` (bit-equal terms)."""
    v = torch.arange(256, device=device).float()
    c, d = v - 16.0, v - 128.0
    return torch.stack((1.164383 * c, 1.596027 * d, 0.391762 * d, 0.812968 * d, 2.017232 * d))


def row_table(frames: Sequence[Frame], pixels: Sequence[torch.Tensor],
              plans: Sequence[Resize], rows: int) -> np.ndarray:
    """(rows, len(COLUMNS)) int64: where each frame's pixels are (`pixels`, the frames' pixels
    on the kernel's device) and how it lands on the canvas; rows past the frames are padding."""
    table = np.zeros((rows, len(COLUMNS)), dtype=np.int64)
    table[len(frames):, 2:4] = 1  # a 1x1 source resized to nothing
    for row, (frame, data, plan) in enumerate(zip(frames, pixels, plans, strict=True)):
        if data.dtype != torch.uint8 or data.stride(-1) != 1 or (
                frame.pixel_format == "rgb24" and data.stride(1) != 3):
            raise ValueError(f"frame of {frame.stream}: expected uint8 pixels with packed rows, "
                             f"got {data.dtype} strides {data.stride()}")
        table[row] = (data.data_ptr(), data.stride(0), frame.height, frame.width,
                      *plan.resized_hw, _FORMATS[frame.pixel_format])
    return table


@triton.jit
def _round_half_even(x):
    """torch.round: to the nearest integer, ties to even (exact for |x| < 2**23)."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _to_uint8(x):
    return tl.minimum(tl.maximum(_round_half_even(x), 0.0), 255.0)


@triton.jit
def _nv12_pixel(src, stride, height, y, x, lut, mask):
    """RGB at (y, x) of an NV12 picture, each channel a whole number 0..255."""
    luma = tl.load(src + y * stride + x, mask=mask, other=16).to(tl.int32)
    uv = src + (height + y // 2) * stride + (x // 2) * 2
    u = tl.load(uv, mask=mask, other=128).to(tl.int32)
    v = tl.load(uv + 1, mask=mask, other=128).to(tl.int32)
    c = tl.load(lut + luma)
    r = c + tl.load(lut + 256 + v)
    g = c - tl.load(lut + 512 + u) - tl.load(lut + 768 + v)
    b = c + tl.load(lut + 1024 + u)
    return _to_uint8(r), _to_uint8(g), _to_uint8(b)


@triton.jit
def _rgb_pixel(src, stride, y, x, mask):
    p = src + y * stride + x * 3
    r = tl.load(p, mask=mask, other=0).to(tl.float32)
    g = tl.load(p + 1, mask=mask, other=0).to(tl.float32)
    b = tl.load(p + 2, mask=mask, other=0).to(tl.float32)
    return r, g, b


@triton.jit
def _pixel(src, stride, height, y, x, lut, mask, nv12):
    if nv12:
        r, g, b = _nv12_pixel(src, stride, height, y, x, lut, mask)
    else:
        r, g, b = _rgb_pixel(src, stride, y, x, mask)
    return r, g, b


@triton.jit
def _source_index(out_index, in_size, out_size):
    """PyTorch's area_pixel_compute_source_index (align_corners=False) and the two taps."""
    scale = tl.div_rn(in_size.to(tl.float32), tl.maximum(out_size, 1).to(tl.float32))
    real = tl.maximum(scale * (out_index.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = real.to(tl.int32)
    i1 = i0 + (i0 < in_size - 1).to(tl.int32)
    lambda1 = real - i0.to(tl.float32)
    return i0, i1, 1.0 - lambda1, lambda1


@triton.jit
def _bilinear(h0, h1, w0, w1, p00, p01, p10, p11):
    """PyTorch's CUDA upsample_bilinear2d expression, same order."""
    return _to_uint8(h0 * (w0 * p00 + w1 * p01) + h1 * (w0 * p10 + w1 * p11))


@triton.jit
def preprocess_kernel(
    table_ptr, lut_ptr, images_ptr, masks_ptr,
    canvas_h, canvas_w,
    mean_r, mean_g, mean_b, std_r, std_g, std_b,
    TABLE_ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (rows, cdiv(canvas_h * canvas_w, BLOCK)): one block of one row's output pixels."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    plane = canvas_h * canvas_w
    in_canvas = offs < plane
    oy = offs // canvas_w
    ox = offs - oy * canvas_w

    meta = table_ptr + row * TABLE_ROW  # the columns of `COLUMNS`
    src = tl.load(meta + 0).to(tl.pointer_type(tl.uint8))
    stride = tl.load(meta + 1)
    height = tl.load(meta + 2).to(tl.int32)
    width = tl.load(meta + 3).to(tl.int32)
    new_h = tl.load(meta + 4).to(tl.int32)
    new_w = tl.load(meta + 5).to(tl.int32)
    fmt = tl.load(meta + 6)
    inside = in_canvas & (oy < new_h) & (ox < new_w)

    y0, y1, h0, h1 = _source_index(oy, height, new_h)
    x0, x1, w0, w1 = _source_index(ox, width, new_w)
    nv12 = fmt == 2
    r00, g00, b00 = _pixel(src, stride, height, y0, x0, lut_ptr, inside, nv12)
    r01, g01, b01 = _pixel(src, stride, height, y0, x1, lut_ptr, inside, nv12)
    r10, g10, b10 = _pixel(src, stride, height, y1, x0, lut_ptr, inside, nv12)
    r11, g11, b11 = _pixel(src, stride, height, y1, x1, lut_ptr, inside, nv12)
    # Padding is raw pixel 0 (normalised below); padding ROWS stay plain zeros.
    r = tl.where(inside, _bilinear(h0, h1, w0, w1, r00, r01, r10, r11), 0.0)
    g = tl.where(inside, _bilinear(h0, h1, w0, w1, g00, g01, g10, g11), 0.0)
    b = tl.where(inside, _bilinear(h0, h1, w0, w1, b00, b01, b10, b11), 0.0)
    blank = fmt == 0
    out = images_ptr + row * 3 * plane + offs
    tl.store(out, tl.where(blank, 0.0, tl.div_rn(r - mean_r, std_r)), mask=in_canvas)
    tl.store(out + plane, tl.where(blank, 0.0, tl.div_rn(g - mean_g, std_g)), mask=in_canvas)
    tl.store(out + 2 * plane, tl.where(blank, 0.0, tl.div_rn(b - mean_b, std_b)),
             mask=in_canvas)
    tl.store(masks_ptr + row * plane + offs, tl.zeros([BLOCK], tl.uint8), mask=in_canvas)


def launch(table: torch.Tensor, lut: torch.Tensor, images: torch.Tensor, masks: torch.Tensor,
           mean: Sequence[float], std: Sequence[float]) -> None:
    """Fill rows 0..len(table)-1 of `images` (N, 3, H, W) float32 and `masks` (N, H, W) bool;
    `table` is `row_table`'s, on the images' device."""
    rows = table.shape[0]
    block = BLOCK if images.is_cuda else INTERPRETER_BLOCK
    _, _, canvas_h, canvas_w = images.shape
    if not (images.is_contiguous() and masks.is_contiguous()):
        raise ValueError("the engine's input buffers must be contiguous")
    grid = (rows, triton.cdiv(canvas_h * canvas_w, block))
    preprocess_kernel[grid](table, lut, images, masks.view(torch.uint8), canvas_h, canvas_w,
                            *map(float, mean), *map(float, std), TABLE_ROW=len(COLUMNS),
                            BLOCK=block)
