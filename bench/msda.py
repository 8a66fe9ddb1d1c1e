"""MSDA forward at Co-DINO Swin-L 1152x768 shapes: our Triton kernels vs the baselines vs the floor.

    python bench/msda.py [--out DIR] [--results bench/RESULTS.md] [--model-share] [--no-sweep]

Variants, side by side in one run (plugin/kernel.py's `msda_fwd_kernel` at its launch shapes,
then the baselines): `lanes2` (2 lanes a query row), `lanes1`, `lanes4` (the op's shape),
`half` (lanes2 with the 4 corners combined in packed float16, FP32 across points; float16
values only), `headmajor` (lanes4 reading the value stored (B, heads, tokens, dim), so a point's
horizontal corners are neighbours in memory; timed on values already stored so, as the layer's
value projection could write them), `v3` (the previous kernel, 4 lanes a row),
`per_output` (the classic im2col design: one lane per output element) and `grid_sample` (the
reference of plugin/reference.py). Shapes: 5 levels 192x288 .. 12x18 (73,656 tokens), 8 heads, 4
points, head dim 32; encoder queries = all tokens, decoder queries = 900; batch 1 and 8; FP16,
FP32 and the FP16 engine's mix (float16 values, float32 locations and weights). Locations are
model-like (reference points plus offsets of a few pixels, boxes for the decoder), so
neighbouring queries share cache lines as in the model. Every variant's numerics are checked
against float64 before it is timed (a variant over the tolerance is reported, not timed). Time:
GPU time per call from CUDA-graph replays over rotating input sets (no host overhead, no warm
L2), and eager calls through `triton.testing.do_bench` for grid_sample and the op.

Floor: the bytes one call must move (value + locations + weights read once, output written
once) over the GPU's DRAM bandwidth, taken from the device name. Also: a block-shape sweep, a
locality study (the encoder FP16 call with every location on one pixel: the instruction-bound
time; and with uniformly random locations: the cache-hostile time) and with `--model-share` the
share of MSDA in one FP16 forward of the full model at 1152x768 (random weights).
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
from codetr_stream.compile.model.deformable import level_shape_tensors
from codetr_stream.plugin.kernel import (
    LaunchConfig,
    head_major_copy,
    launch_config,
    ms_deform_attn_triton,
)
from codetr_stream.plugin.reference import ms_deform_attn_reference
from msda_baselines import ms_deform_attn_baseline

LEVELS = [(192, 288), (96, 144), (48, 72), (24, 36), (12, 18)]
HEADS, POINTS, DIM, DECODER_QUERIES = 8, 4, 32, 900
BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12}  # bytes/s, datasheet
F16, F32 = torch.float16, torch.float32
DTYPES = {"fp16": (F16, F16), "fp32": (F32, F32), "fp16+fp32": (F16, F32)}  # value, locations
TOLERANCE = {F32: 1e-5, F16: 2e-3}  # by value dtype
DEVICE = "cuda"
SECTION_BEGIN, SECTION_END = "<!-- msda:begin -->", "<!-- msda:end -->"
L2_BYTES = 50e6  # H100 / H200 L2: rotate through input sets several times larger
LANES = {"lanes2": LaunchConfig(64, 2, 4), "lanes1": LaunchConfig(128, 1, 4),
         "lanes4": LaunchConfig(64, 4, 8), "half": LaunchConfig(64, 2, 4, half_bilinear=True)}
KERNELS = [*LANES, "headmajor", "v3", "per_output"]  # timed through CUDA graphs
SWEEP = [LaunchConfig(32, 2, 2), LaunchConfig(64, 2, 4), LaunchConfig(128, 2, 4),
         LaunchConfig(128, 2, 8), LaunchConfig(64, 1, 2), LaunchConfig(128, 1, 4),
         LaunchConfig(256, 1, 8), LaunchConfig(16, 4, 2), LaunchConfig(32, 4, 4),
         LaunchConfig(64, 4, 8)]


def bandwidth(name: str) -> float:
    for key, value in BANDWIDTH.items():
        if key in name:
            return value
    raise SystemExit(f"no DRAM bandwidth known for {name!r}: add it to BANDWIDTH in {__file__}")


def make_case(kind: str, batch: int, dtypes: str, seed: int = 0, locality: str = "model"):
    """value, shapes, starts, locations, weights on the GPU.

    locality "model": model-like locations; "one_pixel": every location at each map's centre
    (all gathers hit the same 4 rows: no cache misses); "uniform": uniformly random in [0, 1].
    """
    value_dtype, loc_dtype = DTYPES[dtypes]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    cuda = dict(device=DEVICE)
    shapes, starts = level_shape_tensors(LEVELS, torch.device(DEVICE))
    tokens = sum(h * w for h, w in LEVELS)
    wh = shapes.flip(-1).to(torch.float32)  # (L,2) as (w,h)
    value = torch.randn(batch, tokens, HEADS, DIM, generator=gen, **cuda)
    queries = tokens if kind == "encoder" else DECODER_QUERIES
    loc_shape = (batch, queries, HEADS, len(LEVELS), POINTS, 2)
    if locality == "one_pixel":
        locs = torch.full(loc_shape, 0.5, **cuda)
    elif locality == "uniform":
        locs = torch.rand(loc_shape, generator=gen, **cuda)
    elif kind == "encoder":
        # Each token's own centre as reference point on every level, offsets ~2 px.
        centres = [
            torch.stack(torch.meshgrid((torch.arange(w, **cuda) + 0.5) / w,
                                       (torch.arange(h, **cuda) + 0.5) / h, indexing="xy"), -1)
            .reshape(-1, 2)
            for h, w in LEVELS
        ]
        ref = torch.cat(centres)[None, :, None, None, None, :].expand(batch, -1, 1, 1, 1, 2)
        pixels = torch.randn(loc_shape, generator=gen, **cuda)
        locs = ref + 2.0 * pixels / wh[None, None, None, :, None, :]
    else:
        # Boxes (cx, cy, w, h); points spread over each box.
        centre = torch.rand(batch, queries, 1, 1, 1, 2, generator=gen, **cuda)
        size = 0.05 + 0.3 * torch.rand(batch, queries, 1, 1, 1, 2, generator=gen, **cuda)
        locs = centre + (torch.rand(loc_shape, generator=gen, **cuda) - 0.5) * size
    logits = torch.randn(batch, queries, HEADS, len(LEVELS) * POINTS, generator=gen, **cuda)
    weights = logits.softmax(-1).view(batch, queries, HEADS, len(LEVELS), POINTS)
    return value.to(value_dtype), shapes, starts, locs.to(loc_dtype), weights.to(loc_dtype)


def run(name: str, args):
    """One call of variant `name`."""
    if name in LANES:
        return ms_deform_attn_triton(*args, config=LANES[name])
    if name == "headmajor":  # lanes4 on a head-major value (no copy where stored_for made it)
        return ms_deform_attn_triton(head_major_copy(args[0]), *args[1:], config=LANES["lanes4"])
    if name == "grid_sample":
        return ms_deform_attn_reference(*args)
    return ms_deform_attn_baseline(*args, design=name)


def stored_for(name: str, cases: list) -> list:
    """The cases as variant `name` reads them: `headmajor` gets each value stored head-major,
    as the layer's value projection could write it (so the copy is not timed)."""
    if name != "headmajor":
        return cases
    return [(head_major_copy(v), *rest) for v, *rest in cases]


