"""Engine benchmark: PyTorch FP32 eager, FP16 eager, Inductor FP16 engines (+ CUDA graph) and
TensorRT, side by side on one GPU, at several input sizes, batch sizes and engine variants.

    python bench/engine.py --sizes 608x608,1152x768,1920x1280 --batches 1,8
    python bench/engine.py --sizes 1152x768 --variants baseline,fold-masks+linear-relu

Numerics first (drift and top-k agreement against FP32 eager on one seeded batch), then the
median of --iters CUDA-event timings after --warmup runs. The Inductor engines are built in
parallel worker processes and timed one at a time (bench/engine_jobs.py); then this process
times the eager rows. A variant is '+'-joined engine passes (compile/engines/passes.py) and
Inductor option presets (engine_jobs.OPTION_PRESETS); "baseline" is the plain engine.
FLOPs per image are counted at each size (FlopCounterMode on fake tensors: matmul, conv and
attention, as docs/flops.md); the peak is the H100/H200 SXM dense FP16 tensor-core rate.
The table goes to stdout, the JSON to --json, and a section into --results.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_jobs, however this is started
# codetr_stream is imported inside the functions, never here: the build workers are spawned
# processes, which import this module first, and a --baseline-code worker must import that
# checkout's codetr_stream, not this one's.
from engine_jobs import (
    Job,
    Outcome,
    gpu_lock,
    median_ms,  # also what bench/swin_block.py imports from here
    parse_variant,
    peak_gib,
    reset_peak,
    run_jobs,
    top_kernels,
    weights_checksum,
)

FLOP_1152x768 = 2.525e12  # docs/flops.md, the fallback of model_flops
PEAK_FP16 = 989.4e12  # H100 SXM dense FP16/BF16; the H200 has the same tensor cores
SECTION = "## Engine benchmark (bench/engine.py)"
ROOT = Path(__file__).resolve().parents[1]


def parse_size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.split("x"))
    return h, w


def model_flops(config: str, hw: tuple[int, int]) -> float:
    """Matmul + conv + attention FLOPs of one image at `hw`, counted on fake tensors (no memory,
    seconds on the CPU); SDPA and the Swin window attention op counted as their two matmuls."""
    from codetr_stream.compile import build_model
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
        return sdpa_flop_count(query, key, value)

    def window_attention(qkv: Any, bias: Any, fill: Any, height: int, width: int, window: int,
                         *args: Any, **kwargs: Any) -> int:
        """q @ k.T and p @ v over every padded window: 2 x 2 x tokens x N x C."""
        padded = -(-height // window) * window * (-(-width // window) * window)
        return 4 * qkv[0] * padded * window * window * (qkv[2] // 3)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
               torch.ops.codetr.window_attention: window_attention}
    with FakeTensorMode():
        model = build_model(config, device="cpu")
        images = torch.randn(1, 3, *hw)
        masks = torch.zeros(1, *hw, dtype=torch.bool)
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with counter, torch.inference_mode():
            model(images, masks)
    return float(counter.get_total_flops())


def warm_start(engine_dir: Path) -> str:
    """A daemon start: a fresh process with empty local compiler caches loads the engine (its
    saved compiled graphs) and infers once. Says how long, each part of the start, and whether
    Inductor compiled anything (a cache miss: the start was not served by the saved graphs)."""
    code = ("import time, torch; t = time.perf_counter();"
            "from codetr_stream.compile.engines import load_engine;"
            "from codetr_stream.compile.export import example_inputs;"
            f"e = load_engine({str(engine_dir)!r}); b = e.manifest.batch_sizes[0];"
            "e.infer(*example_inputs(b, e.input_hw, e.device));"
            "torch.cuda.synchronize() if torch.cuda.is_available() else None;"
            "from torch._dynamo.utils import counters; c = counters['inductor'];"
            "print(e.start_seconds);"
            "print(time.perf_counter() - t, c['fxgraph_cache_hit'], c['fxgraph_cache_miss'],"
            " c['fxgraph_cache_bypass'])")
    with tempfile.TemporaryDirectory() as fresh:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{fresh}/inductor",
                   TRITON_CACHE_DIR=f"{fresh}/triton")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True)
    if out.returncode != 0:
        return f"warm start failed: {out.stderr.strip()[-300:]}"
    *_, phases, last = out.stdout.strip().splitlines()
    seconds, hit, miss, bypass = last.split()
    return (f"warm start (fresh process, empty local caches, the engine's saved compiled "
            f"graphs): load + first inference {float(seconds):.1f} s; FX graph cache {hit} hit, "
            f"{miss} miss, {bypass} bypass; phases (s) {phases}")


def eager_rows(model: torch.nn.Module, fp16: torch.nn.Module | None, hw: tuple[int, int],
               batch: int, engines: list[Outcome], extra: dict[str, Any],
               args: argparse.Namespace) -> list[dict[str, Any]]:
    """FP32 eager is the reference: every other row of this (size, batch) is compared with it."""
    from codetr_stream.compile.engines.numerics import compare
    from codetr_stream.compile.export import example_inputs

    device = next(model.parameters()).device
    size = f"{hw[1]}x{hw[0]}"
    images, masks = example_inputs(batch, hw, device, seed=1)
    rows: list[dict[str, Any]] = []
    reference = None
    with torch.inference_mode():
        runs = {"eager fp32": model, **({"eager fp16": fp16} if fp16 is not None else {}), **extra}
        try:
            reference = tuple(t.cpu() for t in model(images, masks))
        except torch.cuda.OutOfMemoryError as exc:  # reported in the table, the rest goes on
            torch.cuda.empty_cache()
            rows.append({"size": size, "batch": batch, "variant": "eager fp32", "error":
                         f"skipped: GPU out of memory ({str(exc).splitlines()[0][:100]})"})
            runs.pop("eager fp32")
        if "fp32" not in args.eager.split(","):
            runs.pop("eager fp32", None)
        for name, run in runs.items():
            row: dict[str, Any] = {"size": size, "batch": batch, "variant": name}
            try:
                outputs = run(images, masks)
                if reference is not None:
                    row.update(compare(reference, outputs))
                del outputs
                reset_peak(device)
                row["ms"] = median_ms(lambda run=run: run(images, masks), args.eager_warmup,
                                      args.eager_iters)
                row["gib"] = peak_gib(device)
            except (RuntimeError, ValueError, KeyError) as exc:  # e.g. OOM, no such batch
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    for outcome in engines:
        row = {"size": size, "batch": batch, "variant": outcome.job.name}
        if outcome.error is not None:
            row["error"] = outcome.error
        else:
            row.update(ms=outcome.ms, gib=outcome.info.get("gib"))
            if reference is not None:
                row.update(compare(reference, outcome.outputs))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def feature_rows(model: torch.nn.Module, fp16: torch.nn.Module | None, hw: tuple[int, int],
                 batch: int, probes: list[Outcome]) -> list[dict[str, Any]]:
    """Feature-level drift against FP32 eager (bench/probe.py) of FP16 eager and every probe
    engine of this (size, batch)."""
    from codetr_stream.compile.engines.precision import PrecisionWrapper
    from codetr_stream.compile.export import example_inputs
    from probe import FeatureProbe, feature_drift

    device = next(model.parameters()).device
    images, masks = example_inputs(batch, hw, device, seed=1)
    size = f"{hw[1]}x{hw[0]}"
    rows = []
    with torch.inference_mode():
        probe = FeatureProbe(model)
        reference = tuple(t.cpu() for t in probe(images, masks))
        probe.remove_hooks()
        runs = []
        if fp16 is not None:
            probe16 = FeatureProbe(fp16.module)
            got = PrecisionWrapper(probe16, device, "fp16")(images, masks)
            runs.append(("eager fp16", tuple(t.cpu() for t in got)))
            probe16.remove_hooks()
        runs += [(o.job.name, o.outputs) for o in probes if o.outputs is not None]
        for name, outputs in runs:
            rows.append({"size": size, "batch": batch, "variant": name,
                         **feature_drift(reference, outputs, hw)})
            print(json.dumps(rows[-1]), flush=True)
    rows += [{"size": size, "batch": batch, "variant": o.job.name, "error": o.error}
             for o in probes if o.outputs is None]
    return rows


def feature_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| size | batch | variant | memory 1-cos | memory max err (rel.) | queries with "
             "the same slot + token | their state 1-cos | their box drift p99 / max px | "
             "finite |",
             "|" + " --- |" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['batch']} | {r['variant']} | {r['error']} |"
                         + " |" * 5)
            continue
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['variant']} | {r['memory_1_minus_cos']:.1e} | "
            f"{r['memory_rel_max_err']:.1e} | {100 * r['same_token_share']:.0f}% | "
            f"{r['state_1_minus_cos']:.1e} | {r['query_box_p99_px']:.2f} / "
            f"{r['query_box_max_px']:.2f} | {'yes' if r['finite'] else 'NO'} |")
    return "\n".join(lines)


def add_ratios(rows: list[dict[str, Any]], flops: dict[str, float]) -> None:
    """Throughput, fraction of FP16 peak and speed-ups over the eager rows of the same shape."""
    base = {(r["size"], r["batch"], r["variant"]): r.get("ms") for r in rows}
    for r in rows:
        if "ms" not in r:
            continue
        r["images_per_s"] = round(1000 * r["batch"] / r["ms"], 1)
        r["peak_fraction"] = round(flops[r["size"]] * r["batch"] / (r["ms"] / 1000) / PEAK_FP16,
                                   4)
        for ref in ("eager fp32", "eager fp16"):
            ref_ms = base.get((r["size"], r["batch"], ref))
            if ref_ms:
                r[f"speedup_vs_{ref.split()[1]}"] = round(ref_ms / r["ms"], 2)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| size | batch | variant | median ms | img/s | x FP32 | x FP16 eager | "
            "% FP16 peak | GPU GiB | score drift | top-10 / top-100 agree | box drift px |")
    lines = [head, "|" + " --- |" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['batch']} | {r['variant']} | {r['error']} |"
                         + " |" * 8)
            continue
        numerics = "no FP32 reference | |"
        if "score_max_abs" in r:  # top-k keys follow the model's K (top10/top100, tiny: top50)
            ks = sorted(int(k[3:-10]) for k in r if k[:3] == "top" and k.endswith("_agreement"))
            numerics = (f"{r['score_max_abs']:.2e} | "
                        + " / ".join(f"{r[f'top{k}_agreement']:.3f}" for k in ks)
                        + f" | {r[f'top{ks[-1]}_box_drift_px']:.2f}")
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['variant']} | {r['ms']:.2f} | "
            f"{r['images_per_s']} | {r.get('speedup_vs_fp32', '')} | "
            f"{r.get('speedup_vs_fp16', '')} | {100 * r['peak_fraction']:.1f} | "
            f"{'' if r.get('gib') is None else r['gib']} | {numerics} |")
    return "\n".join(lines)


def publish(section: str, script: str, argv: list[str] | None, note: str, body: str,
            results: Path | None) -> str:
    """A side-by-side script's report: `section`, the GPU, torch, date and command line, `note`
    and `body`; printed, and written into the RESULTS.md `results` when given."""
    command = f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([section, "", f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
                      f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; `{command}`; {note}", "", body])
    print("\n" + text, flush=True)
    if results:
        write_results(results, text, section)
    return text


def write_results(path: Path, text: str, section: str = SECTION) -> None:
    """Replace a script's `section` of RESULTS.md (or append it), leaving others' alone."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if section in old:
        start = old.index(section)
        end = old.find("\n## ", start + len(section))
        old = old[:start] + (old[end + 1:] if end != -1 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="co_dino_swin_l")
    p.add_argument("--sizes", default="1152x768", help="comma list of WxH")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--variants", default="baseline",
                   help="comma list of Inductor engine variants, e.g. "
                        "baseline,fold-masks,linear-relu,fold-masks+linear-relu")
    p.add_argument("--eager", default="fp32,fp16", help="eager rows to time (fp32 is the "
                   "numerics reference and always runs once)")
    p.add_argument("--baseline-code", default=None, metavar="DIR",
                   help="another checkout's codetr_stream namespace folder (e.g. the last "
                        "release): its engines are built with that code, side by side")
    p.add_argument("--baseline-variant", default="fold-masks+linear-relu",
                   help="the variant the --baseline-code engines are built with")
    p.add_argument("--baseline-label", default="baseline code", help="their rows' name")
    p.add_argument("--probe", action="store_true",
                   help="also build every engine as a feature probe (bench/probe.py): encoder "
                        "memory / decoder state cosine and per-query box drift against FP32 "
                        "eager")
    p.add_argument("--engine", action="append", default=[], metavar="WxH=DIR",
                   help="prebuilt Inductor engine for a size (its batch sizes; else built here)")
    p.add_argument("--tensorrt", action="append", default=[], metavar="WxH=DIR",
                   help="prebuilt TensorRT engine for a size")
    p.add_argument("--parallel", type=int, default=0,
                   help="engines built at once (default: all)")
    p.add_argument("--warm-start", default="", metavar="VARIANTS",
                   help="comma list of variants whose first engine a fresh process then loads")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--eager-warmup", type=int, default=None, help="default: --warmup")
    p.add_argument("--eager-iters", type=int, default=None, help="default: --iters")
    p.add_argument("--deadline", type=float, default=3600,
                   help="seconds from the start after which unfinished engine builds are "
                        "stopped (and timing goes on without --gpu-lock)")
    p.add_argument("--gpu-lock", default=None, metavar="PATH",
                   help="flock to hold while timing (a concurrent GPU test holds it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--precision", default="fp16", choices=("fp16", "fp32"),
                   help="of the Inductor engines")
    p.add_argument("--title", default="", help="a ### heading for the results section")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--profile", type=Path, default=None,
                   help="folder for torch.profiler top-kernel tables (engines, FP16 eager)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = p.parse_args(argv)
    args.eager_warmup = args.warmup if args.eager_warmup is None else args.eager_warmup
    args.eager_iters = args.iters if args.eager_iters is None else args.eager_iters
    return args


