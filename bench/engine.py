"""Engine benchmark: PyTorch FP32 eager, FP16 eager, the Inductor FP16 engine and TensorRT, side by
side on one GPU, at several input sizes and batch sizes. Numerics first, then speed.

    python bench/engine.py --engine 1152x768=/tmp/eng_1152 --sizes 1152x768 --batches 1,8

A size without a prebuilt `--engine` is built here (`build_engine`, FP16 Inductor). Each variant
is timed with CUDA events (median of --iters after --warmup runs, one seeded random batch).
FLOPs per image scale the FlopCounterMode count (shared/spec/flops.md: 2.525 TFLOP at 1152x768,
matmul/conv only) by pixels; the peak is the H100/H200 SXM dense FP16 tensor-core rate.
The table goes to stdout, the JSON to --json, and a section into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from codetr_stream.compile import build_model
from codetr_stream.compile.configs import BUILTIN
from codetr_stream.compile.engines import build_engine, load_engine
from codetr_stream.compile.engines.numerics import compare
from codetr_stream.compile.engines.precision import PrecisionWrapper
from codetr_stream.compile.export import example_inputs

FLOP_1152x768 = 2.525e12
PEAK_FP16 = 989.4e12  # H100 SXM dense FP16/BF16; the H200 has the same tensor cores
SECTION = "## Engine benchmark (bench/engine.py)"
ROOT = Path(__file__).resolve().parents[1]


def flops_per_image(hw: tuple[int, int]) -> float:
    return FLOP_1152x768 * hw[0] * hw[1] / (768 * 1152)


def median_ms(fn: Any, warmup: int, iters: int) -> float:
    """Median GPU time of fn() over `iters` runs, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def parse_size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.split("x"))
    return h, w


