"""The neck's 1x1 conv + GroupNorm and the encoder's token concatenation, two ways, side by side.

    python bench/neck_norm.py --batches 8,1 --results bench/RESULTS.md

Why: in the engine's batch-8 profile, the GroupNorm of the largest level (192 x 288, from the
stride-4 Swin stage) takes 0.74 ms: its conv output is channels-last, and Inductor reduces each
group in NCHW order, reading pixels 256 channels apart (16x the sectors its bytes need).

From the four Swin-L output maps at 1152x768 (NCHW views of (B, H, W, C) rows, FP16, as the
backbone's LayerNorms leave them) to the encoder's (B, 73,656 - 216, 256) tokens:
- "conv+GroupNorm": `gn(conv(x))` on the NCHW view, its output rounded to FP16 (the engine's
  round-norms pass), then `flatten(2).transpose(1, 2)` and `cat`: what the engine ran before;
- "rows": the candidate, `rows_conv_gn`: a linear over the rows and `group_norm_channels_last`
  (each group reduced in memory order), then the same flatten and cat.
Both compiled by Inductor under FP16 autocast and replayed in a CUDA graph (median of 50
CUDA-event timings); numerics first, against the FP32 eager module on the same inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from codetr_stream.compile.model.neck import ConvGN
from engine import median_ms, publish  # bench/engine.py (this folder is on sys.path)
from swin_block import graphed
from torch import Tensor

SECTION = "## Neck GroupNorm on rows (bench/neck_norm.py)"
# Swin-L's output maps at 1152x768: (rows, columns, channels).
LEVELS = [(192, 288, 192), (96, 144, 384), (48, 72, 768), (24, 36, 1536)]


def conv_gn(levels: list[ConvGN], maps: list[Tensor]) -> Tensor:
    outs = [level.gn(level.conv(x)).to(x.dtype) for level, x in zip(levels, maps, strict=True)]
    return torch.cat([f.flatten(2).transpose(1, 2) for f in outs], 1)


def group_norm_channels_last(x: Tensor, gn: torch.nn.GroupNorm) -> Tensor:
    """`gn` over (B, H, W, C) rows, channels innermost: each group's statistics reduced in
    memory order (a group's channels are neighbours). Computes in FP32, returns x's dtype."""
    b, h, w, c = x.shape
    groups = x.float().view(b, h * w, gn.num_groups, c // gn.num_groups)
    var, mean = torch.var_mean(groups, dim=(1, 3), keepdim=True, correction=0)
    out = ((groups - mean) * torch.rsqrt(var + gn.eps)).view(b, h, w, c)
    return (out * gn.weight + gn.bias).to(x.dtype)


def rows_conv_gn(level: ConvGN, x: Tensor) -> Tensor:
    """`level` (1x1 conv + GroupNorm) on an NCHW view of (B, H, W, C) rows: a linear over the
    rows, the norm on the rows, and the NCHW view of the result."""
    rows = F.linear(x.permute(0, 2, 3, 1), level.conv.weight.flatten(1))
    return group_norm_channels_last(rows, level.gn).permute(0, 3, 1, 2)


def rows(levels: list[ConvGN], maps: list[Tensor]) -> Tensor:
    outs = [rows_conv_gn(level, x) for level, x in zip(levels, maps, strict=True)]
    return torch.cat([f.flatten(2).transpose(1, 2) for f in outs], 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--results", type=Path, default=None, help="RESULTS.md to write a section to")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/neck_norm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    levels = [ConvGN(c, 256, 1, 1, 32).cuda().eval() for _, _, c in LEVELS]
    for level in levels:
        torch.nn.init.normal_(level.gn.weight, 1.0, 0.2)
        torch.nn.init.normal_(level.gn.bias, 0.0, 0.2)
    lines = ["| batch | variant | ms | x conv+GroupNorm | max error vs FP32 (of max) |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for batch in (int(b) for b in args.batches.split(",")):
        maps = [torch.randn(batch, h, w, c, device="cuda").permute(0, 3, 1, 2)
                for h, w, c in LEVELS]
        with torch.inference_mode():
            reference = conv_gn(levels, maps)
        maps16 = [m.half() for m in maps]
        first = None
        for name, fn in (("conv+GroupNorm", conv_gn), ("rows", rows)):
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True)

            def run(compiled=compiled, maps16=maps16) -> Tensor:
                with torch.autocast("cuda", dtype=torch.float16):
                    return compiled(levels, maps16)

            with torch.inference_mode():
                replay, out = graphed(run)
                replay()
                torch.cuda.synchronize()
                err = float((out.float() - reference).abs().max() / reference.abs().max())
                ms = median_ms(replay, warmup=5, iters=50)
            first = first or ms
            lines.append(f"| {batch} | {name} | {ms:.3f} | {first / ms:.2f} | {err:.1e} |")
            print(lines[-1], flush=True)
    publish(SECTION, "neck_norm.py", argv, "FP16 autocast, CUDA-graph replay, median of 50 "
            "CUDA-event timings; errors against FP32 eager on the same inputs.",
            "\n".join(lines), args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
