"""Inputs and a float64 formula for `codetr::window_attention`, shared by its CPU, interpreter
and GPU tests.

The formula is written from mmdet's definition, token by token, with none of the reference's
roll / partition / reverse machinery: window (wr, wc) of the map rolled by -shift holds the
tokens at ((wr*window + i + shift) % Hp, (wc*window + j + shift) % Wp) of the padded map.
"""

from __future__ import annotations

import torch
from torch import Tensor

# name: (batch, height, width, heads, head dim, window, shift, with fill)
CASES = {
    "whole-windows": (2, 8, 12, 2, 16, 4, 0, True),
    "whole-windows-shifted": (2, 8, 12, 2, 16, 4, 2, True),
    "padded": (1, 7, 10, 3, 16, 4, 0, True),
    "padded-shifted": (2, 10, 7, 2, 16, 5, 2, True),
    "padded-shifted-no-fill": (1, 9, 11, 1, 32, 4, 1, False),
    "head-dim-8": (1, 6, 6, 4, 8, 3, 1, True),
    "swin-window-12": (1, 24, 12, 2, 32, 12, 6, True),
}


def make_inputs(batch: int, height: int, width: int, heads: int, dim: int, window: int,
                with_fill: bool, dtype: torch.dtype, device: str = "cpu",
                seed: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    """qkv (B, H*W, 3C), bias (heads, N, N), fill (3C,) or None; values of attention-like size."""
    g = torch.Generator().manual_seed(seed)
    n, channels = window * window, heads * dim
    qkv = torch.randn(batch, height * width, 3 * channels, generator=g)
    bias = torch.randn(heads, n, n, generator=g)
    fill = torch.randn(3 * channels, generator=g) if with_fill else None
    move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return move(qkv), move(bias), move(fill)


def window_attention_float64(qkv: Tensor, bias: Tensor, fill: Tensor | None, height: int,
                             width: int, window: int, shift: int, scale: float) -> Tensor:
    """mmdet's shifted-window attention in float64, one window at a time."""
    qkv, bias = qkv.double().cpu(), bias.double().cpu()
    batch, _, row = qkv.shape
    heads, channels = bias.shape[0], row // 3
    dim = channels // heads
    hp, wp = -(-height // window) * window, -(-width // window) * window
    padded = torch.zeros(batch, hp, wp, row, dtype=torch.float64)
    if fill is not None:
        padded[:] = fill.double().cpu()
    padded[:, :height, :width] = qkv.view(batch, height, width, row)

    def band(x: int, size: int) -> int:
        return int(x >= size - window) + int(x >= size - shift) if shift else 0

    out = torch.zeros(batch, hp, wp, channels, dtype=torch.float64)
    ii, jj = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    for wr in range(hp // window):
        for wc in range(wp // window):
            rs, cs = (wr * window + ii).flatten(), (wc * window + jj).flatten()
            rows, cols = (rs + shift) % hp, (cs + shift) % wp
            region = torch.tensor([band(int(r), hp) * 3 + band(int(c), wp)
                                   for r, c in zip(rs, cs, strict=True)])
            mask = torch.where(region[:, None] != region[None, :], -100.0, 0.0).double()
            tokens = padded[:, rows, cols].view(batch, -1, 3, heads, dim)
            q, k, v = (tokens[:, :, i].transpose(1, 2) for i in range(3))
            attn = (q * scale) @ k.transpose(-1, -2) + bias[None] + mask
            got = (attn.softmax(-1) @ v).transpose(1, 2).reshape(batch, -1, channels)
            out[:, rows, cols] = got
    return out[:, :height, :width].reshape(batch, height * width, channels)
