"""`torch.ops.codetr.window_attention`: Swin's shifted-window attention as one op.

Arguments: qkv (B, H*W, 3C), the qkv projection of the normed tokens in row-major order (last dim
q | k | v, each heads x head dim); bias (heads, N, N), the relative-position bias of a window of
N = window**2 tokens; fill (3C,) or None, the qkv of a padding token (the projection's bias: mmdet
pads the normed map with zeros before projecting); height, width of the token map; window; shift
(0 for the unshifted blocks); scale. Returns the attention output (B, H*W, C) in token order,
ready for the output projection. Semantics are mmdet's `ShiftWindowMSA`: pad to whole windows,
roll by -shift, attend inside each window with the bias and, when shifted, -100 between tokens
of different regions, roll back, crop.

On CUDA the op runs the Triton kernel of plugin/window_kernel.py (no window copies, no dense
mask); elsewhere `window_attention_reference`, which spells those steps out with torch ops.
The op is opaque to torch.compile (a `custom_op`, not a `triton_op`): Inductor calls it like a
library kernel. Traced into as a user-defined Triton kernel (as MSDA is) it ran at half speed
(Inductor passes the float `scale` as fp64) and its engines missed their saved compile cache at
every start (measured on an H200, bench/RESULTS.md). torch.export keeps the op as one node; the
TensorRT build swaps it for the reference's torch ops (`decompositions()`), which TensorRT
converts natively.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from codetr_stream.plugin import window_kernel as _kernel
except ImportError:  # no triton: CPU-only torch
    _kernel = None

OP_NAME = "codetr::window_attention"


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, window*window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: Tensor, batch: int, h: int, w: int) -> Tensor:
    """Inverse of `window_partition`: (B * nW, window*window, C) -> (B, H, W, C)."""
    window = round(windows.shape[1] ** 0.5)
    x = windows.view(batch, h // window, w // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, h, w, -1)


def shift_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> Tensor:
    """(nW, N, N) additive mask: -100 between tokens that came from different regions.

    mmdet labels 3 x 3 regions (rows and columns split at -window and -shift) by slice
    assignment; the same labels come here from comparisons, without in-place writes."""
    def band(n: int) -> Tensor:  # 0 before the last window, 1 in it before the shift, 2 after
        i = torch.arange(n, device=device)
        return (i >= n - window).long() + (i >= n - shift).long()

    region = (band(h)[:, None] * 3 + band(w)[None, :]).float()
    ids = window_partition(region[None, :, :, None], window).squeeze(-1)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0)


def window_mask(bias: Tensor, padded_h: int, padded_w: int, window: int, shift: int) -> Tensor:
    """(1, windows * heads, N, N): the bias, plus the shift mask when shifted, of every window.

    The window index is folded into the head dimension so that the mask broadcasts over the
    batch, a layout the fused attention kernels accept."""
    heads, n = bias.shape[0], window * window
    windows = padded_h * padded_w // n
    if shift == 0:
        return bias.expand(windows, heads, n, n).reshape(1, -1, n, n)
    mask = shift_mask(padded_h, padded_w, window, shift, bias.device)[:, None].to(bias.dtype)
    return (bias + mask).reshape(1, -1, n, n)


def windowed_sdpa(qkv: Tensor, mask: Tensor, fill: Tensor | None, height: int, width: int,
                  window: int, shift: int, scale: float) -> Tensor:
    """The op's steps in torch ops, given `window_mask`: pad, roll, partition, fused SDPA,
    reverse, roll back, crop."""
    batch, _, row = qkv.shape
    n, channels = window * window, row // 3
    pad_h, pad_w = (window - height % window) % window, (window - width % window) % window
    hp, wp = height + pad_h, width + pad_w
    x = qkv.view(batch, height, width, row)
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        if fill is not None:
            inside = ((torch.arange(hp, device=qkv.device) < height)[:, None]
                      & (torch.arange(wp, device=qkv.device) < width)[None, :])
            x = torch.where(inside[..., None], x, fill.to(x.dtype))
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    windows, heads = hp * wp // n, mask.shape[1] * n // (hp * wp)
    parts = window_partition(x, window).view(batch, windows, n, 3, heads, channels // heads)
    q, k, v = parts.permute(3, 0, 1, 4, 2, 5).reshape(3, batch, windows * heads, n, -1).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale)
    out = out.reshape(batch * windows, heads, n, -1).transpose(1, 2).reshape(-1, n, channels)
    out = window_reverse(out, batch, hp, wp)
    if shift > 0:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out[:, :height, :width].reshape(batch, height * width, channels)


def window_attention_reference(qkv: Tensor, bias: Tensor, fill: Tensor | None, height: int,
                               width: int, window: int, shift: int, scale: float) -> Tensor:
    """The op spelled out in torch ops: `window_mask`, then `windowed_sdpa`."""
    hp, wp = -(-height // window) * window, -(-width // window) * window
    mask = window_mask(bias, hp, wp, window, shift)
    return windowed_sdpa(qkv, mask, fill, height, width, window, shift, scale)


def check_inputs(qkv: Tensor, bias: Tensor, fill: Tensor | None, height: int, width: int,
                 window: int, shift: int) -> None:
    """Raise a ValueError naming the argument whose shape or value is wrong."""

    def fail(problem: str) -> None:
        raise ValueError(f"{OP_NAME}: {problem} (see codetr_stream/plugin/window_attention.py)")

    if qkv.dim() != 3 or qkv.shape[1] != height * width or qkv.shape[2] % 3:
        fail(f"qkv must be (B, {height}*{width}, 3C), got {tuple(qkv.shape)}")
    n = window * window
    if bias.dim() != 3 or bias.shape[1:] != (n, n) or (qkv.shape[2] // 3) % bias.shape[0]:
        fail(f"bias must be (heads, {n}, {n}) with heads dividing C, got {tuple(bias.shape)}")
    if fill is not None and tuple(fill.shape) != (qkv.shape[2],):
        fail(f"fill must be ({qkv.shape[2]},), got {tuple(fill.shape)}")
    if not 0 <= shift < window:
        fail(f"shift must be in [0, window={window}), got {shift}")


def _forward(qkv: Tensor, bias: Tensor, fill: Tensor | None, height: int, width: int,
             window: int, shift: int, scale: float) -> Tensor:
    """Shifted-window attention (see the module doc), inference only."""
    check_inputs(qkv, bias, fill, height, width, window, shift)
    if _kernel is not None and qkv.is_cuda:
        return _kernel.window_attention_triton(qkv, bias, fill, height, width, window, shift,
                                               scale)
    return window_attention_reference(qkv, bias, fill, height, width, window, shift, scale)


window_attention = torch.library.custom_op(OP_NAME, _forward, mutates_args=())


@window_attention.register_fake
def _(qkv, bias, fill, height, width, window, shift, scale):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)


def _no_backward(ctx, grad_output):
    raise RuntimeError(f"{OP_NAME} is inference only: run the model under torch.no_grad() or "
                       "torch.inference_mode()")


window_attention.register_autograd(_no_backward, setup_context=lambda ctx, inputs, output: None)


def decompositions() -> dict[torch._ops.OpOverload, object]:
    """For `ExportedProgram.run_decompositions`: the op as the reference's torch ops."""
    return {torch.ops.codetr.window_attention.default: window_attention_reference}
