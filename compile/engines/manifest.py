"""`manifest.json`: what an engine directory holds and where it may run.

An engine is only valid for the GPU and library versions it was compiled for (Inductor kernels,
TensorRT plans). The manifest records them so the daemon can refuse a stale engine up front, with
the exact command that rebuilds it, instead of crashing or silently recompiling at start.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
BACKENDS = ("eager", "inductor", "tensorrt")
PRECISIONS = ("fp16", "fp32")


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or malformed."""


class IncompatibleEngine(RuntimeError):
    """An engine built for another GPU or library version; the message says how to rebuild."""


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output; `shape[0]` is "B" (one of the manifest's batch sizes)."""

    name: str
    shape: list[int | str]
    dtype: str


@dataclass
class Manifest:
    backend: str
    precision: str
    input_hw: tuple[int, int]
    batch_sizes: list[int]
    config_name: str
    config: dict[str, Any]
    class_names: list[str]
    random_weights: bool
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    seed: int | None = None
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    file_bytes: dict[str, int] = field(default_factory=dict)  # each file's size at the build
    device_name: str = "cpu"
    compute_capability: str | None = None
    device_index: int | None = None  # the CUDA device compiled for (Inductor's code names it)
    versions: dict[str, str] = field(default_factory=dict)
    built_at: str = ""
    build_seconds: float = 0.0
    measured: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Inductor: the graph passes (engines/passes.py) and Inductor options the engine was compiled
    # with (its rebuild command repeats them).
    passes: list[str] = field(default_factory=list)
    inductor_options: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def save(self, engine_dir: Path) -> Path:
        """Write manifest.json (atomically: a reader sees the old one or the new one)."""
        path = Path(engine_dir) / MANIFEST_NAME
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(partial, path)
        return path

    @classmethod
    def load(cls, engine_dir: Path) -> Manifest:
        path = Path(engine_dir) / MANIFEST_NAME
        build = f"build one with `{_plain_build_command(engine_dir)}`"
        if not Path(engine_dir).is_dir():
            raise ManifestError(f"{engine_dir}: no such engine directory; fix the path, or {build}")
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            clear = "remove it, then " if any(Path(engine_dir).iterdir()) else ""  # see --out
            raise ManifestError(f"{path}: no manifest, so {engine_dir} is not an engine built by "
                                f"`codetr-stream compile` (or its build was interrupted); "
                                f"{clear}{build}") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: unreadable manifest ({exc}); {build}") from exc
        if not isinstance(raw, dict):
            raise ManifestError(f"{path}: malformed manifest (not a JSON object); {build}")
        rebuild = f"rebuild the engine: {_rebuild_hint(raw, engine_dir)}"
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            upgrade = "upgrade codetr-stream, or " if newer else ""
            raise ManifestError(f"{path}: format_version {version!r} is "
                                f"{'newer' if newer else 'older'} than the {FORMAT_VERSION} this "
                                f"codetr-stream reads; {upgrade}{rebuild}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ManifestError(f"{path}: unknown fields {unknown} (hand-edited, or written by a "
                                f"newer codetr-stream); {rebuild}")
        try:
            raw["input_hw"] = tuple(raw["input_hw"])
            raw["inputs"] = [TensorSpec(**s) for s in raw.get("inputs", [])]
            raw["outputs"] = [TensorSpec(**s) for s in raw.get("outputs", [])]
            manifest = cls(**raw)
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{path}: malformed manifest ({exc}); {rebuild}") from exc
        for name, kind in (("files", str), ("file_bytes", int)):
            table = getattr(manifest, name)
            if not isinstance(table, dict) or not all(
                    isinstance(k, str) and isinstance(v, kind) for k, v in table.items()):
                raise ManifestError(f"{path}: malformed manifest ({name} is not a mapping of "
                                    f"file names to {kind.__name__}); {rebuild}")
        if manifest.backend not in BACKENDS or manifest.precision not in PRECISIONS:
            raise ManifestError(f"{path}: backend {manifest.backend!r} / precision "
                                f"{manifest.precision!r} not one of {BACKENDS} / {PRECISIONS}; "
                                f"{rebuild}")
        return manifest

    def rebuild_command(self, engine_dir: Path | str, device: str | None = None) -> str:
        """The `codetr-stream compile` line that rebuilds this engine for `device` (default: this
        machine's). On a CPU it must run there: FP32, and a GPU's Inductor or TensorRT engine
        becomes the CPU path's eager one (Inductor on a CPU builds for minutes, for no gain)."""
        backend, precision, passes = self.backend, self.precision, self.passes
        if (device or current_environment()["device"]).startswith("cpu"):
            precision = "fp32"
            if backend == "tensorrt" or (backend == "inductor" and self.compute_capability):
                backend, passes = "eager", []
        h, w = self.input_hw
        config = self.config_name if self.files.get("config") is None else str(
            Path(engine_dir) / self.files["config"])
        if self.random_weights:
            weights = ["--random-weights", "--seed", str(self.seed or 0)]
        else:
            weights = ["--weights", self.checkpoint or "CHECKPOINT.pth"]
        argv = ["codetr-stream", "compile", "--config", config, *weights,
                "--precision", precision, "--size", f"{w}x{h}",
                "--batch", ",".join(map(str, self.batch_sizes)),
                "--backend", backend, "--out", str(engine_dir)]
        if passes:
            argv[-2:-2] = ["--passes", ",".join(passes)]
        return shlex.join(argv)

    def check_compatible(self, engine_dir: Path | str, device: str | None = None) -> None:
        """Refuse an engine whose compiled code does not fit this machine (see `mismatches`)."""
        env = current_environment(device)
        problems = self.mismatches(env)
        if problems:
            raise IncompatibleEngine(
                f"engine {engine_dir} ({self.backend}, {self.precision}) cannot run here: "
                f"{'; '.join(problems)}. Rebuild it on this machine: "
                f"{self.rebuild_command(engine_dir, env['device'])}")

    def mismatches(self, env: dict[str, Any]) -> list[str]:
        """What differs between the build machine and `env` in ways the backend cannot absorb.

        eager: only needs a GPU for fp16 (weights are portable). inductor: compiled kernels and the
        exported program are tied to torch/triton and the GPU architecture (compute capability).
        tensorrt: plans are tied to the exact GPU model and TensorRT version.
        """
        problems = []
        if self.precision == "fp16" and env["device"] == "cpu":
            problems.append("fp16 engines need a CUDA GPU, this device is cpu")
        if self.backend == "eager":
            return problems
        built_on = "cpu" if self.compute_capability is None else "cuda"
        if built_on != env["device"]:
            problems.append(f"built for {built_on} ({self.device_name}), running on "
                            f"{env['device']} ({env['device_name']})")
        elif self.compute_capability != env["compute_capability"]:
            problems.append(f"built for compute capability {self.compute_capability} "
                            f"({self.device_name}), this GPU is {env['compute_capability']} "
                            f"({env['device_name']})")
        elif self.backend == "tensorrt" and self.device_name != env["device_name"]:
            problems.append(f"TensorRT plan built on {self.device_name}, this GPU is "
                            f"{env['device_name']}")
        keys = ("torch", "triton") if self.backend == "inductor" else ("tensorrt",)
        for key in keys:
            built, here = self.versions.get(key), env["versions"].get(key)
            if built != here:
                problems.append(f"built with {key} {built}, installed is {here}")
        return problems


def _rebuild_hint(raw: dict[str, Any], engine_dir: Path | str) -> str:
    """The exact rebuild command where the manifest still says enough for one, else the plain
    form (a manifest of another format version may lack or rename fields)."""
    known = {f.name for f in fields(Manifest)}
    try:
        return Manifest(**{k: v for k, v in raw.items() if k in known}).rebuild_command(engine_dir)
    except (TypeError, ValueError, AttributeError):
        return _plain_build_command(engine_dir)


def _plain_build_command(engine_dir: Path | str) -> str:
    return f"codetr-stream compile --weights PATH --out {engine_dir}"


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str]:
    """Versions that decide whether compiled artefacts still load (absent libraries left out)."""
    import torch

    found = {"torch": torch.__version__, "python": platform.python_version()}
    for key, dist in (("triton", "triton"), ("tensorrt", "tensorrt"),
                      ("torch_tensorrt", "torch_tensorrt")):
        version = _version(dist)
        if version is not None:
            found[key] = version
    if torch.version.cuda:
        found["cuda"] = torch.version.cuda
    return found


def current_environment(device: str | None = None) -> dict[str, Any]:
    """The device and library facts a manifest is checked against."""
    import torch

    dev = torch.device(device) if device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    env: dict[str, Any] = {"device": dev.type, "device_name": "cpu", "compute_capability": None,
                           "versions": library_versions()}
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        env["device_name"] = torch.cuda.get_device_name(index)
        env["compute_capability"] = f"{major}.{minor}"
    return env