def make_jobs(args: argparse.Namespace) -> list[Job]:
    """Every (variant, size, batch) engine; prebuilt engines stand for the baseline variant;
    --baseline-code adds that code's engines, --probe a feature probe per variant."""
    from codetr_stream.compile.export import check_input_size
    from codetr_stream.compile.model_config import parse_config

    cfg = parse_config(args.config)
    prebuilt = dict(e.split("=", 1) for e in args.engine)
    batches = [int(b) for b in args.batches.split(",")]
    kinds = [(variant, None, "") for variant in args.variants.split(",")]
    if args.baseline_code:
        kinds.insert(0, (args.baseline_variant, str(Path(args.baseline_code).resolve()),
                         args.baseline_label))
    jobs = []
    for variant, code, label in kinds:
        parse_variant(variant)  # a clear error before any build
        for size in args.sizes.split(","):
            check_input_size(cfg, parse_size(size))
            probes = [(b, True) for b in batches] if args.probe else []
            for batch, probe in [(b, False) for b in batches] + probes:
                if variant == "baseline" and size in prebuilt and not (code or probe):
                    directory, built = prebuilt[size], True
                else:
                    tag = "-".join(filter(None, [variant.replace("+", "-"), code and "code",
                                                 probe and "probe"]))
                    directory, built = f"/tmp/codetr_bench_engine_{size}_b{batch}_{tag}", False
                jobs.append(Job(size, parse_size(size), batch, variant, directory, args.config,
                                args.seed, args.warmup, args.iters, built,
                                str(args.profile) if args.profile else None, args.device,
                                args.precision, probe=probe, code=code, label=label))
    return jobs


