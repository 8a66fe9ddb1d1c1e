"""Backend "inductor": the exported program compiled by TorchInductor, one CUDA graph per batch.

Files: `program.pt2` (torch.export.save; one dynamic-batch program, or `program_b{N}.pt2` where
the batch does not export dynamically), the compiled graph of each batch size
(`inductor_b{N}.bin`, `artifact.py`) and the weights those graphs take as inputs
(`program_weights.pt`, one per program). At build each program's module gets the FP16 policy's
weights (`precision.py`) and the manifest's graph passes (`passes.py`), then each batch size is
compiled (static shapes, the reduction heuristics of `reductions.py`, the manifest's Inductor
options) and saved. A load reads weights and compiled graphs back and traces and compiles
nothing. Either way each batch size is warmed up and captured in a CUDA graph; `infer` copies
into the graph's static inputs, replays, and clones the outputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from codetr_stream.compile.engines import artifact
from codetr_stream.compile.engines.base import Engine, Outputs
from codetr_stream.compile.engines.eager import save_config
from codetr_stream.compile.engines.manifest import Manifest, ManifestError
from codetr_stream.compile.engines.passes import apply_passes, check_passes
from codetr_stream.compile.engines.precision import (
    compute_dtype,
    drop_dtype_asserts,
    half_matrices_,
)
from codetr_stream.compile.export import example_inputs, export_for_batches
from torch import Tensor, fx, nn

log = logging.getLogger(__name__)

Runner = Callable[[Tensor, Tensor], Outputs]


def _program_files(batch_sizes: list[int], shared: bool) -> dict[int, str]:
    return {b: "program.pt2" if shared else f"program_b{b}.pt2" for b in batch_sizes}


def build(model: nn.Module, out_dir: Path, manifest: Manifest, device: torch.device, *,
          passes: tuple[str, ...] | list[str] = (),
          inductor_options: dict[str, Any] | None = None) -> InductorEngine:
    """Export, prepare (FP16 weights, graph passes), compile and save every batch size.

    `passes` (names from passes.py) and `inductor_options` (Inductor config) are recorded in the
    manifest; the saved graphs hold what they did."""
    manifest.passes = check_passes(passes)
    manifest.inductor_options = dict(inductor_options or {})
    manifest.device_index = device.index
    save_config(out_dir, manifest)
    programs = export_for_batches(model, manifest.input_hw, manifest.batch_sizes, device)
    shared = len({id(p) for p in programs.values()}) == 1 and len(programs) > 1
    for b, name in _program_files(manifest.batch_sizes, shared).items():
        if name not in manifest.files.values():  # a shared program: one file, saved once
            torch.export.save(programs[b], str(out_dir / name))
        manifest.files[f"program_b{b}"] = name
    manifest.notes.append("batch dimension exported dynamic (one program)" if shared
                          else "batch exported static (one program per batch size)")
    runners = _compile(programs, manifest, device, out_dir)
    return InductorEngine(out_dir, manifest, device, runners=runners)


def _compile(programs: dict[int, torch.export.ExportedProgram], manifest: Manifest,
             device: torch.device, out_dir: Path | None) -> dict[int, Runner]:
    """Each batch size's program prepared and compiled, with its weights bound; with `out_dir`,
    weights and compiled graphs are saved there (named in `manifest.files`), and how long each
    compile took is in `manifest.measured`."""
    flat: dict[str, tuple[fx.GraphModule, list[Tensor]]] = {}
    runners: dict[int, Runner] = {}
    seconds: dict[str, float] = {}
    for b in manifest.batch_sizes:
        name = manifest.files[f"program_b{b}"]
        weights_name = name.removesuffix(".pt2") + "_weights.pt"
        if name not in flat:  # a shared program: prepared once
            module, manifest.measured["pass_sites"] = _prepare(programs[b], manifest, device)
            graph, weights = artifact.flatten(module, manifest.precision)
            if out_dir is not None:
                artifact.save_weights(weights, out_dir / weights_name)
            flat[name] = graph, list(weights.values())
        graph, weights = flat[name]
        started = time.perf_counter()
        images, masks = example_inputs(b, manifest.input_hw, device)
        compiled = artifact.compile_graph(graph, weights, images, masks, manifest.precision,
                                          manifest.inductor_options)
        seconds[str(b)] = _since(started)
        runners[b] = partial(compiled, *weights)
        if out_dir is not None:
            compiled.save(path=str(out_dir / f"inductor_b{b}.bin"), format="binary")
            manifest.files.update({f"weights_b{b}": weights_name,
                                   f"inductor_b{b}": f"inductor_b{b}.bin"})
    if out_dir is not None:
        manifest.measured["compile_seconds"] = seconds
    return runners


def _prepare(program: torch.export.ExportedProgram, manifest: Manifest,
             device: torch.device) -> tuple[fx.GraphModule, dict[str, int]]:
    """The program's module on `device` with the engine precision's weights (FP16 matrices),
    then the manifest's passes (after the FP16 copies: folded masks are computed from the
    weights as they are); with how many sites each pass rewrote."""
    module = _on_device(program.module(), device)
    if manifest.precision == "fp16":
        half_matrices_(drop_dtype_asserts(module))
    for param in module.parameters():
        param.requires_grad_(False)
    return module, apply_passes(module, manifest.passes, compute_dtype(manifest.precision))


class InductorEngine(Engine):
    """The compiled graphs of every batch size, each replayed as a CUDA graph (on CUDA).

    `runners` (batch size -> the compiled graph with its weights bound) come from `build`;
    without them the engine directory's files are loaded."""

    def __init__(self, path: Path, manifest: Manifest, device: torch.device, *,
                 runners: dict[int, Runner] | None = None) -> None:
        super().__init__(path, manifest, device)
        # How long each part of a start took, in seconds (a daemon's start is their sum).
        self.start_seconds: dict[str, float] = {}
        if runners is None:
            runners = self._load()
        self._graphs: dict[int, _Graph] = {}
        for b in manifest.batch_sizes:
            started = time.perf_counter()
            self._graphs[b] = _Graph(runners[b], b, manifest.input_hw, device)
            self.start_seconds[f"batch {b} warm-up + graph"] = _since(started)
        log.info("inductor engine started: %s",
                 ", ".join(f"{phase} {s:.1f} s" for phase, s in self.start_seconds.items()))

    def _load(self) -> dict[int, Runner]:
        files, built_on = self.manifest.files, self.manifest.device_index
        if any(f"inductor_b{b}" not in files for b in self.manifest.batch_sizes):
            raise ManifestError(
                f"{self.path}: no compiled graphs (an Inductor engine from before they were "
                f"saved); rebuild it: {self.manifest.rebuild_command(self.path, str(self.device))}")
        if self.device.index != built_on:
            return self._compile_here()
        started = time.perf_counter()
        weights = {name: self._read(name, artifact.load_weights, self.device)
                   for name in {files[f"weights_b{b}"] for b in self.manifest.batch_sizes}}
        self.start_seconds["weights"] = _since(started)
        started = time.perf_counter()
        runners = {b: partial(self._read(files[f"inductor_b{b}"], artifact.load),
                              *weights[files[f"weights_b{b}"]])
                   for b in self.manifest.batch_sizes}
        self.start_seconds["compiled graphs"] = _since(started)
        return runners

    def _read(self, name: str, reader: Callable[..., Any], *args: Any) -> Any:
        """`reader(path, *args)` of the engine's file `name`; a file it cannot read (changed
        since the build, or from another torch build) is a one-line error with the fix."""
        try:
            return reader(self.path / name, *args)
        except Exception as exc:  # torch raises many types for a bad file
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ManifestError(
                f"{self.path / name}: unreadable ({type(exc).__name__}: {first[:200]}); rebuild "
                f"the engine: {self.manifest.rebuild_command(self.path, str(self.device))}"
            ) from exc

    def _compile_here(self) -> dict[int, Runner]:
        """Compile the engine's programs for this device: Inductor's code names the GPU it was
        compiled for (cuda:0 of a build, where a daemon runs engine workers on more GPUs)."""
        log.warning("engine %s was compiled for cuda:%s; compiling it for %s now (minutes; "
                    "one daemon per GPU, each seeing its GPU as cuda:0, starts at once)",
                    self.path, self.manifest.device_index, self.device)
        started = time.perf_counter()
        import codetr_stream.plugin  # noqa: F401  (registers the ops the programs call)

        files = {self.manifest.files[f"program_b{b}"] for b in self.manifest.batch_sizes}
        loaded = {name: torch.export.load(str(self.path / name)) for name in files}
        programs = {b: loaded[self.manifest.files[f"program_b{b}"]]
                    for b in self.manifest.batch_sizes}
        runners = _compile(programs, self.manifest, self.device, None)
        self.start_seconds["compile"] = _since(started)
        return runners

    def _run(self, images: Tensor, masks: Tensor) -> Outputs:
        return self._graphs[images.shape[0]](images, masks)


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


