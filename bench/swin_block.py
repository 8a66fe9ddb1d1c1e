"""Swin block pieces side by side on one GPU: the shifted-window attention and the MLP's first
layer, at Swin-L's 1152x768 stage shapes, before a full engine build.

    python bench/swin_block.py --batches 1,8 --stages 1,2,3,4

Window attention (unshifted and shifted block of each stage):
- "sdpa+copies": the previous engine's path (plugin/window_attention.windowed_sdpa): pad, roll,
  window copies, fused SDPA (cuDNN on H100/H200) with the (windows*heads, N, N) mask precomputed
  as the engine's fold-masks pass did, copies back; compiled by Inductor.
- "online m32-n32-w2": the op's previous kernel (bench/window_baselines.py) at its shipped
  launch: a program per 32 queries, online softmax over 32 keys a step.
- "kernel mM-gG-wW-sS": the Triton op (plugin/window_kernel.py) at each launch shape (G blocks
  of M queries a program, which loads the window's keys once, W warps, S pipeline stages).
MLP first layer + GELU:
- "inductor": `gelu(linear(x))` compiled by Inductor (a cuBLAS GEMM, then a GELU pass).
- "gelu-epilogue": the engine pass's `linear_gelu` (one cuBLASLt GEMM, GELU's tanh form).
Everything in FP16, replayed in CUDA graphs; numerics first: max |error| against an FP32 run of
the reference formula on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from codetr_stream.compile.engines.passes import linear_gelu
from codetr_stream.plugin.window_attention import (
    window_attention_reference,
    window_mask,
    windowed_sdpa,
)
from codetr_stream.plugin.window_kernel import WindowLaunch, window_attention_triton
from engine import median_ms, publish  # bench/engine.py (this folder is on sys.path)
from torch import Tensor
from window_baselines import window_attention_baseline

SECTION = "## Swin block pieces (bench/swin_block.py)"
# Swin-L at 1152x768: (token rows, token columns, channels, heads) per stage.
STAGES = {1: (192, 288, 192, 6), 2: (96, 144, 384, 12), 3: (48, 72, 768, 24),
          4: (24, 36, 1536, 48)}
WINDOW, SHIFT = 12, 6
LAUNCHES = ["32-5-2-2", "32-5-2-3", "32-5-1-2", "32-3-2-2", "64-3-4-2", "64-3-4-3", "16-9-1-2",
            "16-9-1-3", "128-2-8-2"]


def graphed(fn: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
    """Warm up (compiles) and capture fn in a CUDA graph; returns replay and the output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def max_error(got: Tensor, reference: Tensor) -> dict[str, float]:
    return {"max_err": float((got.float() - reference).abs().max())}


def measure(name: str, fn: Callable[[], Tensor], reference: Tensor | None,
            row: dict[str, Any],
            errors: Callable[[Tensor, Tensor], dict[str, float]] = max_error) -> dict[str, Any]:
    """One variant: its `errors` against `reference` (none without one), then its median ms
    (graph replay)."""
    out = dict(row, variant=name)
    try:
        with torch.inference_mode():
            replay, got = graphed(fn)
            replay()
            torch.cuda.synchronize()
            if reference is not None:
                out.update(errors(got, reference))
            out["ms"] = round(median_ms(replay, warmup=5, iters=50), 4)
    except Exception as exc:  # a launch shape this GPU or Triton cannot run
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    print(json.dumps(out), flush=True)
    return out