def warm_start_seconds(engine_dir: Path) -> float:
    """Seconds for a fresh process with empty compiler caches to load the engine and infer once:
    what a daemon start costs with the engine's saved Inductor cache."""
    code = ("import time, torch; t = time.perf_counter();"
            "from codetr_stream.compile.engines import load_engine;"
            "from codetr_stream.compile.export import example_inputs;"
            f"e = load_engine({str(engine_dir)!r}); b = e.manifest.batch_sizes[0];"
            "e.infer(*example_inputs(b, e.input_hw, e.device)); torch.cuda.synchronize();"
            "print(time.perf_counter() - t)")
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as fresh:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{fresh}/inductor",
                   TRITON_CACHE_DIR=f"{fresh}/triton")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_runs(model: torch.nn.Module, hw: tuple[int, int], batches: list[int],
               runs: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Numerics (vs FP32 eager on the same seeded batch) then median latency, per variant."""
    rows = []
    device = next(model.parameters()).device
    for batch in batches:
        images, masks = example_inputs(batch, hw, device, seed=1)
        with torch.inference_mode():
            reference = model(images, masks)
            for name, run in runs.items():
                row: dict[str, Any] = {"size": f"{hw[1]}x{hw[0]}", "batch": batch,
                                       "variant": name}
                try:
                    row.update(compare(reference, run(images, masks)))
                    row["ms"] = median_ms(lambda run=run, i=images, m=masks: run(i, m),
                                          args.warmup,
                                          args.iters)
                except (RuntimeError, ValueError, KeyError) as exc:  # e.g. OOM, no such batch
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Throughput, fraction of FP16 peak and speed-ups over the eager rows of the same shape."""
    base = {(r["size"], r["batch"], r["variant"]): r.get("ms") for r in rows}
    for r in rows:
        if "ms" not in r:
            continue
        hw = parse_size(r["size"])
        flop = flops_per_image(hw) * r["batch"]
        r["images_per_s"] = round(1000 * r["batch"] / r["ms"], 1)
        r["peak_fraction"] = round(flop / (r["ms"] / 1000) / PEAK_FP16, 4)
        for ref in ("eager fp32", "eager fp16"):
            ref_ms = base.get((r["size"], r["batch"], ref))
            if ref_ms:
                r[f"speedup_vs_{ref.split()[1]}"] = round(ref_ms / r["ms"], 2)


def top_kernels(fn: Any, steps: int = 3, limit: int = 25) -> str:
    """torch.profiler: the GPU kernels that take the most time, with their share."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages()
              if getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) > 0]
    def own(e: Any) -> float:
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
    total = sum(own(e) for e in events) or 1.0
    events.sort(key=own, reverse=True)
    lines = [f"GPU busy {total / 1000 / steps:.2f} ms per run over {len(events)} kernel kinds"]
    for e in events[:limit]:
        lines.append(f"{100 * own(e) / total:5.1f}%  {own(e) / 1000 / steps:8.3f} ms  "
                     f"x{e.count // steps:<4} {e.key[:110]}")
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| size | batch | variant | median ms | img/s | x FP32 | x FP16 eager | "
            "% FP16 peak | score drift | top-10 / top-100 agree | box drift px |")
    lines = [head, "|" + " --- |" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['batch']} | {r['variant']} | {r['error']} |"
                         + " |" * 7)
            continue
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['variant']} | {r['ms']:.2f} | "
            f"{r['images_per_s']} | {r.get('speedup_vs_fp32', '')} | "
            f"{r.get('speedup_vs_fp16', '')} | {100 * r['peak_fraction']:.1f} | "
            f"{r['score_max_abs']:.2e} | {r['top10_agreement']:.3f} / "
            f"{r['top100_agreement']:.3f} | {r['top100_box_drift_px']:.2f} |")
    return "\n".join(lines)


def write_results(path: Path, text: str) -> None:
    """Replace this script's section of RESULTS.md (or append it), leaving others' alone."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION in old:
        start = old.index(SECTION)
        end = old.find("\n## ", start + len(SECTION))
        old = old[:start] + (old[end + 1:] if end != -1 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="co_dino_swin_l")
    p.add_argument("--sizes", default="1152x768", help="comma list of WxH")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--engine", action="append", default=[], metavar="WxH=DIR",
                   help="prebuilt Inductor engine for a size (else built here)")
    p.add_argument("--tensorrt", action="append", default=[], metavar="WxH=DIR",
                   help="prebuilt TensorRT engine for a size")
    p.add_argument("--warm-start", action="store_true",
                   help="also time a fresh-process engine load (the daemon's warm start)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--profile", type=Path, default=None,
                   help="folder for torch.profiler top-kernel tables (Inductor, FP16 eager)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/engine.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    batches = [int(b) for b in args.batches.split(",")]
    prebuilt = dict(e.split("=", 1) for e in args.engine)
    trt_dirs = dict(e.split("=", 1) for e in args.tensorrt)
    torch.manual_seed(args.seed)
    model = build_model(args.config, device=device).eval()
    fp16 = PrecisionWrapper(copy.deepcopy(model), device, "fp16").eval()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def emit() -> None:
        """Write the RESULTS.md section and JSON now (a later step may run out of time)."""
        device_name = torch.cuda.get_device_name(device)
        command = "python bench/engine.py " + " ".join(argv if argv is not None else sys.argv[1:])
        text = "\n".join([
            SECTION, "",
            f"{device_name}, torch {torch.__version__}, "
            f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; `{command}`; Co-DINO Swin-L with "
            f"seeded random weights (seed {args.seed}), all-valid masks; median of {args.iters} "
            "CUDA-event timings after warm-up. Drift/agreement are against FP32 eager on the same "
            "batch (agreement: share of FP32's top-k found in the variant's top-k, same label, "
            f"IoU >= 0.9). FLOPs/image {flops_per_image((768, 1152)) / 1e12:.3f} T at 1152x768, "
            f"scaled by pixels; peak {PEAK_FP16 / 1e12:.1f} TFLOP/s dense FP16.", "",
            table(rows), "", *[f"- {n}" for n in notes]])
        print("\n" + text)
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "notes": notes}, indent=2))
        write_results(args.results, text)

    for size in args.sizes.split(","):
        hw = parse_size(size)
        rows += bench_runs(model, hw, batches, {"eager fp32": model, "eager fp16": fp16}, args)
        engines: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            if size in prebuilt:
                engines["inductor fp16"] = load_engine(prebuilt[size], device)
                notes.append(f"{size}: Inductor engine {prebuilt[size]} loaded in "
                             f"{time.perf_counter() - started:.1f} s (this process)")
            else:
                out = Path(f"/tmp/codetr_bench_engine_{size}")
                engines["inductor fp16"], manifest = build_engine(
                    model, out, backend="inductor", precision="fp16", input_hw=hw,
                    batch_sizes=batches, config_name=args.config,
                    config=BUILTIN[args.config](), device=device, seed=args.seed)
                prebuilt[size] = str(out)
                notes.append(f"{size}: Inductor engine built in {time.perf_counter() - started:.1f}"
                             f" s (export + cold compile per batch "
                             f"{manifest.measured['compile_seconds']} s)")
        except Exception as exc:  # report the eager numbers even if the engine fails
            notes.append(f"{size}: Inductor engine failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300] if str(exc) else ''}")
            import traceback

            traceback.print_exc()
        if size in trt_dirs:
            engines["tensorrt fp16"] = load_engine(trt_dirs[size], device)
        runs = {name: engine.infer for name, engine in engines.items()}
        rows += bench_runs(model, hw, batches, runs, args)
        if args.profile and "inductor fp16" in engines:
            engine = engines["inductor fp16"]
            for b in batches:
                images, masks = example_inputs(b, hw, device, seed=1)
                for name, fn in (("inductor", engine._graphs[b].fn), ("eager_fp16", fp16)):
                    with torch.inference_mode():
                        text = top_kernels(lambda fn=fn, i=images, m=masks: fn(i, m))
                    (args.profile / f"profile_{name}_{size}_b{b}.txt").write_text(text + "\n")
                    print(f"--- {name} {size} batch {b}\n{text}", flush=True)
        del engines
        torch.cuda.empty_cache()
        add_ratios(rows)
        emit()
        if args.warm_start and size in prebuilt:
            try:
                seconds = warm_start_seconds(Path(prebuilt[size]))
                notes.append(f"{size}: daemon warm start (fresh process, empty local compiler "
                             f"caches, the engine's saved Inductor cache): load + first "
                             f"inference {seconds:.1f} s")
            except subprocess.CalledProcessError as exc:
                notes.append(f"{size}: warm start failed: {exc.stderr.strip()[-300:]}")
            emit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