def applicable(name: str, args) -> bool:
    """`half` combines corners in float16: only for float16 values."""
    return name != "half" or args[0].dtype == F16


def floor_bytes(args) -> int:
    """Bytes a call must move: value, locations and weights read once, output written once."""
    value, _, _, locs, weights = args
    batch, _, heads, dim = value.shape
    out = batch * locs.shape[1] * heads * dim * value.element_size()
    return sum(t.numel() * t.element_size() for t in (value, locs, weights)) + out


def check(args) -> dict[str, float]:
    """Max abs error of every variant against float64 (the reference on upcast inputs)."""
    value, shapes, starts, locs, weights = args
    expected = torch.cat([  # one image at a time: grid_sample in float64 is memory hungry
        ms_deform_attn_reference(value[b:b + 1].double(), shapes, starts,
                                 locs[b:b + 1].double(), weights[b:b + 1].double())
        for b in range(value.shape[0])
    ])
    errors = {name: (run(name, args).double() - expected).abs().max().item()
              for name in [*KERNELS, "grid_sample"] if applicable(name, args)}
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
    """Block shapes (queries a program, lanes a row, warps) of the op's kernel."""
    return {f"{c.block_q}q/{c.lanes_per_row}l/{c.num_warps}w":
            time_graph_us(lambda args, c=c: ms_deform_attn_triton(*args, config=c), cases)
            for c in SWEEP}


