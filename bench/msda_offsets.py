"""The MSDA layer's sampling step two ways, at Co-DINO Swin-L 1152x768 shapes, side by side.

    python bench/msda_offsets.py [--iters 20]

- `layer + op`: what the engine runs without the "msda-offsets" pass: Inductor's kernels make
  the FP32 sampling locations (`reference + offsets / (w, h)`, boxes for the decoder) and the
  FP32 softmax of the logits, then `codetr::ms_deform_attn` reads them back.
- `offsets kernel`: `ms_deform_attn_from_offsets`, one kernel that makes them as it samples.

Both compiled by Inductor (fullgraph) and replayed in a CUDA graph, with inputs as the engine
gives them (FP16 value; FP16 offsets and logits as column slices of one merged projection
output; FP32 references). Numerics first: at batch 1 each variant against float64 (the same
formula in float64, grid_sample's sampling), then timed with CUDA events (median of `--iters`
replays). The break-even is per call: the offsets kernel pays if it is faster than both steps
of `layer + op` together.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from collections.abc import Callable

import torch
from codetr_stream.compile.model.deformable import level_shape_tensors
from codetr_stream.plugin import ms_deform_attn
from codetr_stream.plugin.op import ms_deform_attn_from_offsets
from codetr_stream.plugin.reference import ms_deform_attn_reference, sampling_from_offsets
from msda import DECODER_QUERIES, DIM, HEADS, LEVELS, POINTS, TOLERANCE


def make_inputs(batch: int, queries: int, ref_dims: int, seed: int = 0) -> tuple:
    """value, level shapes and starts, references, and offsets / logits as column slices of
    one (B, Q, 480) FP16 projection output (merge-linears' layout), on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes, starts = level_shape_tensors(LEVELS, torch.device("cuda"))
    tokens = sum(h * w for h, w in LEVELS)
    value = torch.randn(batch, tokens, HEADS, DIM, device="cuda", generator=gen).half()
    n = HEADS * len(LEVELS) * POINTS
    merged = torch.randn(batch, queries, 3 * n, device="cuda", generator=gen)
    merged[..., :2 * n] *= 2.0  # offsets of a few pixels (points) or box fractions (boxes)
    merged = merged.half()
    reference = torch.rand(batch, queries, len(LEVELS), ref_dims, device="cuda", generator=gen)
    if ref_dims == 4:
        reference[..., 2:] *= 0.3  # box sizes
    return value, shapes, starts, reference, merged[..., :2 * n], merged[..., 2 * n:]


def layer_and_op(value, shapes, starts, reference, offsets, logits):
    """The layer's location and softmax arithmetic in FP32 (autocast's dtype), then the op."""
    locations, weights = sampling_from_offsets(shapes, reference, offsets, logits.float(), HEADS)
    return ms_deform_attn(value, shapes, starts, locations, weights)


VARIANTS: dict[str, Callable[..., torch.Tensor]] = {
    "layer + op": layer_and_op,
    "offsets kernel": ms_deform_attn_from_offsets,
}


def float64_error(fn: Callable[..., torch.Tensor], inputs: tuple) -> float:
    value, shapes, starts, reference, offsets, logits = inputs
    exact = sampling_from_offsets(shapes, reference.double(), offsets.double(), logits.double(),
                                  HEADS)
    want = ms_deform_attn_reference(value.double(), shapes, starts, *exact)
    return (fn(*inputs).double() - want).abs().max().item()


def replay_ms(fn: Callable[..., torch.Tensor], inputs: tuple, iters: int) -> float:
    """Median GPU time of one CUDA-graph replay of the compiled `fn`, in ms."""
    fn(*inputs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*inputs)
    times = []
    for _ in range(iters):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    compiled = {name: torch.compile(fn, fullgraph=True, dynamic=False)
                for name, fn in VARIANTS.items()}
    print(f"### MSDA sampling step: the layer's arithmetic + op vs the offsets kernel\n\n"
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
          f"`python bench/msda_offsets.py --iters {args.iters}`\n")
    print("| call | batch | variant | max error vs float64 (batch 1) | median ms | vs layer + op |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    failed = False
    with torch.no_grad():
        for call, queries, ref_dims in (("encoder", sum(h * w for h, w in LEVELS), 2),
                                        ("decoder", DECODER_QUERIES, 4)):
            errors = {name: float64_error(fn, make_inputs(1, queries, ref_dims))
                      for name, fn in compiled.items()}
            failed |= any(e > TOLERANCE[torch.float16] for e in errors.values())
            for batch in (1, 8):
                inputs = make_inputs(batch, queries, ref_dims)
                times = {name: replay_ms(fn, inputs, args.iters) for name, fn in compiled.items()}
                base = times["layer + op"]
                for name, ms in times.items():
                    print(f"| {call} | {batch} | {name} | {errors[name]:.1e} | {ms:.3f} | "
                          f"{ms / base:.2f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
