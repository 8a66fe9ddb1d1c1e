"""MSDA forward at Co-DINO Swin-L 1152x768 shapes: our Triton kernel vs the baselines vs the floor.

    python bench/msda.py [--out DIR] [--results bench/RESULTS.md] [--model-share]

Variants, side by side in one run: `triton` (plugin/kernel.py, one program per query block of a
(batch, head)), `per_output` (the classic im2col design: one lane per output element, same
source) and `grid_sample` (the reference of plugin/reference.py). Shapes: 5 levels 192x288 ..
12x18 (73,656 tokens), 8 heads, 4 points, head dim 32; encoder queries = all tokens, decoder
queries = 900; batch 1 and 8; FP16 and FP32. Locations are realistic (reference points plus
offsets of a few pixels, boxes for the decoder), so neighbouring queries share cache lines as
they do in the model. Numerics are checked against float64 before anything is timed. Time: GPU
time per call from CUDA-graph replays over rotating input sets (no host overhead, no warm L2),
and eager calls through `triton.testing.do_bench` for comparison.

Floor: the bytes one call must move (value + locations + weights read once, output written
once) over the GPU's DRAM bandwidth, taken from the device name. `--model-share` also profiles
one FP16 forward pass of the full model at 1152x768 (random weights) and reports MSDA's share of
its GPU time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from codetr_stream.plugin.kernel import ms_deform_attn_triton
from codetr_stream.plugin.reference import ms_deform_attn_reference

LEVELS = [(192, 288), (96, 144), (48, 72), (24, 36), (12, 18)]
HEADS, POINTS, DIM, DECODER_QUERIES = 8, 4, 32, 900
BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12}  # bytes/s, datasheet
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
DEVICE = "cuda"
SECTION_BEGIN, SECTION_END = "<!-- msda:begin -->", "<!-- msda:end -->"


def bandwidth(name: str) -> float:
    for key, value in BANDWIDTH.items():
        if key in name:
            return value
    raise SystemExit(f"no DRAM bandwidth known for {name!r}: add it to BANDWIDTH in {__file__}")


def make_case(kind: str, batch: int, dtype: torch.dtype, seed: int = 0):
    """value, shapes, starts, locations, weights on the GPU, with model-like locations."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    cuda = dict(device=DEVICE)
    shapes = torch.tensor(LEVELS, dtype=torch.int64, **cuda)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    tokens = int(areas.sum())
    wh = shapes.flip(-1).to(torch.float32)  # (L,2) as (w,h)
    value = torch.randn(batch, tokens, HEADS, DIM, generator=gen, **cuda)
    if kind == "encoder":
        # Each token's own centre as reference point on every level, offsets ~2 px.
        centres = [
            torch.stack(torch.meshgrid((torch.arange(w, **cuda) + 0.5) / w,
                                       (torch.arange(h, **cuda) + 0.5) / h, indexing="xy"), -1)
            .reshape(-1, 2)
            for h, w in LEVELS
        ]
        ref = torch.cat(centres)[None, :, None, None, None, :].expand(batch, -1, 1, 1, 1, 2)
        pixels = torch.randn(batch, tokens, HEADS, len(LEVELS), POINTS, 2, generator=gen, **cuda)
        locs = ref + 2.0 * pixels / wh[None, None, None, :, None, :]
    else:
        # Boxes (cx, cy, w, h); points spread over each box.
        centre = torch.rand(batch, DECODER_QUERIES, 1, 1, 1, 2, generator=gen, **cuda)
        size = 0.05 + 0.3 * torch.rand(batch, DECODER_QUERIES, 1, 1, 1, 2, generator=gen, **cuda)
        spread = torch.rand(batch, DECODER_QUERIES, HEADS, len(LEVELS), POINTS, 2, generator=gen,
                            **cuda) - 0.5
        locs = centre + spread * size
    queries = locs.shape[1]
    logits = torch.randn(batch, queries, HEADS, len(LEVELS) * POINTS, generator=gen, **cuda)
    weights = logits.softmax(-1).view(batch, queries, HEADS, len(LEVELS), POINTS)
    return value.to(dtype), shapes, starts, locs.to(dtype), weights.to(dtype)


