"""Offline subcommands: fetch-weights, export, compile. (Benchmarks are scripts in bench/ of a
source checkout: `python bench/engine.py --help`.)

Each handler turns the errors a user can cause (unknown config, missing weights file, bad size,
no GPU, no TensorRT, offline) into one line on stderr (exit code 2 for bad input, 1 for what the
machine or network refuses); torch is imported only inside handlers so `codetr-stream --help`
stays fast.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from codetr_stream.compile.engines.manifest import BACKENDS, PRECISIONS
from codetr_stream.compile.model_config import BUILTIN, ConfigError, parse_config


class UsageError(ValueError):
    """Bad command-line input, reported as one line."""


def _size(text: str) -> tuple[int, int]:
    """"1152x768" (W x H, as people say it) -> (H, W) as tensors are laid out."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must look like 1152x768 (WxH), got {text!r}") from None
    return h, w


# The Inductor engine's graph passes unless --passes says otherwise (compile/engines/passes.py).
DEFAULT_PASSES = ("fold-masks", "linear-relu", "linear-gelu", "merge-linears", "round-norms",
                  "msda-head-major")


def _passes(text: str) -> list[str]:
    """'a,b' -> ['a', 'b'] (known engine passes only); '' -> []."""
    from codetr_stream.compile.engines.passes import check_passes

    try:
        return check_passes(name for name in text.split(",") if name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _batches(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"batch sizes must look like 1,2,4,8, got {text!r}") from None
    if values[0] < 1:
        raise argparse.ArgumentTypeError("batch sizes must be >= 1")
    return values


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="co_dino_swin_l",
                   help=f"built-in name ({', '.join(BUILTIN)}) or a config .json path")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--weights", type=Path, help="mmdet checkpoint (.pth)")
    weights.add_argument("--random-weights", action="store_true",
                         help="seeded random weights (for benchmarks; the manifest says so)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-weights")
    p.add_argument("--size", type=_size, default=(768, 1152), metavar="WxH",
                   help="input canvas, W x H (default: 1152x768)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 (default: the GPU if there is one, else cpu)")


def register(subparsers: argparse._SubParsersAction) -> None:
    from codetr_stream.compile.weights import CACHE_ENV, CHECKPOINT_NAME, default_cache_dir

    p = subparsers.add_parser(
        "fetch-weights", help="download the official Co-DINO checkpoint",
        description=f"Download {CHECKPOINT_NAME} (~900 MB, resumable, sha256-checked) into the "
        f"cache: --cache-dir, else ${CACHE_ENV}, else $XDG_CACHE_HOME/codetr-stream, else "
        f"~/.cache/codetr-stream; here that is {default_cache_dir()}. Prints the file's path.")
    p.add_argument("--url", default=None, help="checkpoint URL (default: OpenMMLab's)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"where to keep it (default: {default_cache_dir()})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_guard(_fetch_weights))

    p = subparsers.add_parser("export", help="torch.export the model at a fixed size (.pt2)")
    _add_model_args(p)
    p.add_argument("--batch", type=_batches, default=[1], help="batch size(s): 1 or 1,2,4,8")
    p.add_argument("--out", type=Path, required=True, help="output .pt2 file")
    p.set_defaults(handler=_guard(_export))

    p = subparsers.add_parser(
        "compile", help="build an engine directory from a checkpoint",
        description="Build an engine directory (weights or compiled program, manifest.json) "
        "for `codetr-stream run`.\n\nDefaults follow the device: on a GPU Inductor FP16 (the "
        "production engine), on a CPU eager FP32 (the CPU path: FP16 needs a GPU, and Inductor "
        "on a CPU builds for minutes for no gain: measured in the README's Quick start).")
    _add_model_args(p)
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="default: fp16 on a GPU, fp32 on the CPU")
    p.add_argument("--batch", type=_batches, default=[1, 2, 4, 8], help="e.g. 1,2,4,8")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="default: inductor on a GPU, eager on the CPU")
    p.add_argument("--passes", type=_passes, default=list(DEFAULT_PASSES),
                   metavar="A,B", help="inductor: engine graph passes (compile/engines/passes.py; "
                   f"default {','.join(DEFAULT_PASSES)}; '' for none)")
    p.add_argument("--out", type=Path, required=True,
                   help="engine directory (new, empty, or an engine to rebuild)")
    p.set_defaults(handler=_guard(_compile))