class _Graph:
    """One batch size: warm-up (the first call times the launch configurations of kernels that
    have several) and, on CUDA, a captured CUDA graph."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Outputs], batch: int,
                 hw: tuple[int, int], device: torch.device) -> None:
        self.fn = fn
        self.images, self.masks = example_inputs(batch, hw, device)
        self.graph: torch.cuda.CUDAGraph | None = None
        with torch.inference_mode():
            if device.type != "cuda":
                fn(self.images, self.masks)
                return
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn(self.images, self.masks)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            try:
                # Captured on this graph's own stream: cuBLAS keeps a workspace per stream and
                # the graph replays with the one of its capture stream, so graphs captured on a
                # shared stream (torch's default) must never replay at the same time.
                with torch.cuda.graph(graph, stream=stream):
                    self.outputs = fn(self.images, self.masks)
            except RuntimeError as exc:  # still correct without the graph, only slower
                log.warning("batch %d: CUDA graph capture failed, running without: %s",
                            batch, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                return
            self.graph = graph

    def __call__(self, images: Tensor, masks: Tensor) -> Outputs:
        with torch.inference_mode():
            if self.graph is None:
                return self.fn(images, masks)
            self.images.copy_(images)
            self.masks.copy_(masks)
            self.graph.replay()
            return tuple(o.clone() for o in self.outputs)  # type: ignore[return-value]


def _on_device(module: nn.Module, device: torch.device) -> nn.Module:
    """Move parameters, buffers and the program's lifted tensor constants (plain attributes,
    e.g. level shapes made with torch.tensor) to `device`: a host-to-device copy inside the
    graph would make CUDA graph capture fail."""
    module.to(device)
    for owner in module.modules():
        for name, value in list(vars(owner).items()):
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(owner, name, value.to(device))
    return module


def load(path: Path, manifest: Manifest, device: torch.device) -> InductorEngine:
    return InductorEngine(path, manifest, device)
