"""`codetr-stream eval`: COCO box AP of engines on one labelled image set, side by side.

Mistakes in what the user passes (flags, the annotation file, its images, categories the model
does not have, a bad checkpoint) are one line and exit 2; an engine that cannot run here (built
for another GPU or library version, missing files) is one line with its rebuild command and
exit 1, as `run` refuses it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from codetr_stream.compile.build_commands import UsageError
from codetr_stream.compile.build_commands import _size as size_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="COCO box AP of engines on a labelled image set, side by side",
        description="Run each engine (and the FP32 eager model of a checkpoint) over the same "
        "images with the daemon's pre- and postprocessing, and print COCO box AP (pycocotools) "
        "and images/s, one row each. Needs pycocotools: pip install 'codetr-stream[eval]'.")
    p.add_argument("--engine", type=Path, action="append", default=[], metavar="DIR",
                   help="engine directory from `codetr-stream compile` (repeatable)")
    p.add_argument("--eager", metavar="CONFIG",
                   help="also the FP32 eager model: built-in config name or .json (with "
                   "--weights)")
    p.add_argument("--weights", type=Path, metavar="PTH", help="checkpoint for --eager")
    p.add_argument("--size", type=size_arg, default=None, metavar="WxH",
                   help="--eager's input size (default: the first engine's, else 1152x768)")
    p.add_argument("--images", type=Path, required=True, metavar="DIR",
                   help="directory of the images (file_name in the annotations is relative "
                   "to it)")
    p.add_argument("--annotations", type=Path, metavar="JSON",
                   help="COCO instances file, e.g. annotations/instances_val2017.json")
    p.add_argument("--reference", action="store_true",
                   help="also score each engine against the first one's detections "
                   "(agreement AP; the first is --eager when given); without --annotations, "
                   "every image in --images")
    p.add_argument("--reference-score", type=float, default=0.3, metavar="S",
                   help="the reference's detections with score >= S are its ground truth "
                   "(default 0.3)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images")
    p.add_argument("--batch", type=int, metavar="N",
                   help="images per engine call (default: each engine's largest batch size; "
                   "--eager: the engines' largest, else 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if any)")
    p.add_argument("--out", type=Path, metavar="JSON", help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=eval_command)


def _check_args(args: argparse.Namespace) -> None:
    if not args.engine and args.eager is None:
        raise UsageError("nothing to evaluate; pass --engine DIR (repeatable) and/or --eager "
                         "CONFIG --weights PTH")
    if (args.eager is None) != (args.weights is None):
        raise UsageError("--eager CONFIG and --weights PTH go together (the FP32 eager model "
                         "of that checkpoint)")
    if args.weights is not None and not args.weights.is_file():
        raise UsageError(f"--weights {args.weights}: no such file (fetch the official "
                         "checkpoint with `codetr-stream fetch-weights`)")
    if args.annotations is None and not args.reference:
        raise UsageError("no ground truth; pass --annotations instances.json, or --reference "
                         "to score agreement with the first engine")
    if args.reference and len(args.engine) + (args.eager is not None) < 2:
        raise UsageError("--reference compares engines: pass at least two (--engine, --eager)")
    if not args.images.is_dir():
        raise UsageError(f"--images {args.images}: no such directory; pass the directory that "
                         "holds the images")
    for flag, value in (("--limit", args.limit), ("--batch", args.batch)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be >= 1")


def _device(name: str | None) -> Any:
    import torch

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _engine_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """Errors raised once torch is in: (exit 2: a bad checkpoint or size for --eager; exit 1:
    an engine that cannot run here)."""
    from codetr_stream.compile.checkpoint import CheckpointError
    from codetr_stream.compile.engines.manifest import IncompatibleEngine, ManifestError
    from codetr_stream.compile.engines.tensorrt import TensorRTUnavailable
    from codetr_stream.compile.export import SizeError

    return (CheckpointError, SizeError), (IncompatibleEngine, ManifestError, TensorRTUnavailable)


def _fail(message: object, code: int) -> int:
    print(f"codetr-stream eval: error: {message}", file=sys.stderr)
    return code


def eval_command(args: argparse.Namespace) -> int:
    from codetr_stream.compile.model_config import ConfigError
    from codetr_stream.daemon.accuracy.coco import DatasetError

    try:
        import pycocotools  # noqa: F401
    except ImportError:
        return _fail("pycocotools is not installed; pip install 'codetr-stream[eval]'", 1)
    try:
        report = _evaluate(args)
    except (UsageError, DatasetError, ConfigError) as exc:
        return _fail(exc, 2)
    except Exception as exc:
        usage, runtime = _engine_errors()
        if not isinstance(exc, usage + runtime):
            raise
        return _fail(exc, 2 if isinstance(exc, usage) else 1)
    print(report.to_markdown(), end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def _evaluate(args: argparse.Namespace) -> Any:
    """The data is checked before torch is imported, so a typo costs no engine load."""
    from codetr_stream.compile.engines.manifest import Manifest
    from codetr_stream.daemon.accuracy.coco import category_ids, load_annotations
    from codetr_stream.daemon.accuracy.image_set import check_images, scan_images

    _check_args(args)
    truth = load_annotations(args.annotations) if args.annotations is not None else None
    if truth is not None:
        images, source = truth.images[:args.limit], str(args.annotations)
    else:
        images, source = scan_images(args.images)[:args.limit], f"--images {args.images}"
    paths = check_images(args.images, images, source)
    manifests = [Manifest.load(path) for path in args.engine]
    from codetr_stream.daemon.accuracy.evaluate import EngineDetector, eager_engine, evaluate

    device = _device(args.device)
    # Every engine is checked as loading will check it: a wrong one fails before minutes of
    # another one's run.
    for path, manifest in zip(args.engine, manifests, strict=True):
        manifest.check_compatible(path, str(device))
        if truth is not None:
            category_ids(manifest.class_names, truth, f"engine {path}")
        if manifest.random_weights:
            print(f"codetr-stream eval: warning: engine {path} has RANDOM weights: its AP is "
                  "meaningless", file=sys.stderr)
    largest = max((m.batch_sizes[-1] for m in manifests), default=1)

    def detectors(scratch: Path) -> Iterator[EngineDetector]:
        if args.eager is not None:
            size = args.size or (manifests[0].input_hw if manifests else (768, 1152))
            path = eager_engine(args.eager, args.weights, scratch / "eager", input_hw=size,
                                batch_size=args.batch or largest)
            yield EngineDetector(path, device, name=f"eager fp32 ({args.weights.name})")
        for path in args.engine:
            yield EngineDetector(path, device, batch_size=args.batch)

    with tempfile.TemporaryDirectory(prefix="codetr-eval-") as scratch:
        return evaluate(detectors(Path(scratch)), images, paths, source=source, truth=truth,
                        reference_score=args.reference_score if args.reference else None,
                        progress=not args.no_progress)
