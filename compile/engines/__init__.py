"""Engines: a compiled model in a directory with `manifest.json`, loaded by the daemon.

`build_engine` writes one from a PyTorch model (backend "eager", "inductor" or "tensorrt");
`load_engine` checks the manifest against this machine and returns an `Engine` whose
`infer(images, masks)` runs on the engine's device. Backends import their heavy libraries lazily.
"""

from __future__ import annotations

import importlib
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codetr_stream.compile.engines.manifest import (
    BACKENDS,
    IncompatibleEngine,
    Manifest,
    ManifestError,
    TensorSpec,
    current_environment,
)

if TYPE_CHECKING:
    import torch
    from codetr_stream.compile.engines.base import Engine
    from torch import nn

__all__ = ["BACKENDS", "IncompatibleEngine", "Manifest", "ManifestError", "build_engine",
           "check_engine_dir", "load_engine"]


def _device(device: str | torch.device | None) -> torch.device:
    import torch

    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_engine_dir(path: str | Path, device: str | torch.device | None = None) -> Manifest:
    """The manifest of the engine in `path`, once it is known to be loadable on `device`.

    Raises `ManifestError` for a missing/malformed manifest or a file it lists that is gone, and
    `IncompatibleEngine` (with the rebuild command) for an engine built for another GPU or
    library version.
    """
    path = Path(path)
    manifest = Manifest.load(path)
    dev = _device(device)
    manifest.check_compatible(path, str(dev))
    missing = sorted(name for name in manifest.files.values() if not (path / name).is_file())
    if missing:  # say so here, not as whatever error the backend's loader hits first
        raise ManifestError(f"{path}: {', '.join(missing)} listed in manifest.json but missing "
                            f"(copied in part?); rebuild the engine: "
                            f"{manifest.rebuild_command(path, str(dev))}")
    sizes = {name: (path / name).stat().st_size for name in manifest.file_bytes
             if (path / name).is_file()}
    changed = sorted(f"{name} ({sizes[name]} bytes, built {size})"
                     for name, size in manifest.file_bytes.items() if sizes.get(name, size) != size)
    if changed:
        raise ManifestError(f"{path}: {', '.join(changed)}: not the size the build wrote (copied "
                            f"in part?); copy the engine again, or rebuild it: "
                            f"{manifest.rebuild_command(path, str(dev))}")
    return manifest


def load_engine(path: str | Path, device: str | torch.device | None = None) -> Engine:
    """Load the engine in directory `path` on `device` (default: the GPU if there is one),
    after `check_engine_dir`."""
    manifest = check_engine_dir(path, device)
    backend = importlib.import_module(f"codetr_stream.compile.engines.{manifest.backend}")
    return backend.load(Path(path), manifest, _device(device))


def io_specs(hw: tuple[int, int], num_detections: int) -> tuple[list[TensorSpec],
                                                                list[TensorSpec]]:
    h, w = hw
    inputs = [TensorSpec("images", ["B", 3, h, w], "float32"),
              TensorSpec("masks", ["B", h, w], "bool")]
    outputs = [TensorSpec("boxes", ["B", num_detections, 4], "float32"),
               TensorSpec("scores", ["B", num_detections], "float32"),
               TensorSpec("labels", ["B", num_detections], "int64")]
    return inputs, outputs


def build_engine(model: nn.Module, out_dir: str | Path, *, backend: str, precision: str,
                 input_hw: tuple[int, int], batch_sizes: list[int], config_name: str,
                 config: dict[str, Any], device: str | torch.device | None = None,
                 checkpoint: str | None = None, checkpoint_sha256: str | None = None,
                 seed: int | None = None, **options: Any) -> tuple[Engine, Manifest]:
    """Compile `model` (FP32, eval) into `out_dir`; the manifest is written last, so a directory
    without one is an interrupted build. Returns the ready engine and its manifest."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    dev = _device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    env = current_environment(str(dev))
    inputs, outputs = io_specs(input_hw, model.config.head.max_per_img)
    manifest = Manifest(
        backend=backend, precision=precision, input_hw=tuple(input_hw),
        batch_sizes=sorted(set(batch_sizes)), config_name=config_name, config=config,
        class_names=list(model.class_names or []), random_weights=checkpoint is None,
        checkpoint=checkpoint, checkpoint_sha256=checkpoint_sha256, seed=seed,
        inputs=inputs, outputs=outputs, device_name=env["device_name"],
        compute_capability=env["compute_capability"], versions=env["versions"],
        built_at=datetime.now(UTC).isoformat(timespec="seconds"))
    started = time.perf_counter()
    module = importlib.import_module(f"codetr_stream.compile.engines.{backend}")
    model = model.to(dev).eval()
    engine = module.build(model, out, manifest, dev, **options)
    if engine is None:
        engine = module.load(out, manifest, dev)
    manifest.build_seconds = round(time.perf_counter() - started, 2)
    manifest.file_bytes = {name: (out / name).stat().st_size
                           for name in sorted(set(manifest.files.values()))}
    manifest.save(out)
    return engine, manifest