def _guard(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Known errors -> one line on stderr: exit code 2 for bad input (flags, config, size), 1
    for what the machine or the network refuses (no TensorRT, offline, a broken checkpoint)."""

    def run(args: argparse.Namespace) -> int:
        from codetr_stream.compile.weights import FetchError

        usage: tuple[type[BaseException], ...] = (UsageError, ConfigError)
        refused: tuple[type[BaseException], ...] = (FetchError,)
        try:
            from codetr_stream.compile.checkpoint import CheckpointError
            from codetr_stream.compile.engines.tensorrt import TensorRTUnavailable
            from codetr_stream.compile.export import SizeError

            usage += (SizeError,)
            refused += (CheckpointError, TensorRTUnavailable)
            return handler(args)
        except usage + refused as exc:
            print(f"codetr-stream {args.command}: error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, usage) else 1

    return run


def _fetch_weights(args: argparse.Namespace) -> int:
    from codetr_stream.compile.weights import DEFAULT_URL, fetch, sha256_file

    path = fetch(args.url or DEFAULT_URL, args.cache_dir, progress=not args.no_progress)
    print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB, sha256 {sha256_file(path)[:16]}...)")
    return 0


def _choose_device(args: argparse.Namespace) -> Any:
    import torch

    if args.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device}: not a device name; use cpu, cuda or "
                         "cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA GPU is visible; build on the GPU "
                         "machine, or leave --device out to build the CPU engine here")
    return device


def _choose_build(args: argparse.Namespace, device: Any) -> tuple[str, str]:
    """(backend, precision): the flags, else the device's defaults, said in one line."""
    gpu = device.type == "cuda"
    backend = args.backend or ("inductor" if gpu else "eager")
    precision = args.precision or ("fp16" if gpu else "fp32")
    if not gpu and precision == "fp16":
        raise UsageError("--precision fp16 needs a CUDA GPU and none is visible; use "
                         "--precision fp32 (CPU) or build on the GPU machine")
    if not gpu and backend == "tensorrt":
        raise UsageError("--backend tensorrt needs a CUDA GPU and none is visible; build it on "
                         "a GPU machine with TensorRT, or use --backend eager --precision fp32 "
                         "here")
    if args.backend is None or args.precision is None:
        print(f"codetr-stream compile: building {backend} {precision} on {device} (the "
              f"defaults on a {'GPU' if gpu else 'CPU'}; --backend and --precision choose)",
              file=sys.stderr)
    return backend, precision


def _check_model_args(args: argparse.Namespace) -> tuple[Any, str, dict[str, Any]]:
    """(parsed config, config name, config dict) once config, size and weights file check out;
    runs before any progress bar so that a mistake is the only line printed."""
    from codetr_stream.compile.export import check_input_size

    cfg = parse_config(args.config)
    check_input_size(cfg, args.size)
    if args.weights is not None and args.weights.is_dir():
        raise UsageError(f"--weights {args.weights}: is a directory; pass the checkpoint .pth "
                         "file")
    if args.weights is not None and not args.weights.is_file():
        raise UsageError(f"--weights {args.weights}: no such file (fetch it with "
                         "`codetr-stream fetch-weights`, or pass --random-weights)")
    return cfg, cfg.name, cfg.to_dict()


def _check_out(out: Path) -> bool:
    """Create `out` unless it is a file or a directory of something else: a build writes several
    files into it and replaces manifest.json, so a wrong --out must fail before, not litter.
    True when `out` is new or was empty: a failed build then removes it again."""
    from codetr_stream.compile.engines.manifest import MANIFEST_NAME

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; pass a directory for the engine (new, empty, "
                         "or an engine to rebuild)")
    if out.is_dir() and not (out / MANIFEST_NAME).is_file() and any(out.iterdir()):
        raise UsageError(f"--out {out}: not empty and not an engine directory (no "
                         f"{MANIFEST_NAME}); pass a new or empty directory, or delete it if it "
                         "is an interrupted build")
    fresh = not out.is_dir() or not any(out.iterdir())
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the directory ({exc.strerror}); pass a "
                         "writable path") from None
    return fresh


def _load_model(args: argparse.Namespace, cfg: Any) -> tuple[Any, str | None]:
    """(model, checkpoint sha256): the checkpoint's weights, or seeded random ones."""
    import torch
    from codetr_stream.compile import build_model

    digest = None
    if args.weights is not None:
        from codetr_stream.compile.weights import sha256_file

        digest = sha256_file(args.weights)
        model = build_model(args.config, args.weights)
    else:
        torch.manual_seed(args.seed)
        model = build_model(args.config)
    if not model.class_names:
        model.class_names = [f"class_{i}" for i in range(cfg.head.num_classes)]
    return model, digest


