"""Swin Transformer backbone, laid out like mmdet's `SwinTransformer` (keys and numerics).

mmdet details that matter for parity (docs/model.md): windows are padded with zeros AFTER the
first LayerNorm (so a padding token's qkv is the projection's bias); only shifted blocks get an
attention mask (-100 across regions); patch merging uses `nn.Unfold` order (channel-major);
outputs are normed per stage before the downsample. Every shape decision uses python ints from
static tensor shapes, so the module exports with torch.export and also takes a symbolic batch
size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from codetr_stream.compile.model.ffn import FFN
from codetr_stream.compile.model_config import SwinConfig
from codetr_stream.plugin.window_attention import window_attention
from torch import Tensor, nn


def _relative_position_index(window: int) -> Tensor:
    """mmdet's `WindowMSA` index into the (2w-1)^2 bias table (it is also in the checkpoint)."""
    seq1 = torch.arange(0, (2 * window - 1) * window, 2 * window - 1)
    seq2 = torch.arange(0, window)
    coords = (seq1[:, None] + seq2[None, :]).reshape(1, -1)
    return (coords + coords.T).flip(1).contiguous()


class WindowMSA(nn.Module):
    """Multi-head self-attention inside (shifted) windows, with a learned relative position
    bias: the qkv projection of every token, one `window_attention` op (pad, shift, windows,
    attention, back: plugin/window_attention.py), the output projection."""

    def __init__(self, dims: int, heads: int, window: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dims // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_position_index(window))
        self.qkv = nn.Linear(dims, dims * 3, bias=qkv_bias)
        self.proj = nn.Linear(dims, dims)

    def forward(self, x: Tensor, hw: tuple[int, int], shift: int) -> Tensor:
        """x (B, H*W, C) normed tokens in row-major order -> (B, H*W, C)."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.heads).permute(2, 0, 1)
        out = window_attention(self.qkv(x), bias, self.qkv.bias, hw[0], hw[1], self.window,
                               shift, self.scale)
        return self.proj(out)


class ShiftWindowMSA(nn.Module):
    """`WindowMSA` on windows cyclic-shifted by `shift` tokens (0: the unshifted blocks)."""

    def __init__(self, dims: int, heads: int, window: int, shift: int, qkv_bias: bool) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.w_msa = WindowMSA(dims, heads, window, qkv_bias)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return self.w_msa(x, hw, self.shift)


class SwinBlock(nn.Module):
    """Pre-norm block: `x + attn(LN(x))`, then `x + FFN(LN(x))`."""

    def __init__(self, dims: int, heads: int, window: int, shift: int, mlp_ratio: float,
                 qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dims)
        self.attn = ShiftWindowMSA(dims, heads, window, shift, qkv_bias)
        self.norm2 = nn.LayerNorm(dims)
        self.ffn = FFN(dims, int(dims * mlp_ratio), nn.GELU)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = x + self.attn(self.norm1(x), hw)
        return self.ffn(self.norm2(x), identity=x)


class PatchMerging(nn.Module):
    """Stride-k token merge in `nn.Unfold` order (index c*k*k + kh*k + kw), LN, linear."""

    def __init__(self, dims: int, out_dims: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.norm = nn.LayerNorm(stride * stride * dims)
        self.reduction = nn.Linear(stride * stride * dims, out_dims, bias=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        b, _, c = x.shape
        s = self.stride
        h, w = hw
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, (s - w % s) % s, 0, (s - h % s) % s))
        ho, wo = x.shape[1] // s, x.shape[2] // s
        x = x.view(b, ho, s, wo, s, c).permute(0, 1, 3, 5, 2, 4).reshape(b, ho * wo, c * s * s)
        return self.reduction(self.norm(x)), (ho, wo)


class SwinStage(nn.Module):
    """Blocks of one resolution (odd ones shifted by window // 2), then the optional merge."""

    def __init__(self, dims: int, depth: int, heads: int, window: int, mlp_ratio: float,
                 qkv_bias: bool, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dims, heads, window, window // 2 if i % 2 else 0, mlp_ratio, qkv_bias)
            for i in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int], Tensor]:
        for block in self.blocks:
            x = block(x, hw)
        out = x
        if self.downsample is not None:
            x, hw = self.downsample(x, hw)
        return x, hw, out


class PatchEmbed(nn.Module):
    """Corner-padded strided conv, then LayerNorm over channels."""

    def __init__(self, in_channels: int, dims: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.projection = nn.Conv2d(in_channels, dims, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dims)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        p = self.patch
        x = self.projection(F.pad(x, (0, (p - x.shape[3] % p) % p, 0, (p - x.shape[2] % p) % p)))
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class SwinTransformer(nn.Module):
    """Images (B,3,H,W) -> one NCHW feature map per `out_indices` stage."""

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        self.out_indices = cfg.out_indices
        channels = cfg.stage_channels
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.embed_dims, cfg.patch_size)
        self.stages = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            last = i == len(cfg.depths) - 1
            merge = None if last else PatchMerging(channels[i], channels[i] * 2, cfg.strides[i + 1])
            self.stages.append(SwinStage(channels[i], depth, cfg.num_heads[i], cfg.window_size,
                                         cfg.mlp_ratio, cfg.qkv_bias, merge))
        for i in cfg.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(channels[i]))

    def forward(self, images: Tensor) -> list[Tensor]:
        x, hw = self.patch_embed(images)
        outs = []
        for i, stage in enumerate(self.stages):
            x, next_hw, out = stage(x, hw)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(-1, hw[0], hw[1], out.shape[-1]).permute(0, 3, 1, 2))
            hw = next_hw
        return outs
