"""Backend "inductor": the exported program compiled by TorchInductor, one CUDA graph per batch.

Files: `program.pt2` (torch.export.save; one dynamic-batch program, or `program_b{N}.pt2` where
the batch does not export dynamically), `inductor_cache.bin` (Inductor's portable compile cache,
`torch.compiler.save_cache_artifacts`, so a daemon start skips codegen and autotuning), and
optionally `aoti_b{N}.pt2` AOTInductor packages where the installed torch can load them.
FP16 follows `precision.py` (FP16 matrix weights + autocast). At load, the manifest's graph
passes (`passes.py`) rewrite the program's module, then each batch size is compiled
(`torch.compile(fullgraph=True)` with the manifest's Inductor options and the reduction
heuristics of `reductions.py`, static shapes), warmed up and captured in a CUDA graph; `infer`
copies into the graph's static inputs, replays, and clones the outputs.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from codetr_stream.compile.engines import reductions
from codetr_stream.compile.engines.base import Engine, Outputs
from codetr_stream.compile.engines.eager import save_config
from codetr_stream.compile.engines.manifest import Manifest
from codetr_stream.compile.engines.passes import apply_passes, check_passes
from codetr_stream.compile.engines.precision import (
    PrecisionWrapper,
    compute_dtype,
    drop_dtype_asserts,
)
from codetr_stream.compile.export import example_inputs, export_for_batches, export_model
from torch import Tensor, nn

log = logging.getLogger(__name__)

CACHE_FILE = "inductor_cache.bin"
# torch builds whose `aoti_load_package` crashes the process for any package (the GPU machine's
# torch 2.11.0+cu130, on CPU and CUDA, even a single Linear layer: README, "The MSDA kernel").
AOTI_BROKEN_TORCH = ("2.11.",)


def _program_files(batch_sizes: list[int], shared: bool) -> dict[int, str]:
    return {b: "program.pt2" if shared else f"program_b{b}.pt2" for b in batch_sizes}


def build(model: nn.Module, out_dir: Path, manifest: Manifest, device: torch.device, *,
          aoti: bool = False, passes: tuple[str, ...] | list[str] = (),
          inductor_options: dict[str, Any] | None = None) -> InductorEngine:
    """Export, save, compile every batch size (filling Inductor's cache) and save the cache.

    `passes` (names from passes.py) and `inductor_options` (torch.compile options) are recorded
    in the manifest and re-applied at every load."""
    manifest.passes = check_passes(passes)
    manifest.inductor_options = dict(inductor_options or {})
    save_config(out_dir, manifest)
    programs = export_for_batches(model, manifest.input_hw, manifest.batch_sizes, device)
    shared = len({id(p) for p in programs.values()}) == 1 and len(programs) > 1
    names = _program_files(manifest.batch_sizes, shared)
    for b, program in programs.items():
        if names[b] not in manifest.files.values():  # a shared program: one file, saved once
            torch.export.save(program, str(out_dir / names[b]))
        manifest.files[f"program_b{b}"] = names[b]
    manifest.notes.append("batch dimension exported dynamic (one program)" if shared
                          else "batch exported static (one program per batch size)")
    engine = InductorEngine(out_dir, manifest, device, programs=programs)
    manifest.measured["compile_seconds"] = engine.compile_seconds
    if engine.pass_sites:
        manifest.measured["pass_sites"] = engine.pass_sites
    saved = torch.compiler.save_cache_artifacts()
    if saved is not None:
        (out_dir / CACHE_FILE).write_bytes(saved[0])
        manifest.files["inductor_cache"] = CACHE_FILE
    if aoti:
        _build_aoti(engine, out_dir, manifest, device)
    return engine


class InductorEngine(Engine):
    def __init__(self, path: Path, manifest: Manifest, device: torch.device, *,
                 programs: dict[int, torch.export.ExportedProgram] | None = None) -> None:
        super().__init__(path, manifest, device)
        self.compile_seconds: dict[str, float] = {}  # per batch size: compile, warm-up, graph
        # The rest of a start (a daemon's start is these plus compile_seconds).
        self.load_seconds = {"compile cache": 0.0, "programs": 0.0, "passes": 0.0}
        self.pass_sites: dict[str, int] = {}
        self._graphs: dict[int, _Graph] = {}
        self._runners: dict[int, Callable[[Tensor, Tensor], Outputs]] = {}
        self.modules: dict[int, PrecisionWrapper] = {}
        cache = self.path / manifest.files.get("inductor_cache", CACHE_FILE)
        if programs is None and cache.is_file():
            with self._timed("compile cache"):
                torch.compiler.load_cache_artifacts(cache.read_bytes())
        aoti = _aoti_problem() is None and programs is None
        prepared: dict[str, tuple[PrecisionWrapper, Callable[[Tensor, Tensor], Outputs]]] = {}
        options = {**reductions.compile_options(), **manifest.inductor_options}
        for b in manifest.batch_sizes:
            package = manifest.files.get(f"aoti_b{b}")
            if aoti and package:
                self._runners[b] = _aoti_runner(self.path / package)
                continue
            name = manifest.files[f"program_b{b}"]
            if name not in prepared:
                with self._timed("programs"):
                    program = programs[b] if programs else _load_program(self.path / name)
                module = self._prepare(program)
                prepared[name] = module, torch.compile(module, fullgraph=True, dynamic=False,
                                                       options=options)
            self.modules[b], fn = prepared[name]
            started = time.perf_counter()
            with reductions.installed():  # the warm-up compiles
                self._graphs[b] = _Graph(fn, b, manifest.input_hw, device)
            self.compile_seconds[str(b)] = round(time.perf_counter() - started, 2)
        phases = [f"{phase} {s:.1f} s" for phase, s in self.load_seconds.items()]
        phases += [f"batch {b} compile + warm-up {s:.1f} s"
                   for b, s in self.compile_seconds.items()]
        log.info("inductor engine started: %s", ", ".join(phases))

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.load_seconds[phase] += round(time.perf_counter() - started, 2)

    def _prepare(self, program: torch.export.ExportedProgram) -> PrecisionWrapper:
        with self._timed("programs"):
            module = _on_device(program.module(), self.device)
            if self.manifest.precision == "fp16":
                drop_dtype_asserts(module)
            for param in module.parameters():
                param.requires_grad_(False)
            wrapped = PrecisionWrapper(module, self.device, self.manifest.precision)
        # After the FP16 weight copies: folded masks are computed from the weights as they run.
        with self._timed("passes"):
            self.pass_sites = apply_passes(module, self.manifest.passes,
                                           compute_dtype(self.manifest.precision))
        return wrapped

    def _run(self, images: Tensor, masks: Tensor) -> Outputs:
        graph = self._graphs.get(images.shape[0])
        if graph is not None:
            return graph(images, masks)
        with torch.inference_mode():
            return self._runners[images.shape[0]](images, masks)


class _Graph:
    """One batch size: warm-up (this compiles) and, on CUDA, a captured CUDA graph."""

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
                with torch.cuda.graph(graph):
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


def _load_program(path: Path) -> torch.export.ExportedProgram:
    """torch.export.load, after registering the MSDA op the program calls."""
    import codetr_stream.plugin  # noqa: F401  (registers torch.ops.codetr.ms_deform_attn)

    return torch.export.load(str(path))


def _aoti_problem() -> str | None:
    """Why AOTInductor packages cannot be used with this torch, or None if they can."""
    if torch.__version__.startswith(AOTI_BROKEN_TORCH):
        return f"torch {torch.__version__}: aoti_load_package crashes the process (known)"
    return None


_PROBE = """
import sys, tempfile, torch
m = torch.nn.Linear(4, 4).to(sys.argv[1])
ep = torch.export.export(m, (torch.randn(2, 4, device=sys.argv[1]),))
path = torch._inductor.aoti_compile_and_package(ep, package_path=tempfile.mktemp(suffix=".pt2"))
torch._inductor.aoti_load_package(path)(torch.randn(2, 4, device=sys.argv[1]))
"""


def _aoti_runner(package: Path) -> Callable[[Tensor, Tensor], Outputs]:
    model = torch._inductor.aoti_load_package(str(package))

    def run(images: Tensor, masks: Tensor) -> Outputs:
        boxes, scores, labels = model(images, masks)
        return boxes, scores, labels

    return run


def _probe_aoti(device: torch.device) -> str | None:
    """Load a one-layer AOTI package in a child process: a crash there must not end the build."""
    result = subprocess.run([sys.executable, "-c", _PROBE, device.type], capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"AOTInductor probe exited {result.returncode}: {tail}"
    return None


def _build_aoti(engine: InductorEngine, out_dir: Path, manifest: Manifest,
                device: torch.device) -> None:
    """Package each batch size as an AOTInductor .pt2, or record why not (manifest notes)."""
    problem = _aoti_problem() or _probe_aoti(device)
    if problem is not None:
        manifest.notes.append(f"AOTInductor skipped: {problem}")
        log.warning("AOTInductor skipped: %s", problem)
        return
    for b in manifest.batch_sizes:
        program = export_model(engine.modules[b], manifest.input_hw, b, device)
        path = out_dir / f"aoti_b{b}.pt2"
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        manifest.files[f"aoti_b{b}"] = path.name


def load(path: Path, manifest: Manifest, device: torch.device) -> InductorEngine:
    return InductorEngine(path, manifest, device)