def locality(model_cases, names: list[str]) -> dict[str, dict[str, float]]:
    """Encoder FP16 batch 1 with every location on one pixel (no cache misses: the
    instruction-bound time) and uniformly random (no locality), per kernel."""
    results = {}
    for where in ("one_pixel", "uniform"):
        cases = [make_case("encoder", 1, "fp16", seed, locality=where) for seed in range(4)]
        results[where] = {n: time_graph_us(lambda a, n=n: run(n, a), stored_for(n, cases))
                          for n in names}
    results["model"] = {n: time_graph_us(lambda a, n=n: run(n, a), stored_for(n, model_cases))
                        for n in names}
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


CASES = [(kind, batch, dtypes) for kind in ("encoder", "decoder") for batch in (1, 8)
         for dtypes in ("fp16", "fp32")]
CASES += [("encoder", 1, "fp16+fp32"), ("decoder", 1, "fp16+fp32")]
LOCALITY_KERNELS = ["v3", "lanes1", "lanes2", "half", "lanes4", "headmajor"]


def _cases(text: str) -> list[tuple[str, int, str]]:
    """"encoder:8:fp16+fp32,decoder:1:fp16" -> [("encoder", 8, "fp16+fp32"), ...]."""
    cases = []
    for item in text.split(","):
        kind, batch, dtypes = item.split(":")
        if kind not in ("encoder", "decoder") or dtypes not in DTYPES or not batch.isdigit():
            raise argparse.ArgumentTypeError(
                f"{item!r}: want KIND:BATCH:DTYPES, KIND encoder|decoder, DTYPES one of "
                f"{', '.join(DTYPES)}")
        cases.append((kind, int(batch), dtypes))
    return cases


def measure(kind: str, batch: int, dtypes: str, bw: float, studies: bool) -> dict:
    """Check, then time every variant on one call shape (plus sweep and locality if asked)."""
    case = make_case(kind, batch, dtypes)
    errors = check(case)
    passed = [n for n in KERNELS if n in errors and errors[n] <= TOLERANCE[case[0].dtype]]
    nbytes = floor_bytes(case)
    sets = min(8, max(2, math.ceil(4 * L2_BYTES / nbytes)))
    cases = [case] + [make_case(kind, batch, dtypes, seed) for seed in range(1, sets)]
    times = {name: time_graph_us(lambda a, n=name: run(n, a), stored_for(name, cases))
             for name in passed}
    # grid_sample reads the level shapes on the host: no graph, eager calls.
    times["grid_sample"] = time_us(lambda: ms_deform_attn_reference(*case))
    times["op_eager"] = time_us(lambda: ms_deform_attn_triton(*case))
    queries = case[3].shape[1]
    op = next(n for n, c in LANES.items() if c == launch_config())
    entry = dict(kind=kind, batch=batch, dtypes=dtypes, queries=queries, bytes=nbytes,
                 floor_us=1e6 * nbytes / bw, op=op, times_us=times, errors=errors,
                 failed=[n for n in KERNELS if n in errors and n not in passed])
    if studies and batch == 1 and dtypes == "fp16":
        entry["sweep_us"] = sweep(cases)
        if kind == "encoder":
            entry["locality_us"] = locality(cases, [n for n in LOCALITY_KERNELS if n in passed])
    return entry