def build_notes(outcomes: list[Outcome], checksum: float) -> list[str]:
    notes = []
    for o in outcomes:
        if "build_s" in o.info:
            notes.append(f"{o.job.key}: built in {o.info['build_s']} s (cold compile "
                         f"{o.info['compile_s']} s), pass sites {o.info['pass_sites'] or 'none'}")
        if "checksum" in o.info and abs(o.info["checksum"] - checksum) > 1e-6 * abs(checksum):
            notes.append(f"{o.job.key}: WARNING its seeded weights differ from this process's")
    return notes


def main(argv: list[str] | None = None) -> int:
    from codetr_stream.compile import build_model
    from codetr_stream.compile.engines import load_engine
    from codetr_stream.compile.engines.precision import PrecisionWrapper
    from codetr_stream.compile.export import example_inputs

    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/engine.py needs a CUDA GPU (--device cpu: a smoke run of the script "
              "with --precision fp32 --eager fp32)", file=sys.stderr)
        return 2
    started = time.monotonic()
    jobs = make_jobs(args)
    sizes = args.sizes.split(",")
    flops, how = {}, "counted"
    for size in sizes:
        try:
            flops[size] = model_flops(args.config, parse_size(size))
        except Exception as exc:  # the table still needs a figure: spec's count, pixel-scaled
            h, w = parse_size(size)
            flops[size], how = FLOP_1152x768 * h * w / (768 * 1152), f"pixel-scaled ({exc!r})"
    notes = [f"FLOPs/image ({how}): "
             + ", ".join(f"{s} {f / 1e12:.3f} T" for s, f in flops.items())]
    print(notes[0], flush=True)
    outcomes = run_jobs(jobs, parallel=args.parallel or len(jobs),
                        deadline=started + args.deadline, lock=args.gpu_lock)

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(args.seed)
    model = build_model(args.config, device=device).eval()
    notes += build_notes(outcomes, weights_checksum(model))
    fp16 = (PrecisionWrapper(copy.deepcopy(model), device, "fp16").eval()
            if "fp16" in args.eager.split(",") else None)
    trt_dirs = dict(e.split("=", 1) for e in args.tensorrt)
    rows: list[dict[str, Any]] = []
    features: list[dict[str, Any]] = []
    with gpu_lock(args.gpu_lock, started + args.deadline):
        for size in sizes:
            hw = parse_size(size)
            extra = {}
            if size in trt_dirs:
                extra["tensorrt fp16"] = load_engine(trt_dirs[size], device).infer
            for batch in sorted({int(b) for b in args.batches.split(",")}):
                mine = [o for o in outcomes if o.job.size == size and o.job.batch == batch]
                rows += eager_rows(model, fp16, hw, batch, [o for o in mine if not o.job.probe],
                                   extra, args)
                probes = [o for o in mine if o.job.probe]
                if probes:
                    features += feature_rows(model, fp16, hw, batch, probes)
                if args.profile and fp16 is not None:
                    images, masks = example_inputs(batch, hw, device, seed=1)
                    with torch.inference_mode():
                        text = top_kernels(lambda i=images, m=masks: fp16(i, m))
                    (args.profile / f"profile_{size}_b{batch}_eager-fp16.txt").write_text(text)
            add_ratios(rows, flops)
            emit(args, argv, device, rows, features, notes)  # a later step may run out of time
    for variant in filter(None, args.warm_start.split(",")):
        done = [o for o in outcomes if o.job.variant == variant and o.error is None]
        if done:
            notes.append(f"{done[0].job.key}: {warm_start(Path(done[0].job.engine_dir))}")
            print(notes[-1], flush=True)
    notes.append(f"whole run {time.monotonic() - started:.0f} s")
    emit(args, argv, device, rows, features, notes)
    return 0


