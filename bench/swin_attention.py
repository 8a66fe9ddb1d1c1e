"""Swin window attention variants side by side: explicit softmax (mmdet's formulation, what the
model ran before) and the model's fused `scaled_dot_product_attention` with bias + shift mask as
one additive mask (backend chosen by torch: cuDNN on H100/H200; or forced memory-efficient).

    python bench/swin_attention.py --batch 1 --kernels

Per Swin-L stage at 1152x768 (unshifted and shifted block), under FP16 autocast, compiled by
Inductor and replayed in a CUDA graph (as the engine runs). Numerics first: max |difference| of
each variant against an FP32 explicit-softmax run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch
from codetr_stream.compile.model.swin import ShiftWindowMSA, WindowMSA
from engine import median_ms  # bench/engine.py (this folder is on sys.path when run)
from torch import Tensor

# Swin-L at 1152x768: (tokens h, w, channels, heads) per stage.
STAGES = {1: (192, 288, 192, 6), 2: (96, 144, 384, 12), 3: (48, 72, 768, 24),
          4: (24, 36, 1536, 48)}
MODEL_FORWARD = WindowMSA.forward


def _qkv_bias(self: WindowMSA, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
    return q, k, v, bias.view(n, n, self.heads).permute(2, 0, 1)


def explicit_softmax(self: WindowMSA, x: Tensor, windows: int, mask: Tensor | None) -> Tensor:
    """The pre-SDPA forward: scores materialised, bias and mask added, softmax, matmul."""
    b, n, c = x.shape
    q, k, v, bias = _qkv_bias(self, x)
    attn = (q * self.scale) @ k.transpose(-2, -1) + bias[None]
    if mask is not None:
        attn = attn.view(-1, windows, self.heads, n, n) + mask[None, :, None]
        attn = attn.view(b, self.heads, n, n)
    return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))


def efficient(self: WindowMSA, x: Tensor, windows: int, mask: Tensor | None) -> Tensor:
    """The model's forward with SDPA restricted to the memory-efficient (CUTLASS) kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return MODEL_FORWARD(self, x, windows, mask)


VARIANTS = {"explicit": explicit_softmax, "sdpa": MODEL_FORWARD, "sdpa-efficient": efficient}


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


def kernels(fn: Callable[[], object], limit: int = 6) -> list[str]:
    """The variant's top GPU kernels (profiled without the CUDA graph)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                    key=lambda e: -e.self_device_time_total)
    return [f"{e.self_device_time_total / 1000:.3f} ms {e.key[:90]}" for e in events[:limit]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--stages", default="1,3")
    p.add_argument("--variants", default="explicit,sdpa,sdpa-efficient")
    p.add_argument("--kernels", action="store_true",
                   help="add each variant's top GPU kernels (torch.profiler) to its row")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/swin_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    for stage in (int(s) for s in args.stages.split(",")):
        h, w, c, heads = STAGES[stage]
        for shift in (0, 6):
            block = ShiftWindowMSA(c, heads, 12, shift, True).cuda().eval()
            torch.nn.init.normal_(block.w_msa.relative_position_bias_table, std=0.5)
            x = torch.randn(args.batch, h * w, c, device="cuda")
            with torch.inference_mode():
                WindowMSA.forward = explicit_softmax  # type: ignore[method-assign]
                reference = block(x, (h, w))
            for name in args.variants.split(","):
                WindowMSA.forward = VARIANTS[name]  # type: ignore[method-assign]
                row: dict[str, object] = {"stage": stage, "shift": shift, "batch": args.batch,
                                          "variant": name}
                torch._dynamo.reset()
                compiled = torch.compile(block, fullgraph=True)

                def run(compiled=compiled, x=x, hw=(h, w)) -> Tensor:
                    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                        return compiled(x, hw)
                try:
                    replay, out = graphed(run)
                    row["ms"] = round(median_ms(replay, warmup=5, iters=50), 4)
                    row["max_abs_vs_fp32"] = float((out.float() - reference).abs().max())
                    if args.kernels:
                        row["kernels"] = kernels(run)
                except Exception as exc:  # a variant the installed torch cannot run
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                print(json.dumps(row), flush=True)
    WindowMSA.forward = MODEL_FORWARD  # type: ignore[method-assign]
    return 0


if __name__ == "__main__":
    sys.exit(main())