def floor_bytes(args, out_dtype: torch.dtype) -> int:
    value, _, _, locs, weights = args
    batch, _, heads, dim = value.shape
    out = batch * locs.shape[1] * heads * dim * torch.finfo(out_dtype).bits // 8
    return sum(t.numel() * t.element_size() for t in (value, locs, weights)) + out


VARIANTS = {
    "triton": lambda args: ms_deform_attn_triton(*args),
    "per_output": lambda args: ms_deform_attn_triton(*args, per_output=True),
    "grid_sample": lambda args: ms_deform_attn_reference(*args),
}
L2_BYTES = 50e6  # H100 / H200 L2: rotate through input sets several times larger
KERNELS = [name for name in VARIANTS if name != "grid_sample"]


def check(args, dtype) -> dict[str, float]:
    """Max abs error of each variant against float64 (the reference on upcast inputs)."""
    value, shapes, starts, locs, weights = args
    expected = torch.cat([  # one image at a time: grid_sample in float64 is memory hungry
        ms_deform_attn_reference(value[b:b + 1].double(), shapes, starts,
                                 locs[b:b + 1].double(), weights[b:b + 1].double())
        for b in range(value.shape[0])
    ])
    errors = {}
    for name, fn in VARIANTS.items():
        got = fn(args)
        errors[name] = (got.double() - expected).abs().max().item()
        if name in KERNELS and not errors[name] <= TOLERANCE[dtype]:
            raise SystemExit(f"{name} {dtype}: max abs error {errors[name]:.3g} > "
                             f"{TOLERANCE[dtype]:g}; not timing a wrong kernel")
    del expected
    return errors


def time_us(fn) -> float:
    """Eager calls: CUDA events around each call, L2 flushed before it (host launch included)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def time_graph_us(fn, cases, replays: int = 15) -> float:
    """GPU time of one call: a CUDA graph of 2 rounds over input sets larger than L2 together
    (so no call finds its inputs cached), replayed; median per call. No host overhead."""
    for case in cases:
        fn(case)
    torch.cuda.synchronize()
    calls = 2 * len(cases)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(cases[i % len(cases)])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def sweep(cases) -> dict[str, float]:
    """Block shapes of the main kernel, to choose `block_config`'s default."""
    results = {}
    for block_q, warps in ((16, 2), (32, 4), (64, 4), (64, 8)):
        results[f"BLOCK_Q={block_q},warps={warps}"] = time_graph_us(
            lambda c, bq=block_q, w=warps: ms_deform_attn_triton(*c, block_q=bq, num_warps=w),
            cases)
    return results


def model_share() -> dict[str, float]:
    """GPU time of MSDA in one FP16 full-model forward at 1152x768 (random weights)."""
    from codetr_stream.compile import build_model
    from torch.profiler import ProfilerActivity, profile

    model = build_model("co_dino_swin_l", device="cuda").half()
    images = torch.randn(1, 3, 768, 1152, device="cuda", dtype=torch.float16)
    masks = torch.zeros(1, 768, 1152, device="cuda", dtype=torch.bool)
    with torch.inference_mode():
        for _ in range(3):
            model(images, masks)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(images, masks)
            torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in events)
    msda = [e for e in events if "msda_fwd_kernel" in e.name]
    return {"gpu_us": total, "msda_us": sum(e.device_time for e in msda), "msda_calls": len(msda)}


