"""FP16 against FP8 FFNs at Co-DINO's 1152x768 shapes, side by side, before an engine build.

    python bench/fp8_ffn.py --results bench/RESULTS.md

Per shape (the encoder FFN, 256 -> 2048 -> 256 with ReLU, over 73,656 tokens an image; the Swin
stage-3 MLP, 768 -> 3072 -> 768 with GELU, over 3,456 tokens an image), on a LayerNorm's output:
- "fp16": what the engine runs today: cuBLASLt's bias+activation GEMM (`_addmm_activation`), then
  a cuBLAS linear;
- "fp8 TILES": bench/fp8_baseline.py's FP8 FFN: the first layer's Triton kernel at each launch
  shape, the second layer cuBLAS FP8 (`torch._scaled_mm`);
- "fp8 TILES fast-accum": the same with cuBLAS's fast FP8 accumulation in the second layer;
- each layer alone: FP16, FP8, and the FP8 first layer given an input in E4M3 already (as a
  LayerNorm kernel could write it), to see where the time goes.
Numerics first, against an FP32 run of the same FFN on the same weights and inputs: the largest
error relative to the largest output and 1 - cosine. Times: CUDA-graph replay, median of 50
CUDA-event timings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from codetr_stream.compile.engines.passes import linear_gelu, linear_relu
from engine import publish  # bench/engine.py (this folder is on sys.path)
from fp8_baseline import Tiles, linear_act_fp8, quantize_ffn, second_layer
from swin_block import measure
from torch import Tensor

SECTION = "## FP8 FFNs (bench/fp8_ffn.py)"
# name: (tokens per image, channels, hidden, activation)
SHAPES = {"encoder": (73_656, 256, 2048, "relu"), "swin3": (3_456, 768, 3072, "gelu")}
TILES = [Tiles(), Tiles(128, 256, 64, 8, 8, 4), Tiles(128, 256, 64, 8, 8, 2),
         Tiles(128, 128, 64, 8, 4, 4), Tiles(128, 128, 64, 8, 4, 2), Tiles(128, 128, 128, 8, 4, 2),
         Tiles(64, 256, 64, 8, 4, 3), Tiles(128, 256, 256, 8, 8, 1), Tiles(128, 64, 128, 8, 4, 3)]


def inputs(tokens: int, dims: int, hidden: int, seed: int) -> dict[str, Tensor]:
    """A LayerNorm's output and FFN weights of a trained layer's scale (std 1/sqrt(fan-in))."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape: int, std: float = 1.0) -> Tensor:
        return std * torch.randn(*shape, device="cuda", generator=g)

    gamma, beta = 1 + 0.2 * rand(dims), 0.1 * rand(dims)
    x = F.layer_norm(rand(tokens, dims) * 2 + 0.5, (dims,), gamma, beta)
    return dict(x=x, gamma=gamma, beta=beta, w1=rand(hidden, dims, std=dims ** -0.5),
                b1=0.1 * rand(hidden), w2=rand(dims, hidden, std=hidden ** -0.5),
                b2=0.1 * rand(dims))


def errors(got: Tensor, reference: Tensor) -> dict[str, float]:
    got, reference = got.float().flatten(), reference.flatten()
    return {"rel_err": float((got - reference).abs().max() / reference.abs().max()),
            "one_minus_cos": float(1 - F.cosine_similarity(got, reference, dim=0))}


def shape_rows(name: str, batch: int) -> list[dict]:
    tokens, dims, hidden, activation = SHAPES[name]
    t = inputs(tokens * batch, dims, hidden, seed=batch)
    act = F.relu if activation == "relu" else F.gelu
    fused16 = linear_relu if activation == "relu" else linear_gelu
    with torch.inference_mode():
        reference = F.linear(act(F.linear(t["x"], t["w1"], t["b1"])), t["w2"], t["b2"])
        q = quantize_ffn(t["gamma"], t["beta"], t["w1"], t["b1"], t["w2"], t["b2"],
                         torch.float16)
    x16, w1, b1, w2, b2 = (t[k].half() for k in ("x", "w1", "b1", "w2", "b2"))
    row = {"shape": name, "batch": batch, "rows": tokens * batch}
    rows = [measure("fp16", lambda: F.linear(fused16(x16, w1, b1, None), w2, b2), reference,
                    row, errors)]
    for tiles in TILES:
        rows.append(measure(f"fp8 {tiles}", lambda tiles=tiles: second_layer(linear_act_fp8(
            x16, q.w1, q.w1_scale, q.b1, q.x_scale, q.h_scale, activation, tiles), q),
            reference, row, errors))
    best = min((r for r in rows[1:] if "ms" in r), key=lambda r: r["ms"], default=None)
    tiles = TILES[rows[1:].index(best)] if best else Tiles()
    rows.append(measure(f"fp8 {tiles} fast-accum", lambda: second_layer(linear_act_fp8(
        x16, q.w1, q.w1_scale, q.b1, q.x_scale, q.h_scale, activation, tiles), q, True),
        reference, row, errors))
    rows.append(measure("first layer fp16", lambda: fused16(x16, w1, b1, None), None, row))
    rows.append(measure(f"first layer fp8 {tiles}", lambda: linear_act_fp8(
        x16, q.w1, q.w1_scale, q.b1, q.x_scale, q.h_scale, activation, tiles), None, row))
    x8 = (x16.float() / q.x_scale).to(torch.float8_e4m3fn)  # as a LayerNorm kernel could write
    for tiles in TILES:
        rows.append(measure(f"first layer fp8, x E4M3 already, {tiles}", lambda tiles=tiles:
                            linear_act_fp8(x8, q.w1, q.w1_scale, q.b1, q.x_scale, q.h_scale,
                                           activation, tiles), None, row))
    with torch.inference_mode():
        h16 = fused16(x16, w1, b1, None)
        h8 = linear_act_fp8(x16, q.w1, q.w1_scale, q.b1, q.x_scale, q.h_scale, activation)
    rows.append(measure("second layer fp16", lambda: F.linear(h16, w2, b2), None, row))
    rows.append(measure("second layer fp8", lambda: second_layer(h8, q), None, row))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape | batch | rows | variant | ms | x fp16 | rel. max error | 1 - cos |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    base: dict[tuple, float] = {}
    for r in rows:
        key = (r["shape"], r["batch"])
        if "ms" not in r:
            lines.append(f"| {r['shape']} | {r['batch']} | {r['rows']} | {r['variant']} | "
                         f"{r.get('error', 'failed')} | | | |")
            continue
        base.setdefault(key, r["ms"])
        err = f"{r['rel_err']:.1e} | {r['one_minus_cos']:.1e}" if "rel_err" in r else " | "
        lines.append(f"| {r['shape']} | {r['batch']} | {r['rows']} | {r['variant']} | "
                     f"{r['ms']:.3f} | {base[key] / r['ms']:.2f} | {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results", type=Path, default=None, help="RESULTS.md to write a section to")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/fp8_ffn.py needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = [r for batch in args.batches.split(",") for name in args.shapes.split(",")
            for r in shape_rows(name, int(batch))]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    publish(SECTION, "fp8_ffn.py", argv, "CUDA-graph replay, median of 50 CUDA-event timings; "
            "errors against FP32 on the same inputs.", table(rows), args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