def emit(args: argparse.Namespace, argv: list[str] | None, device: torch.device,
         rows: list[dict[str, Any]], features: list[dict[str, Any]], notes: list[str]) -> None:
    """The RESULTS.md section (printed too) and the JSON."""
    command = "python bench/engine.py " + " ".join(argv if argv is not None else sys.argv[1:])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        SECTION, "", *([f"### {args.title}", ""] if args.title else []),
        f"{where}, torch {torch.__version__}, {when}; `{command}`; model {args.config} with "
        f"seeded random weights (seed {args.seed}), all-valid masks; median of {args.iters} "
        f"(eager: {args.eager_iters}) CUDA-event timings after warm-up. Drift/agreement are "
        "against FP32 eager on the same batch (agreement: share of FP32's top-k found in the "
        "variant's top-k, same label, IoU >= 0.9). GPU GiB: eager, the peak while timed; an "
        f"engine, all its process holds. Peak {PEAK_FP16 / 1e12:.1f} TFLOP/s dense FP16.", "",
        table(rows), "", *(["Feature-level numerics against FP32 eager, worst image of the batch "
                            "(bench/probe.py; probe engines are built like the timed ones, with "
                            "the features as extra outputs):", "", feature_table(features), ""]
                           if features else []),
        *[f"- {n}" for n in notes]])
    print("\n" + text, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "features": features, "notes": notes},
                                        indent=2))
    write_results(args.results, text)


if __name__ == "__main__":
    sys.exit(main())