def replace_section(path: Path, text: str) -> None:
    """Write our section of RESULTS.md between the markers, leaving the others' untouched."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{SECTION_BEGIN}\n{text.strip()}\n{SECTION_END}"
    if SECTION_BEGIN in old and SECTION_END in old:
        head, rest = old.split(SECTION_BEGIN, 1)
        new = head + block + rest.split(SECTION_END, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for results.json and section.md")
    parser.add_argument("--results", type=Path, help="RESULTS.md whose MSDA section to replace")
    parser.add_argument("--model-share", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    if args.results and not torch.cuda.is_available():
        # Merge a section written on the GPU machine: bench/msda.py --results R --out DIR
        replace_section(args.results, (args.out / "section.md").read_text())
        return 0
    device = torch.cuda.get_device_name()
    bw = bandwidth(device)
    rows, record = [], {"device": device, "torch": torch.__version__, "cases": []}
    for kind in ("encoder", "decoder"):
        for batch in (1, 8):
            for dtype in (torch.float16, torch.float32):
                case = make_case(kind, batch, dtype)
                errors = check(case, dtype)
                nbytes = floor_bytes(case, dtype)
                floor_us = 1e6 * nbytes / bw
                sets = min(8, max(2, math.ceil(4 * L2_BYTES / nbytes)))
                cases = [case] + [make_case(kind, batch, dtype, seed) for seed in range(1, sets)]
                times = {name: time_graph_us(fn, cases) for name, fn in VARIANTS.items()
                         if name in KERNELS}
                # grid_sample reads the level shapes on the host: no graph, eager calls.
                times["grid_sample"] = time_us(lambda c=case: ms_deform_attn_reference(*c))
                times["triton_eager"] = time_us(lambda c=case: ms_deform_attn_triton(*c))
                entry = dict(kind=kind, batch=batch, dtype=str(dtype), queries=case[3].shape[1],
                             bytes=nbytes, floor_us=floor_us, times_us=times, errors=errors)
                if not args.no_sweep and batch == 1 and dtype == torch.float16:
                    entry["sweep_us"] = sweep(cases)
                record["cases"].append(entry)
                print(json.dumps(entry), flush=True)
                rows.append(
                    f"| {kind} | {batch} | {str(dtype)[6:]} | {case[3].shape[1]:,} | "
                    f"{nbytes / 1e6:.1f} | {floor_us:.1f} | "
                    + " | ".join(f"{times[n]:.1f} ({times[n] / floor_us:.2f}x)" for n in VARIANTS)
                    + f" | {times['triton_eager']:.1f} | {max(errors[n] for n in KERNELS):.1e} |"
                )
                del case, cases
                torch.cuda.empty_cache()
    share = ""
    if args.model_share:
        try:
            record["model"] = model_share()
            m = record["model"]
            share = (f"\nShare of MSDA in one FP16 eager forward of the full model at 1152x768 "
                     f"(batch 1, random weights): {m['msda_us'] / 1e3:.2f} ms of "
                     f"{m['gpu_us'] / 1e3:.2f} ms GPU time ({100 * m['msda_us'] / m['gpu_us']:.1f}%"
                     f", {m['msda_calls']} MSDA calls).\n")
        except Exception as error:  # the model is another module's; report, don't hide
            share = f"\nModel share not measured: {type(error).__name__}: {error}\n"
    sweep_note = ""
    for entry in record["cases"]:
        if "sweep_us" in entry:
            best = min(entry["sweep_us"], key=entry["sweep_us"].get)
            sweep_note += (f"- {entry['kind']} batch 1 fp16 block sweep: best {best} "
                           f"{entry['sweep_us'][best]:.1f} us; "
                           + ", ".join(f"{k} {v:.1f}" for k, v in entry["sweep_us"].items()) + "\n")
    command = "python bench/msda.py " + " ".join(sys.argv[1:])
    section = (
        f"## MSDA kernel (bench/msda.py)\n\n"
        f"Device: {device} (floor bandwidth {bw / 1e12:.2f} TB/s), torch {torch.__version__}, "
        f"date {datetime.date.today()}, command `{command}`.\n"
        f"Microseconds per call and ratio to the memory floor. `triton` (the op's kernel) and "
        f"`per_output` (the classic one-lane-per-output design, same source): GPU time, median "
        f"over replays of a CUDA graph cycling through input sets 4x the L2 size. `grid_sample` "
        f"(the reference; it reads level shapes on the host, so no graph) and `triton eager`: "
        f"median of `triton.testing.do_bench` over eager calls (CUDA events, L2 flushed), host "
        f"launch included. `err`: max abs error of the Triton kernels vs float64.\n\n"
        "| call | batch | dtype | queries | floor MB | floor us | "
        + " | ".join(VARIANTS) + " | triton eager | err |\n|" + "---|" * (len(VARIANTS) + 8)
        + "\n"
        + "\n".join(rows) + "\n" + share + ("\n" + sweep_note if sweep_note else "")
    )
    print(section)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(record, indent=1))
        (args.out / "section.md").write_text(section)
    if args.results:
        replace_section(args.results, section)
    return 0 if all(math.isfinite(e["times_us"]["triton"]) for e in record["cases"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