def _export(args: argparse.Namespace) -> int:
    import torch
    from codetr_stream.compile.export import (
        example_inputs,
        export_for_batches,
        max_abs_diff,
    )

    cfg, _, _ = _check_model_args(args)
    device = _choose_device(args)
    if args.out.is_dir():
        raise UsageError(f"--out {args.out}: is a directory; pass the .pt2 file to write")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {args.out}: cannot create {args.out.parent} ({exc.strerror}); "
                         "pass a writable path") from None
    model, _ = _load_model(args, cfg)
    model = model.to(device)
    started = time.perf_counter()
    program = export_for_batches(model, args.size, args.batch, device)[args.batch[-1]]
    seconds = time.perf_counter() - started
    torch.export.save(program, str(args.out))
    images, masks = example_inputs(args.batch[-1], args.size, device, seed=1)
    with torch.no_grad():
        diffs = max_abs_diff(program.module()(images, masks), model(images, masks))
    print(f"{args.out}: exported in {seconds:.1f} s, {args.out.stat().st_size / 2**20:.1f} MiB; "
          f"vs eager max|diff| boxes {diffs[0]:.2e} px, scores {diffs[1]:.2e}, "
          f"labels differing {int(diffs[2])}")
    return 0


def _compile(args: argparse.Namespace) -> int:
    cfg, name, config = _check_model_args(args)
    device = _choose_device(args)
    backend, precision = _choose_build(args, device)
    if backend == "tensorrt":
        from codetr_stream.compile.engines.tensorrt import _import_torch_tensorrt

        _import_torch_tensorrt()
    fresh = _check_out(args.out)
    try:
        manifest, times = _build(args, cfg, name, config, device, backend, precision)
    except BaseException:  # an error or Ctrl-C: no half-built engine left behind
        if fresh:
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    _summary(args.out, manifest, times)
    return 0


def _build(args: argparse.Namespace, cfg: Any, name: str, config: dict[str, Any], device: Any,
           backend: str, precision: str) -> tuple[Any, dict[str, float]]:
    """Model -> engine -> numerics check, under a progress bar that is erased when it ends, so
    an error is never printed after a half-drawn bar."""
    from codetr_stream.compile.engines import build_engine
    from codetr_stream.compile.engines.numerics import check_engine
    from tqdm import tqdm

    times: dict[str, float] = {}
    with tqdm(total=3, desc="compile", unit="stage", leave=False) as bar:
        started = time.perf_counter()
        bar.set_postfix_str("model")
        model, digest = _load_model(args, cfg)
        times["model"] = time.perf_counter() - started
        bar.update()
        bar.set_postfix_str(f"{backend} build")
        started = time.perf_counter()
        options = {"passes": args.passes} if backend == "inductor" else {}
        engine, manifest = build_engine(
            model, args.out, backend=backend, precision=precision, input_hw=args.size,
            batch_sizes=args.batch, config_name=name, config=config, device=device,
            checkpoint=str(args.weights) if args.weights else None, checkpoint_sha256=digest,
            seed=None if args.weights else args.seed, **options)
        times["build"] = time.perf_counter() - started
        bar.update()
        bar.set_postfix_str("verify")
        started = time.perf_counter()
        manifest.measured["numerics"] = check_engine(engine, model)
        manifest.save(args.out)
        times["verify"] = time.perf_counter() - started
        bar.update()
    return manifest, times


def _summary(out: Path, manifest: Any, times: dict[str, float]) -> None:
    h, w = manifest.input_hw
    print(f"\nengine {out}: {manifest.backend} {manifest.precision} {w}x{h} batch "
          f"{','.join(map(str, manifest.batch_sizes))} on {manifest.device_name}"
          + (" (RANDOM WEIGHTS)" if manifest.random_weights else ""))
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<24} {path.stat().st_size / 2**20:10.1f} MiB")
    print("  times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    numerics = manifest.measured.get("numerics", {})
    if numerics:
        print("  vs fp32 eager: " + ", ".join(f"{k} {v}" for k, v in numerics.items()))
    for note in manifest.notes:
        print(f"  note: {note}")