def attention_rows(stage: int, shift: int, batch: int, launches: list[str],
                   sdpa: bool = True) -> list[dict]:
    height, width, channels, heads = STAGES[stage]
    torch._dynamo.reset()  # a fresh compile per shape, not dynamo's recompile limit
    g = torch.Generator(device="cuda").manual_seed(stage * 10 + shift)
    qkv = torch.randn(batch, height * width, 3 * channels, device="cuda", generator=g)
    bias = 0.5 * torch.randn(heads, WINDOW * WINDOW, WINDOW * WINDOW, device="cuda", generator=g)
    fill = torch.randn(3 * channels, device="cuda", generator=g)
    args = (height, width, WINDOW, shift, (channels // heads) ** -0.5)
    with torch.inference_mode():
        reference = window_attention_reference(qkv, bias, fill, *args)
    qkv, bias, fill = qkv.half(), bias.half(), fill.half()
    mask = window_mask(bias, height, width, WINDOW, shift)  # sizes divide: no padding here
    compiled = torch.compile(windowed_sdpa, fullgraph=True, dynamic=False)
    row = {"piece": "window attention", "stage": stage, "shift": shift, "batch": batch}
    rows = []
    if sdpa:
        rows.append(measure("sdpa+copies", lambda: compiled(qkv, mask, fill, *args), reference,
                            row))
    rows.append(measure("online m32-n32-w2",
                        lambda: window_attention_baseline(qkv, bias, fill, *args), reference, row))
    for launch in launches:
        shape = WindowLaunch(*(int(v) for v in launch.split("-")))
        name = f"m{shape.block_m}-g{shape.group}-w{shape.num_warps}-s{shape.num_stages}"
        rows.append(measure(f"kernel {name}",
                            lambda shape=shape: window_attention_triton(qkv, bias, fill, *args,
                                                                        launch=shape),
                            reference, row))
    return rows


def gelu_rows(stage: int, batch: int) -> list[dict]:
    height, width, channels, _ = STAGES[stage]
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(stage)
    x = torch.randn(batch * height * width, channels, device="cuda", generator=g)
    weight = torch.randn(4 * channels, channels, device="cuda", generator=g) / channels ** 0.5
    bias = 0.1 * torch.randn(4 * channels, device="cuda", generator=g)
    with torch.inference_mode():
        reference = F.gelu(F.linear(x, weight, bias))
    x, weight, bias = x.half(), weight.half(), bias.half()
    compiled = torch.compile(lambda: F.gelu(F.linear(x, weight, bias)), fullgraph=True)
    row = {"piece": "fc1 + GELU", "stage": stage, "shift": "", "batch": batch}
    return [measure("inductor", compiled, reference, row),
            measure("gelu-epilogue", lambda: linear_gelu(x, weight, bias, None), reference, row)]


def table(rows: list[dict]) -> str:
    """Markdown: one line per (piece, stage, shift, batch), variants side by side as
    'ms (x of the first variant) / max err'."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["piece"], r["stage"], r["shift"], r["batch"]), []).append(r)
    lines = ["| piece | stage | shift | batch | variant: ms (x first) / max err vs FP32 |",
             "| --- | --- | --- | --- | --- |"]
    for (piece, stage, shift, batch), group in groups.items():
        first = group[0].get("ms")
        cells = []
        for r in group:
            if "ms" not in r:
                cells.append(f"{r['variant']}: {r.get('error', 'failed')}")
                continue
            speed = f" ({first / r['ms']:.2f}x)" if first else ""
            cells.append(f"{r['variant']}: {r['ms']:.3f}{speed} / {r['max_err']:.1e}")
        lines.append(f"| {piece} | {stage} | {shift} | {batch} | " + "<br>".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--stages", default="1,2,3,4")
    p.add_argument("--sweep-stages", default="1,3",
                   help="stages that time every launch shape (the others: the default only)")
    p.add_argument("--kernels-only", action="store_true",
                   help="window attention's Triton kernels alone: no SDPA path, no fc1 + GELU")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results", type=Path, default=None, help="RESULTS.md to write a section to")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/swin_block.py needs a CUDA GPU", file=sys.stderr)
        return 2
    default = WindowLaunch()
    default_launch = "-".join(str(v) for v in (default.block_m, default.group, default.num_warps,
                                               default.num_stages))
    sweep = {int(s) for s in args.sweep_stages.split(",")}
    rows: list[dict] = []
    for batch in (int(b) for b in args.batches.split(",")):
        for stage in (int(s) for s in args.stages.split(",")):
            for shift in (0, SHIFT):
                rows += attention_rows(stage, shift, batch,
                                       LAUNCHES if stage in sweep else [default_launch],
                                       sdpa=not args.kernels_only)
            if not args.kernels_only:
                rows += gelu_rows(stage, batch)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    publish(SECTION, "swin_block.py", argv, "FP16, CUDA-graph replay, median of 50 CUDA-event "
            "timings; max |error| against FP32 on the same inputs.", table(rows), args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