def table(record: dict) -> str:
    """Markdown: us per call (ratio to the floor) of every variant, per call shape."""
    names = [*KERNELS, "grid_sample"]
    lines = ["| call | batch | dtype | floor MB | floor us | op | " + " | ".join(names)
             + " | op eager | err op | err half |", "|---" * (len(names) + 9) + "|"]
    for e in record["cases"]:
        t, floor = e["times_us"], e["floor_us"]
        cells = [f"{t[n]:.1f} ({t[n] / floor:.2f}x)" if n in t
                 else (f"err {e['errors'][n]:.1e}" if n in e["errors"] else "-") for n in names]
        half = f"{e['errors']['half']:.1e}" if "half" in e["errors"] else "-"
        lines.append(f"| {e['kind']} | {e['batch']} | {e['dtypes']} | {e['bytes'] / 1e6:.1f} | "
                     f"{floor:.1f} | {e['op']} | " + " | ".join(cells)
                     + f" | {t['op_eager']:.1f} | {e['errors'][e['op']]:.1e} | {half} |")
    return "\n".join(lines)


def studies_text(record: dict) -> str:
    text = ""
    for e in record["cases"]:
        if "sweep_us" in e:
            best = min(e["sweep_us"], key=e["sweep_us"].get)
            text += (f"- {e['kind']} batch 1 fp16 sweep (queries a program / lanes a row / warps):"
                     f" best {best} {e['sweep_us'][best]:.1f} us; "
                     + ", ".join(f"{k} {v:.1f}" for k, v in e["sweep_us"].items()) + "\n")
        for where, times in e.get("locality_us", {}).items():
            text += (f"- encoder batch 1 fp16, locations {where}: "
                     + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()) + "\n")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for results.json and section.md")
    parser.add_argument("--results", type=Path, help="RESULTS.md whose MSDA section to replace")
    parser.add_argument("--model-share", action="store_true")
    parser.add_argument("--no-sweep", action="store_true", help="skip sweep and locality study")
    parser.add_argument("--cases", type=_cases, default=CASES, metavar="KIND:BATCH:DTYPES,...",
                        help="call shapes to run, e.g. encoder:8:fp16+fp32 (default: all)")
    args = parser.parse_args()
    if args.results and not torch.cuda.is_available():
        # Merge a section written on the GPU machine: bench/msda.py --results R --out DIR
        replace_section(args.results, (args.out / "section.md").read_text())
        return 0
    device = torch.cuda.get_device_name()
    bw = bandwidth(device)
    record = {"device": device, "torch": torch.__version__, "cases": []}
    for kind, batch, dtypes in args.cases:
        entry = measure(kind, batch, dtypes, bw, studies=not args.no_sweep)
        record["cases"].append(entry)
        print(json.dumps(entry), flush=True)
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
    command = "python bench/msda.py " + " ".join(sys.argv[1:])
    section = (
        f"## MSDA kernel (bench/msda.py)\n\n"
        f"Device: {device} (floor bandwidth {bw / 1e12:.2f} TB/s), torch {torch.__version__}, "
        f"date {datetime.date.today()}, command `{command}`.\n"
        f"Microseconds per call and ratio to the memory floor. Kernels (`lanes2` `lanes1` `lanes4`"
        f" `half` `headmajor`: plugin/kernel.py at 2, 1, 4 lanes a query row, `half` with "
        f"packed-float16 corners, `headmajor` lanes4 on a head-major value; `v3` the previous "
        f"kernel, `per_output` the classic design; `op`: the launch "
        f"shape the op picks for the call): GPU time, median over replays of a CUDA graph cycling "
        f"through input sets 4x the L2 size. `grid_sample` (the reference; it reads level shapes "
        f"on the host, so no graph) and `op eager`: median of `triton.testing.do_bench` over "
        f"eager calls (CUDA events, L2 flushed), host launch included. `err`: max abs error vs "
        f"float64; a variant over its tolerance shows its error instead of a time. dtype "
        f"fp16+fp32: float16 values, float32 locations and weights (the FP16 engine's call).\n\n"
        + table(record) + "\n" + share + "\n" + studies_text(record)
    )
    print(section)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(record, indent=1))
        (args.out / "section.md").write_text(section)
    if args.results:
        replace_section(args.results, section)
    failed = {n for e in record["cases"] for n in e["failed"] if n != "half"}
    if failed:
        print(f"over the tolerance: {sorted(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
